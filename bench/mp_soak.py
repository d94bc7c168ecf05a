"""Soak the whole terminal firmware under MicroPython: heap, latency and bytes written.

Run by ``bench/firmware_bench.py`` (not by hand)::

    micropython -X heapsize=N -m mp_soak CONFIG_JSON STORAGE VOTES LATENCY_PRESSES MODE [ROMFS]

with MICROPYPATH holding the compiled firmware (``terminal/*.mpy``) and this module, or
with ``ROMFS`` a ROMFS image holding ``terminal/*.mpy`` (mounted before the import).  It
builds a real ``Terminal`` on a ``SimBoard`` (no control channel, no harness: nothing but the
firmware and this driver is on the heap) that talks to a real broker and ingest worker, then

1. presses ``LATENCY_PRESSES`` buttons one at a time on an idle terminal, each once the
   previous one is acknowledged by the fleet, printing ``L press->vote press->ack append``
   in microseconds per press;
2. presses ``VOTES`` buttons as fast as the uploader drains them (at most ``WINDOW`` votes
   not yet acknowledged);
3. prints ``RESULT {json}`` and exits 0 once every vote is acknowledged; exits 3 when the
   fleet's acks stop for ``STALL_S`` seconds, 1 on any exception (MemoryError included).

``MODE`` says what the soak measures:

``measure``  the heap: automatic collection is off during the soak and the driver collects
             every ``MEASURE_EVERY`` presses, noting the live heap after each collection and
             the garbage allocated since the previous one (so both are exact, not sampled
             at whatever moment the collector happened to run).
``limit``    nothing extra, collection automatic: run under a small ``-X heapsize`` to see
             whether the firmware still gets every vote through.
``lfs``      the vote log on MicroPython's littlefs v2 over a RAM block device with the
             ESP32's geometry, counting bytes programmed and blocks erased.  Its 1 MiB
             buffer lives on the heap, so heap figures from such a run mean nothing.

No per-vote data is kept (the latency phase prints its samples instead of storing them), so
the heap measured is the firmware's.
"""

import gc
import sys


def mount_romfs(path: str) -> int:
    """Mount the ROMFS image at ``path`` on /rom, first on ``sys.path``; return its size.

    The unix port has no ``vfs.rom_ioctl`` (no ROM partition), so the image is a buffer
    on the GC heap, read in one allocation of its exact size.
    """
    import os

    import vfs  # type: ignore[import-not-found]

    image = bytearray(os.stat(path)[6])
    with open(path, "rb") as f:
        f.readinto(image)
    vfs.mount(vfs.VfsRom(image), "/rom")
    sys.path.insert(0, "/rom")
    return len(image)


gc.collect()
BASELINE = gc.mem_alloc()  # type: ignore[attr-defined]  # interpreter + this module's code
# With a 6th argument the firmware is imported from that ROMFS image (bytecode runs in
# place from the image instead of being copied): counted from here, with the code.
ROMFS_BYTES = mount_romfs(sys.argv[6]) if len(sys.argv) > 6 else 0

import asyncio  # noqa: E402 - after the baseline, so that the firmware's code is counted
import json  # noqa: E402
import os  # noqa: E402
import time  # noqa: E402

from terminal import votelog as votelog_module  # noqa: E402
from terminal.app import Terminal  # noqa: E402
from terminal.board_sim import SimBoard  # noqa: E402
from terminal.config import validate  # noqa: E402

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import Any

WINDOW = 100  # unacknowledged votes at most: two full batches, so one is always ready
MEASURE_EVERY = 100  # presses between collections in ``measure`` mode
STALL_S = 10  # no ack for this long: the fleet or the link is stuck; give up
BLOCK_SIZE = 4096  # ESP32 SPI flash erase block, as littlefs uses it there
BLOCKS = 256  # a 1 MiB data partition
LFS_OPTS = {"readsize": 32, "progsize": 32, "lookahead": 32}  # MicroPython's ESP32 defaults


