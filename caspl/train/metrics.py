"""Accuracy, base/novel harmonic mean, and seed aggregation (DESIGN §2.4)."""

from __future__ import annotations

import statistics
from typing import Mapping, Sequence


def harmonic_mean(base: float, novel: float) -> float:
    return 0.0 if base + novel == 0 else 2 * base * novel / (base + novel)


def aggregate_seeds(per_seed: Sequence[Mapping[str, float]], keys: Sequence[str] = ("base", "novel")) -> dict:
    """Mean and sample std of each key over seeds, and `hm` = HM of the *mean* base and novel accuracies."""
    out: dict = {"seeds": len(per_seed)}
    for key in keys:
        values = [float(r[key]) for r in per_seed]
        out[key] = statistics.fmean(values)
        out[f"{key}_std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    if "base" in keys and "novel" in keys:
        out["hm"] = harmonic_mean(out["base"], out["novel"])
    return out
