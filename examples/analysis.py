"""The demo's job: a small pandas + numpy computation, run inside a codecage sandbox."""

import time

import numpy as np
import pandas as pd

started = time.perf_counter()
rng = np.random.default_rng()
df = pd.DataFrame(
    {
        "region": rng.choice(["north", "south", "east", "west"], size=10_000),
        "sales": rng.gamma(2.0, 50.0, size=10_000).round(2),
    }
)
summary = df.groupby("region")["sales"].agg(["count", "mean", "sum"]).round(1)
print(summary.to_string())
print(f"\ncomputed in {(time.perf_counter() - started) * 1000:.1f} ms inside the sandbox")
