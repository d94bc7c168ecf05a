"""Worker counters, exported in the Prometheus text format at ``/metrics``."""

from __future__ import annotations

import threading
from collections import Counter


class Metrics:
    """Thread-safe counters with optional labels (``refused{reason="bad_json"}``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[tuple[str, tuple[tuple[str, str], ...]]] = Counter()
        self._gauges: dict[str, float] = {}
        self._help: dict[str, str] = {}

    def describe(self, name: str, help_text: str) -> None:
        """Attach HELP text to a metric name."""
        self._help[name] = help_text

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        """Add ``amount`` to counter ``name`` with ``labels``."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += amount

    def set(self, name: str, value: float) -> None:
        """Set gauge ``name``."""
        with self._lock:
            self._gauges[name] = value

    def get(self, name: str, **labels: str) -> int:
        """Current value of a counter (0 if never incremented)."""
        with self._lock:
            return self._counters[(name, tuple(sorted(labels.items())))]

    def total(self, name: str) -> int:
        """Sum of a counter over all its label sets."""
        with self._lock:
            return sum(v for (n, _), v in self._counters.items() if n == name)

    def render(self) -> str:
        """The Prometheus text exposition of every counter and gauge."""
        with self._lock:
            counters = sorted(self._counters.items())
            gauges = sorted(self._gauges.items())
        lines: list[str] = []
        seen: set[str] = set()
        for (name, labels), value in counters:
            if name not in seen:
                seen.add(name)
                if name in self._help:
                    lines.append(f"# HELP {name} {self._help[name]}")
                lines.append(f"# TYPE {name} counter")
            label_text = ",".join(f'{k}="{v}"' for k, v in labels)
            lines.append(f"{name}{{{label_text}}} {value}" if label_text else f"{name} {value}")
        for name, gauge in gauges:
            if name in self._help:
                lines.append(f"# HELP {name} {self._help[name]}")
            lines.append(f"# TYPE {name} gauge")
            lines.append(f"{name} {gauge}")
        return "\n".join(lines) + "\n"
