"""Over-the-air content updates: ``desired`` in, ``fetch``/``chunk`` download, ``reported`` out.

The decision rules, reasons and topics are docs/content.md's.  One task does everything that
talks to the fleet: it publishes ``reported`` (retained) whenever the state changed or the
link came up, and downloads with one ``fetch`` in flight, so a download never holds more than
one chunk (<= 4 KiB) in RAM and never floods the link the vote uploader shares.  The MQTT
callbacks only store the message and wake the task; nothing here blocks button handling:
the signature check yields to the event loop every few bits.

Content is applied only after size, SHA-256, signature and header checks pass, by one atomic
rename (``ContentStore.commit``).
"""

import asyncio
import hashlib
import json
import sys

from terminal.content import VERSION_MAX, PackageError

CHUNK_MAX = 4096  # protocol limit on chunk payload bytes
FAILURES_MAX = 5  # fetches in a row without the chunk asked for: refuse with fetch_timeout
SIGNED_PREFIX = b"palaute-content\x00"
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


def signed_message(version, size, digest):
    """The 54 bytes the fleet signs: tag, u16le version, u32le size, sha256 of the package."""
    return (SIGNED_PREFIX + version.to_bytes(2, "little") + size.to_bytes(4, "little")
            + bytes(digest))


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


async def _verify(key, message, signature):
    """Ed25519 check with the verifier imported for this call only (its tables are freed)."""
    from terminal import ed25519

    result = False
    try:
        for result in ed25519.verify_steps(key, message, signature):
            if result is None:
                await asyncio.sleep(0)
    finally:
        sys.modules.pop("terminal.ed25519", None)
        package = sys.modules.get("terminal")
        if package is not None and hasattr(package, "ed25519"):
            delattr(package, "ed25519")
    return bool(result)


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
        self._job = None  # the desired dict being downloaded
        # (version, sha256, sig) of the last desired refused for good: the same desired again
        # is refused again without a download; a corrected signature is tried afresh.
        self._refused = None
        self._file = None
        self._hash = None
        self._offset = 0
        self._failures = 0
        self._chunk = None  # the latest chunk payload, handled by the task
        self._got = asyncio.Event()  # a chunk arrived or the link came back
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
            self._abandon()
            self._set("refused", "bad_package", None)
            return
        if job is None:
            self._abandon()
            self._set("applied", None, None)
            return
        version = job["version"]
        current = self._job
        if (current is not None and current["version"] == version
                and current["sha256"] == job["sha256"]):
            self._report_due = True  # the same download, redelivered: keep going
            self._wake.set()
            return
        self._abandon()
        shown = self.store.version
        if version == shown:
            self._set("applied", None, version)
        elif version < shown:
            self._set("refused", "downgrade", version)
        elif job["size"] > self.max_bytes or job["chunk"] > CHUNK_MAX:
            self._set("refused", "too_large", version)
        elif self.key is None:
            self._set("refused", "no_key", version)
        elif (self._refused == (version, job["sha256"], job["sig"])
              and self.desired == version):
            self._report_due = True  # refused this very package already: say so again
            self._wake.set()
        else:
            self._job = job
            self._offset = 0
            self._failures = 0
            self._set("downloading", None, version)

    def on_chunk(self, payload):
        """Handle a ``chunk`` message: keep it for the task (older ones are superseded)."""
        self._chunk = payload
        self._got.set()

    def link_up(self):
        """The link is (re)connected: report again and re-ask the chunk in flight at once."""
        self._report_due = True
        self._got.set()
        self._wake.set()

    # -- state ---------------------------------------------------------------------------------
    def _refuse(self, job, reason):
        """Give up on ``job`` with ``reason``; a package refused for good stays refused."""
        if reason in FINAL_REASONS:
            self._refused = (job["version"], job["sha256"], job["sig"])
        self._abandon()
        self._set("refused", reason, job["version"])

    def _set(self, state, reason, desired):
        self.state = state
        self.reason = reason
        self.desired = desired
        self._report_due = True
        self._wake.set()

    def _abandon(self):
        if self._file is not None:
            try:
                self._file.close()
            except OSError:
                pass
            self._file = None
        if self._job is not None:
            self._job = None
            self.store.discard()
        self._hash = None
        self._chunk = None
        self._got.set()  # a fetch waiting for this job's chunk gives up at once

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
            if self._job is not None:
                await self._fetch_one(self._job)
                continue
            await self._wake.wait()

    async def _fetch_one(self, job):
        """Ask for the chunk at the current offset and handle the answer or the timeout."""
        version = job["version"]
        request = json.dumps({"version": version, "offset": self._offset,
                              "display": self.display}).encode()
        self._got.clear()
        self._chunk = None
        try:
            await self.publish(self.prefix + "fetch", request, 1, False)
        except OSError:
            return  # link down: run() waits for it and asks again
        self.emit("fetch", self._offset)
        try:
            await asyncio.wait_for(self._wait_chunk(job), self.fetch_timeout_s)
        except asyncio.TimeoutError:
            if self._job is job and self.up.is_set():
                self._failures += 1
                if self._failures >= FAILURES_MAX:
                    self._refuse(job, "fetch_timeout")
            return
        if self._job is not job:
            return  # replaced by a newer desired while we waited
        data = self._chunk
        self._chunk = None
        if data is None:
            return  # woken by link_up: ask again
        try:
            self._write(job, data)
        except OSError:
            self._refuse(job, "storage_error")
            return
        self._failures = 0
        if self._offset == job["size"]:
            await self._finish(job)

    async def _wait_chunk(self, job):
        while True:
            await self._got.wait()
            self._got.clear()
            data = self._chunk
            if data is None or self._job is not job:
                return  # link came back or the job changed: the caller decides
            if self._matches(job, data):
                return
            self._chunk = None  # a stale or duplicate chunk: keep waiting for ours

    def _matches(self, job, data):
        if len(data) < 7:
            return False
        version = data[0] | data[1] << 8
        offset = int.from_bytes(data[2:6], "little")
        n = len(data) - 6
        return (version == job["version"] and offset == self._offset
                and n <= job["chunk"] and self._offset + n <= job["size"])

    def _write(self, job, data):
        f = self._file
        h = self._hash
        if f is None or h is None:
            # Open for the whole download, closed in _finish/_abandon: not a with-block.
            f = self._file = open(self.store.tmp_path, "wb")  # noqa: SIM115
            h = self._hash = hashlib.sha256()
        body = memoryview(data)[6:]
        f.write(body)
        h.update(body)
        self._offset += len(body)

    async def _finish(self, job):
        version = job["version"]
        f = self._file
        h = self._hash
        self._file = self._hash = None
        if f is None or h is None:
            return
        f.close()
        digest = h.digest()
        if digest != job["sha256"]:
            self._refuse(job, "sha256_mismatch")
            return
        message = signed_message(version, job["size"], digest)
        ok = await _verify(self.key, message, job["sig"])
        if self._job is not job:
            return  # replaced while verifying
        if not ok:
            self._refuse(job, "bad_signature")
            return
        try:
            content = self.store.commit()
        except PackageError as exc:
            self.emit("bad_package", str(exc))
            self._refuse(job, exc.reason)
            return
        except OSError:
            self._refuse(job, "storage_error")
            return
        self._job = None
        if self.on_applied is not None:
            self.on_applied(content)
        self._set("applied", None, version)
