"""Vote log in flash: record format, recovery, seq floor, acks, drops and littlefs wear.

Runs under CPython (pytest) and the real MicroPython (tests/firmware/mp_runner.py).  Power
cuts are simulated by editing the files the log left behind, then opening a new instance,
exactly as a reboot would.
"""

import os

import _support
from terminal.votelog import RECORD_SIZE, VoteLog

TS = 1700000000123  # a wall-clock ms value that needs more than 32 bits


def _files(root):
    return sorted(os.listdir(root))


def _segments(root):
    return [n for n in _files(root) if n.endswith(".seg")]


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def _write(path, data):
    with open(path, "wb") as f:
        f.write(data)


def _fill(log, n, flags=0):
    return [log.append(TS + i, 1 + i % 5, flags, 1) for i in range(n)]


def _seqs(log, n=100000):
    return [v[0] for v in log.batch(n)]


def _lcg(state):
    return (state * 1103515245 + 12345) & 0x7FFFFFFF


# -- record format ---------------------------------------------------------------------------
def test_record_bytes_are_exact():
    root = _support.tempdir()
    log = VoteLog(root)
    assert log.append(TS, 3, 0b011, 7) == 1
    # seq u32 | ts u48 | button | flags << 3 | content_version u16 | crc32 low 16 bits
    assert RECORD_SIZE == 15
    assert _read(root + "/00000001.seg") == bytes(
        [0x01, 0x00, 0x00, 0x00, 0x7B, 0x68, 0xE5, 0xCF, 0x8B, 0x01, 0x1B, 0x07, 0x00,
         0x33, 0xC9])
    assert log.batch() == [(1, TS, 3, 3, 7)]


def test_extreme_field_values_round_trip():
    log = VoteLog(_support.tempdir())
    log.append((1 << 48) - 1, 5, 31, 0xFFFF)
    log.append(0, 1, 0, 0)
    assert log.batch() == [(1, (1 << 48) - 1, 5, 31, 0xFFFF), (2, 0, 1, 0, 0)]


def test_out_of_range_fields_are_rejected_without_using_a_seq():
    log = VoteLog(_support.tempdir())
    for args in ((TS, 0, 0, 0), (TS, 8, 0, 0), (TS, 1, 32, 0), (-1, 1, 0, 0),
                 (1 << 48, 1, 0, 0), (TS, 1, 0, 0x10000), (TS, 1, -1, 0)):
        _support.raises(ValueError, log.append, *args)
    assert log.append(TS, 1, 0, 0) == 1
    assert log.bytes_written == RECORD_SIZE


def test_bytes_written_per_vote_is_one_record():
    log = VoteLog(_support.tempdir(), segment_records=8)
    for i in range(20):  # crosses two segment rotations
        log.append(TS, 1, 0, 0)
        assert log.bytes_written == (i + 1) * RECORD_SIZE


# -- append / batch / ack ----------------------------------------------------------------------
def test_append_batch_ack_round_trip():
    log = VoteLog(_support.tempdir())
    assert (log.pending, log.last_seq, log.acked_seq, log.dropped) == (0, 0, 0, 0)
    assert log.batch() == []
    assert _fill(log, 5) == [1, 2, 3, 4, 5]
    assert log.pending == 5 and log.last_seq == 5
    assert log.batch(2) == [(1, TS, 1, 0, 1), (2, TS + 1, 2, 0, 1)]
    assert log.batch(2) == log.batch(2)  # reading does not consume
    log.ack(2)
    assert log.acked_seq == 2 and log.pending == 3
    assert _seqs(log) == [3, 4, 5]
    log.ack(1)  # stale ack: no effect
    assert log.acked_seq == 2
    log.ack(99)  # beyond last_seq: clamped
    assert log.acked_seq == 5 and log.pending == 0 and log.batch() == []


def test_batch_spans_segments_and_respects_max_n():
    log = VoteLog(_support.tempdir(), segment_records=3)
    _fill(log, 10)
    assert len(_segments(log.root)) == 4
    assert _seqs(log, 7) == [1, 2, 3, 4, 5, 6, 7]
    log.ack(4)
    assert _seqs(log, 4) == [5, 6, 7, 8]
    assert _seqs(log) == [5, 6, 7, 8, 9, 10]


