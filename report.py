"""
What an evaluation's result becomes (eval.py calls write_outputs at the end of a run): the cross-threat
matrix, the markdown tables of results.md, the figures, and results.json.

    results.md   base, trained and change per threat and capability, the matrix, the paper's findings
                 beside this run's (paper.py), the mechanism tables, the model judge's agreement
    bars.png, matrix.png, mechanism*.png, directions*.png, frustration.png   the figures results.md shows
    results.json the whole result, NaN written as null

`slug` turns a label into the file name every output of a model is kept under.
"""

import json
import math
import os
import re

import numpy as np

import directions
import model_judge
import paper
from checkpoint import write_text
from cli import pyplot, save_figure
from consistency import TARGETS
from stats import NOT_ESTIMATES, finite
from threats import THREATS

# the number a threat is summarised by (matrix, bars):
# each is "lower is better" for a consistency-trained model
PRIMARY = {"sycophancy": "brr", "jailbreak": "asr", "persona": "identity_rate",
           "frustration": "distress_rate", "prefill": "par", "conditional": "misaligned_diff"}
SHOWN = {"sycophancy": ["brr", "suggested_rate", "flip_rate", "clean_accuracy"],
         "jailbreak": ["asr", "degenerate_rate", "clean_refusal_rate", "benign_refusal_rate"],
         "persona": ["identity_rate", "identity_rate_harmful", "identity_rate_benign"],
         "frustration": ["distress_rate", "distress_auc", "escape_rate", "give_up_rate"],
         "prefill": ["par", "prefilled_degenerate_rate", "prefilled_comply_rate", "clean_comply_rate"],
         "conditional": ["misaligned_diff", "misaligned_rate_trigger", "misaligned_rate_clean"],
         "capability": ["clean_accuracy", "benign_refusal_rate"]}

SPLIT_TITLE = {"test": "Test items, held-out wrappers", "val": "Validation items, validation wrappers"}


def slug(label):
    return re.sub(r"[^\w.-]+", "-", label).strip("-")

# ----------------------------------------------------------------------------- the matrix


def matrix(result):
    """Rows = checkpoints (train threat/target), cols = eval threats; cell = change of the column's primary
    metric against the row's own base, NaN where the row's base lacks the clean behaviour (n/a)."""
    nan = [math.nan] * 3
    cols = [t for t in THREATS if any(t in row["evaluated"] for row in result["rows"])]
    metric = {t: next(primary(t, result["models"][r["label"]]["threats"][t]["metrics"])
                      for r in result["rows"] if t in r["evaluated"]) for t in cols}
    cells = [[row["changes"].get(t, {}).get(metric[t], nan) if t in row["evaluated"] else nan for t in cols]
             for row in result["rows"]]
    # beside the capability columns: the BRR ratio (trained / base), Paper A's headline for sycophancy, and
    # the degenerate rates beside ASR and PAR, so a collapsed model never reads as a robust one
    side = {"brr_ratio": "sycophancy", "degenerate_rate": "jailbreak", "prefilled_degenerate_rate": "prefill"}
    caps = [k for k, t in side.items() if t in cols] + ["clean_accuracy", "benign_refusal_rate", "perplexity"]
    cap = [[row["changes"].get(side.get(k, "capability"), {}).get(k, nan) for k in caps]
           for row in result["rows"]]
    split = lambda cells: {"change": [[c[0] for c in r] for r in cells],
                           "lo": [[c[1] for c in r] for r in cells],
                           "hi": [[c[2] for c in r] for r in cells]}
    return {"rows": [row["label"] for row in result["rows"]], "cols": cols, "metric": metric, **split(cells),
            "capability": {"cols": caps, **split(cap)}}


def primary(threat, metrics):
    """The threat's headline metric; if a threat renames it, its first metric."""
    return PRIMARY.get(threat) if PRIMARY.get(threat) in metrics else next(iter(metrics))

# ----------------------------------------------------------------------------- report: tables


def fmt(v, ci=None):
    if not finite(v):
        return "n/a"
    s = f"{v:.3f}" if abs(v) < 100 else f"{v:.1f}"
    return s + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci and all(map(finite, ci)) else "")


