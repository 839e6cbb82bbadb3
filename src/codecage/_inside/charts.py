"""Structured results inside the sandbox: a matplotlib figure as chart data, a DataFrame as
columns. Both ride in the result's MIME bundle (docs/protocol.md):

    application/vnd.codecage.chart+json   {"type", "title", "elements", ...} (E2B's Result.chart)
    application/vnd.codecage.data+json    {column: [values]}                 (E2B's Result.data)

Imported by shell.py only (IPython land); matplotlib and pandas are looked up in sys.modules,
never imported here: an object of theirs exists only if user code imported them. Every value
is made plain JSON (no NaN, no numpy scalars), and a chart or table whose JSON would pass
MAX_BYTES is left out: the image and text of the result still come.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import math
import re
import sys
from typing import Any

CHART_MIME = "application/vnd.codecage.chart+json"
DATA_MIME = "application/vnd.codecage.data+json"
MAX_BYTES = 2 << 20
MAX_POINTS = 100_000  # per chart, over all its elements
_UNIT = re.compile(r"\s\((.*?)\)|\[(.*?)\]")
_SCALES = {"linear", "log", "symlog", "logit", "function", "functionlog", "asinh"}


def plain(value: Any) -> Any:
    """A JSON value: numpy scalars as Python numbers, NaN and infinities as null,
    timestamps as ISO text, anything else unknown as its str()."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    item = getattr(value, "item", None)  # numpy scalars
    if callable(item):
        try:
            return plain(item())
        except (TypeError, ValueError):
            pass
    iso = getattr(value, "isoformat", None)  # pandas.Timestamp
    if callable(iso):
        return str(iso())
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return str(value)