def test_segments_are_deleted_only_after_ack_and_never_the_newest():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=4)
    _fill(log, 10)
    assert _segments(root) == ["00000001.seg", "00000005.seg", "00000009.seg"]
    log.ack(3)  # first segment only partly acknowledged: nothing deleted
    assert _segments(root) == ["00000001.seg", "00000005.seg", "00000009.seg"]
    log.ack(4)
    assert _segments(root) == ["00000005.seg", "00000009.seg"]
    log.ack(10)  # everything acknowledged; the newest file keeps carrying the seq floor
    assert _segments(root) == ["00000009.seg"]
    assert log.pending == 0
    assert log.append(TS, 1, 0, 0) == 11


def test_full_segment_is_deleted_once_acked_and_rotated():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=4)
    _fill(log, 4)
    log.ack(4)
    assert _segments(root) == ["00000001.seg"]  # newest: kept
    log.append(TS, 1, 0, 0)
    log.ack(5)
    assert _segments(root) == ["00000005.seg"]


# -- reboot --------------------------------------------------------------------------------
def test_reopen_preserves_seq_pending_and_watermark():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=4)
    _fill(log, 10, flags=2)
    log.ack(6)
    expected = log.batch()
    log = VoteLog(root, segment_records=4)
    assert (log.last_seq, log.acked_seq, log.pending) == (10, 6, 4)
    assert log.batch() == expected  # acknowledged votes are not sent again
    assert log.append(TS, 2, 0, 0) == 11
    assert VoteLog(root, segment_records=4).pending == 5


def test_seq_never_repeats_after_acking_everything_and_reopening():
    root = _support.tempdir()
    seen = []
    state = 7
    for _ in range(30):
        log = VoteLog(root, segment_records=4)
        state = _lcg(state)
        for _ in range(state % 7):
            seen.append(log.append(TS, 1, 0, 0))
        if state & 8:
            log.ack(log.last_seq)  # sometimes everything, sometimes nothing
            assert len(_segments(root)) <= 1
    assert seen == list(range(1, len(seen) + 1))
    assert VoteLog(root, segment_records=4).last_seq == len(seen)


def test_seq_floor_survives_losing_the_state_file():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=4)
    _fill(log, 9)
    log.ack(9)
    for name in _files(root):
        if name.startswith("state"):
            os.remove(root + "/" + name)
    log = VoteLog(root, segment_records=4)
    assert log.append(TS, 1, 0, 0) == 10  # from the newest segment's name and size


def test_seq_floor_survives_losing_every_segment():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=4)
    _fill(log, 9)
    log.ack(9)
    for name in _segments(root):  # as if a power cut hit right after a deletion
        os.remove(root + "/" + name)
    assert VoteLog(root, segment_records=4).append(TS, 1, 0, 0) == 10  # from state


def test_torn_state_copy_falls_back_to_the_other():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=16)
    _fill(log, 8)
    log.ack(2)
    log.ack(5)  # written to the other copy
    assert len([n for n in _files(root) if n.startswith("state")]) == 2
    for name in _files(root):
        if name.startswith("state"):
            data = _read(root + "/" + name)
            _write(root + "/" + name, data[:10])  # a power cut while writing this copy
            log = VoteLog(root, segment_records=16)
            assert log.acked_seq in (2, 5)
            assert log.pending == log.last_seq - log.acked_seq
            seq = log.append(TS, 1, 0, 0)
            assert seq == log.last_seq and seq in (9, 10)
            log = VoteLog(root, segment_records=16)
            assert log.acked_seq in (2, 5) and log.last_seq == seq
            _write(root + "/" + name, data)
    # The newest copy wins, and the next save overwrites the older one.
    log = VoteLog(root, segment_records=16)
    assert log.acked_seq == 5
    log.ack(7)
    log = VoteLog(root, segment_records=16)
    assert log.acked_seq == 7


# -- power cuts and corruption ------------------------------------------------------------------
def test_torn_tail_at_every_byte_offset():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=8)
    _fill(log, 5)
    path = root + "/00000001.seg"
    intact = _read(path)
    for cut in range(RECORD_SIZE):
        _write(path, intact[:4 * RECORD_SIZE + cut])  # record 5 cut after `cut` bytes
        for name in _segments(root):
            if name != "00000001.seg":
                os.remove(root + "/" + name)
        log = VoteLog(root, segment_records=8)
        assert log.pending == 4 and log.corrupt == 0
        assert _seqs(log) == [1, 2, 3, 4]
        seq = log.append(TS + 4, 5, 0, 1)  # the same vote again
        if cut:
            # A partial record burns its seq and the next vote goes to a fresh file, so
            # the torn file is never appended to or rewritten.
            assert seq == 6 and _read(path) == intact[:4 * RECORD_SIZE + cut]
        else:
            assert seq == 5 and _read(path) == intact  # clean end: appended in place
        log = VoteLog(root, segment_records=8)
        assert _seqs(log) == [1, 2, 3, 4, seq]


