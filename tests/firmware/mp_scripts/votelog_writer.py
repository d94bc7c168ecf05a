"""Append votes to a VoteLog until killed; run by tests/firmware/test_votelog_power_cut.py.

Usage: micropython votelog_writer.py ROOT LIMIT   (MICROPYPATH must include firmware/)

Prints ``R last_seq acked_seq pending`` once the log is open, then ``A seq`` each time
``append`` has returned -- the moment a terminal thanks the visitor, so from then on the
vote must never be lost -- and ``K seq`` each time ``ack`` has returned.  Every vote's
content is derived from its seq (``vote_for``) so the test can check what it reads back.
"""

import sys

from terminal.votelog import VoteLog

SEGMENT_RECORDS = 8  # small, so that kills also land in rotations and deletions


def vote_for(seq):
    """``(ts_ms, button, flags, content_version)`` of the vote with ``seq``."""
    return 1700000000000 + seq * 7, 1 + seq % 5, 1 if seq % 3 == 0 else 0, seq & 0xFFFF


def main():
    log = VoteLog(sys.argv[1], segment_records=SEGMENT_RECORDS)
    print("R", log.last_seq, log.acked_seq, log.pending)
    for _ in range(int(sys.argv[2])):
        seq = log.last_seq + 1
        ts_ms, button, flags, version = vote_for(seq)
        got = log.append(ts_ms, button, flags, version)
        if got != seq:
            raise SystemExit("append returned %d, expected %d" % (got, seq))
        print("A", got)
        if got % 11 == 0:
            # What the uploader does: send the oldest few, then the fleet acks them.
            batch = log.batch(6)
            if batch:
                log.ack(batch[-1][0])
                print("K", batch[-1][0])
        if got % 37 == 0:
            log.ack(got)  # everything acknowledged: every older segment file is deleted
            print("K", got)


main()