def _bounded(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        size = len(json.dumps(value, allow_nan=False))
    except (TypeError, ValueError):
        return None
    return value if size <= MAX_BYTES else None


# -- DataFrames -------------------------------------------------------------------------------


def dataframe_data(obj: Any) -> dict[str, Any] | None:
    """A pandas DataFrame as {column: [values]}; None for anything else."""
    pandas = sys.modules.get("pandas")
    if pandas is None or not isinstance(obj, pandas.DataFrame):
        return None
    if obj.size > MAX_POINTS * 4:
        return None
    return _bounded({str(col): [plain(v) for v in obj[col].tolist()] for col in obj.columns})


# -- charts -----------------------------------------------------------------------------------


def figure_chart(obj: Any) -> dict[str, Any] | None:
    """A matplotlib Figure as chart data; None for anything else or a blank figure."""
    if sys.modules.get("matplotlib.figure") is None:
        return None
    from matplotlib.figure import Figure

    if not isinstance(obj, Figure):
        return None
    axes = [ax for ax in obj.get_axes() if ax.has_data()]
    if not axes:
        return None
    _drawn(obj)
    budget = [MAX_POINTS]
    if len(obj.get_axes()) > 1:
        title = obj.get_suptitle() if hasattr(obj, "get_suptitle") else ""
        chart: dict[str, Any] = {
            "type": "superchart",
            "title": title or None,
            "elements": [_axes_chart(ax, budget) for ax in obj.get_axes()],
        }
    else:
        chart = _axes_chart(axes[0], budget)
    return _bounded(plain(chart))


def _drawn(fig: Any) -> None:
    """Tick labels are only known once the figure was drawn (savefig for the PNG usually
    did): draw without rendering when they are not."""
    for ax in fig.get_axes():
        if any(t.get_text() for t in ax.get_xticklabels() + ax.get_yticklabels()):
            continue
        with contextlib.suppress(Exception):
            fig.draw_without_rendering()
        return


def _kind(ax: Any) -> str:
    from matplotlib.collections import PathCollection
    from matplotlib.lines import Line2D
    from matplotlib.patches import PathPatch, Rectangle, Wedge

    artists = [*ax.lines, *ax.patches, *ax.collections, *ax.images]
    if all(isinstance(a, Line2D) for a in artists):
        return "line"
    if all(isinstance(a, (PathPatch, Line2D)) for a in artists):
        return "box_and_whisker"
    if all(isinstance(a, PathCollection) for a in artists):
        return "scatter"
    if all(isinstance(a, Wedge) for a in artists):
        return "pie"
    if all(isinstance(a, Rectangle) for a in artists):
        return "bar"
    return "unknown"


def _axes_chart(ax: Any, budget: list[int]) -> dict[str, Any]:
    kind = _kind(ax)
    chart: dict[str, Any] = {"type": kind, "title": ax.get_title() or None, "elements": []}
    if kind == "pie":
        chart["elements"] = _pie(ax)
        return chart
    chart.update(_labels(ax))
    if kind in ("line", "scatter"):
        chart.update(_axis(ax, "x"))
        chart.update(_axis(ax, "y"))
        chart["elements"] = _points(ax, kind, budget)
    elif kind == "bar":
        chart["elements"] = _bars(ax, chart)
    elif kind == "box_and_whisker":
        chart["elements"] = _boxes(ax)
    return chart


def _labels(ax: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for axis in ("x", "y"):
        label = getattr(ax, f"get_{axis}label")() or None
        unit = None
        if label:
            match = _UNIT.search(label)
            if match:
                unit = match.group(1) or match.group(2)
        out[f"{axis}_label"], out[f"{axis}_unit"] = label, unit
    return out


def _scale(ax: Any, axis: str) -> str:
    which = ax.xaxis if axis == "x" else ax.yaxis
    units = getattr(which, "units", None)
    if type(units).__name__ == "UnitData":
        return "categorical"
    converter = which.get_converter() if hasattr(which, "get_converter") else which.converter
    if converter is not None and "date" in type(converter).__module__.split(".")[-1]:
        return "datetime"
    scale = getattr(ax, f"get_{axis}scale")()
    return scale if scale in _SCALES else "unknown"


def _converter(ax: Any, axis: str) -> Any:
    """How a value on this axis reads: an ISO date, a category's name, or the number."""
    scale = _scale(ax, axis)
    if scale == "datetime":
        from matplotlib.dates import num2date

        return lambda v: num2date(float(v)).isoformat()
    if scale == "categorical":
        which = ax.xaxis if axis == "x" else ax.yaxis
        names = {int(i): str(k) for k, i in which.units._mapping.items()}
        return lambda v: names.get(round(float(v)), str(v))
    return lambda v: float(v)


def _axis(ax: Any, axis: str) -> dict[str, Any]:
    convert = _converter(ax, axis)
    ticks = getattr(ax, f"get_{axis}ticks")()
    labels = [t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")()]
    return {
        f"{axis}_scale": _scale(ax, axis),
        f"{axis}_ticks": [convert(t) for t in ticks],
        f"{axis}_tick_labels": labels,
    }


def _points(ax: Any, kind: str, budget: list[int]) -> list[dict[str, Any]]:
    fx, fy = _converter(ax, "x"), _converter(ax, "y")
    out = []
    series = ax.lines if kind == "line" else ax.collections
    for artist in series:
        xy = artist.get_xydata() if kind == "line" else artist.get_offsets()
        rows = list(xy)[: max(0, budget[0])]
        budget[0] -= len(rows)
        out.append({"label": str(artist.get_label()), "points": [[fx(x), fy(y)] for x, y in rows]})
    return out


def _tick_name(ax: Any, axis: str, position: float) -> str:
    ticks = getattr(ax, f"get_{axis}ticks")()
    labels = [t.get_text() for t in getattr(ax, f"get_{axis}ticklabels")()]
    for tick, label in zip(ticks, labels, strict=False):
        if abs(float(tick) - position) < 1e-6:
            return str(label)
    return str(round(position, 6))


def _bars(ax: Any, chart: dict[str, Any]) -> list[dict[str, Any]]:
    from matplotlib.container import BarContainer

    groups = [(c, str(c.get_label())) for c in ax.containers if isinstance(c, BarContainer)]
    if not groups:
        groups = [(ax.patches, "")]
    horizontal = any(getattr(c, "orientation", None) == "horizontal" for c, _ in groups)
    out = []
    for container, group in groups:
        for rect in container:
            if horizontal:
                center, value = rect.get_y() + rect.get_height() / 2, rect.get_width()
                label = _tick_name(ax, "y", center)
            else:
                center, value = rect.get_x() + rect.get_width() / 2, rect.get_height()
                label = _tick_name(ax, "x", center)
            out.append({"label": label, "group": group, "value": plain(value)})
    if horizontal:  # the value runs along x: say so in the labels' order too
        chart["x_label"], chart["y_label"] = chart["y_label"], chart["x_label"]
        chart["x_unit"], chart["y_unit"] = chart["y_unit"], chart["x_unit"]
    return out


def _pie(ax: Any) -> list[dict[str, Any]]:
    return [
        {
            "label": str(w.get_label()),
            "angle": round(abs(w.theta2 - w.theta1), 6),
            "radius": plain(w.r),
        }
        for w in ax.patches
    ]


def _boxes(ax: Any) -> list[dict[str, Any]]:
    """Boxes (PathPatch) with their whiskers, median and fliers (Line2D) found by position."""
    from matplotlib.patches import PathPatch

    boxes = [p for p in ax.patches if isinstance(p, PathPatch)]
    vertical = True
    for line in ax.lines:
        xs = list(line.get_xdata())
        if len(xs) == 2 and xs[0] == xs[1]:
            break
        ys = list(line.get_ydata())
        if len(ys) == 2 and ys[0] == ys[1] and xs[0] != xs[1] and line.get_linestyle() != "None":
            vertical = False
    out = []
    for box in boxes:
        verts = box.get_path().vertices
        across, along = (verts[:, 0], verts[:, 1]) if vertical else (verts[:, 1], verts[:, 0])
        lo, hi, q1, q3 = (
            float(min(across)),
            float(max(across)),
            float(min(along)),
            float(max(along)),
        )
        item: dict[str, Any] = {"first_quartile": q1, "third_quartile": q3, "outliers": []}
        ends, median = [q1, q3], None
        for line in ax.lines:
            a = [float(v) for v in (line.get_xdata() if vertical else line.get_ydata())]
            b = [float(v) for v in (line.get_ydata() if vertical else line.get_xdata())]
            if not a or min(a) < lo - 1e-9 or max(a) > hi + 1e-9:
                continue
            if line.get_linestyle() in ("None", "none", "", " "):
                item["outliers"] = [plain(v) for v in b]
            elif len(a) == 2 and a[0] == a[1]:
                ends += b  # a whisker
            elif len(b) == 2 and b[0] == b[1] and (max(a) - min(a)) >= 0.9 * (hi - lo):
                median = b[0]
        center = (lo + hi) / 2
        item.update(
            label=_tick_name(ax, "x" if vertical else "y", center),
            min=min(ends),
            max=max(ends),
            median=median if median is not None else (q1 + q3) / 2,
        )
        out.append(item)
    return out


# -- IPython formatters -----------------------------------------------------------------------


def install(shell: Any) -> None:
    """Add the two formats to a shell's display formatter (every result gets them where
    they apply, the main result and display() alike)."""
    from IPython.core.formatters import BaseFormatter
    from traitlets import ObjectName, Unicode

    class ChartFormatter(BaseFormatter):  # type: ignore[misc]
        format_type = Unicode(CHART_MIME)
        print_method = ObjectName("_repr_codecage_chart_")
        _return_type = (dict,)

        def __call__(self, obj: Any) -> Any:
            try:
                return figure_chart(obj)
            except Exception:
                return None  # a figure this cannot read: its image still comes

    class DataFormatter(BaseFormatter):  # type: ignore[misc]
        format_type = Unicode(DATA_MIME)
        print_method = ObjectName("_repr_codecage_data_")
        _return_type = (dict,)

        def __call__(self, obj: Any) -> Any:
            try:
                return dataframe_data(obj)
            except Exception:
                return None

    display = shell.display_formatter
    display.formatters[CHART_MIME] = ChartFormatter(parent=display)
    display.formatters[DATA_MIME] = DataFormatter(parent=display)
    active = list(display.active_types)
    display.active_types = active + [m for m in (CHART_MIME, DATA_MIME) if m not in active]
