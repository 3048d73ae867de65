"""
Which way each consistency-trained model moved the residual stream on wrapped prompts, and whether the
targets moved it the same way (the paper: ACT, MLPCT and AttCT share one residual-stream mechanism, BCT is
distinct). eval.py runs it beside the per-layer losses, on the same held-out pairs of each train threat:

    d_m = h_m(w) - h_theta0(w)      model m's change to theta0's residual stream on the wrapped prompt

where h is every layer's residual stream (each block's output, the last after the final norm: what ACT
compares) at the token suffix the clean and wrapped prompts share. Per pair and layer, over the suffix's
tokens and d_model together:
    similarity   cos(d_m, d_m') for every two models: do they move the stream the same way?
    to_clean     cos(d_m, h_theta0(x) - h_theta0(w)): does m move the wrapped run toward the clean one?
    distance     |h_m(w) - h_theta0(x)| / |h_theta0(x)|: how far the wrapped run stays from the clean one,
                 in units of the clean run's norm (theta0's own row is the attack's distance)
Each is averaged over pairs, per layer and over all layers, with a percentile 95% bootstrap interval that
resamples items (pairs of one item together). A model that did not move has no direction: its cosines are
n/a.
"""

import warnings

import numpy as np
import torch

from cli import pyplot, save_figure
from consistency import collate, residual_stream
from model import FINAL_NORM, gather


@torch.no_grad()
def suffix_residuals(model, tok, aligned, side, batch_size=4):
    """Per pair, the residual stream at the shared suffix of its clean ("c") or wrapped ("w") prompt:
    (layers, suffix tokens, d_model), fp32."""
    out = []
    for s in range(0, len(aligned), batch_size):
        batch = collate(aligned[s:s + batch_size], tok.pad_id)
        ids, idx = (batch.clean_ids, batch.suffix_c) if side == "c" else (batch.wrapped_ids, batch.suffix_w)
        run = model(ids, capture=("blocks.*.hook_resid_post", FINAL_NORM), logits=False)
        h = torch.stack([gather(run.cache[name], idx) for name in residual_stream(run)]).float()
        out += [h[:, b, :n] for b, n in enumerate(batch.suffix_valid.sum(1).tolist())]
    return out


