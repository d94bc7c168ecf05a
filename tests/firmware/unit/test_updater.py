"""Content updates: desired rules, chunked fetch, every refusal reason, reported payloads.

The test plays the fleet: it reads what the updater publishes and answers ``fetch`` with
``chunk`` bytes of a package signed by an RFC 8032 signer.  Runs under CPython and
MicroPython.
"""

import asyncio
import binascii
import json
import os
import sys

from _support import ed25519_keypair, simple_package, tempdir
from terminal.content import ContentStore
from terminal.download import signed_message
from terminal.updater import FAILURES_MAX, Updater, parse_desired, parse_key

PREFIX = "fb/v1/d/pt-0123456789ab/"
_keys = {}


def keypair(seed_byte=7):
    if seed_byte not in _keys:
        _keys[seed_byte] = ed25519_keypair(bytes([seed_byte]) * 32)
    return _keys[seed_byte]


def hexs(data):
    return binascii.hexlify(data).decode()


def sha256(data):
    import hashlib

    return hashlib.sha256(data).digest()


def desired(package, version, chunk=1000, seed=7, size=None, digest=None, sig=None):
    size = len(package) if size is None else size
    digest = sha256(package) if digest is None else digest
    if sig is None:
        sig = keypair(seed)[1](signed_message(version, size, digest))
    return json.dumps({"version": version, "size": size, "sha256": hexs(digest),
                       "sig": hexs(sig), "chunk": chunk}).encode()


class Wire:
    """Records what the updater publishes; ``next(leaf)`` awaits the next one on a topic."""

    def __init__(self):
        self.sent = []
        self.cursor = {}
        self.event = asyncio.Event()

    async def publish(self, topic, payload, qos=0, retain=False):
        self.sent.append((topic[len(PREFIX):], payload, qos, retain))
        self.event.set()

    def all(self, leaf):
        return [json.loads(p) for t, p, q, r in self.sent if t == leaf]

    async def next(self, leaf, timeout=10):
        async def find():
            while True:
                start = self.cursor.get(leaf, 0)
                for i in range(start, len(self.sent)):
                    if self.sent[i][0] == leaf:
                        self.cursor[leaf] = i + 1
                        return json.loads(self.sent[i][1])
                self.cursor[leaf] = len(self.sent)
                self.event.clear()
                await self.event.wait()

        return await asyncio.wait_for(find(), timeout)

    async def state(self, state, timeout=10):
        while True:
            body = await self.next("reported", timeout)
            if body["state"] == state:
                return body


def make(installed=None, key=True, max_bytes=65536, timeout=5):
    root = tempdir("upd")
    if installed is not None:
        with open(root + "/content.bin", "wb") as f:
            f.write(installed)
    store = ContentStore(root, 128, 64)
    store.boot()
    wire = Wire()
    up = asyncio.Event()
    up.set()
    applied = []
    updater = Updater(store, wire.publish, up, PREFIX, key=keypair()[0] if key else None,
                      max_bytes=max_bytes, fetch_timeout_s=timeout, on_applied=applied.append,
                      wall_ms=lambda: 1700000000000)
    return updater, wire, store, applied


def chunk_bytes(version, offset, data):
    return version.to_bytes(2, "little") + offset.to_bytes(4, "little") + data


async def serve(wire, updater, package, version, chunk=1000, skip=0, stale=False):
    """Answer fetch requests like the fleet; ``skip`` ignores the first requests."""
    while True:
        request = await wire.next("fetch", 30)
        assert request["display"] == "128x64" and request["version"] == version
        if skip:
            skip -= 1
            continue
        offset = request["offset"]
        if stale:
            stale = False
            updater.on_chunk(chunk_bytes(version, offset + 1, b"junk"))  # wrong offset
            updater.on_chunk(chunk_bytes(version - 1, offset, b"junk"))  # wrong version
        updater.on_chunk(chunk_bytes(version, offset, package[offset:offset + chunk]))


async def run_until(updater, wire, coro, peer=None):
    tasks = [asyncio.create_task(updater.run())]
    if peer is not None:
        tasks.append(asyncio.create_task(peer))
    try:
        return await coro
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.sleep(0)


def test_download_verifies_applies_and_reports():
    async def main():
        package = simple_package(3)
        updater, wire, store, applied = make()
        updater.on_desired(desired(package, 3))
        done = await run_until(updater, wire, wire.state("applied"),
                               serve(wire, updater, package, 3))
        assert done == {"version": 3, "state": "applied", "desired": 3, "reason": None,
                        "ts_ms": 1700000000000}
        states = [r["state"] for r in wire.all("reported")]
        assert states == ["downloading", "applied"], states
        offsets = [r["offset"] for r in wire.all("fetch")]
        assert offsets == list(range(0, len(package), 1000)), offsets
        assert store.version == 3 and [c.version for c in applied] == [3]
        with open(store.bin_path, "rb") as f:
            assert f.read() == package
        for rare in ("terminal.ed25519", "terminal.download", "terminal.package"):
            assert rare not in sys.modules, rare  # loaded for the update, then let go
        for topic, _, qos, retain in wire.sent:
            assert (qos, retain) == ((1, True) if topic == "reported" else (1, False))

    asyncio.run(main())


