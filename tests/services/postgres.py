"""A real PostgreSQL for tests: one throw-away cluster per session, a fresh database per test.

``initdb`` and ``postgres`` refuse to run as root.  When the tests run as root (CI containers),
the cluster runs as the unprivileged system user ``palaute-test`` (created on first use) and
lives in its own ``/tmp/palaute-pg-*`` directory: pytest's temp dirs sit below a root-only
0700 directory that the server user could not enter.  That directory is removed by
:meth:`PostgresServer.close`; the server log stays in the pytest ``workdir``.

Durability is switched off (``fsync``, ``synchronous_commit``, ``full_page_writes``): the
cluster is thrown away after the session, and tests spend their time on SQL, not on disk waits.
Authentication is ``trust`` and the server only listens on 127.0.0.1 and in its own socket dir.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from glob import glob
from pathlib import Path
from typing import IO

import psycopg
import pytest
from psycopg import sql
from psycopg.rows import TupleRow

from tests.services.common import ServerProcess, file_tail, free_port, require_binary

INSTALL_HINT = "run scripts/install-system-packages.sh (Debian package postgresql)"
SERVER_OS_USER = "palaute-test"
DB_SUPERUSER = "palaute"

INITDB_TIMEOUT = 60.0
START_TIMEOUT = 30.0
STOP_TIMEOUT = 30.0

SERVER_SETTINGS = {
    "listen_addresses": "127.0.0.1",
    "fsync": "off",
    "synchronous_commit": "off",
    "full_page_writes": "off",
    # Each test's engine keeps a small pool open until it is garbage-collected; the default
    # (100) is within reach of a long session.
    "max_connections": "300",
}


def postgres_bin_dirs() -> tuple[str, ...]:
    """Debian's versioned ``/usr/lib/postgresql/N/bin`` directories, highest version first."""
    def version(directory: str) -> tuple[int, ...]:
        name = Path(directory).parent.name
        return tuple(int(part) for part in name.split(".") if part.isdigit())
    return tuple(sorted(glob("/usr/lib/postgresql/*/bin"), key=version, reverse=True))


