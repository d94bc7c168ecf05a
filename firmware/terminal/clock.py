"""Monotonic millisecond ticks that work on MicroPython and CPython.

MicroPython's ``time.ticks_ms`` wraps around; ``ticks_diff`` handles that.  CPython has no
ticks API, so the simulator gets an equivalent built on ``time.monotonic``.
"""

try:
    from time import ticks_add, ticks_diff, ticks_ms  # type: ignore[attr-defined]
except ImportError:  # CPython: the simulator and host-side unit tests
    from time import monotonic

    def ticks_ms() -> int:
        """Milliseconds from an arbitrary, monotonic origin."""
        return int(monotonic() * 1000)

    def ticks_diff(new: int, old: int) -> int:
        """Signed difference ``new - old`` in milliseconds."""
        return new - old

    def ticks_add(ticks: int, delta: int) -> int:
        """``ticks`` moved by ``delta`` milliseconds."""
        return ticks + delta

__all__ = ["ticks_add", "ticks_diff", "ticks_ms"]
