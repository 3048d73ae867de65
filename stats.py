"""
Bootstrap 95% intervals for eval.py's metrics: percentile intervals over items, where the records that share
an item are resampled together, and paired intervals of a change (trained - base) where one resample of
items is applied to both models.

    score(metrics_fn, records, n_boot, seed)               -> {"metrics", "ci", "n"}
    bootstrap_change(metrics_fn, base_records, records)    -> {metric: [change, lo, hi]}

metrics_fn is a threat's `metrics` (threats.py) or any function of a list of records to {name: number}.
"""

import math
import random

import numpy as np

NOT_ESTIMATES = ("n", "survivors")   # counts: no interval
RATIOS = ("brr",)                    # also reported as trained / base: the BRR ratio, Paper A's headline


def finite(x):
    return isinstance(x, (int, float)) and math.isfinite(x)


def interval(values):
    values = [v for v in values if finite(v)]
    return [float(np.percentile(values, 2.5)),
            float(np.percentile(values, 97.5))] if values else [math.nan] * 2


def resamples(n_records, n_boot, seed):
    rng = random.Random(seed)
    return [[rng.randrange(n_records) for _ in range(n_records)] for _ in range(n_boot)]


def clusters(records):
    """The records grouped by the item they share, {item: indices}: a persona (probe, persona) pair is scored
    at every k, and sycophancy asks a question in every format, so their records are not independent draws.
    A record without an id (a perplexity line) is its own cluster."""
    groups = {}
    for i, r in enumerate(records):
        groups.setdefault((r.get("kind"), r["id"], r.get("persona")) if "id" in r else i, []).append(i)
    return groups


def draw(records, groups, idx):
    return [records[i] for c in idx for i in groups[c]]


def bootstrap(metrics_fn, records, n_boot=1000, seed=0) -> dict:
    """Percentile 95% interval of every metric: resample the items (clusters of records) with replacement,
    recompute."""
    point, groups = metrics_fn(records), list(clusters(records).values())
    draws = [metrics_fn(draw(records, groups, idx)) for idx in resamples(len(groups), n_boot, seed)]
    return {k: interval([d.get(k) for d in draws]) for k in point if k not in NOT_ESTIMATES}


def bootstrap_change(metrics_fn, base_records, records, n_boot=1000, seed=0) -> dict:
    """(trained - base, 95% interval) per metric, paired: one resample of items is applied to both. Where
    one model's records lack items the other's have (a model judge left them out), both are compared on the
    items they share; lists with no item in common resample apart."""
    by_b, by = clusters(base_records), clusters(records)
    common = [k for k in by_b if k in by]
    if common:
        base_records = [base_records[i] for k in common for i in by_b[k]]
        records = [records[i] for k in common for i in by[k]]
        by_b, by = clusters(base_records), clusters(records)
    point_b, point = metrics_fn(base_records), metrics_fn(records)
    groups_b, groups = list(by_b.values()), list(by.values())
    idx_b = resamples(len(groups_b), n_boot, seed)
    idx = idx_b if common else resamples(len(groups), n_boot, seed + 1)
    draws = [(metrics_fn(draw(base_records, groups_b, ib)), metrics_fn(draw(records, groups, it)))
             for ib, it in zip(idx_b, idx)]
    out = {}
    for k in point:
        if k in NOT_ESTIMATES or not (finite(point.get(k)) and finite(point_b.get(k))):
            continue
        out[k] = [point[k] - point_b[k]] + interval([t.get(k, math.nan) - b.get(k, math.nan)
                                                     for b, t in draws])
        if k in RATIOS and point_b[k]:
            out[k + "_ratio"] = [point[k] / point_b[k]] + interval([t.get(k, math.nan) / b[k]
                                                                    if b.get(k) else math.nan
                                                                    for b, t in draws])
    return out


def score(metrics_fn, records, n_boot, seed):
    """The metrics of `records`, each estimate's interval and the record count."""
    metrics = metrics_fn(records)
    return {"metrics": metrics, "ci": bootstrap(metrics_fn, records, n_boot, seed),
            "n": int(metrics.get("n", len(records)))}