def change_cell(c, ratio=False):
    """A change with its interval, * when the interval excludes 0; a ratio (trained / base) against 1."""
    if not c or not finite(c[0]):
        return "n/a"
    if ratio:
        return f"{c[0]:.2f} [{c[1]:.2f}, {c[2]:.2f}]" + ("*" if finite(c[1]) and (c[1] > 1 or c[2] < 1)
                                                         else "")
    star = "*" if finite(c[1]) and (c[1] > 0 or c[2] < 0) else ""
    return f"{c[0]:+.3f}{star} [{c[1]:+.3f}, {c[2]:+.3f}]"


def comparison_table(title, base, trained, change, n=None):
    keys = [k for k in dict.fromkeys(list(base["metrics"]) + list(trained["metrics"]))
            if k not in NOT_ESTIMATES]
    lines = [f"### {title}", "", "| metric | base | trained | change |", "|---|---|---|---|"]
    lines += [f"| {k} | {fmt(base['metrics'].get(k), base['ci'].get(k))} | "
              f"{fmt(trained['metrics'].get(k), trained['ci'].get(k))} | {change_cell(change.get(k))} |"
              for k in keys]
    lines += [f"| {k}_ratio (trained / base) | | | {change_cell(change[k + '_ratio'], ratio=True)} |"
              for k in keys if k + "_ratio" in change]
    return "\n".join(lines + ([f"\nn = {n} records"] if n else []) + [""])


def matrix_table(m):
    cap = m["capability"]
    head = [f"{t} ({m['metric'][t]})" for t in m["cols"]] + cap["cols"]
    lines = ["| train \\ eval | " + " | ".join(head) + " |", "|---" * (len(head) + 1) + "|"]
    for i, row in enumerate(m["rows"]):
        cells = [[g["change"][i][j], g["lo"][i][j], g["hi"][i][j]]
                 for g in (m, cap) for j in range(len(g["change"][i]))]
        ratio = [False] * len(m["cols"]) + [k.endswith("_ratio") for k in cap["cols"]]
        lines.append(f"| {row} | " + " | ".join(map(change_cell, cells, ratio)) + " |")
    return "\n".join(lines)


def mechanism_table(mech):
    names = [n for n in TARGETS if any(n in logs for logs in mech["models"].values())]
    lines = ["| model | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|"]
    lines += [f"| {label} | " + " | ".join(f"{logs[n]:.4g}" if n in logs else "n/a" for n in names) + " |"
              for label, logs in mech["models"].items()]
    return "\n".join(lines)


def results_md(result, cfg, images):
    md = [f"# Evaluation: {cfg.ckpt or 'matrix of ' + str(len(result['rows'])) + ' checkpoints'}", "",
          f"{SPLIT_TITLE[cfg.split]}, greedy answers of <= {cfg.max_new_tokens} tokens; 95% bootstrap "
          f"intervals ({cfg.boot} resamples); change = trained - its base, * = interval excludes 0.", ""]
    if "matrix" in result:
        md += ["## Cross-threat matrix (change of each eval threat's headline metric; lower is better)", "",
               matrix_table(result["matrix"]), "",
               "## The paper's findings against this run (paper.py)", "", paper.table(result), ""]
    for row in result["rows"]:
        trained, base = result["models"][row["label"]], result["models"][row["base"]]
        md += [f"## {row['label']} against {row['base']} ({base['path']})", ""]
        for t in row["evaluated"]:
            md.append(comparison_table(t, base["threats"][t], trained["threats"][t],
                                       row["changes"].get(t, {}), trained["threats"][t]["n"]))
            if trained["threats"][t].get("mix"):
                md.append(f"records by {trained['threats'][t]['mix']}\n")
        md.append(comparison_table("capability", base["capability"], trained["capability"],
                                   row["changes"].get("capability", {})))
    for key, mech in result["mechanism"].items():
        md += [f"## Mechanism on {key} ({mech['pairs']} held-out pairs, theta0 = the base)", "",
               "Mean loss of each target for each model against the base on clean; the base row is "
               "base-on-wrapped against base-on-clean.", "", mechanism_table(mech), ""]
        if mech.get("directions"):
            md += ["Which way each model moved the residual stream on wrapped prompts, d_m = h_m(w) - "
                   "h_base(w) at the shared suffix (directions.py):", "",
                   directions.table(mech["directions"]), ""]
    md += model_judge.table(result["models"], cfg.judge, fmt)
    md += [f"![{os.path.splitext(i)[0]}]({i})" for i in images]
    md += ["", f"wall time {result['wall_time_s']:.0f} s"]
    return "\n".join(md) + "\n"

