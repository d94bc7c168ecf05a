"""Over-the-air content updates: ``desired`` in, ``fetch``/``chunk`` download, ``reported`` out.

The decision rules, reasons and topics are docs/content.md's.  One task does everything that
talks to the fleet: it publishes ``reported`` (retained) whenever the state changed or the
link came up, and downloads with one ``fetch`` in flight, so a download never holds more than
one chunk (<= 4 KiB) in RAM and never floods the link the vote uploader shares.  The MQTT
callbacks only store the message and wake the task; nothing here blocks button handling:
the signature check yields to the event loop every few bits.

Content is applied only after size, SHA-256, signature and header checks pass, by one atomic
rename (``ContentStore.commit``).  The download itself is ``terminal.download``, loaded only
while there is something to download.
"""

import asyncio
import json

from terminal.content import VERSION_MAX, unload

CHUNK_MAX = 4096  # protocol limit on chunk payload bytes
FAILURES_MAX = 5  # fetches in a row without the chunk asked for: refuse with fetch_timeout
# Refusals of the package itself: a re-delivered ``desired`` for the same package (after
# every reconnect, it is retained) is not downloaded again.
FINAL_REASONS = ("sha256_mismatch", "bad_signature", "bad_package", "wrong_display",
                 "too_large", "downgrade", "no_key")
_HEX = "0123456789abcdef"


def parse_key(text):
    """The 32-byte public key from 64 hex digits; ValueError if it is not that."""
    if not isinstance(text, str) or len(text) != 64 or not all(c in _HEX for c in text.lower()):
        raise ValueError("must be 64 hex digits (the fleet's content public key)")
    return bytes(int(text[i:i + 2], 16) for i in range(0, 64, 2))


def _hex_bytes(text, n):
    if not isinstance(text, str) or len(text) != 2 * n or not all(c in _HEX for c in text):
        return None
    return bytes(int(text[i:i + 2], 16) for i in range(0, 2 * n, 2))


def parse_desired(payload):
    """A ``desired`` payload as a dict with bytes ``sha256``/``sig``; None when empty.

    ValueError names the first bad field.
    """
    if not payload:
        return None
    try:
        data = json.loads(payload)
    except ValueError:
        raise ValueError("desired is not JSON") from None
    if not isinstance(data, dict):
        raise ValueError("desired is not an object")
    for key, low, high in (("version", 1, VERSION_MAX), ("size", 1, 0xFFFFFFFF),
                           ("chunk", 1, 0xFFFFFFFF)):
        value = data.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise ValueError("desired.%s missing or out of range" % key)
    digest = _hex_bytes(data.get("sha256"), 32)
    sig = _hex_bytes(data.get("sig"), 64)
    if digest is None or sig is None:
        raise ValueError("desired.sha256/sig must be 64/128 lowercase hex digits")
    data["sha256"] = digest
    data["sig"] = sig
    return data


