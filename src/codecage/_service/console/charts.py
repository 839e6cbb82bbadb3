"""The console's charts, from the data /metrics serves (the Manager's prometheus
registry), sampled every few seconds into a ring: runs per minute by outcome, run latency
percentiles (from the histogram's buckets), memory in use. Drawn as SVG on the server:
the browser shows them as images, so nothing in them can run."""

from __future__ import annotations

import collections
import math
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from markupsafe import escape

SAMPLE_EVERY_S = 5.0
KEEP = 720  # an hour of samples
WINDOW_MIN = 30  # minutes the charts show
COLOURS = ("#2b7bb9", "#c0392b", "#27ae60", "#8e44ad", "#d35400", "#7f8c8d", "#16a085")


@dataclass
class Sample:
    at: float
    runs: dict[str, float] = field(default_factory=dict)  # outcome -> runs so far
    buckets: dict[float, float] = field(default_factory=dict)  # le -> runs so far, all kinds
    memory_bytes: float = 0.0
    live: float = 0.0


def read(registry: Any, at: float) -> Sample:
    """One sample of the registry: what a scrape of /metrics would show."""
    sample = Sample(at)
    for family in registry.collect():
        for s in family.samples:
            if s.name == "codecage_runs_total":
                outcome = s.labels.get("outcome", "")
                sample.runs[outcome] = sample.runs.get(outcome, 0.0) + s.value
            elif s.name == "codecage_run_seconds_bucket":
                le = float(s.labels["le"])
                sample.buckets[le] = sample.buckets.get(le, 0.0) + s.value
            elif s.name == "codecage_sandboxes_memory_bytes":
                sample.memory_bytes = s.value
            elif s.name == "codecage_sandboxes_live":
                sample.live = s.value
    return sample


class Sampler:
    """A daemon thread sampling `registry` every SAMPLE_EVERY_S (started once, by the first
    request the console's dispatcher sees)."""

    def __init__(self, registry: Any) -> None:
        self.registry = registry
        self.samples: collections.deque[Sample] = collections.deque(maxlen=KEEP)
        self._lock = threading.Lock()
        self._thread = threading.Thread(target=self._loop, name="codecage-console", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while True:
            self.take()
            time.sleep(SAMPLE_EVERY_S)

    def take(self) -> None:
        sample = read(self.registry, time.time())
        with self._lock:
            self.samples.append(sample)

    def snapshot(self) -> list[Sample]:
        self.take()  # the latest figures, as of this request
        with self._lock:
            return list(self.samples)


def per_minute(samples: list[Sample], now: float) -> list[tuple[float, Sample, Sample]]:
    """(minute's start, first sample, last sample) for each of the last WINDOW_MIN minutes
    with samples: what changed in a minute is last minus first (and the one before it)."""
    out = []
    start = math.floor(now / 60) * 60 - (WINDOW_MIN - 1) * 60
    previous: Sample | None = None
    by_minute: dict[float, list[Sample]] = collections.defaultdict(list)
    for s in samples:
        by_minute[math.floor(s.at / 60) * 60].append(s)
    for minute in sorted(by_minute):
        group = by_minute[minute]
        first = previous or group[0]
        if minute >= start:
            out.append((minute, first, group[-1]))
        previous = group[-1]
    return out


def runs_series(samples: list[Sample], now: float) -> dict[str, list[tuple[float, float]]]:
    """Runs per minute, by outcome."""
    minutes = per_minute(samples, now)
    outcomes = sorted({o for _, _, last in minutes for o in last.runs})
    return {
        o: [
            (m, max(0.0, last.runs.get(o, 0.0) - first.runs.get(o, 0.0)))
            for m, first, last in minutes
        ]
        for o in outcomes
    }


def quantile(buckets: dict[float, float], q: float) -> float | None:
    """The q-quantile of a cumulative histogram (le -> count), interpolated in its bucket
    as Prometheus' histogram_quantile does; None without observations."""
    bounds = sorted(buckets)
    if not bounds or buckets[bounds[-1]] <= 0:
        return None
    total, low, below = buckets[bounds[-1]], 0.0, 0.0
    rank = q * total
    for le in bounds:
        count = buckets[le]
        if count >= rank:
            if math.isinf(le):
                return low  # beyond the last finite bound: its value is all we know
            inside = count - below
            return low + (le - low) * ((rank - below) / inside if inside else 1.0)
        low, below = le, count
    return low


def latency_series(samples: list[Sample], now: float) -> dict[str, list[tuple[float, float]]]:
    """p50, p90, p99 of the runs that ended in each minute, in milliseconds."""
    out: dict[str, list[tuple[float, float]]] = {"p50": [], "p90": [], "p99": []}
    for minute, first, last in per_minute(samples, now):
        delta = {le: last.buckets.get(le, 0.0) - first.buckets.get(le, 0.0) for le in last.buckets}
        for name, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99)):
            value = quantile(delta, q)
            if value is not None:
                out[name].append((minute, value * 1000))
    return out


