"""The abuse filter: which presses count, as a pure function of the press ticks.

A filtered press is still stored (flag bit 0), never dropped: reports show raw and filtered
counts, and the rule can be changed afterwards without losing data.  Two rules:

- **Minimum gap.** A press less than ``min_gap_ms`` after the last *counted* press is
  filtered (one visitor, one answer).  0 switches the rule off.
- **Burst suppression.** When a press is the ``burst_count + 1``-th within less than
  ``burst_window_ms`` (counting every press: counted and filtered alike), that press and
  every further one are filtered until a press comes at least ``burst_quiet_ms`` after the
  press before it.  That press ends the burst, forgets the burst history and is judged by
  the minimum gap as usual.  ``burst_count`` 0 switches the rule off.

Times are ``ticks_ms`` values compared with ``ticks_diff``, so the ticks wrapping around
(every 2**30 ms on MicroPython) is harmless; a negative difference (the earlier press lies
more than half a ticks period back, about 6 days) counts as "long ago".

The app does not pass test-mode presses through the filter: they neither count nor change
its state.
"""

from terminal.clock import ticks_diff

SETTINGS = ("min_gap_ms", "burst_count", "burst_window_ms", "burst_quiet_ms")
BURST_COUNT_MAX = 64  # the burst history is a preallocated list of this many ticks at most


class AbuseFilter:
    """Decides whether a press counts; settings are class defaults, per instance overridable.

    ``AbuseFilter(min_gap_ms=..., ...)`` or ``configure(**settings)`` later (the content and
    settings feature updates them at run time).  ``check(at_ticks)`` is called once per
    press, in press order.
    """

    min_gap_ms = 2000
    burst_count = 8
    burst_window_ms = 20000
    burst_quiet_ms = 30000

    def __init__(self, **settings):
        self._ring = []  # type: list  # ticks of the last ``burst_count`` presses (circular)
        self._pos = 0  # where the next press goes (= the oldest entry once full)
        self._n = 0  # entries in use
        self._last = 0  # ticks of the previous press (any)
        self._has_last = False
        self._counted = 0  # ticks of the last counted press
        self._has_counted = False
        self.burst = False  # True while burst suppression filters every press
        self.configure(**settings)
        if len(self._ring) != self.burst_count:
            self._ring = [0] * self.burst_count

    def configure(self, **settings):
        """Change settings (names as in ``SETTINGS``); raises ValueError naming a bad one.

        All values are checked before any is applied.  Changing ``burst_count`` restarts
        burst detection (the history is reallocated); other changes keep the state.
        """
        for key in settings:
            value = settings[key]
            if key not in SETTINGS:
                raise ValueError("%s: unknown abuse filter setting" % key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise ValueError("%s: must be a non-negative integer" % key)
            if key == "burst_count" and value > BURST_COUNT_MAX:
                raise ValueError("burst_count: must be 0..%d" % BURST_COUNT_MAX)
        for key in settings:
            setattr(self, key, settings[key])
        if "burst_count" in settings:
            self._ring = [0] * self.burst_count
            self._pos = self._n = 0
            self.burst = False

    def reset(self):
        """Forget every press seen (settings stay)."""
        self._pos = self._n = 0
        self._has_last = self._has_counted = False
        self.burst = False

    def check(self, at):
        """Record a press made at ticks ``at``; True if it counts, False if it is filtered."""
        if self.burst and self._has_last:
            since = ticks_diff(at, self._last)
            if since < 0 or since >= self.burst_quiet_ms:
                self.burst = False  # quiet long enough: the burst is over
                self._pos = self._n = 0
        self._last = at
        self._has_last = True
        size = self.burst_count
        if size:
            ring = self._ring
            if not self.burst and self._n == size:
                # ring[pos] is the press ``size`` presses ago: with this one, size + 1.
                span = ticks_diff(at, ring[self._pos])
                if 0 <= span < self.burst_window_ms:
                    self.burst = True
            ring[self._pos] = at
            self._pos = self._pos + 1 if self._pos + 1 < size else 0
            if self._n < size:
                self._n += 1
        if self.burst:
            return False
        if self._has_counted:
            gap = ticks_diff(at, self._counted)
            if 0 <= gap < self.min_gap_ms:
                return False
        self._counted = at
        self._has_counted = True
        return True