class Updater:
    """Content update state for one terminal.

    ``publish(topic, payload, qos, retain)`` is the MQTT client's; ``up`` the link's
    asyncio.Event; ``on_applied(content)`` is called once new content is current;
    ``emit(name, data)`` reports observable changes (``reported``, ``fetch``).
    """

    def __init__(self, store, publish, up, prefix, *, key=None, max_bytes=65536,
                 fetch_timeout_s=10, on_applied=None, emit=None, wall_ms=None):
        self.store = store
        self.publish = publish
        self.up = up
        self.prefix = prefix
        self.key = key
        self.max_bytes = max_bytes
        self.fetch_timeout_s = fetch_timeout_s
        self.on_applied = on_applied
        self.emit = emit or (lambda name, data=None: None)
        self.wall_ms = wall_ms or (lambda: None)
        self.display = "%dx%d" % (store.width, store.height)
        self.state = "applied"
        self.reason = None
        self.desired = None  # the version desired, None: nothing desired
        if store.boot_error is not None:  # content.bin unusable: showing the default
            self.state = "refused"
            self.reason = store.boot_error.split(":")[0]
        self.job = None  # the desired dict being downloaded
        # (version, sha256, sig) of the last desired refused for good: the same desired again
        # is refused again without a download; a corrected signature is tried afresh.
        self._refused = None
        self.file = None
        self.hasher = None
        self.offset = 0
        self.failures = 0
        self.chunk_in = None  # the latest chunk payload, handled by the task
        self.got = asyncio.Event()  # a chunk arrived or the link came back
        self._wake = asyncio.Event()
        self._report_due = True
        self.reports = 0

    # -- inputs (called from the MQTT receive path: store and wake, nothing slow) -----------
    def on_desired(self, payload):
        """Handle a ``desired`` message (see docs/content.md for the rules)."""
        try:
            job = parse_desired(payload)
        except ValueError as exc:
            self.emit("bad_desired", str(exc))
            self.abandon()
            self.set_state("refused", "bad_package", None)
            return
        if job is None:
            self.abandon()
            self.set_state("applied", None, None)
            return
        version = job["version"]
        current = self.job
        if (current is not None and current["version"] == version
                and current["sha256"] == job["sha256"]):
            self._report_due = True  # the same download, redelivered: keep going
            self._wake.set()
            return
        self.abandon()
        shown = self.store.version
        if version == shown:
            self.set_state("applied", None, version)
        elif version < shown:
            self.set_state("refused", "downgrade", version)
        elif job["size"] > self.max_bytes or job["chunk"] > CHUNK_MAX:
            self.set_state("refused", "too_large", version)
        elif self.key is None:
            self.set_state("refused", "no_key", version)
        elif (self._refused == (version, job["sha256"], job["sig"])
              and self.desired == version):
            self._report_due = True  # refused this very package already: say so again
            self._wake.set()
        else:
            self.job = job
            self.offset = 0
            self.failures = 0
            self.set_state("downloading", None, version)

    def on_chunk(self, payload):
        """Handle a ``chunk`` message: keep it for the task (older ones are superseded)."""
        self.chunk_in = payload
        self.got.set()

    def link_up(self):
        """The link is (re)connected: report again and re-ask the chunk in flight at once."""
        self._report_due = True
        self.got.set()
        self._wake.set()

    # -- state ---------------------------------------------------------------------------------
    def refuse(self, job, reason):
        """Give up on ``job`` with ``reason``; a package refused for good stays refused."""
        if reason in FINAL_REASONS:
            self._refused = (job["version"], job["sha256"], job["sig"])
        self.abandon()
        self.set_state("refused", reason, job["version"])

    def set_state(self, state, reason, desired):
        """Change the reported state (and report it soon)."""
        self.state = state
        self.reason = reason
        self.desired = desired
        self._report_due = True
        self._wake.set()

    def abandon(self):
        """Drop the download in progress, if any, and its ``content.tmp``."""
        if self.file is not None:
            try:
                self.file.close()
            except OSError:
                pass
            self.file = None
        if self.job is not None:
            self.job = None
            self.store.discard()
        self.hasher = None
        self.chunk_in = None
        self.got.set()  # a fetch waiting for this job's chunk gives up at once

    def reported(self):
        """The ``reported`` payload (docs/content.md)."""
        return {"version": self.store.version, "state": self.state, "desired": self.desired,
                "reason": self.reason, "ts_ms": self.wall_ms()}

    # -- the task --------------------------------------------------------------------------
    async def run(self):
        """Publish ``reported`` when due and download the desired package, forever."""
        while True:
            self._wake.clear()
            if not self.up.is_set():
                await self.up.wait()
                continue
            if self._report_due:
                self._report_due = False
                body = self.reported()
                try:
                    await self.publish(self.prefix + "reported", json.dumps(body).encode(),
                                       1, True)
                    self.reports += 1
                    self.emit("reported", body)
                except OSError:
                    # The link dropped: pause rather than spin while it still looks up.
                    self._report_due = True
                    await asyncio.sleep(1)
                continue
            job = self.job
            if job is not None:
                # The download code is loaded only while there is something to download.
                from terminal import download

                await download.fetch_one(self, job)
                if self.job is None:
                    unload("terminal.download")
                continue
            await self._wake.wait()