def memory_series(samples: list[Sample], now: float) -> dict[str, list[tuple[float, float]]]:
    """Memory charged to all live sandboxes (MiB), at each sample of the window."""
    start = now - WINDOW_MIN * 60
    return {"memory MiB": [(s.at, s.memory_bytes / (1 << 20)) for s in samples if s.at >= start]}


def svg(title: str, series: dict[str, list[tuple[float, float]]], unit: str, now: float) -> str:
    """A line chart of `series` over the last WINDOW_MIN minutes (x: time, y: from 0)."""
    w, h, left, right, top, bottom = 640, 240, 56, 130, 28, 28
    x0, x1 = now - WINDOW_MIN * 60, now
    top_value = max([v for points in series.values() for _, v in points] + [0.0])
    y1 = _nice(top_value)
    pw, ph = w - left - right, h - top - bottom

    def x(t: float) -> float:
        return left + pw * (t - x0) / (x1 - x0)

    def y(v: float) -> float:
        return top + ph * (1 - v / y1)

    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" viewBox="0 0 {w} {h}"'
        ' font-family="sans-serif" font-size="11">',
        f'<rect width="{w}" height="{h}" fill="#ffffff"/>',
        f'<text x="{left}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    for i in range(5):
        v = y1 * i / 4
        parts.append(
            f'<line x1="{left}" x2="{left + pw}" y1="{y(v):.1f}" y2="{y(v):.1f}" stroke="#e5e5e5"/>'
        )
        parts.append(f'<text x="{left - 4}" y="{y(v) + 4:.1f}" text-anchor="end">{v:g}</text>')
    for minutes_ago in (30, 20, 10, 0):
        t = now - minutes_ago * 60
        label = time.strftime("%H:%M", time.localtime(t))
        parts.append(f'<text x="{x(t):.1f}" y="{h - 8}" text-anchor="middle">{label}</text>')
    parts.append(f'<text x="8" y="{top - 8}">{escape(unit)}</text>')
    for i, (name, points) in enumerate(sorted(series.items())):
        colour = COLOURS[i % len(COLOURS)]
        coords = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in points if t >= x0)
        if coords:
            parts.append(
                f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="2"/>'
            )
            for t, v in points[-1:]:
                parts.append(f'<circle cx="{x(t):.1f}" cy="{y(v):.1f}" r="3" fill="{colour}"/>')
        ly = top + 14 * i + 8
        parts.append(
            f'<rect x="{w - right + 12}" y="{ly - 8}" width="10" height="10" fill="{colour}"/>'
        )
        parts.append(f'<text x="{w - right + 28}" y="{ly + 1}">{escape(name)}</text>')
    if not any(series.values()):
        parts.append(
            f'<text x="{left + pw / 2}" y="{top + ph / 2}" text-anchor="middle" fill="#888">no data yet</text>'
        )
    parts.append("</svg>")
    return "\n".join(parts)


def _nice(value: float) -> float:
    """A round top for the y axis, at least `value`."""
    if value <= 0:
        return 1.0
    magnitude = 10 ** math.floor(math.log10(value))
    for step in (1, 2, 5, 10):
        if step * magnitude >= value:
            return float(step * magnitude)
    return float(10 * magnitude)
