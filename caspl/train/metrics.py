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


def ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=lambda i: values[i])
    out = [0.0] * len(values)
    start = 0
    while start < len(order):
        end = start
        while end + 1 < len(order) and values[order[end + 1]] == values[order[start]]:
            end += 1
        for i in order[start:end + 1]:
            out[i] = (start + end) / 2 + 1
        start = end + 1
    return out


def spearman(xs: Sequence[float], ys: Sequence[float]) -> float:
    """Spearman's rank correlation (Pearson's on average ranks); nan for fewer than 3 pairs or a constant side."""
    if len(xs) != len(ys):
        raise ValueError(f"spearman needs pairs, got {len(xs)} and {len(ys)} values")
    if len(xs) < 3:
        return float("nan")
    rx, ry = ranks(xs), ranks(ys)
    mx, my = statistics.fmean(rx), statistics.fmean(ry)
    cov = sum((a - mx) * (b - my) for a, b in zip(rx, ry))
    spread = (sum((a - mx) ** 2 for a in rx) * sum((b - my) ** 2 for b in ry)) ** 0.5
    return float("nan") if spread == 0 else cov / spread