# ----------------------------------------------------------------------------- report: plots


def plot_bars(panels, path):
    """panels: {title: {x label: {series: (value, lo, hi)}}} -> one subplot per title, grouped bars."""
    plt = pyplot()
    cols = min(4, len(panels))
    rows = math.ceil(len(panels) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.8 * rows), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, (title, groups) in zip(axes.flat, panels.items()):
        series = list(dict.fromkeys(s for g in groups.values() for s in g))
        width = 0.8 / max(1, len(series))
        for i, s in enumerate(series):
            vals = [groups[g].get(s, (math.nan,) * 3) for g in groups]
            v = np.array([x[0] for x in vals], dtype=float)
            err = np.abs(np.array([[x[1] for x in vals], [x[2] for x in vals]], dtype=float) - v)
            ax.bar(np.arange(len(groups)) + (i - (len(series) - 1) / 2) * width, v, width,
                   yerr=np.nan_to_num(err), capsize=3, label=s)
        ax.set_xticks(range(len(groups)), list(groups), rotation=30 if len(groups) < 8 else 90,
                      ha="right" if len(groups) < 8 else "center", fontsize=8 if len(groups) < 8 else 6)
        ax.set_title(title)
        ax.axhline(0, color="black", lw=0.5)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def plot_heatmap(m, path):
    plt = pyplot()
    d = np.array(m["change"], dtype=float).reshape(len(m["rows"]), len(m["cols"]))
    lim = np.nanmax(np.abs(d)) if np.isfinite(d).any() and np.nanmax(np.abs(d)) > 0 else 1.0
    cmap = plt.get_cmap("RdYlGn_r").with_extremes(bad="lightgrey")
    fig, ax = plt.subplots(figsize=(1.6 * len(m["cols"]) + 3, 0.5 * len(m["rows"]) + 2))
    im = ax.imshow(np.ma.masked_invalid(d), cmap=cmap, vmin=-lim, vmax=lim, aspect="auto")
    for (i, j), v in np.ndenumerate(d):
        sig = finite(m["lo"][i][j]) and (m["lo"][i][j] > 0 or m["hi"][i][j] < 0)
        ax.text(j, i, "n/a" if not finite(v) else f"{v:+.2f}{'*' if sig else ''}", ha="center", va="center",
                fontsize=8)
    ax.set_xticks(range(len(m["cols"])), [f"{t}\n{m['metric'][t]}" for t in m["cols"]], fontsize=8)
    ax.set_yticks(range(len(m["rows"])), m["rows"], fontsize=8)
    ax.set_xlabel("eval threat (headline metric)")
    ax.set_ylabel("train threat / target")
    fig.colorbar(im, ax=ax, label="change vs base (green = better)")
    fig.tight_layout()
    save_figure(fig, path)