def ticks_us() -> int:
    """Microsecond ticks (MicroPython's wrapping counter)."""
    return int(time.ticks_us())  # type: ignore[attr-defined]


def ticks_diff(new: int, old: int) -> int:
    """``new - old`` across a wrap of the tick counter."""
    return int(time.ticks_diff(new, old))  # type: ignore[attr-defined]


def mem_alloc() -> int:
    """Heap bytes in use, garbage included until the next collection."""
    return int(gc.mem_alloc())  # type: ignore[attr-defined]


def mem_free() -> int:
    """Heap bytes free."""
    return int(gc.mem_free())  # type: ignore[attr-defined]


def live_heap() -> int:
    """Heap bytes still reachable: in use right after a full collection."""
    gc.collect()
    return mem_alloc()


class CountingBlockDevice:
    """A RAM flash chip for littlefs that counts what is done to it.

    The extended block protocol: ``offset`` given means a program within a block (already
    erased), erase is ``ioctl(6, block)``.  Slicing through a memoryview allocates nothing.
    """

    def __init__(self, block_size: int, blocks: int) -> None:
        self.block_size = block_size
        self.blocks = blocks
        self.data = bytearray(block_size * blocks)
        self.mv = memoryview(self.data)
        self.blank = b"\xff" * block_size  # erased flash reads as 0xFF
        self.erases = 0
        self.programs = 0
        self.programmed = 0  # bytes
        self.read_bytes = 0

    def readblocks(self, block: int, buf: "Any", offset: int = 0) -> None:
        start = block * self.block_size + offset
        buf[:] = self.mv[start:start + len(buf)]
        self.read_bytes += len(buf)

    def writeblocks(self, block: int, buf: "Any", offset: "int | None" = None) -> None:
        if offset is None:  # simple protocol: erase then program whole blocks
            for n in range(len(buf) // self.block_size):
                self.ioctl(6, block + n)
            offset = 0
        start = block * self.block_size + offset
        self.mv[start:start + len(buf)] = buf
        self.programs += 1
        self.programmed += len(buf)

    def ioctl(self, op: int, arg: int) -> int:
        if op == 4:  # block count
            return self.blocks
        if op == 5:  # block size
            return self.block_size
        if op == 6:  # erase
            start = arg * self.block_size
            self.mv[start:start + self.block_size] = self.blank
            self.erases += 1
        return 0  # init, deinit, sync, erase: done


class FileCounter:
    """Wraps ``open`` and ``os`` as the vote log module sees them, to count at the file
    level what its own ``bytes_written`` counter claims: bytes written to segment and state
    files, and the sizes of segment files as they are deleted or left at the end."""

    def __init__(self, module: "Any") -> None:
        self.segment_bytes = 0  # bytes written into segment files
        self.state_bytes = 0  # bytes written into state files
        self.removed_size = 0  # sizes of segment files when they were deleted
        self.writes = 0  # write calls
        self.opens = 0
        counter = self
        real_open = open

        class File:
            """A file whose writes are counted."""

            def __init__(self, path: str, mode: str) -> None:
                self.f = real_open(path, mode)
                self.state = path.endswith(".0") or path.endswith(".1")

            def __enter__(self) -> "File":
                return self

            def __exit__(self, *exc: object) -> None:
                self.f.close()

            def write(self, data: "Any") -> int:
                n = int(self.f.write(data))
                counter.writes += 1
                if self.state:
                    counter.state_bytes += n
                else:
                    counter.segment_bytes += n
                return n

            def __getattr__(self, name: str) -> "Any":
                return getattr(self.f, name)

        class Os:
            """``os`` with a ``remove`` that first notes the file's size."""

            def remove(self, path: str) -> None:
                try:  # noqa: SIM105 - MicroPython has no contextlib
                    counter.removed_size += os.stat(path)[6]
                except OSError:
                    pass  # missing already: nothing was deleted
                os.remove(path)

            def __getattr__(self, name: str) -> "Any":
                return getattr(os, name)

        def counting_open(path: str, mode: str = "r") -> "Any":
            counter.opens += 1
            if "w" in mode or "a" in mode:
                return File(path, mode)
            return real_open(path, mode)

        module.open = counting_open  # module globals come before builtins
        module.os = Os()


class Probe:
    """The board's event sink: what the driver waits for, and heap high-water marks."""

    def __init__(self) -> None:
        self.voted = 0  # seq of the last vote event
        self.voted_at = 0  # ticks_us of it
        self.acked = 0  # highest seq acknowledged
        self.acked_at = 0
        self.link_up = asyncio.Event()
        self.vote = asyncio.Event()
        self.ack = asyncio.Event()
        self.events = 0

    def __call__(self, name: str, data: "Any") -> None:
        now = ticks_us()  # first, so that sampling the heap does not count as latency
        if name == "vote":
            self.voted = data[0]
            self.voted_at = now
            self.vote.set()
        elif name == "acked":
            self.acked = data
            self.acked_at = now
            self.ack.set()
        elif name == "link" and data:
            self.link_up.set()
        self.events += 1


async def until(event: "Any", what: str) -> None:
    """Wait for ``event`` (then clear it); exit 3 if nothing happens for ``STALL_S``."""
    try:
        await asyncio.wait_for(event.wait(), STALL_S)
    except asyncio.TimeoutError:  # noqa: UP041 - MicroPython has no builtin TimeoutError
        print("STALL", what)
        sys.exit(3)
    event.clear()


async def latency(board: "Any", probe: Probe, presses: int, append_us: "list[int]",
                  quiet: bool = False) -> None:
    """Isolated presses on an idle terminal: print each one's timings unless ``quiet``."""
    for n in range(presses):
        probe.vote.clear()
        probe.ack.clear()
        start = ticks_us()
        board.press(1 + n % 4)
        await until(probe.vote, "vote")
        seq = probe.voted
        voted = ticks_diff(probe.voted_at, start)
        while probe.acked < seq:
            await until(probe.ack, "ack")
        if not quiet:
            print("L", voted, ticks_diff(probe.acked_at, start), append_us[0])


async def soak(board: "Any", probe: Probe, first: int, votes: int, measure: bool
               ) -> "dict[str, int]":
    """Press ``votes`` buttons as fast as the uploader drains them.

    With ``measure``: automatic collection off, a collection every ``MEASURE_EVERY``
    presses; returns the highest live heap, the highest heap in use just before a
    collection (live + garbage) and the garbage allocated in total.
    """
    stats = {"live_peak": live_heap(), "peak_before_collect": 0, "garbage": 0}
    live = stats["live_peak"]
    if measure:
        gc.disable()
    pressed = 0
    while pressed < votes:
        while first + pressed - probe.acked >= WINDOW:
            probe.ack.clear()
            if first + pressed - probe.acked >= WINDOW:
                await until(probe.ack, "ack")
        board.press(1 + pressed % 4)
        pressed += 1
        # One press per scheduling round, as presses arrive one by one on the device.
        await asyncio.sleep(0)
        if measure and pressed % MEASURE_EVERY == 0:
            used = mem_alloc()
            stats["peak_before_collect"] = max(stats["peak_before_collect"], used)
            stats["garbage"] += used - live
            live = live_heap()
            stats["live_peak"] = max(stats["live_peak"], live)
    last = first + votes
    while probe.acked < last:
        probe.ack.clear()
        if probe.acked < last:
            await until(probe.ack, "final ack")
    gc.enable()
    return stats


def mount_lfs() -> CountingBlockDevice:
    """Format and mount a counting littlefs at /flash (MicroPython's own littlefs v2)."""
    import vfs  # type: ignore[import-not-found]

    device = CountingBlockDevice(BLOCK_SIZE, BLOCKS)
    vfs.VfsLfs2.mkfs(device, **LFS_OPTS)
    vfs.mount(vfs.VfsLfs2(device, **LFS_OPTS), "/flash")
    device.erases = device.programs = device.programmed = device.read_bytes = 0  # not mkfs
    return device


async def main(config_path: str, storage: str, votes: int, presses: int, mode: str) -> None:
    heap = {"baseline": BASELINE, "imported": live_heap(), "romfs_image": ROMFS_BYTES}
    heap["total"] = mem_alloc() + mem_free()
    device = mount_lfs() if mode == "lfs" else None
    if device is not None:
        storage = "/flash"
    with open(config_path) as f:
        config = validate(json.load(f))
    probe = Probe()
    board = SimBoard(storage, broker_host=config["mqtt"]["host"],
                     broker_port=config["mqtt"]["port"], buttons=config["buttons"],
                     on_event=probe)
    terminal = Terminal(board, config)
    files = FileCounter(votelog_module)  # from here on, every file write is counted
    log = terminal.log
    append_us = [0]  # the last append's duration
    real_append = log.append

    def timed_append(*args: "Any") -> int:
        start = ticks_us()
        seq = int(real_append(*args))
        append_us[0] = ticks_diff(ticks_us(), start)
        return seq

    log.append = timed_append  # an instance attribute shadows the method
    heap["constructed"] = live_heap()
    runner = asyncio.create_task(terminal.run())
    await until(probe.link_up, "link")
    heap["connected"] = live_heap()
    # One press to warm up: the ingest worker may not have subscribed yet (the uploader
    # re-sends after ``ack_timeout_s``), and the first ack sets the clock.
    await latency(board, probe, 1, append_us, quiet=True)
    await latency(board, probe, presses, append_us)
    # Counters at the start of the soak, so that its per-vote figures are its own.
    before = (log.bytes_written, files.segment_bytes, files.state_bytes, files.writes,
              terminal.uploader.sent_batches)
    first = log.last_seq
    start_ms = time.ticks_ms()  # type: ignore[attr-defined]
    stats = await soak(board, probe, first, votes, mode == "measure")
    took_ms = time.ticks_diff(time.ticks_ms(), start_ms)  # type: ignore[attr-defined]
    heap.update(stats)
    heap["end"] = live_heap()
    heap_free = terminal.health()["heap_free"]
    segments = 0
    for name in os.listdir(storage + "/votes"):
        if name.endswith(".seg"):
            segments += os.stat(storage + "/votes/" + name)[6]
    result = {
        "mode": mode, "votes": votes, "duration_ms": took_ms, "heap": heap,
        "heap_free_at_end": heap_free,
        # The soak only:
        "log_bytes_written": log.bytes_written - before[0],
        "file_segment_bytes": files.segment_bytes - before[1],
        "file_state_bytes": files.state_bytes - before[2],
        "file_writes": files.writes - before[3],
        "batches": terminal.uploader.sent_batches - before[4],
        # The whole run (warm-up and latency presses too): every byte written to a segment
        # file is still in the file when it is deleted -- nothing is rewritten.
        "run_votes": log.last_seq, "run_segment_bytes": files.segment_bytes,
        "run_segment_file_sizes": files.removed_size + segments,
        "pending": log.pending, "acked_seq": log.acked_seq, "last_seq": log.last_seq,
        "resends": terminal.uploader.resends, "reconnects": terminal.link.reconnects,
        "board_events": probe.events,
    }
    if device is not None:
        result["flash"] = {"erases": device.erases, "programs": device.programs,
                           "programmed": device.programmed, "read": device.read_bytes,
                           "block_size": BLOCK_SIZE, "blocks": BLOCKS}
    print("RESULT " + json.dumps(result))
    terminal.stop()
    runner.cancel()


asyncio.run(main(sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]))
