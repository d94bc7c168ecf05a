"""Worker counters and gauges, exported in the Prometheus text format at ``/metrics``.

``palaute ingest --metrics-port N`` serves them (``fleet/ingest/http.py``); the demo serves
them through its API.  Deliberately tiny: a handful of metrics, no client library.
"""

from __future__ import annotations

import threading
from collections import Counter
from typing import Literal

Kind = Literal["counter", "gauge"]
_LabelSet = tuple[tuple[str, str], ...]


def _escape(value: str) -> str:
    # The exposition format quotes label values: backslash, double quote and newline must be
    # escaped or a scraper rejects the whole page.
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _sample(name: str, labels: _LabelSet, value: float) -> str:
    text = ",".join(f'{key}="{_escape(val)}"' for key, val in labels)
    number = int(value) if float(value).is_integer() else value
    return f"{name}{{{text}}} {number}" if text else f"{name} {number}"


class Metrics:
    """Thread-safe counters and gauges with optional labels (``refused{reason="bad_json"}``)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._counters: Counter[tuple[str, _LabelSet]] = Counter()
        self._gauges: dict[tuple[str, _LabelSet], float] = {}
        self._help: dict[str, str] = {}
        self._kind: dict[str, Kind] = {}

    def describe(self, name: str, help_text: str, kind: Kind = "counter") -> None:
        """Attach HELP text and a type to a metric name.

        A described metric is listed even before its first sample, and an unlabelled counter
        shows ``0`` then: a scraper tells "nothing happened" from "metric missing".
        """
        with self._lock:
            self._help[name] = help_text
            self._kind[name] = kind

    def inc(self, name: str, amount: int = 1, **labels: str) -> None:
        """Add ``amount`` to counter ``name`` with ``labels``."""
        key = (name, tuple(sorted(labels.items())))
        with self._lock:
            self._counters[key] += amount

    def set(self, name: str, value: float, **labels: str) -> None:
        """Set gauge ``name`` (with ``labels``) to ``value``."""
        with self._lock:
            self._gauges[(name, tuple(sorted(labels.items())))] = value

    def get(self, name: str, **labels: str) -> int:
        """Current value of a counter (0 if never incremented)."""
        with self._lock:
            return self._counters[(name, tuple(sorted(labels.items())))]

    def gauge(self, name: str, **labels: str) -> float | None:
        """Current value of a gauge (None if never set)."""
        with self._lock:
            return self._gauges.get((name, tuple(sorted(labels.items()))))

    def total(self, name: str) -> int:
        """Sum of a counter over all its label sets."""
        with self._lock:
            return sum(v for (n, _), v in self._counters.items() if n == name)

    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        with self._lock:
            samples: dict[str, list[tuple[_LabelSet, float]]] = {}
            kinds: dict[str, Kind] = dict(self._kind)
            for (name, labels), value in self._counters.items():
                samples.setdefault(name, []).append((labels, value))
                kinds.setdefault(name, "counter")
            for (name, labels), gauge in self._gauges.items():
                samples.setdefault(name, []).append((labels, gauge))
                kinds.setdefault(name, "gauge")
            help_texts = dict(self._help)
        lines: list[str] = []
        for name in sorted(kinds):
            if name in help_texts:
                lines.append(f"# HELP {name} {help_texts[name]}")
            lines.append(f"# TYPE {name} {kinds[name]}")
            rows = sorted(samples.get(name, []))
            if not rows and kinds[name] == "counter":
                rows = [((), 0)]
            lines.extend(_sample(name, labels, value) for labels, value in rows)
        return "\n".join(lines) + "\n"
