"""A real Mosquitto broker per test, configured like production: no anonymous access, ACLs.

Each :class:`MosquittoBroker` runs its own ``mosquitto`` on a free 127.0.0.1 port, with every
file (config, password file, ACL file, persistence database, log) in its own directory.
:class:`DynsecMosquittoBroker` (fixture ``dynsec_mosquitto``) instead runs the configuration
``palaute broker-config`` generates, with accounts in the dynamic-security plugin; what that
plugin does differently (it refuses subscriptions, kicks deleted clients) is listed in
tests/fleet/test_broker_accounts.py.

Behaviour of Mosquitto 2.0.x with password and ACL files worth knowing when writing tests
(checked against 2.0.11):

* **Subscriptions are not ACL-checked.**  With an ``acl_file``, a device that subscribes to
  ``#`` or to another device's ``fb/v1/d/<other>/#`` gets a *granted* SUBACK (QoS as asked),
  for MQTT 3.1.1 and 5 alike; it simply never receives a message it may not read, because
  the read ACL is applied when each message is delivered.  (Plugins can deny subscriptions,
  and then the SUBACK carries 0x80; the plain ACL file does not.)
* **Denied publishes are dropped silently.**  A QoS 1 publish to a topic the client may not
  write is still PUBACKed (MQTT 3.1.1 has no way to say no), then discarded.
* **Bad credentials and anonymous clients** both get CONNACK code 5, "not authorised"
  (paho 2.x reports it as reason code 135).
* **Reload is signalled before it happens.**  On SIGHUP the broker logs ``Reloading config.``
  and *then* re-reads the password and ACL files, in its single-threaded main loop.  So after
  the line appears, any connection the broker answers was answered with the new files: that
  is what :meth:`MosquittoBroker.add_user` waits for.
* **Persistence is written on clean shutdown only** (``autosave_interval 0``): ``restart()``
  keeps persistent sessions and their queued QoS 1/2 messages; after ``kill()`` the broker
  comes back with the state of its last clean shutdown, like a crash before an autosave.
"""

from __future__ import annotations

import os
import re
import secrets
import signal
import socket
import struct
import subprocess
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TypeVar
from urllib.parse import quote

import pytest

from fleet.mqtt_url import parse_mqtt_url
from tests.services.common import (
    ServerProcess,
    file_tail,
    free_port,
    kill_process,
    port_open,
    require_binary,
)

INSTALL_HINT = ("run scripts/install-system-packages.sh "
                "(Debian packages mosquitto, mosquitto-clients)")
# Debian installs the broker in /usr/sbin, which is not on a normal user's PATH.
SBIN_DIRS = ("/usr/sbin", "/usr/local/sbin")

ADMIN_USER = "palaute-admin"
# A device's MQTT username is its device id, so "%u" confines it to its own topic subtree.
DEVICE_ACL_PATTERN = "fb/v1/d/%u/#"

START_TIMEOUT = 15.0
RELOAD_TIMEOUT = 10.0

_RUNNING_LINE = re.compile(r"mosquitto version \S+ running")
_RELOAD_LINE = "Reloading config."

CONNACK_ACCEPTED = 0
CONNACK_NOT_AUTHORISED = 5