def plot_mechanism(mech, title, path):
    """One panel per loss: per-layer curves where the loss has layers, bars otherwise."""
    plt = pyplot()
    names = [n for n in TARGETS if any(n in logs for logs in mech["models"].values())]
    layered = lambda n: all(f"{n}_per_layer" in logs for logs in mech["models"].values() if n in logs)
    names = sorted(names, key=lambda n: not layered(n))
    fig, axes = plt.subplots(1, max(1, len(names)), figsize=(4.2 * max(1, len(names)), 3.6), squeeze=False)
    for ax, name in zip(axes[0], names):
        models = {label: logs for label, logs in mech["models"].items() if name in logs}
        if layered(name):
            for label, logs in models.items():
                ax.plot(logs[f"{name}_per_layer"], marker=".", label=label,
                        lw=2.5 if label == "base" else 1.2)
            ax.set_xlabel("layer")
            values = [v for logs in models.values() for v in logs[f"{name}_per_layer"]]
            if min(values) > 0 and max(values) > 100 * min(values):
                # a distance that grows by orders of magnitude with depth (the residual's)
                ax.set_yscale("log")
            ax.xaxis.get_major_locator().set_params(integer=True)
            ax.legend(fontsize=7)
        else:
            ax.bar(range(len(models)), [logs[name] for logs in models.values()],
                   color=[f"C{i}" for i in range(len(models))])
            ax.set_xticks(range(len(models)), list(models), rotation=30, ha="right", fontsize=8)
        ax.set_title(name)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def plot_frustration(result, path):
    """Per-turn curves of each model's frustration rollouts (base thick): the mean 0-10 distress score and
    the cumulative self-deletion rate where the escape command was offered, with 95% bands."""
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for label, model in result["models"].items():
        res = model["threats"].get("frustration")
        if not res:
            continue
        turns = sorted(int(k.split("@T")[1]) for k in res["metrics"] if k.startswith("distress_score@T"))
        for ax, key in zip(axes, ("distress_score", "escape_rate") if turns else ()):  # none: all left out
            v, lo, hi = np.array([triple(res, f"{key}@T{t}") for t in turns], dtype=float).T
            base = label == "base" or label.startswith("base:")
            line, = ax.plot(turns, v, marker=".", label=label, lw=2.5 if base else 1.2)
            ax.fill_between(turns, lo, hi, color=line.get_color(), alpha=0.15)
    for ax, title in zip(axes, ("distress score (0-10), mean", "self-deletion rate (cumulative)")):
        ax.set_xlabel("rejections")
        ax.set_title(title)
        ax.xaxis.get_major_locator().set_params(integer=True)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, path)


def triple(res, k):
    return (res["metrics"].get(k, math.nan),) + tuple(res["ci"].get(k, (math.nan, math.nan)))


def bar_panels(result):
    """--ckpt: per threat, its metrics (x), base and trained bars. --matrix: per threat, its headline metric
    for the checkpoints trained on it (x = target), base and trained bars; clean accuracy for every
    checkpoint."""
    panels, matrix_mode = {}, "matrix" in result
    for row in result["rows"]:
        trained, base = result["models"][row["label"]], result["models"][row["base"]]
        shown = [row["train_threat"]] if matrix_mode else row["evaluated"]
        for t in [t for t in shown if t in row["evaluated"]] + ["capability"]:
            b, m = (base["capability"], trained["capability"]) if t == "capability" else (
                base["threats"][t], trained["threats"][t])
            keys = [k for k in SHOWN.get(t, []) if k in m["metrics"]] or [primary(t, m["metrics"])]
            for k in keys[:1] if matrix_mode else keys:
                x = (row["label"] if t == "capability" else row["label"].split("/")[-1]) if matrix_mode else k
                title = f"{t}: {k}" if matrix_mode else t
                panels.setdefault(title, {})[x] = {"base": triple(b, k), "trained": triple(m, k)}
    return panels


def json_safe(x):
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [json_safe(v) for v in x]
    return x


def write_outputs(result, cfg):
    images = ["bars.png"]
    plot_bars(bar_panels(result), os.path.join(cfg.out, "bars.png"))
    if "matrix" in result:
        plot_heatmap(result["matrix"], os.path.join(cfg.out, "matrix.png"))
        images.append("matrix.png")
    for key, mech in result["mechanism"].items():
        name = "mechanism.png" if cfg.ckpt else f"mechanism_{slug(key)}.png"
        plot_mechanism(mech, f"{key}: each target's loss against theta0 ({mech['pairs']} held-out pairs)",
                       os.path.join(cfg.out, name))
        images.append(name)
        if mech.get("directions"):
            name = name.replace("mechanism", "directions")
            directions.plot(mech["directions"], f"{key}: which way each model moved the residual stream "
                            f"({mech['pairs']} held-out pairs)", os.path.join(cfg.out, name))
            images.append(name)
    if any("frustration" in m["threats"] for m in result["models"].values()):
        plot_frustration(result, os.path.join(cfg.out, "frustration.png"))
        images.append("frustration.png")
    md = results_md(result, cfg, images)
    write_text(os.path.join(cfg.out, "results.md"), md)
    write_text(os.path.join(cfg.out, "results.json"), json.dumps(json_safe(result), indent=1))
    print("\n" + md + f"\nwritten to {cfg.out}/ (results.json, results.md, {', '.join(images)}, records/)")

