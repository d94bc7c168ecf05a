"""Which topics each kind of broker account may use, as dynamic-security role ACLs.

One place for the rules, so the accounts made at run time (``dynsec``) and the initial
configuration (``config_files``) cannot disagree.
"""

from __future__ import annotations

from typing import Any

from fleet.protocol.v1 import DEVICE_ID_RE, Topics

ADMIN_USER = "palaute-admin"
INGEST_USER = "palaute-ingest"
ADMIN_ROLE = "palaute-admin"
INGEST_ROLE = "palaute-ingest"
CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"

# What the fleet reads from every device and what it sends to them (docs/protocol.md,
# docs/content.md).
FROM_DEVICES = ("votes", "health", "status", "reported", "fetch", "cmd/result")
TO_DEVICES = ("ack", "desired", "chunk", "cmd")

Acl = dict[str, Any]


def _acl(acltype: str, topic: str) -> Acl:
    return {"acltype": acltype, "topic": topic, "priority": 0, "allow": True}


def device_role(device_id: str) -> str:
    """The name of the role that confines one device to its own topics."""
    if not DEVICE_ID_RE.match(device_id):
        # A device id becomes part of an ACL topic: "+" or "#" in it would widen the grant.
        raise ValueError(f"device id {device_id!r} must be 'pt-' and 12 lowercase hex digits")
    return f"device-{device_id}"


def device_acls(device_id: str, topic_root: str) -> list[Acl]:
    """Subscribe to and receive everything below ``{root}/d/{id}/``; publish only its uplinks.

    A device never sends on the fleet's downlinks (``desired``, ``ack``, ``chunk``,
    ``cmd``): otherwise a terminal, or whoever holds its credential, could retain a
    ``desired`` of its own and mask the fleet's until the next rollout.
    """
    device_role(device_id)  # validates the id
    topics = Topics(topic_root)
    own = topics.device(device_id, "#")
    acls = [_acl("publishClientSend", topics.device(device_id, leaf)) for leaf in FROM_DEVICES]
    return acls + [_acl(kind, own) for kind in ("publishClientReceive", "subscribePattern",
                                                "unsubscribePattern")]


def ingest_acls(topic_root: str, shared_group: str) -> list[Acl]:
    """Read every device's uplink topics (also through ``$share/<group>/``), write downlinks."""
    topics = Topics(topic_root)
    acls: list[Acl] = []
    for leaf in FROM_DEVICES:
        wildcard = topics.wildcard(leaf)
        filters = [wildcard]
        if shared_group:
            filters.append(f"$share/{shared_group}/{wildcard}")
        for topic_filter in filters:
            acls += [_acl("subscribePattern", topic_filter),
                     _acl("unsubscribePattern", topic_filter)]
        acls.append(_acl("publishClientReceive", wildcard))
    acls += [_acl("publishClientSend", topics.wildcard(leaf)) for leaf in TO_DEVICES]
    return acls


def admin_acls() -> list[Acl]:
    """Send dynamic-security commands and read their answers; nothing else."""
    control = "$CONTROL/dynamic-security/#"
    return [_acl("publishClientSend", control), _acl("publishClientReceive", control),
            _acl("subscribePattern", control), _acl("unsubscribePattern", control)]


# Anything not granted by a role is refused.
DEFAULT_ACL_ACCESS = {"publishClientSend": False, "publishClientReceive": False,
                      "subscribe": False, "unsubscribe": False}