def _server_account() -> pwd.struct_passwd | None:
    """The account to run the server as: ``None`` (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(SERVER_OS_USER)
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    result = subprocess.run(
        [useradd, "--system", "--no-create-home", "--user-group", "--home-dir", "/nonexistent",
         "--shell", "/usr/sbin/nologin", SERVER_OS_USER],
        capture_output=True, text=True, timeout=60)
    # Exit code 9: the name exists, e.g. a parallel test session created it just now.
    if result.returncode not in (0, 9):
        raise RuntimeError(f"cannot create system user {SERVER_OS_USER!r} for PostgreSQL "
                           f"(initdb refuses to run as root): {result.stderr.strip()}")
    return pwd.getpwnam(SERVER_OS_USER)


@dataclass
class _Resources:
    """What must be released even if nobody calls close(); holds no reference to the server."""

    process: subprocess.Popen[bytes] | None = None
    remove_dir: Path | None = None


def _release(resources: _Resources) -> None:
    """Last-resort cleanup (garbage collection or interpreter exit)."""
    process = resources.process
    if process is not None and process.poll() is None:
        # The postmaster leads its own process group; take the backends down with it.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if resources.remove_dir is not None:
        shutil.rmtree(resources.remove_dir, ignore_errors=True)
        resources.remove_dir = None


class PostgresServer(ServerProcess):
    """A PostgreSQL cluster created with ``initdb`` and served on a free 127.0.0.1 port.

    Connect as :data:`DB_SUPERUSER` without a password.  :meth:`start` runs ``initdb`` the
    first time; :meth:`stop` keeps the data so the server can be started again; :meth:`close`
    stops it and deletes the data.
    """

    service_name = "PostgreSQL"

    host = "127.0.0.1"
    user = DB_SUPERUSER

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.log_file = workdir / "postgres.log"
        bin_dirs = postgres_bin_dirs()
        self._initdb = require_binary("initdb", INSTALL_HINT, bin_dirs)
        # Use the server binary of the same installation as initdb: versions must match.
        sibling = Path(self._initdb).with_name("postgres")
        self._postgres = (str(sibling) if sibling.is_file()
                          else require_binary("postgres", INSTALL_HINT, bin_dirs))
        self._account = _server_account()
        # Popen arguments that drop root privileges (None: run as ourselves).
        self._uid: int | None = None
        self._gid: int | None = None
        self._extra_groups: list[int] | None = None
        self._env: dict[str, str] | None = None
        if self._account is not None:
            self._uid, self._gid = self._account.pw_uid, self._account.pw_gid
            self._extra_groups = []  # drop root's supplementary groups too
            self._env = dict(os.environ, HOME=self._account.pw_dir, USER=SERVER_OS_USER,
                             LOGNAME=SERVER_OS_USER)
        self._resources = _Resources()
        self._finalizer = weakref.finalize(self, _release, self._resources)
        if self._account is not None:
            self.runtime_dir = Path(tempfile.mkdtemp(prefix="palaute-pg-"))
            self._resources.remove_dir = self.runtime_dir
            self._chown(self.runtime_dir)
        else:
            self.runtime_dir = workdir
        self.data_dir = self.runtime_dir / "data"
        # Unix socket in our own dir: no clash with a system cluster's /var/run/postgresql.
        self.socket_dir = self.runtime_dir / "sockets"
        self._log: IO[bytes] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while the postmaster process is alive."""
        process = self._resources.process
        return process is not None and process.poll() is None

    @property
    def pid(self) -> int | None:
        """The postmaster's process id while it runs."""
        process = self._resources.process
        return process.pid if process is not None and self.running else None

    def start(self) -> None:
        """Create the cluster if needed, start the server and wait until it takes queries."""
        if self.running:
            return
        if not (self.data_dir / "PG_VERSION").exists():
            self._run_initdb()
        self.socket_dir.mkdir(exist_ok=True)
        self._chown(self.socket_dir)
        command = [self._postgres, "-D", str(self.data_dir), "-p", str(self.port),
                   "-k", str(self.socket_dir)]
        for name, value in SERVER_SETTINGS.items():
            command += ["-c", f"{name}={value}"]
        self._close_log()
        # Opened by us (possibly root) and inherited: the server user need not own the log.
        self._log = open(self.log_file, "ab")  # noqa: SIM115 (kept open while it runs)
        self._resources.process = subprocess.Popen(
            command, cwd=self.runtime_dir, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, user=self._uid, group=self._gid,
            extra_groups=self._extra_groups, env=self._env,
            # Own session and process group: Ctrl-C on pytest must not reach the server
            # before teardown, and _release() can kill the postmaster with its backends.
            start_new_session=True)
        try:
            self._wait(self._accepts_queries, START_TIMEOUT,
                       f"PostgreSQL to accept connections on port {self.port}")
        except BaseException:
            self.kill()
            raise

    def stop(self) -> None:
        """Fast shutdown (SIGINT: roll back open sessions, checkpoint, exit) and wait.

        SIGTERM would be a "smart" shutdown that waits for every client to disconnect.
        """
        process = self._resources.process
        if process is not None and process.poll() is None:
            process.send_signal(signal.SIGINT)
            try:
                process.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_log()

    def kill(self) -> None:
        """SIGKILL the postmaster and its backends."""
        _release(_Resources(process=self._resources.process))
        self._close_log()

    def close(self) -> None:
        """Stop the server and delete its data directory if it lives outside ``workdir``."""
        self.stop()
        if self._finalizer is not None:
            self._finalizer()

    # -- databases -------------------------------------------------------------------------

    def url_for(self, dbname: str) -> str:
        """The SQLAlchemy URL of database ``dbname`` (psycopg 3 driver)."""
        return f"postgresql+psycopg://{self.user}@{self.host}:{self.port}/{dbname}"

    def connect(self, dbname: str = "postgres", *, autocommit: bool = False,
                connect_timeout: int = 10) -> psycopg.Connection[TupleRow]:
        """A plain psycopg connection, for set-up and assertions outside SQLAlchemy."""
        return psycopg.connect(host=self.host, port=self.port, user=self.user, dbname=dbname,
                               autocommit=autocommit, connect_timeout=connect_timeout)

    def create_database(self, name: str) -> str:
        """Create an empty database and return its SQLAlchemy URL."""
        with self.connect(autocommit=True) as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return self.url_for(name)

    # -- internals -------------------------------------------------------------------------

    def _run_initdb(self) -> None:
        command = [self._initdb, "-D", str(self.data_dir), "--username", self.user,
                   "--auth", "trust", "--encoding", "UTF8", "--locale", "C",
                   # No fsync of the new files: the cluster is disposable (saves ~1 s).
                   "--no-sync", "--no-instructions"]
        with open(self.log_file, "ab") as log:
            result = subprocess.run(command, cwd=self.runtime_dir, stdout=log,
                                    stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                    timeout=INITDB_TIMEOUT, check=False, user=self._uid,
                                    group=self._gid, extra_groups=self._extra_groups,
                                    env=self._env)
        if result.returncode != 0:
            raise RuntimeError(f"initdb failed (exit {result.returncode})\n{self.log_tail()}")

    def _chown(self, path: Path) -> None:
        if self._account is not None:
            os.chown(path, self._account.pw_uid, self._account.pw_gid)

    def _accepts_queries(self) -> bool:
        try:
            with self.connect(connect_timeout=2) as conn:
                conn.execute("SELECT 1")
            return True
        except psycopg.OperationalError:
            # Not listening yet, or "the database system is starting up".
            return False

    def log_tail(self, lines: int = 40) -> str:
        """The end of the initdb/server log."""
        return file_tail(self.log_file, lines)


_database_numbers = itertools.count(1)


def _database_name(test_name: str) -> str:
    """A unique, readable database name (63 bytes at most) for one test."""
    slug = re.sub(r"[^a-z0-9]+", "_", test_name.lower()).strip("_")
    return f"t{next(_database_numbers):04d}_{slug}"[:63]


@pytest.fixture(scope="session")
def postgres_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    """One PostgreSQL server for the whole test session."""
    server = PostgresServer(tmp_path_factory.mktemp("postgres"))
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture
def postgres_url(postgres_server: PostgresServer, request: pytest.FixtureRequest) -> str:
    """The SQLAlchemy URL of a new, empty database for this test alone."""
    return postgres_server.create_database(_database_name(request.node.name))