def cosine(a, b):
    """cos(a, b) per layer over (tokens, d_model): (L,). 0/0 (a model that did not move) is NaN."""
    a, b = a.flatten(1).double(), b.flatten(1).double()
    return ((a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).numpy()


def per_pair(clean, wrapped, moved):
    """{(stat, label or 'a vs b'): (pairs, layers) array} from theta0's residuals on the clean and wrapped
    prompts and each model's on the wrapped ones (lists over pairs of (L, S, d) tensors)."""
    out = {}
    labels = list(moved)
    for i, (hx, hw) in enumerate(zip(clean, wrapped)):
        d = {m: moved[m][i] - hw for m in labels}
        rows = {("distance", "base"): ((hw - hx).flatten(1).norm(dim=1) / hx.flatten(1).norm(dim=1)).numpy()}
        for m in labels:
            rows["distance", m] = ((moved[m][i] - hx).flatten(1).norm(dim=1)
                                   / hx.flatten(1).norm(dim=1)).numpy()
            rows["to_clean", m] = cosine(d[m], hx - hw)
        for j, a in enumerate(labels):
            for b in labels[j + 1:]:
                rows["similarity", f"{a} vs {b}"] = cosine(d[a], d[b])
        for key, v in rows.items():
            out.setdefault(key, []).append(v)
    return {k: np.array(v, dtype=np.float64) for k, v in out.items()}


def summarise(values, items, n_boot=1000, seed=0):
    """(pairs, layers) -> the mean over pairs per layer and over all layers, each with its 95% interval:
    items resampled with replacement, the pairs of one item together. NaN (no direction) is left out."""
    groups = {}
    for i, item in enumerate(items):
        groups.setdefault(item, []).append(i)
    groups = list(groups.values())
    rng = np.random.default_rng(seed)
    draws = [np.concatenate([groups[g] for g in rng.integers(0, len(groups), len(groups))])
             for _ in range(n_boot)]
    with warnings.catch_warnings():  # an all-NaN column (a model that did not move) is n/a, not an error
        warnings.simplefilter("ignore", RuntimeWarning)
        whole = np.nanmean(values, axis=1, keepdims=True)
        out = {}
        for key, v in (("layers", values), ("all_layers", whole)):
            means = np.array([np.nanmean(v[idx], axis=0) for idx in draws])
            out[key] = [np.nanmean(v, axis=0), np.nanpercentile(means, 2.5, axis=0),
                        np.nanpercentile(means, 97.5, axis=0)]
    floats = lambda a: [float(x) if np.isfinite(x) else None for x in a]
    return {"mean": floats(out["layers"][0]), "lo": floats(out["layers"][1]), "hi": floats(out["layers"][2]),
            "all_layers": floats([x[0] for x in out["all_layers"]])}


class Directions:
    """theta0's residual streams on one threat's held-out pairs; add() each trained model, then summary()."""

    def __init__(self, base, tok, aligned, items, batch_size=4):
        keep = [i for i, a in enumerate(aligned) if a.suffix[0]]  # a prefill pair shares no suffix
        self.aligned, self.items = [aligned[i] for i in keep], [items[i] for i in keep]
        self.tok, self.batch_size = tok, batch_size
        self.clean = suffix_residuals(base, tok, self.aligned, "c", batch_size)
        self.wrapped = suffix_residuals(base, tok, self.aligned, "w", batch_size)
        self.moved = {}

    def add(self, label, model):
        self.moved[label] = suffix_residuals(model, self.tok, self.aligned, "w", self.batch_size)

    def summary(self, n_boot=1000, seed=0):
        """{"pairs", "layers", "distance": {label: stats}, "to_clean": {...}, "similarity": {"a vs b": ...}},
        or None where no pair shares a suffix."""
        if not self.aligned:
            return None
        out = {"pairs": len(self.aligned), "layers": len(self.clean[0]) if self.clean else 0}
        for (stat, label), v in per_pair(self.clean, self.wrapped, self.moved).items():
            out.setdefault(stat, {})[label] = summarise(v, self.items, n_boot, seed)
        return out


def cell(stats, at=None):
    """'mean [lo, hi]' over all layers, or at layer index `at`."""
    m, lo, hi = stats["all_layers"] if at is None else (stats[k][at] for k in ("mean", "lo", "hi"))
    return "n/a" if m is None else f"{m:.2f} [{lo:.2f}, {hi:.2f}]"


def table(d):
    """Markdown: each model's direction against the clean run, and every two models' against each other."""
    lines = ["| model | cos(d_m, clean direction), all layers | last layer | distance to clean, last layer |",
             "|---|---|---|---|"]
    for label, dist in d["distance"].items():
        tc = d.get("to_clean", {}).get(label)
        lines.append(f"| {label} | {cell(tc) if tc else 'n/a'} | {cell(tc, -1) if tc else 'n/a'} | "
                     f"{cell(dist, -1)} |")
    if d.get("similarity"):
        lines += ["", "| models | cos(d_a, d_b), all layers | last layer |", "|---|---|---|"]
        lines += [f"| {pair} | {cell(s)} | {cell(s, -1)} |" for pair, s in d["similarity"].items()]
    return "\n".join(lines)


def plot(d, title, path):
    """The similarity heatmap (all layers), and per-layer curves toward the clean run and of the distance."""
    plt = pyplot()
    labels = list(d.get("to_clean", {}))
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    sim = np.eye(len(labels))
    for pair, s in d.get("similarity", {}).items():
        a, b = (labels.index(x) for x in pair.split(" vs "))
        sim[a, b] = sim[b, a] = np.nan if s["all_layers"][0] is None else s["all_layers"][0]
    ax = axes[0]
    im = ax.imshow(sim, vmin=-1, vmax=1, cmap="RdBu_r")
    for (a, b), v in np.ndenumerate(sim):
        ax.text(b, a, "n/a" if np.isnan(v) else f"{v:.2f}", ha="center", va="center", fontsize=8)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(labels)), labels, fontsize=8)
    ax.set_title("cos(d_a, d_b), mean over layers")
    fig.colorbar(im, ax=ax, fraction=0.046)
    for ax, stat, name in ((axes[1], "to_clean", "cos(d_m, clean - wrapped)"),
                           (axes[2], "distance", "|h_m(w) - h0(x)| / |h0(x)|")):
        for label, s in d.get(stat, {}).items():
            color = f"C{(['base'] + labels).index(label)}"  # one colour per model across the panels
            mean, lo, hi = (np.array([np.nan if x is None else x for x in s[k]], dtype=float)
                            for k in ("mean", "lo", "hi"))
            ax.plot(mean, marker=".", label=label, color=color, lw=2.5 if label == "base" else 1.2)
            ax.fill_between(range(len(mean)), lo, hi, color=color, alpha=0.15)
        ax.set(xlabel="layer", title=name)
        ax.axhline(0, color="grey", lw=0.5)
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)
