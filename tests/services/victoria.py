"""VictoriaMetrics as the InfluxDB-compatible stand-in that ``influxdb-client`` writes to in tests.

Production stores telemetry in InfluxDB 2.x/3.x, which the test machines cannot install.
VictoriaMetrics (Debian package ``victoria-metrics``, 1.79) accepts the same line-protocol
writes on ``/api/v2/write`` (as well as ``/write`` and ``/influx/write``), so the real
``influxdb_client`` can write to :attr:`VictoriaMetrics.url` unchanged.

How a point is stored (found by experiment against 1.79.5)::

    InfluxDBClient(url, token="x", org="o").write_api(write_options=SYNCHRONOUS).write(
        bucket="palaute",
        record=Point("health").tag("device", "pt-0123456789ab").field("heap_free", 1234))

becomes the series ``health_heap_free{device="pt-0123456789ab"}`` with value ``1234``:

* one series per *field*, named ``{measurement}_{field}`` (``-influxMeasurementFieldSeparator``);
* every *tag* becomes a label of the same name and value;
* ``bucket``, ``org`` and the token are ignored: ``/api/v2/write`` adds **no** ``db`` label.
  (Only the v1 endpoint ``/write?db=NAME`` adds ``db="NAME"``.)
* integer and float fields become float64 samples, booleans 1/0; **string fields are stored
  as 0**, so their content cannot be checked here;
* timestamps are kept with millisecond precision; a point without one gets the time the server
  received it.

Making writes visible at once, without sleeping: the HTTP write returns only after the rows
are handed to storage, but storage buffers them (and the new series' index entries) for up to
~10 s before searches see them.  ``GET /internal/force_flush`` makes everything written so far
searchable; :meth:`VictoriaMetrics.flush` calls it and :meth:`~VictoriaMetrics.query` /
:meth:`~VictoriaMetrics.export` do so first.  Second catch: VictoriaMetrics' notion of "now" has
whole-second resolution, so a query without an explicit time does not see samples from the
current second; the helpers therefore query at *now + 1 s*.  The server also runs with
``-search.disableCache`` (no stale cached results) and ``-search.latencyOffset=0s`` (no 30 s
hiding of recent samples).  Even so, under load a *new* series can reach the index a moment
after ``force_flush`` returns, so tests that expect data pass ``expect=N`` to
:meth:`~VictoriaMetrics.query`, which re-flushes and re-queries for a bounded time.
Do not poll ``/metrics`` to see whether a write arrived: that page
is refreshed lazily, about once a second.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import urllib.error
import urllib.parse
import urllib.request
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import pytest

from tests.services.common import (
    ServerProcess,
    file_tail,
    free_port,
    kill_process,
    require_binary,
    wait_until,
)

INSTALL_HINT = "run scripts/install-system-packages.sh (Debian package victoria-metrics)"
START_TIMEOUT = 30.0
HTTP_TIMEOUT = 10.0
# How far past "now" the helpers query; see the module docstring.
NOW_MARGIN_S = 1.0
# How long query(expect=N) waits for freshly written series to become searchable.
VISIBLE_TIMEOUT = 10.0


class VictoriaMetrics(ServerProcess):
    """A ``victoria-metrics`` single-node server on a free 127.0.0.1 port, data in ``workdir``."""

    service_name = "VictoriaMetrics"
    stop_timeout = 30.0

    host = "127.0.0.1"

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.data_dir = workdir / "data"
        self.log_file = workdir / "victoria-metrics.log"
        self._binary = require_binary("victoria-metrics", INSTALL_HINT)
        self._process: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None
        self._finalizer: weakref.finalize[[subprocess.Popen[bytes]], VictoriaMetrics] | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:PORT``: the URL to give ``InfluxDBClient``."""
        return f"http://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        """True while the server process is alive."""
        return self._process is not None and self._process.poll() is None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        """Start the server and wait until ``/health`` answers OK."""
        if self.running:
            return
        self._close_log()
        self._log = open(self.log_file, "ab")  # noqa: SIM115 (kept open while it runs)
        self._process = subprocess.Popen(
            [self._binary,
             f"-httpListenAddr={self.host}:{self.port}",
             f"-storageDataPath={self.data_dir}",
             "-retentionPeriod=1y",
             # Recent samples visible to queries, and no result cache that could hold a
             # pre-write answer: tests query right after writing.
             "-search.latencyOffset=0s",
             "-search.disableCache"],
            cwd=self.workdir, stdout=self._log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            # Own session: a Ctrl-C aimed at pytest must not kill the server before teardown.
            start_new_session=True)
        self._finalizer = weakref.finalize(self, kill_process, self._process)
        try:
            self._wait(self._healthy, START_TIMEOUT, f"VictoriaMetrics on port {self.port}")
        except BaseException:
            self.stop()
            raise

    def stop(self) -> None:
        """SIGTERM (VictoriaMetrics flushes and exits) and wait; SIGKILL if it hangs."""
        self._signal_and_wait(signal.SIGTERM)

    # -- reading back what was written -----------------------------------------------------

    def flush(self) -> None:
        """Make every sample written so far visible to queries and exports."""
        self._get("/internal/force_flush")

    def query(self, promql: str, *, flush: bool = True,
              expect: int | None = None) -> list[dict[str, Any]]:
        """Run an instant query (``/api/v1/query``) and return ``data.result``.

        Each element is ``{"metric": {labels...}, "value": [unix_seconds, "value"]}``.  The
        query time is now + 1 s, so samples from the current second are included; instant
        queries only see the latest sample of each series within the last 5 minutes.

        With ``expect=N`` the flush and query repeat (for at most ``VISIBLE_TIMEOUT``) until
        at least N series are visible: under load VictoriaMetrics registers a new series in
        its index shortly *after* ``force_flush`` returns, and it offers no event to await.
        """
        def run() -> list[dict[str, Any]]:
            if flush:
                self.flush()
            at = f"{time.time() + NOW_MARGIN_S:.3f}"
            body = json.loads(self._get("/api/v1/query", {"query": promql, "time": at}))
            if body.get("status") != "success":
                raise RuntimeError(f"VictoriaMetrics query {promql!r} failed: {body}")
            found: list[dict[str, Any]] = body["data"]["result"]
            return found

        result = run()
        if expect is not None and len(result) < expect:
            def visible() -> bool:
                nonlocal result
                result = run()
                return len(result) >= expect

            wait_until(visible, VISIBLE_TIMEOUT, f"{expect} series for {promql!r}",
                       interval=0.05)
        return result

    def export(self, match: str, *, flush: bool = True) -> list[dict[str, Any]]:
        """Every raw sample of the series matching ``match`` (``/api/v1/export``).

        Each element is ``{"metric": {labels...}, "values": [...], "timestamps": [ms...]}``.
        """
        if flush:
            self.flush()
        end = f"{time.time() + NOW_MARGIN_S:.3f}"
        text = self._get("/api/v1/export", {"match[]": match, "start": "0", "end": end})
        return [json.loads(line) for line in text.splitlines() if line.strip()]

    # -- internals -------------------------------------------------------------------------

    def _get(self, path: str, params: dict[str, str] | None = None) -> str:
        url = self.url + path
        if params:
            url += "?" + urllib.parse.urlencode(params)
        try:
            with urllib.request.urlopen(url, timeout=HTTP_TIMEOUT) as response:
                return str(response.read().decode())
        except urllib.error.HTTPError as exc:
            raise RuntimeError(f"GET {url}: HTTP {exc.code}: {exc.read().decode(errors='replace')}"
                               ) from None

    def _healthy(self) -> bool:
        try:
            return self._get("/health").strip() == "OK"
        except (OSError, RuntimeError):
            return False

    def log_tail(self, lines: int = 40) -> str:
        """The end of the server's log."""
        return file_tail(self.log_file, lines)


@pytest.fixture
def victoria(tmp_path_factory: pytest.TempPathFactory) -> Iterator[VictoriaMetrics]:
    """A started, empty VictoriaMetrics for this test alone.

    Function scope because it is cheap (about 0.1 s to start and stop) and lets a test assert
    on *all* stored series without seeing other tests' writes.
    """
    server = VictoriaMetrics(tmp_path_factory.mktemp("victoria"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
