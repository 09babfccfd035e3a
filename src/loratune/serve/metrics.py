"""The server's counters, in Prometheus' text format (``GET /metrics``), without a client library.

Per adapter (label ``adapter``; ``""`` for requests that named none we know): requests by route and status,
the latency of classify requests (a histogram, seconds), rows per forward pass that the adapter had in it (a histogram), and
the size of each forward pass (rows, all adapters together). Updated and read on the event loop only.
"""

from __future__ import annotations

import bisect
import math
from collections import defaultdict

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Histogram:
    def __init__(self, buckets: tuple[float, ...]) -> None:
        self.buckets = buckets
        self.counts = [0] * (len(buckets) + 1)          # the last: +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.buckets, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str, labels: str) -> list[str]:
        out, total = [], 0
        sep = "," if labels else ""
        for bound, c in zip((*self.buckets, float("inf")), self.counts):
            total += c
            le = "+Inf" if bound == float("inf") else f"{bound:g}"
            out.append(f'{name}_bucket{{{labels}{sep}le="{le}"}} {total}')
        tag = f"{{{labels}}}" if labels else ""
        out.append(f"{name}_sum{tag} {self.sum:.6f}")
        out.append(f"{name}_count{tag} {self.count}")
        return out


def _label(value: str | None) -> str:
    text = "" if value is None else str(value)
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class Metrics:
    def __init__(self) -> None:
        self.requests: dict[tuple[str, str, int], int] = defaultdict(int)   # (adapter, route, status) -> n
        self.latency: dict[str, Histogram] = {}
        self.rows: dict[str, Histogram] = {}
        self.batch = Histogram(BATCH_BUCKETS)
        self.texts: dict[str, int] = defaultdict(int)

    def request(self, adapter: str | None, route: str, status: int, seconds: float, texts: int = 0) -> None:
        key = _label(adapter)
        self.requests[(key, route, status)] += 1
        if status < 400 and texts:                     # classify requests: the latency a client of an adapter sees
            self.latency.setdefault(key, Histogram(LATENCY_BUCKETS)).observe(seconds)
            self.texts[key] += texts

    def batch_ran(self, counts: dict[str | None, int]) -> None:
        self.batch.observe(sum(counts.values()))
        for name, n in counts.items():
            self.rows.setdefault(_label(name), Histogram(BATCH_BUCKETS)).observe(n)

    def text(self, gauges: dict[str, float]) -> str:
        lines = ["# HELP loratune_requests_total Requests answered, by adapter, route and HTTP status.",
                 "# TYPE loratune_requests_total counter"]
        for (adapter, route, status), n in sorted(self.requests.items()):
            lines.append(f'loratune_requests_total{{adapter="{adapter}",route="{route}",status="{status}"}} {n}')
        lines += ["# HELP loratune_request_errors_total Requests answered with a 4xx or 5xx status, by adapter.",
                  "# TYPE loratune_request_errors_total counter"]
        errors: dict[str, int] = defaultdict(int)
        for (adapter, _, status), n in self.requests.items():
            if status >= 400:
                errors[adapter] += n
        for adapter, n in sorted(errors.items()):
            lines.append(f'loratune_request_errors_total{{adapter="{adapter}"}} {n}')
        lines += ["# HELP loratune_texts_total Texts classified, by adapter.", "# TYPE loratune_texts_total counter"]
        for adapter, n in sorted(self.texts.items()):
            lines.append(f'loratune_texts_total{{adapter="{adapter}"}} {n}')
        lines += ["# HELP loratune_request_latency_seconds Time from a request's arrival to its answer, by adapter.",
                  "# TYPE loratune_request_latency_seconds histogram"]
        for adapter, h in sorted(self.latency.items()):
            lines += h.lines("loratune_request_latency_seconds", f'adapter="{adapter}"')
        lines += ["# HELP loratune_adapter_batch_rows Rows of each forward pass that went through an adapter.",
                  "# TYPE loratune_adapter_batch_rows histogram"]
        for adapter, h in sorted(self.rows.items()):
            lines += h.lines("loratune_adapter_batch_rows", f'adapter="{adapter}"')
        lines += ["# HELP loratune_batch_rows Rows of each forward pass, all adapters together.",
                  "# TYPE loratune_batch_rows histogram"]
        lines += self.batch.lines("loratune_batch_rows", "")
        for name, value in gauges.items():
            lines += [f"# TYPE loratune_{name} gauge", f"loratune_{name} {_number(value)}"]
        return "\n".join(lines) + "\n"


def _number(value: float) -> str:
    """A sample value as Prometheus' text format writes it, exactly (``:g`` wrote 1,234,567 bytes as 1.23457e+06)."""
    if isinstance(value, (bool, int)):
        return str(int(value))
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))