def test_equal_lower_too_large_and_no_key_are_decided_at_once():
    installed = simple_package(5)
    updater = make(installed, max_bytes=4096)[0]
    updater.on_desired(desired(installed, 5))
    assert (updater.state, updater.reason, updater.desired) == ("applied", None, 5)
    updater.on_desired(desired(simple_package(4), 4))
    assert (updater.state, updater.reason, updater.desired) == ("refused", "downgrade", 4)
    big = simple_package(6)  # > 4096 bytes
    updater.on_desired(desired(big, 6))
    assert (updater.state, updater.reason) == ("refused", "too_large")
    updater = make(installed)[0]
    updater.on_desired(desired(big, 6, chunk=4097))
    assert (updater.state, updater.reason) == ("refused", "too_large")
    updater = make(installed, key=False)[0]
    updater.on_desired(desired(big, 6))
    assert (updater.state, updater.reason, updater.desired) == ("refused", "no_key", 6)
    assert updater.reported()["version"] == 5
    updater.on_desired(b"")  # nothing desired any more
    assert (updater.state, updater.reason, updater.desired) == ("applied", None, None)


def test_malformed_desired_is_refused_as_bad_package():
    updater, _wire, _store, _ = make()
    for payload in (b"{nope", b"[1]", b'{"version": 3}',
                    json.dumps({"version": 70000, "size": 1, "sha256": "00" * 32,
                                "sig": "00" * 64, "chunk": 1}).encode()):
        updater.on_desired(payload)
        assert (updater.state, updater.reason) == ("refused", "bad_package"), payload
    try:
        parse_desired(b'{"version": 1, "size": 5, "chunk": 9, "sha256": "zz", "sig": ""}')
    except ValueError as exc:
        assert "sha256" in str(exc)
    else:
        raise AssertionError("bad hex accepted")


async def refused_with(package, version, updater, wire, **kwargs):
    updater.on_desired(desired(package, version, **kwargs))
    peer_package = kwargs.pop("served", package)
    return await run_until(updater, wire, wire.state("refused"),
                           serve(wire, updater, peer_package, version))


def test_every_download_refusal_keeps_the_old_content():
    async def main():
        old = simple_package(2)
        cases = [
            ("sha256_mismatch", simple_package(3), {"digest": b"\x01" * 32}),
            ("bad_signature", simple_package(3), {"seed": 9}),  # signed by another key
            ("bad_package", simple_package(3)[:-3], {}),  # signed, but a screen is cut
            ("wrong_display", simple_package(3, 296, 128), {}),
            # Signed and downgrade-checked as version 3, but the package itself says 4 (or
            # 1): the version shown must be the one that was signed.
            ("bad_package", simple_package(4), {}),
            ("bad_package", simple_package(1), {}),
        ]
        for reason, package, kwargs in cases:
            updater, wire, store, applied = make(old)
            body = await refused_with(package, 3, updater, wire, **kwargs)
            assert (body["reason"], body["version"], body["desired"]) == (reason, 2, 3), body
            assert store.version == 2 and not applied
            try:
                os.stat(store.tmp_path)
                raise AssertionError("content.tmp left behind after " + reason)
            except OSError:
                pass

    asyncio.run(main())


def test_refused_package_is_not_downloaded_again_on_redelivery():
    async def main():
        package = simple_package(3)
        updater, wire, store, _ = make()
        payload = desired(package, 3, seed=9)
        updater.on_desired(payload)
        await run_until(updater, wire, wire.state("refused"), serve(wire, updater, package, 3))
        fetches = len(wire.all("fetch"))
        updater.on_desired(payload)  # the retained desired again, after a reconnect
        body = await run_until(updater, wire, wire.state("refused"))
        assert body["reason"] == "bad_signature"
        assert len(wire.all("fetch")) == fetches
        updater.on_desired(desired(package, 3))  # the same package, the right signature
        await run_until(updater, wire, wire.state("applied"), serve(wire, updater, package, 3))
        assert store.version == 3

    asyncio.run(main())


def test_five_unanswered_fetches_refuse_with_fetch_timeout():
    async def main():
        updater, wire, _store, _ = make(timeout=0.05)
        updater.on_desired(desired(simple_package(3), 3))
        body = await run_until(updater, wire, wire.state("refused"))
        assert body["reason"] == "fetch_timeout"
        assert [r["offset"] for r in wire.all("fetch")] == [0] * FAILURES_MAX

    asyncio.run(main())


