"""The main job: a data-analysis run in a codecage sandbox.

Generates a CSV here, uploads it, computes grouped statistics with pandas, draws a
seaborn chart, and brings the PNG back into ./demo-output/, timing every step.
"""

from __future__ import annotations

import base64
import csv
import io
import random
import time
from pathlib import Path

from codecage import Policy, Sandbox
from codecage._jail import get_jail

OUT = Path("demo-output")


def make_csv(rows: int = 5000) -> bytes:
    rng = random.Random(7)
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["region", "product", "units", "price"])
    for _ in range(rows):
        writer.writerow(
            [
                rng.choice(["north", "south", "east", "west"]),
                rng.choice(["widget", "gadget", "gizmo"]),
                rng.randint(1, 40),
                round(rng.uniform(2.0, 30.0), 2),
            ]
        )
    return buf.getvalue().encode()


ANALYSIS = """
import pandas as pd
df = pd.read_csv("sales.csv")
df["revenue"] = df.units * df.price
table = df.groupby("region").agg(orders=("units", "size"), units=("units", "sum"),
                                 revenue=("revenue", "sum")).round(1).sort_values("revenue", ascending=False)
print(table.to_string())
"""

CHART = """
import seaborn as sns, matplotlib.pyplot as plt
ax = sns.barplot(data=df, x="region", y="revenue", hue="product", estimator="sum", errorbar=None)
ax.set_title("Revenue by region and product")
plt.tight_layout()
plt.savefig("revenue.png", dpi=100)
plt.show()
"""


def step(name: str, timings: list[tuple[str, float]], started: float) -> None:
    elapsed = (time.perf_counter() - started) * 1000
    timings.append((name, elapsed))
    print(f"  {name:<38} {elapsed:8.1f} ms")


def main() -> None:
    OUT.mkdir(exist_ok=True)
    timings: list[tuple[str, float]] = []
    print("codecage demo: a data-analysis run in a sandbox\n")
    t = time.perf_counter()
    data = make_csv()
    step(f"generate sales.csv ({len(data) // 1024} KiB)", timings, t)
    t = time.perf_counter()
    get_jail("namespace")
    step("start the template (once per process)", timings, t)
    t = time.perf_counter()
    with Sandbox(Policy(memory_mb=1024, timeout_s=60)) as sbx:
        step("start a sandbox", timings, t)
        t = time.perf_counter()
        sbx.files.write("sales.csv", data)
        step("upload the CSV", timings, t)
        t = time.perf_counter()
        analysis = sbx.run_code(ANALYSIS)
        step("grouped statistics (pandas)", timings, t)
        t = time.perf_counter()
        chart = sbx.run_code(CHART)
        step("draw the chart (imports seaborn)", timings, t)
        t = time.perf_counter()
        png = sbx.files.read("revenue.png")
        (OUT / "revenue.png").write_bytes(png)
        step("download the PNG", timings, t)
    for ex in (analysis, chart):
        if ex.error is not None:
            raise SystemExit(f"the sandbox reported an error:\n{ex.error.traceback}")
    shown = [r for r in chart.results if r.png]
    if shown:
        (OUT / "revenue-shown.png").write_bytes(base64.b64decode(shown[0].png or ""))
    print("\nRevenue by region (computed inside the sandbox):\n")
    print("".join(analysis.logs.stdout))
    print(f"chart: {OUT / 'revenue.png'} ({len(png) // 1024} KiB), also returned as a PNG result")
    print(f"total: {sum(ms for _, ms in timings):.0f} ms")


if __name__ == "__main__":
    main()
