"""Downloading a desired package: fetch chunk by chunk, then hash, signature, header, swap.

Loaded by ``terminal.updater`` only while a download is in progress and dropped afterwards
(its code is heap on a device that runs modules from .mpy files).  The state lives on the
``Updater`` (``u``): the job, the open ``content.tmp``, the running SHA-256, the offset and
the failure count, so that ``desired`` handling can abandon a download at any moment.
"""

import asyncio
import hashlib
import json

from terminal.content import PackageError, unload
from terminal.updater import FAILURES_MAX

SIGNED_PREFIX = b"palaute-content\x00"


def signed_message(version, size, digest):
    """The 54 bytes the fleet signs: tag, u16le version, u32le size, sha256 of the package."""
    return (SIGNED_PREFIX + version.to_bytes(2, "little") + size.to_bytes(4, "little")
            + bytes(digest))


async def verify(key, message, signature):
    """Ed25519 check with the verifier imported for this call only (its tables are freed)."""
    from terminal import ed25519

    result = False
    try:
        for result in ed25519.verify_steps(key, message, signature):
            if result is None:
                await asyncio.sleep(0)
    finally:
        unload("terminal.ed25519")
    return bool(result)


async def fetch_one(u, job):
    """Ask for the chunk at the current offset and handle the answer or the timeout."""
    version = job["version"]
    request = json.dumps({"version": version, "offset": u.offset,
                          "display": u.display}).encode()
    u.got.clear()
    u.chunk_in = None
    try:
        await u.publish(u.prefix + "fetch", request, 1, False)
    except OSError:
        return  # link down: run() waits for it and asks again
    u.emit("fetch", u.offset)
    try:
        await asyncio.wait_for(_wait_chunk(u, job), u.fetch_timeout_s)
    except asyncio.TimeoutError:
        if u.job is job and u.up.is_set():
            u.failures += 1
            if u.failures >= FAILURES_MAX:
                u.refuse(job, "fetch_timeout")
        return
    if u.job is not job:
        return  # replaced by a newer desired while we waited
    data = u.chunk_in
    u.chunk_in = None
    if data is None:
        return  # woken by link_up: ask again
    try:
        _write(u, job, data)
    except OSError:
        u.refuse(job, "storage_error")
        return
    u.failures = 0
    if u.offset == job["size"]:
        await _finish(u, job)


async def _wait_chunk(u, job):
    while True:
        await u.got.wait()
        u.got.clear()
        data = u.chunk_in
        if data is None or u.job is not job:
            return  # link came back or the job changed: the caller decides
        if _matches(u, job, data):
            return
        u.chunk_in = None  # a stale or duplicate chunk: keep waiting for ours


def _matches(u, job, data):
    if len(data) < 7:
        return False
    version = data[0] | data[1] << 8
    offset = int.from_bytes(data[2:6], "little")
    n = len(data) - 6
    return (version == job["version"] and offset == u.offset
            and n <= job["chunk"] and u.offset + n <= job["size"])


def _write(u, job, data):
    f = u.file
    h = u.hasher
    if f is None or h is None:
        # Open for the whole download, closed in _finish/abandon: not a with-block.
        f = u.file = open(u.store.tmp_path, "wb")  # noqa: SIM115
        h = u.hasher = hashlib.sha256()
    body = memoryview(data)[6:]
    f.write(body)
    h.update(body)
    u.offset += len(body)


async def _finish(u, job):
    version = job["version"]
    f = u.file
    h = u.hasher
    u.file = u.hasher = None
    if f is None or h is None:
        return
    f.close()
    digest = h.digest()
    if digest != job["sha256"]:
        u.refuse(job, "sha256_mismatch")
        return
    message = signed_message(version, job["size"], digest)
    ok = await verify(u.key, message, job["sig"])
    if u.job is not job:
        return  # replaced while verifying
    if not ok:
        u.refuse(job, "bad_signature")
        return
    try:
        content = u.store.commit(version)
    except PackageError as exc:
        u.emit("bad_package", str(exc))
        u.refuse(job, exc.reason)
        return
    except OSError:
        u.refuse(job, "storage_error")
        return
    u.job = None
    if u.on_applied is not None:
        u.on_applied(content)
    u.set_state("applied", None, version)
