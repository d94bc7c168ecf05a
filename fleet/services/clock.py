"""Wall-clock access in one place so tests and the simulator can reason about time."""

import time


def now_ms() -> int:
    """Milliseconds since the Unix epoch."""
    return time.time_ns() // 1_000_000