def test_lost_and_stale_chunks_are_asked_again():
    async def main():
        package = simple_package(3)
        updater, wire, store, _ = make(timeout=0.1)
        updater.on_desired(desired(package, 3, chunk=4096))
        await run_until(updater, wire, wire.state("applied"),
                        serve(wire, updater, package, 3, chunk=4096, skip=2, stale=True))
        offsets = [r["offset"] for r in wire.all("fetch")]
        assert offsets[:3] == [0, 0, 0] and store.version == 3, offsets

    asyncio.run(main())


def test_redelivered_desired_does_not_restart_the_download():
    async def main():
        package = simple_package(3)
        updater, wire, _store, _ = make()
        payload = desired(package, 3)
        updater.on_desired(payload)

        async def peer():
            request = await wire.next("fetch")
            updater.on_chunk(chunk_bytes(3, 0, package[:1000]))
            request = await wire.next("fetch")
            assert request["offset"] == 1000
            updater.on_desired(payload)  # retained desired after a reconnect
            updater.link_up()
            await serve(wire, updater, package, 3)

        await run_until(updater, wire, wire.state("applied"), peer())
        offsets = [r["offset"] for r in wire.all("fetch")]
        assert 0 not in offsets[1:], offsets

    asyncio.run(main())


def test_unwritable_storage_is_storage_error():
    async def main():
        updater, wire, store, _ = make()
        os.mkdir(store.tmp_path)  # content.tmp cannot be opened for writing
        body = await refused_with(simple_package(3), 3, updater, wire)
        assert body["reason"] == "storage_error"

    asyncio.run(main())


def test_content_key_parsing():
    assert parse_key("ab" * 32) == b"\xab" * 32
    assert parse_key("AB" * 32) == b"\xab" * 32
    for bad in ("ab" * 31, "zz" * 32, None, 5):
        try:
            parse_key(bad)
        except ValueError:
            continue
        raise AssertionError("accepted %r" % (bad,))


def test_link_down_does_not_count_as_fetch_failures_and_reconnect_re_asks():
    async def main():
        package = simple_package(3)
        updater, wire, store, _ = make(timeout=0.05)
        updater.on_desired(desired(package, 3))
        task = asyncio.create_task(updater.run())
        try:
            await wire.next("fetch")
            updater.up.clear()  # the link drops while the first chunk is awaited
            # Nothing to await: the point is that time passes (3x the failure budget of
            # fetch timeouts) without anything happening.
            await asyncio.sleep(0.05 * 3 * FAILURES_MAX)
            assert updater.state == "downloading" and len(wire.all("fetch")) == 1
            updater.up.set()
            updater.link_up()
            await wire.next("reported")  # reported again after the reconnect
            request = await wire.next("fetch")  # and the chunk asked again
            assert request["offset"] == 0
            peer = asyncio.create_task(serve(wire, updater, package, 3))
            updater.on_chunk(chunk_bytes(3, 0, package[:1000]))
            await wire.state("applied")
            peer.cancel()
            assert store.version == 3
        finally:
            task.cancel()
            await asyncio.sleep(0)

    asyncio.run(main())


def test_a_newer_desired_replaces_the_download_in_progress():
    async def main():
        old, new = simple_package(3), simple_package(4, languages=("en",))
        updater, wire, store, applied = make(timeout=30)  # no test waits for a timeout
        updater.on_desired(desired(old, 3))

        async def peer():
            await wire.next("fetch")
            updater.on_chunk(chunk_bytes(3, 0, old[:1000]))
            await wire.next("fetch")  # offset 1000 of version 3: never answered
            updater.on_desired(desired(new, 4))  # wakes the waiting fetch at once
            await serve(wire, updater, new, 4)

        body = await run_until(updater, wire, wire.state("applied"), peer())
        assert body["version"] == 4 and [c.version for c in applied] == [4]
        with open(store.bin_path, "rb") as f:
            assert f.read() == new
        fetched = [(r["version"], r["offset"]) for r in wire.all("fetch")]
        assert fetched[:3] == [(3, 0), (3, 1000), (4, 0)], fetched

    asyncio.run(main())


def test_signature_check_lets_other_tasks_run():
    async def main():
        from terminal.download import verify

        public, sign = keypair()
        message = signed_message(3, 4242, b"\x07" * 32)
        turns = [0]
        done = [False]

        async def other():  # stands for the button and uploader tasks
            while not done[0]:
                turns[0] += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(other())
        await asyncio.sleep(0)
        ok = await verify(public, message, sign(message))
        done[0] = True
        await task
        assert ok and turns[0] >= 16, turns  # the scalar loop yields every 16 of 256 bits
        assert not await verify(public, message + b"!", sign(message))

    asyncio.run(main())
