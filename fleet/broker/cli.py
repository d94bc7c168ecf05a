"""``palaute broker-config``: write the Mosquitto configuration the fleet expects."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

from fleet.broker.config_files import BrokerConfigError, write_broker_config


def cmd_broker_config(args: argparse.Namespace) -> int:
    """Write mosquitto.conf, dynamic-security.json and palaute-broker.env into ``--out``."""
    from fleet.config import Settings

    settings = Settings()
    try:
        files = write_broker_config(
            args.out, listen=args.listen, plugin=args.plugin,
            topic_root=settings.topic_root, shared_group=settings.ingest_shared_group,
            force=args.force)
    except (BrokerConfigError, OSError) as exc:
        print(f"palaute broker-config: {exc}", file=sys.stderr)
        return 2
    # Never the passwords themselves: they are in the 0600 env file only.
    print(f"wrote {files.conf}\nwrote {files.dynsec}\nwrote {files.env} (secret, mode 0600)\n"
          f"start the broker: mosquitto -c {files.conf}\n"
          f"give the fleet its credentials: set -a; . {files.env}; set +a")
    return 0


def add_broker_parser(sub: Any) -> None:
    """Register ``broker-config`` on the ``palaute`` sub-command parser."""
    parser = sub.add_parser(
        "broker-config", help="write a Mosquitto configuration with the fleet's accounts",
        description="Write mosquitto.conf (no anonymous clients, persistence, the "
                    "dynamic-security plugin), its initial dynamic-security.json with the "
                    "palaute-admin and palaute-ingest accounts, and palaute-broker.env "
                    "(0600) holding PALAUTE_MQTT_URL and PALAUTE_BROKER_ADMIN_URL. Topic root "
                    "and shared-subscription group come from PALAUTE_TOPIC_ROOT and "
                    "PALAUTE_INGEST_SHARED_GROUP.")
    parser.add_argument("--out", type=Path, required=True, help="directory to write into")
    parser.add_argument("--listen", default="0.0.0.0:1883",
                        help="HOST:PORT of the broker's listener (default 0.0.0.0:1883)")
    parser.add_argument("--plugin", default=None,
                        help="path of mosquitto_dynamic_security.so (default: found on this "
                             "host)")
    parser.add_argument("--force", action="store_true",
                        help="overwrite existing files (deletes every device account)")
    parser.set_defaults(func=cmd_broker_config)