def test_garbage_after_the_last_record_is_ignored():
    for garbage in (bytes(RECORD_SIZE * 2), b"\xff" * (RECORD_SIZE * 3), os.urandom(40),
                    os.urandom(RECORD_SIZE)):
        root = _support.tempdir()
        log = VoteLog(root, segment_records=8)
        _fill(log, 3)
        with open(root + "/00000001.seg", "ab") as f:
            f.write(garbage)
        log = VoteLog(root, segment_records=8)
        assert _seqs(log) == [1, 2, 3] and log.corrupt == 0
        started = (len(garbage) + RECORD_SIZE - 1) // RECORD_SIZE
        assert log.append(TS, 1, 0, 0) == 4 + started  # every slot the garbage took is burned
        assert _seqs(VoteLog(root, segment_records=8)) == [1, 2, 3, 4 + started]


def test_corrupt_middle_record_is_skipped_and_counted():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=8)
    _fill(log, 5)
    path = root + "/00000001.seg"
    data = bytearray(_read(path))
    data[2 * RECORD_SIZE + 5] ^= 0x10  # a bit flip in record 3's timestamp
    _write(path, data)
    log = VoteLog(root, segment_records=8)
    assert log.corrupt == 1 and log.pending == 4
    assert _seqs(log) == [1, 2, 4, 5]
    assert log.append(TS, 1, 0, 0) == 6  # later records kept, appending continues in place
    log.ack(4)
    assert log.pending == 2 and _seqs(log) == [5, 6]


def test_record_going_bad_after_open_keeps_pending_consistent():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=8)
    _fill(log, 3)
    path = root + "/00000001.seg"
    data = bytearray(_read(path))
    data[RECORD_SIZE] ^= 0xFF  # record 2's seq field
    _write(path, data)
    assert _seqs(log) == [1, 3]
    assert log.pending == 2 and log.corrupt == 1
    log.ack(1)
    assert _seqs(log) == [3] and log.pending == 1


def test_segment_shrinking_after_open_keeps_pending_consistent():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=8)
    _fill(log, 5)
    path = root + "/00000001.seg"
    _write(path, _read(path)[:2 * RECORD_SIZE])  # e.g. damaged by something else
    assert _seqs(log) == [1, 2] and log.pending == 2
    assert log.append(TS, 1, 0, 0) == 6  # never appended behind the hole
    assert _segments(root) == ["00000001.seg", "00000006.seg"]
    log = VoteLog(root, segment_records=8)
    assert _seqs(log) == [1, 2, 6] and log.last_seq == 6


def test_failed_write_burns_its_seq():
    root = _support.tempdir()
    log = VoteLog(root)
    assert log.append(TS, 1, 0, 0) == 1
    for name in _files(root):
        os.remove(root + "/" + name)
    os.rmdir(root)  # the next write fails
    _support.raises(OSError, log.append, TS, 1, 0, 0)
    os.mkdir(root)
    assert log.append(TS, 1, 0, 0) == 3  # seq 2 may have reached flash: never reused
    assert _segments(root) == ["00000003.seg"]


# -- full log ------------------------------------------------------------------------------
def test_full_log_drops_oldest_filtered_segment_first():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=4, max_records=12)
    _fill(log, 4)  # seqs 1-4
    _fill(log, 4, flags=1)  # seqs 5-8, filtered by the abuse rule
    _fill(log, 4)  # seqs 9-12
    assert log.pending == 12 and log.dropped == 0
    assert log.append(TS, 1, 0, 0) == 13
    assert log.dropped == 4 and log.pending == 9
    assert _seqs(log) == [1, 2, 3, 4, 9, 10, 11, 12, 13]
    assert "00000005.seg" not in _segments(root)
    log = VoteLog(root, segment_records=4, max_records=12)
    assert log.dropped == 4 and log.pending == 9
    _fill(log, 3)  # full again (12), with no filtered votes left: the oldest go
    log.append(TS, 1, 0, 0)
    assert log.dropped == 8 and _seqs(log) == [9, 10, 11, 12, 13, 14, 15, 16, 17]
    assert VoteLog(root, segment_records=4, max_records=12).dropped == 8


def test_drop_prefers_the_segment_losing_fewest_unfiltered_votes():
    log = VoteLog(_support.tempdir(), segment_records=4, max_records=12)
    _fill(log, 4)
    log.append(TS, 1, 1, 0)  # 1 filtered + 3 unfiltered
    _fill(log, 3)
    _fill(log, 3, flags=1)  # 3 filtered + 1 unfiltered
    log.append(TS, 1, 0, 0)
    log.append(TS, 1, 0, 0)
    assert log.dropped == 4 and _seqs(log)[:8] == [1, 2, 3, 4, 5, 6, 7, 8]


