"""Monotonic millisecond ticks that work on MicroPython and CPython.

MicroPython's ``time.ticks_ms`` wraps around; ``ticks_diff`` handles that.  CPython has no
ticks API, so the simulator gets an equivalent built on ``time.monotonic``.
"""

try:
    from time import ticks_add, ticks_diff, ticks_ms
except ImportError:  # CPython: the simulator and host-side unit tests
    # The firmware is type-checked against MicroPython's stdlib, where this branch is dead.
    from time import monotonic  # type: ignore[attr-defined]

    def ticks_ms():  # type: ignore[misc]
        """Milliseconds from an arbitrary, monotonic origin."""
        return int(monotonic() * 1000)

    def ticks_diff(new, old):  # type: ignore[misc,no-redef]
        """Signed difference ``new - old`` in milliseconds."""
        return new - old

    def ticks_add(ticks, delta):  # type: ignore[misc]
        """``ticks`` moved by ``delta`` milliseconds."""
        return ticks + delta

__all__ = ["ticks_add", "ticks_diff", "ticks_ms"]
