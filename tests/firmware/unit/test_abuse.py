"""The abuse filter: minimum gap, burst suppression and its quiet reset, ticks wrap-around."""

import sys

from _support import raises
from terminal.abuse import AbuseFilter
from terminal.clock import ticks_add

BASE = 1000


def run(f, offsets, base=BASE):
    """``check`` a press at each offset (ms after ``base``); the list of results."""
    return [f.check(ticks_add(base, ms)) for ms in offsets]


def test_defaults_are_class_attributes_overridable_per_instance():
    f = AbuseFilter()
    assert (f.min_gap_ms, f.burst_count, f.burst_window_ms, f.burst_quiet_ms) == (
        2000, 8, 20000, 30000)
    g = AbuseFilter(min_gap_ms=10, burst_count=3)
    assert g.min_gap_ms == 10 and g.burst_count == 3
    assert AbuseFilter.min_gap_ms == 2000 and AbuseFilter().burst_count == 8


def test_min_gap_is_measured_from_the_last_counted_press():
    f = AbuseFilter(burst_count=0)
    assert run(f, [0, 1999, 2000, 3000, 3999, 4000]) == [True, False, True, False, False, True]
    # Hammering every 1.5 s: every other press counts (the gap is to the last *counted* one).
    f = AbuseFilter(burst_count=0)
    assert run(f, [0, 1500, 3000, 4500, 6000]) == [True, False, True, False, True]
    f = AbuseFilter(min_gap_ms=0, burst_count=0)
    assert run(f, [0, 0, 1, 1]) == [True] * 4


def test_more_than_burst_count_presses_within_the_window_start_a_burst():
    f = AbuseFilter()  # 2 s gap, more than 8 presses within 20 s
    offsets = [i * 2100 for i in range(12)]  # the 9th press is 16.8 s after the first
    assert run(f, offsets) == [True] * 8 + [False] * 4
    assert f.burst
    # Still inside the burst: less than 30 s of quiet keeps filtering.
    last = offsets[-1]
    assert run(f, [last + 29999]) == [False]
    # 30 s of quiet since the previous press ends it; that press is judged as usual.
    assert run(f, [last + 29999 + 30000, last + 29999 + 30000 + 1000]) == [True, False]
    assert not f.burst


def test_burst_needs_the_presses_strictly_within_the_window():
    f = AbuseFilter()
    # Nine presses spanning exactly 20 s: not "within" 20 s, no burst.
    assert run(f, [i * 2500 for i in range(9)]) == [True] * 9
    assert not f.burst


def test_filtered_presses_count_towards_a_burst():
    f = AbuseFilter()
    offsets = [i * 100 for i in range(12)]
    # The first counts, the next 7 fall in the gap, the 9th starts the burst.
    assert run(f, offsets) == [True] + [False] * 11
    assert f.burst
    # Past the minimum gap but in the burst: filtered until 30 s of quiet.
    assert run(f, [1100 + 5000, 1100 + 5000 + 20000]) == [False, False]
    assert run(f, [1100 + 5000 + 20000 + 30000]) == [True]
    # The burst history was forgotten: eight more slow presses count.
    start = 1100 + 5000 + 20000 + 30000
    assert run(f, [start + 2000 * i for i in range(1, 8)]) == [True] * 7


def test_ticks_wrap_around():
    base = ticks_add(0, -3000)  # on MicroPython: 3 s before ticks_ms wraps to 0
    if sys.implementation.name == "micropython":
        assert ticks_add(base, 4500) < base  # the offsets below straddle the wrap
    f = AbuseFilter(burst_count=0)
    assert run(f, [0, 1999, 2000, 4499, 4500, 5000], base) == [
        True, False, True, True, False, False]
    f = AbuseFilter()
    assert run(f, [i * 800 for i in range(10)], base) == [
        True, False, False, True, False, False, True, False, False, False]
    assert f.burst  # nine presses within 6.4 s across the wrap
    assert run(f, [7200 + 30000], base) == [True]


def test_a_difference_beyond_half_the_ticks_period_counts_as_long_ago():
    f = AbuseFilter()
    assert run(f, [0, 100]) == [True, False]
    # On MicroPython ticks_diff is negative here; on CPython it is just large.
    assert run(f, [2 ** 29 + 5]) == [True]


def test_configure_changes_settings_at_run_time():
    f = AbuseFilter()
    assert run(f, [0, 600]) == [True, False]
    f.configure(min_gap_ms=500)
    assert run(f, [1200, 1300]) == [True, False]
    f.configure(burst_count=2, burst_window_ms=1000, burst_quiet_ms=5000)
    assert run(f, [10000, 10600, 10900]) == [True, True, False]  # 3rd within 1 s: burst
    assert run(f, [14000, 20000]) == [False, True]  # then 5 s of quiet
    assert f.configure() is None  # nothing to change


def test_configure_rejects_bad_settings_naming_them_and_changes_nothing():
    f = AbuseFilter()
    for settings, key in (({"bogus": 1}, "bogus"), ({"min_gap_ms": -1}, "min_gap_ms"),
                          ({"burst_count": True}, "burst_count"),
                          ({"burst_window_ms": 1.5}, "burst_window_ms"),
                          ({"burst_count": 65}, "burst_count"),
                          ({"min_gap_ms": 100, "burst_quiet_ms": "x"}, "burst_quiet_ms")):
        err = raises(ValueError, lambda s=settings: f.configure(**s))
        assert key in str(err), (key, str(err))
    assert f.min_gap_ms == 2000 and f.burst_count == 8 and f.burst_quiet_ms == 30000


def test_reset_forgets_history():
    f = AbuseFilter()
    assert run(f, [i * 10 for i in range(9)])[-1] is False
    assert f.burst
    f.reset()
    assert not f.burst
    assert run(f, [100]) == [True]