def test_acknowledged_votes_do_not_count_towards_full():
    log = VoteLog(_support.tempdir(), segment_records=4, max_records=6)
    _fill(log, 6)
    log.ack(3)
    _fill(log, 3)
    assert log.dropped == 0 and log.pending == 6


def test_tiny_log_drops_the_segment_being_filled():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=8, max_records=3)
    _fill(log, 3)
    assert log.append(TS, 1, 0, 0) == 4
    assert log.dropped == 3 and _seqs(log) == [4]
    assert _segments(root) == ["00000004.seg"]
    assert VoteLog(root, segment_records=8, max_records=3).last_seq == 4


def test_interrupted_drop_is_finished_on_reopen():
    root = _support.tempdir()
    log = VoteLog(root, segment_records=4, max_records=8)
    _fill(log, 8)
    victim = _read(root + "/00000001.seg")
    log.append(TS, 1, 0, 0)
    assert log.dropped == 4
    # Power cut after the write-ahead state but before the victim was deleted.
    _write(root + "/00000001.seg", victim)
    log = VoteLog(root, segment_records=4, max_records=8)
    assert log.dropped == 4 and _seqs(log) == [5, 6, 7, 8, 9]
    assert "00000001.seg" not in _segments(root)


# -- littlefs (MicroPython only) ----------------------------------------------------------------
class _RamFlash:
    """A 4 KiB-block RAM block device that counts erases, for littlefs."""

    def __init__(self, blocks):
        self.data = bytearray(4096 * blocks)
        self.erases = 0

    def readblocks(self, block, buf, offset=0):
        at = block * 4096 + offset
        buf[:] = self.data[at:at + len(buf)]

    def writeblocks(self, block, buf, offset=None):
        if offset is None:
            self.erases += len(buf) // 4096
            offset = 0
        at = block * 4096 + offset
        self.data[at:at + len(buf)] = buf

    def ioctl(self, op, arg):
        if op == 4:
            return len(self.data) // 4096
        if op == 5:
            return 4096
        if op == 6:
            self.erases += 1
            return 0
        return None


def test_on_littlefs_one_block_erase_per_vote_and_recovery():
    try:
        import vfs

        lfs = vfs.VfsLfs2
    except (ImportError, AttributeError):
        return  # CPython has no littlefs; this runs under MicroPython
    flash = _RamFlash(48)
    lfs.mkfs(flash)  # the ESP32 port's defaults: readsize = progsize = lookahead = 32
    vfs.mount(lfs(flash), "/vlfs")
    try:
        log = VoteLog("/vlfs/votes", segment_records=64)
        _fill(log, 20)
        before = flash.erases
        for _ in range(300):  # online: each vote acknowledged on its own
            log.ack(log.append(TS, 2, 0, 3))
        per_vote = (flash.erases - before) / 300
        # Copy-on-write of the partly filled last block: ~1 erase per durable append.
        assert 0.9 < per_vote < 1.2, per_vote
        _fill(log, 30)
        vfs.umount("/vlfs")
        vfs.mount(lfs(flash), "/vlfs")  # reboot
        log = VoteLog("/vlfs/votes", segment_records=64)
        assert (log.last_seq, log.acked_seq, log.pending) == (350, 320, 30)
        assert _seqs(log) == list(range(321, 351))
    finally:
        vfs.umount("/vlfs")


def test_each_passes_fields_in_order_and_stops_when_the_taker_is_full():
    log = VoteLog(_support.tempdir(), segment_records=4)
    log.append(TS, 3, 0b011, 7)
    log.append((1 << 48) - 1, 5, 31, 0xFFFF)  # the widest values a record holds
    _fill(log, 6)  # into a second and third segment
    seen = []

    def take(*vote):
        seen.append(vote)
        return len(seen) < 5  # the fifth vote is offered but refused: not taken

    assert log.each(50, take) == 4
    assert seen[0] == (1, TS, 3, 0b011, 7) and seen[1] == (2, (1 << 48) - 1, 5, 31, 0xFFFF)
    assert [v[0] for v in seen] == [1, 2, 3, 4, 5]
    assert log.batch(5) == seen  # batch is each collecting tuples
    assert log.each(3, lambda *v: True) == 3  # max_n
    log.ack(7)
    assert log.each(50, lambda *v: True) == 1 and log.pending == 1