class MosquittoBroker(ServerProcess):
    """One ``mosquitto`` process with its config, users and persistence in ``workdir``.

    The port is chosen once, so it stays the same across :meth:`restart`.  An admin user
    (:attr:`admin_user` / :attr:`admin_password`, full access plus ``$SYS``) always exists.
    """

    service_name = "mosquitto"
    stop_timeout = 15.0

    host = "127.0.0.1"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.config_file = workdir / "mosquitto.conf"
        self.password_file = workdir / "passwd"
        self.acl_file = workdir / "acl"
        self.persistence_dir = workdir / "persistence"
        self.log_file = workdir / "mosquitto.log"
        # stdout/stderr: errors from before the log file is opened (bad config, port in use).
        self.output_file = workdir / "mosquitto.out"
        self._mosquitto = require_binary("mosquitto", INSTALL_HINT, SBIN_DIRS)
        self._mosquitto_passwd = require_binary("mosquitto_passwd", INSTALL_HINT, SBIN_DIRS)
        self._admins: dict[str, bool] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], MosquittoBroker] | None = None

        self.persistence_dir.mkdir(exist_ok=True)
        self.admin_user = ADMIN_USER
        self.admin_password = secrets.token_urlsafe(16)
        self._set_up_accounts()

    def _set_up_accounts(self) -> None:
        """Password-file mode: the file, the config naming it, and the admin user."""
        # mosquitto refuses to start if the password file named in its config is missing.
        self.password_file.touch()
        self._write_config()
        self.add_user(self.admin_user, self.admin_password, admin=True)

    # -- addresses -------------------------------------------------------------------------

    @property
    def url(self) -> str:
        """``mqtt://127.0.0.1:PORT`` without credentials."""
        return f"mqtt://{self.host}:{self.port}"

    def url_for(self, username: str, password: str) -> str:
        """``mqtt://user:pass@127.0.0.1:PORT``, credentials percent-encoded."""
        credentials = f"{quote(username, safe='')}:{quote(password, safe='')}"
        return f"mqtt://{credentials}@{self.host}:{self.port}"

    # -- users -----------------------------------------------------------------------------

    def add_user(self, username: str, password: str, *, admin: bool = False) -> None:
        """Create or update a user; if the broker runs, return only once it uses the new files.

        Admins may read and write every topic and read ``$SYS/#``; everyone else may only use
        ``fb/v1/d/<username>/#``.
        """
        if not username or ":" in username:
            raise ValueError(f"invalid MQTT username {username!r}")
        subprocess.run([self._mosquitto_passwd, "-b", str(self.password_file), username, password],
                       check=True, capture_output=True, timeout=30)
        self._admins[username] = admin
        self._write_acl()
        if self.running:
            self._reload(username, password)

    def _write_acl(self) -> None:
        lines = [
            "# Generated by tests/services/mosquitto.py.",
            "# Every client: only its own device subtree (username = device id).",
            f"pattern readwrite {DEVICE_ACL_PATTERN}",
            "",
        ]
        for username, admin in sorted(self._admins.items()):
            if admin:
                # "#" never matches topics starting with "$", so $SYS needs its own line.
                lines += [f"user {username}", "topic readwrite #", "topic read $SYS/#", ""]
        _write_atomically(self.acl_file, "\n".join(lines))

    def _reload(self, username: str, password: str) -> None:
        """SIGHUP, then prove the reload finished by logging in with the new credentials."""
        assert self._process is not None
        offset = _size(self.log_file)
        self._process.send_signal(signal.SIGHUP)
        self._wait(lambda: _RELOAD_LINE in _read_from(self.log_file, offset), RELOAD_TIMEOUT,
                   "mosquitto to start reloading its config")
        # The line is logged before the files are re-read, but the reload runs to completion
        # before the single-threaded main loop handles another connection.
        code = self.connack_code(username, password)
        if code != CONNACK_ACCEPTED:
            raise RuntimeError(f"mosquitto refused {username!r} after reload (CONNACK {code})\n"
                               f"{self.log_tail()}")

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the mosquitto process is alive."""
        return self._process is not None and self._process.poll() is None

    @property
    def pid(self) -> int | None:
        """The broker's process id while it runs."""
        return self._process.pid if self._process is not None and self.running else None

    def start(self) -> None:
        """Start the broker and wait until it listens; raise with its log if it exits early."""
        if self.running:
            return
        self._close_log()
        offset = _size(self.log_file)
        self._log = open(self.output_file, "ab")  # noqa: SIM115 (kept open while it runs)
        self._process = subprocess.Popen(
            [self._mosquitto, "-c", str(self.config_file)], cwd=self.workdir,
            stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
            # Own session: a Ctrl-C aimed at pytest must not kill the broker before the
            # fixture's teardown has stopped it cleanly.
            start_new_session=True)
        self._finalizer = weakref.finalize(self, kill_process, self._process)
        try:
            # The "running" line follows a successful bind; checking it (not only the port)
            # catches the case of another process owning the port in the meantime.
            self._wait(lambda: bool(_RUNNING_LINE.search(_read_from(self.log_file, offset)))
                       and port_open(self.port, self.host), START_TIMEOUT,
                       f"mosquitto to listen on port {self.port}")
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """SIGTERM and wait: a clean shutdown that saves the persistence database."""
        self._signal_and_wait(signal.SIGTERM)

    def kill(self) -> None:
        """SIGKILL: a crash; nothing since this process started is saved (no autosave)."""
        self._signal_and_wait(signal.SIGKILL)

    def restart(self) -> None:
        """Clean stop and start on the same port with the same persistence database."""
        self.stop()
        self.start()


    # -- diagnostics -----------------------------------------------------------------------

    def connack_code(self, username: str | None, password: str | None,
                     timeout: float = 5.0) -> int:
        """Log in with a bare MQTT 3.1.1 CONNECT and return the CONNACK code (0 = accepted).

        Dependency-free and synchronous, so it is usable where a paho loop would be overkill.
        """
        with socket.create_connection((self.host, self.port), timeout=timeout) as sock:
            sock.sendall(_connect_packet(f"palaute-probe-{secrets.token_hex(4)}",
                                         username, password))
            reply = _recv_exactly(sock, 4)
            if reply[0] != 0x20:
                raise RuntimeError(f"expected CONNACK from mosquitto, got {reply!r}")
            if reply[3] == CONNACK_ACCEPTED:
                sock.sendall(b"\xe0\x00")  # DISCONNECT, so no "connection lost" in the log.
            return reply[3]

    def log_tail(self, lines: int = 40) -> str:
        """The end of the broker's log file and of its stdout/stderr."""
        return "\n".join(filter(None, (file_tail(self.log_file, lines),
                                        file_tail(self.output_file, lines))))

    def _write_config(self) -> None:
        lines = [
            "# Generated by tests/services/mosquitto.py.",
            "per_listener_settings false",
            "allow_anonymous false",
            f"password_file {self.password_file}",
            f"acl_file {self.acl_file}",
            "persistence true",
            # mosquitto requires the trailing slash on a directory.
            f"persistence_location {self.persistence_dir}/",
            # Save only on clean shutdown (or SIGUSR1), so restart() vs kill() is deterministic.
            "autosave_interval 0",
            # Benchmarks queue many QoS 1 messages for offline persistent sessions; the default
            # (1000) would drop them.
            "max_queued_messages 100000",
            f"listener {self.port} {self.host}",
            # Small MQTT packets: without this, Nagle's algorithm adds latency to every test.
            "set_tcp_nodelay true",
            f"log_dest file {self.log_file}",
            "log_type error",
            "log_type warning",
            "log_type notice",
            "log_type information",
            "log_type subscribe",
            "log_type unsubscribe",
            "connection_messages true",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            # As root, mosquitto 2 switches to the "mosquitto" user, which cannot enter the
            # 0700 pytest temp dir; staying root is harmless for a broker bound to 127.0.0.1.
            lines.append("user root")
        _write_atomically(self.config_file, "\n".join(lines) + "\n")


class DynsecMosquittoBroker(MosquittoBroker):
    """Mosquitto started with the configuration ``palaute broker-config`` generates.

    The generated directory (:attr:`generated_dir`) is used as written; the broker's
    ``-c`` file only adds what the tests need (a log file with subscriptions and connections,
    ``user root`` when run as root) and then ``include_dir``s it.  Accounts
    live in the dynamic-security plugin: :attr:`admin_url` is the fleet's account admin
    (``palaute-admin``) and :attr:`ingest_url` the ingest workers' login, both as the
    generated ``palaute-broker.env`` gives them.  Fails (never skips) if the plugin is missing.
    """

    def _set_up_accounts(self) -> None:
        from fleet.broker.config_files import ENV_NAME, find_plugin
        from fleet.cli import main

        if find_plugin() is None:
            pytest.fail("Mosquitto's dynamic-security plugin (mosquitto_dynamic_security.so) "
                        f"is not installed: {INSTALL_HINT}", pytrace=False)
        self.generated_dir = self.workdir / "generated"
        code = main(["broker-config", "--out", str(self.generated_dir),
                     "--listen", f"{self.host}:{self.port}"])
        if code != 0:
            raise RuntimeError(f"palaute broker-config failed with exit code {code}")
        env = dict(line.split("=", 1)
                   for line in (self.generated_dir / ENV_NAME).read_text().splitlines()
                   if line and not line.startswith("#"))
        self.admin_url = env["PALAUTE_BROKER_ADMIN_URL"]
        self.ingest_url = env["PALAUTE_MQTT_URL"]
        admin = parse_mqtt_url(self.admin_url)
        assert admin.username is not None and admin.password is not None
        self.admin_user, self.admin_password = admin.username, admin.password
        lines = [
            "# Generated by tests/services/mosquitto.py around `palaute broker-config`.",
            f"log_dest file {self.log_file}",
            "log_type subscribe",
            "log_type unsubscribe",
            "log_type information",
            "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        ]
        if os.geteuid() == 0:
            lines.append("user root")  # see MosquittoBroker._write_config
        lines.append(f"include_dir {self.generated_dir}")
        _write_atomically(self.config_file, "\n".join(lines))

    def add_user(self, username: str, password: str, *, admin: bool = False) -> None:
        """Not in this mode: the fleet makes accounts through the plugin (fleet.broker)."""
        raise NotImplementedError("accounts of a dynamic-security broker are made with "
                                  "fleet.broker.dynsec.DynsecAccounts")


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` so that a concurrent reader never sees a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text + ("" if text.endswith("\n") else "\n"))
    os.replace(tmp, path)


def _size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def _read_from(path: Path, offset: int) -> str:
    """The text appended to ``path`` since it was ``offset`` bytes long."""
    if not path.exists():
        return ""
    with open(path, "rb") as log:
        log.seek(offset)
        return log.read().decode(errors="replace")


def _mqtt_string(value: str) -> bytes:
    data = value.encode()
    return struct.pack("!H", len(data)) + data


def _remaining_length(length: int) -> bytes:
    out = bytearray()
    while True:
        length, digit = divmod(length, 128)
        out.append(digit | (0x80 if length else 0))
        if not length:
            return bytes(out)


def _connect_packet(client_id: str, username: str | None, password: str | None) -> bytes:
    """An MQTT 3.1.1 CONNECT with clean session and the given (optional) credentials."""
    flags = 0x02
    payload = _mqtt_string(client_id)
    if username is not None:
        flags |= 0x80
        payload += _mqtt_string(username)
        if password is not None:
            flags |= 0x40
            payload += _mqtt_string(password)
    body = _mqtt_string("MQTT") + bytes([4, flags]) + struct.pack("!H", 10) + payload
    return b"\x10" + _remaining_length(len(body)) + body


def _recv_exactly(sock: socket.socket, count: int) -> bytes:
    data = b""
    while len(data) < count:
        chunk = sock.recv(count - len(data))
        if not chunk:
            raise ConnectionError(f"mosquitto closed the connection after {data!r}")
        data += chunk
    return data


Broker = TypeVar("Broker", bound=MosquittoBroker)


def _running(broker: Broker) -> Iterator[Broker]:
    """Start ``broker`` for one test and stop it cleanly afterwards."""
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()


@pytest.fixture
def dynsec_mosquitto(tmp_path_factory: pytest.TempPathFactory
                     ) -> Iterator[DynsecMosquittoBroker]:
    """A started broker configured by ``palaute broker-config`` (dynamic-security accounts)."""
    yield from _running(DynsecMosquittoBroker(tmp_path_factory.mktemp("mosquitto-dynsec")))


@pytest.fixture
def mosquitto(tmp_path_factory: pytest.TempPathFactory) -> Iterator[MosquittoBroker]:
    """A started broker with admin ``palaute-admin`` (``admin_user`` / ``admin_password``)."""
    yield from _running(MosquittoBroker(tmp_path_factory.mktemp("mosquitto")))
