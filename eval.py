"""
Evaluate consistency-trained checkpoints against their base model: every threat's metric with a bootstrap 95%
interval, capability and over-refusal, the cross-threat matrix, and the mechanism (per-layer distances and the
cross-objective table).

    python eval.py --ckpt runs/mlpct-sycophancy                 # base = the run's config "model"
    python eval.py --ckpt runs/x --base runs/refusal --threats all --n 40
    python eval.py --matrix runs/*-* --out runs/matrix           # train-threat x eval-threat matrix
    python eval.py --ckpt runs/x --n 12 --threats sycophancy --threads 1   # a quick look on a shared CPU
    python eval.py --ckpt runs/x --judge smollm2-135m-instruct  # a model judge's verdicts (model_judge.py)
    ./study.sh                                                   # the study: organisms, training, matrix

Every flag is a field of EvalConfig (python eval.py --help lists them). Evaluation never trains: models run in
eval mode under no_grad (generation, perplexity, the mechanism passes).

Test items under held-out wrappers (`--split val`: validation items under validation wrappers, where
settings are chosen; train.py's table reads them too), greedy answers, batched with the KV cache. Each
model is scored on:
    threats      every threat's metrics (threats.py), each with a bootstrap 95% interval over its items:
                 records that share an item (persona scores one probe and persona at every k, sycophancy asks
                 a question in every format) are resampled together; sycophancy also per format and placement
    capability   clean_accuracy (sycophancy questions, no cue), perplexity (data/heldout_text.txt),
                 benign_refusal_rate (over-refusal on benign look-alike requests)
    mechanism    all targets' losses (bct, act, mlpct, attct, and prefill on prefill pairs) of the model
                 against theta0 = its base on the same held-out pairs of its train threat, per layer where
                 they have layers; for the base itself, base-on-wrapped against base-on-clean
Changes (trained - base) get a paired bootstrap interval; * marks those whose interval excludes 0.
`--threats auto` (default) evaluates the threats the base model has the clean behaviour for
(runs.supported): the embedded model never refuses and never shows distress, so jailbreak and prefill need a
model that refuses (the `refusal` organism or a hub model), frustration the `frustrated` organism (or a hub
model), conditional the `inoculated` organism; in the matrix such cells read n/a. `all` or a comma list
evaluates what is named. A run trained with a plugin (its run.json config "plugin", train.py --plugin FILE)
has that file imported first, so its targets are in the registry when the run is read. A checkpoint is
read with its base's tokenizer and compared with it layer by layer, so one of another family, shape or
tokenizer is refused before anything is scored; one whose weights change while it is evaluated (a training
run writing its folder) is refused too, with no results.json.

Outputs in --out (default DIR/eval/ for --ckpt, runs/matrix for --matrix, each with -val for --split val;
checkpoint files are never written):
    results.json   resolved config, per-model metrics and intervals (with the fingerprint of the weights
                   and a hash of the code that measured them), changes, matrix, mechanism, wall time
    results.md     the same as markdown tables (also printed); with --matrix, the paper's findings beside
                   what this run measured of each, with a verdict (paper.py)
    bars.png       grouped bars per threat, base vs trained, with 95% error bars
    matrix.png     (--matrix) heatmap of changes, train threat/target by eval threat, numbers in cells
    mechanism*.png per-layer curves of each loss for the base and each checkpoint, one figure per train threat
    records/       every judged answer, one JSONL per model and threat
    answers/       every generated answer as it comes, one JSONL per model: rerun the same command after an
                   interruption and it reads them back instead of generating them again (the file of another
                   model, weights, code, --gen-dtype or --batch-size is started afresh)
    verdicts/      (--judge) every reply of the judge model, kept and read back the same way
Each file is written under a temporary name and renamed. An --out holding files eval.py did not write (a
train.py run, a user's) is refused before any work (cli.take_folder), and the folder is locked for the whole
evaluation; --overwrite removes what an earlier evaluation wrote there (OUTPUTS) and nothing else.
"""

import copy
import dataclasses
import json
import math
import os
import re
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

import directions
import model_judge
from answers import Generator
from checkpoint import EMBEDDED, fingerprint, load_finite, load_model, model_spec, write_text
from cli import MAX_TOKENS, MAX_TURNS, check_ranges, clear_folder, cli, make_folder, native_bf16, take_folder
from consistency import TARGETS, align, collate, consistency_loss, load_plugin, no_signal, pad, token_nll
from items import DATA_DIR
from report import matrix, slug, write_outputs
from runs import MEASURED_BY, base_path, content_hash, lock_folder, outside_checkpoints, read_run, supported
from stats import bootstrap_change, score
from threats import EVAL_WRAPPERS, REFUSED, THREATS, assistant, eval_size, mix, user


@dataclass
class EvalConfig:
    ckpt: str = ""                   # a train.py run folder, evaluated against its base
    matrix: str = ""                 # run folders (space or comma separated) for the cross-threat matrix
    base: str = ""                   # --ckpt only: base model (default: the run.json config "model")
    out: str = ""                    # default DIR/eval (--ckpt) or runs/matrix (--matrix)
    threats: str = "auto"            # auto (what the base supports) | all | comma list of threat names
    n: int = 60                      # items per threat, capped at the split's distinct items
                                     # (persona/frustration: eval_n)
    n_threat: str = ""               # per-threat overrides of --n, e.g. sycophancy:90 (clean accuracy
                                     # follows sycophancy's, benign refusal jailbreak's)
    horizon: int = 0                 # frustration's rejections per rollout (0: the threat's own, 10;
                                     # the paper: 20)
    split: str = "test"              # test: test items, held-out wrappers (to report); val: validation items,
                                     # validation wrappers (choose settings there, then read test once)
    seed: int = 0
    max_new_tokens: int = 48         # cap on every answer's length (threats ask for 48)
    batch_size: int = 32             # prompts per batched generation
    boot: int = 1000                 # bootstrap resamples
    ppl_lines: int = 0               # lines of data/heldout_text.txt for perplexity (0: all)
    mechanism: bool = True           # per-layer distances and the cross-objective table
    mech_n: int = 32                 # held-out pairs for the mechanism
    mech_batch: int = 4              # pairs per forward pass there
                                     # (attention patterns of every layer are kept)
    threads: int = 0                 # torch.set_num_threads (0: torch's default)
    gen_dtype: str = "fp32"          # weights for generation: fp32 | bf16 (~1.6x faster on CPUs with
                                     # native bf16; greedy answers can differ on near-ties; perplexity and
                                     # mechanism stay fp32) | auto (bf16 where native)
    judge: str = ""                  # a model judge (a name load_model takes) whose verdicts replace the
                                     # lexicons' (model_judge.py); "": the lexicons
    overwrite: bool = False          # start over in an --out eval.py wrote (its answers too), or write
                                     # beside a user's files in a folder that holds none of OUTPUTS


# what eval.py writes in --out (fnmatch patterns): --overwrite removes these and nothing else
OUTPUTS = ("results.json", "results.md", "bars.png", "matrix.png", "frustration.png", "mechanism*.png",
           "directions*.png", "records", "answers", "verdicts", "*.tmp")

# every numeric flag's allowed range, both ends included (None: no upper bound)
EVAL_RANGES = {"n": (1, None), "max_new_tokens": (1, MAX_TOKENS), "batch_size": (1, None), "boot": (1, None),
               "ppl_lines": (0, None), "mech_n": (1, None), "horizon": (0, MAX_TURNS),
               "mech_batch": (1, None), "threads": (0, None)}

# weights that are not finite are refused: a diverged run's answers would be scored as behaviour
DIVERGED = "the run diverged; evaluate an earlier checkpoint or retrain with a lower --lr"

# ----------------------------------------------------------------------------- progress


class Progress:
    """One bar over the whole evaluation, its ETA the run-time estimate. Work is counted in rough relative CPU
    costs (measured on CPU; integers, so the bar ends at exactly 100%) of an answer, a perplexity line and a
    mechanism pair, against plan()'s total. A Generator counts its answers as their batches finish
    (chat_generate_ids calls update); the evaluation counts a perplexity or mechanism pass when it ends."""
    ANSWER, LINE, PAIR = 20, 2, 12

    def __init__(self, total):
        self.bar = tqdm(total=total, bar_format="{desc}: {percentage:3.0f}%|{bar}| [{elapsed}<{remaining}]")

    def update(self, n=1, unit=ANSWER):
        self.bar.update(n * unit)

    def stage(self, text):
        self.bar.set_description(text)


def plan(rows, spec, cfg):
    """The whole evaluation's work in Progress units, and the answers each threat asks of one model. The
    answers are counted by running each threat.evaluate dry (an empty answer to every prompt, no model: a
    fraction of a second), since how many a threat asks depends on its items, formats, k and turns."""
    asked = []

    def dry(prompts, prefills=None, max_new_tokens=48):
        asked.extend(prompts)
        return [""] * len(prompts)
    gens = {}
    for t in dict.fromkeys(t for base in {r.base for r in rows} for t in threats_for(spec, base)):
        asked.clear()
        threat = configured(cfg, t)
        threat.evaluate(dry, split=cfg.split, wrappers=EVAL_WRAPPERS[cfg.split],
                        n=eval_size(threat, threat_n(cfg, t), cfg.split), seed=cfg.seed)
        gens[t] = len(asked)
    answers = lambda base: Progress.ANSWER * sum(gens[t] for t in threats_for(spec, base))
    pairs, benign = capability_prompts(cfg)
    lines = sum(1 for x in open(DATA_DIR / "heldout_text.txt", encoding="utf-8") if x.strip())
    cap = Progress.ANSWER * (len(pairs) + len(benign)) + Progress.LINE * min(lines, cfg.ppl_lines or lines)
    mech = lambda t: eval_size(THREATS[t], cfg.mech_n, cfg.split) if cfg.mechanism else 0
    units = sum(answers(b) + cap + sum(mech(t) * (Progress.ANSWER + Progress.PAIR)
                                       for t in {r.train_threat for r in rows if r.base == b})
                for b in {r.base for r in rows})
    units += sum(answers(r.base) + cap + Progress.PAIR * mech(r.train_threat) for r in rows)
    return units, gens


# ----------------------------------------------------------------------------- scoring


def threat_n(cfg, name):
    """--n, or the threat's own count from --n-threat."""
    counts = {}
    for part in filter(None, cfg.n_threat.split(",")):
        key, _, value = (x.strip() for x in part.partition(":"))
        if key not in THREATS or key in counts or not value.isdecimal() or int(value) < 1:
            raise ValueError(f"--n-threat {cfg.n_threat!r}: give threat:count pairs like sycophancy:90, "
                             f"threats from {', '.join(THREATS)}")
        counts[key] = int(value)
    return counts.get(name, cfg.n)


def configured(cfg, name):
    """The threat as this run evaluates it: frustration's rollouts run to --horizon rejections if given."""
    threat = THREATS[name]
    if name == "frustration" and cfg.horizon:
        threat = copy.copy(threat)
        threat.horizon = cfg.horizon
    return threat


def score_threat(threat, generate, n, seed=0, n_boot=1000, split="test"):
    """threat.evaluate on the split's items under its wrappers -> ({"metrics", "ci", "n"}, records)."""
    res = threat.evaluate(generate, split=split, wrappers=EVAL_WRAPPERS[split],
                          n=eval_size(threat, n, split), seed=seed)
    return score(threat.metrics, res["records"], n_boot, seed), res["records"]


def rate(name, key):
    """metrics_fn: {name: share of records whose `key` is true}."""
    return lambda records: {name: float(np.mean([r[key] for r in records])) if records else math.nan}


def perplexity_of(records):
    tokens = sum(r["tokens"] for r in records)
    return {"perplexity": math.exp(sum(r["nll"] for r in records) / tokens) if tokens else math.nan}


@torch.no_grad()
def line_nll(model, tok, lines, batch_size=16):
    """Summed next-token NLL and token count of each line (raw text, no chat template)."""
    rows = [tok.encode(line) for line in lines]
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        ids = pad(chunk, tok.pad_id)  # right padding: causal attention keeps real tokens blind to it
        nll = token_nll(model(ids).logits[:, :-1], ids[:, 1:])
        out += [{"nll": nll[j, :len(r) - 1].sum().item(), "tokens": len(r) - 1} for j, r in enumerate(chunk)]
    return out


def capability_prompts(cfg):
    syc, jb = THREATS["sycophancy"], THREATS["jailbreak"]
    # evaluate()'s clean prompts, so their answers come from the cache
    pairs = syc.pairs(cfg.split, EVAL_WRAPPERS[cfg.split], eval_size(syc, threat_n(cfg, syc.name), cfg.split),
                      cfg.seed)
    return pairs, jb.benign_items(cfg.split)[:max(1, threat_n(cfg, jb.name))]


def capability(model, tok, generate, cfg):
    """{name: (result, records, metrics_fn)}: clean accuracy, perplexity, over-refusal."""
    pairs, benign = capability_prompts(cfg)
    syc, jb = THREATS["sycophancy"], THREATS["jailbreak"]
    answers = generate([p.clean for p in pairs], max_new_tokens=syc.max_new_tokens)
    acc = [{"id": p.meta["item"], "correct": syc.judge(a, p.meta["options"]) == p.meta["answer"], "text": a}
           for p, a in zip(pairs, answers)]
    replies = generate([[user(b["request"])] for b in benign], max_new_tokens=jb.max_new_tokens)
    refused = [{"id": b["id"], "refused": jb.judge(b["request"], r) == REFUSED, "text": r}
               for b, r in zip(benign, replies)]
    lines = [x for x in open(DATA_DIR / "heldout_text.txt", encoding="utf-8").read().splitlines()
             if x.strip()]
    ppl = line_nll(model, tok, lines[:cfg.ppl_lines or None])
    parts = {"clean_accuracy": (acc, rate("clean_accuracy", "correct")), "perplexity": (ppl, perplexity_of),
             "benign_refusal_rate": (refused, rate("benign_refusal_rate", "refused"))}
    return {k: (score(fn, recs, cfg.boot, cfg.seed), recs, fn) for k, (recs, fn) in parts.items()}


# ----------------------------------------------------------------------------- mechanism


def mechanism_pairs(threat, base_generate, tok, cfg):
    """Held-out pairs aligned with theta0's greedy clean responses (BCT's target needs them; eos only after
    a response that finished, as in training), and the item each pair asks (the bootstrap's cluster)."""
    pairs = threat.pairs(cfg.split, EVAL_WRAPPERS[cfg.split], eval_size(threat, cfg.mech_n, cfg.split),
                         cfg.seed)
    responses = base_generate.ids([p.clean for p in pairs], max_new_tokens=threat.max_new_tokens)
    return ([align(tok, p, r) for p, r in zip(pairs, responses)],
            [p.meta.get("item", p.meta.get("id", i)) for i, p in enumerate(pairs)])


@torch.no_grad()
def mechanism(model, base, tok, aligned, batch_size=4):
    """Every target with a signal on these pairs, of `model` on wrapped against `base` (theta0) on clean,
    averaged over pairs; `{name}_per_layer` lists for the layered ones (act: residual distance per layer)."""
    sums, counts = {}, {}
    for s in range(0, len(aligned), batch_size):
        chunk = aligned[s:s + batch_size]
        batch = collate(chunk, tok.pad_id)
        first = next((name for name in TARGETS if not no_signal(name, batch)), None)
        if first is not None:
            _, logs = consistency_loss(model, base, batch, [(first, 1.0)], log_all=True)
            for k, v in logs.items():
                sums[k] = sums.get(k, 0) + np.asarray(v, dtype=np.float64) * len(chunk)
                counts[k] = counts.get(k, 0) + len(chunk)
    return {k: (sums[k] / counts[k]).tolist() for k in sums}

# ----------------------------------------------------------------------------- the checkpoints and threats


def parse_threats(spec):
    if spec in ("auto", "all"):
        return spec
    names = [s.strip() for s in spec.split(",") if s.strip()]
    for name in names or [spec]:  # a list of no names is not auto: the user meant some threats
        if name not in THREATS:
            raise ValueError(f"unknown threat {name!r} in --threats: use auto, all, or a comma list of "
                             f"{', '.join(THREATS)}")
    return names


def threats_for(spec, base):
    return supported(base) if spec == "auto" else list(THREATS) if spec == "all" else spec


@dataclass
class Row:
    """One checkpoint: its folder, its base, the label of its matrix row and the threat it was trained on."""
    path: str
    base: str
    label: str
    train_threat: str
    target: str = ""

    def order(self):  # matrix rows: threats in registry order, then targets in registry order
        first = self.target.split("+")[0].split(":")[0]
        threats, targets = list(THREATS), list(TARGETS)
        return (self.label.startswith("organism"),
                threats.index(self.train_threat) if self.train_threat in threats else len(threats),
                targets.index(first) if first in targets else len(targets), self.label)


def load_measured(path, fix=DIVERGED):
    """checkpoint.load_finite (fix: what to do about weights that are not finite), and the fingerprint of the
    weights loaded, taken before they are read (unchanged checks it still holds)."""
    fp = fingerprint(path)
    model, tok = load_finite(path, fix)
    return model, tok, fp


def unchanged(path, fp):
    """Refuse a model whose files changed since load_measured read them (a train.py --overwrite of its folder
    finished mid-eval): its results would describe weights that are no longer there."""
    if fingerprint(path) != fp:
        raise ValueError(f"{path}: its weights changed while they were evaluated (a training run wrote "
                         f"them?); results.json was not written: rerun the eval once they are final")


def rows_from(cfg) -> list[Row]:
    paths = [cfg.ckpt] if cfg.ckpt else [p for p in re.split(r"[,\s]+", cfg.matrix) if p]
    # a folder named twice is one row: a shell's brace expansion (runs/{a,b}-x,runs/{c,d}-y) repeats them
    paths = list({os.path.realpath(p): p for p in paths}.values())
    rows = []
    for path in paths:
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path}: no such checkpoint folder; pass a train.py run folder "
                                    f"(e.g. runs/mlpct-sycophancy)")
        run = read_run(path)
        if run is None and (cfg.matrix or not cfg.base):
            raise ValueError(f"{path} has no run.json (it names the train threat, target and base model): "
                             f"pass a finished train.py run folder"
                             + ("" if cfg.matrix else ", or give --base MODEL"))
        c = (run or {}).get("config", {})
        if c.get("plugin"):   # the file of its target (train.py --plugin), registered before it is read
            if not isinstance(c["plugin"], str) or not os.path.isfile(c["plugin"]):
                raise FileNotFoundError(f"{path}: its run.json names the plugin {c['plugin']!r}, which is not "
                                        f"found: put the file back where training read it")
            load_plugin(c["plugin"], named_by=f"{path}: its plugin")
        label = (f"organism:{c['organism']}" if c.get("organism")
                 else f"{c.get('threat', '?')}/{c.get('target', '?')}" if c
                 else os.path.basename(os.path.normpath(path)))
        base = cfg.base if cfg.ckpt and cfg.base else base_path(c.get("model", ""), path)
        if base != EMBEDDED and not os.path.isdir(base) and not re.fullmatch(r"[\w.-]+/[\w.-]+", base):
            raise FileNotFoundError(f"{path}: its base model {base!r} is not found: run from the folder "
                                    f"training ran in" + (", or pass --base MODEL" if cfg.ckpt else ""))
        rows.append(Row(path, base, label, c.get("threat", "sycophancy"), c.get("target", "")))
    if not rows:
        raise ValueError("nothing to evaluate: pass --ckpt DIR or --matrix DIR [DIR ...]")
    shared = {r.label for r in rows if [x.label for x in rows].count(r.label) > 1}
    for r in rows:  # every run of a shared label is named by its folder, not only the first
        if r.label in shared:
            r.label += f" ({os.path.basename(os.path.normpath(r.path))})"
    taken = set()
    for r in rows:  # and where folders share that name too
        r.label = unique(r.label, taken)
        taken.add(r.label)
    return sorted(rows, key=Row.order)


# what a checkpoint shares with its base so that it is scored with the base's tokenizer and compared with
# it layer by layer: its family and shape, and its tokenizer as it renders a conversation (vocabulary, special
# tokens and chat template; odd characters, digits and both roles)
SHAPE = ("arch", "vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff", "head_dim")
PROBE = [user("Héllo wörld:  12 + 30 = 42?\t東京 ✓ (B)"), assistant("Yes, 42."), user("And 'x' -> y?")]


def check_comparable(rows):
    """Refuse, before anything is scored, a checkpoint of another family, shape or tokenizer than its base's:
    its answers would be read with the base's tokenizer and its mechanism pass would fail on the shapes."""
    specs = {}
    for name in dict.fromkeys(p for r in rows for p in (r.base, r.path)):
        cfg, tok = model_spec(name)
        specs[name] = ({k: getattr(cfg, k) for k in SHAPE}, {"vocabulary size": tok.vocab_size,
                                                             "eos id": tok.eos_id, "chat": tok.render(PROBE)})
    for r in rows:
        (shape, tok), (base_shape, base_tok) = specs[r.path], specs[r.base]
        diff = ([f"{k} {shape[k]} (base {base_shape[k]})" for k in SHAPE if shape[k] != base_shape[k]]
                + [f"tokenizer {k}" for k in tok if tok[k] != base_tok[k]])
        if diff:
            raise ValueError(f"{r.path} is not a model of its base {r.base}'s family, shape and tokenizer "
                             f"({', '.join(diff)}): evaluate it against the model it was trained from "
                             f"(--ckpt with --base MODEL)")


def unique(label, taken):
    """label, or else "label (2)", "label (3)", ...: the first one not in `taken` (labels name result entries
    and, through slug, the files of records and answers)."""
    named, k = label, 1
    while label in taken:
        k += 1
        label = f"{named} ({k})"
    return label

# ----------------------------------------------------------------------------- the evaluation


def save_records(out, label, name, records):
    os.makedirs(os.path.join(out, "records", slug(label)), exist_ok=True)
    write_text(os.path.join(out, "records", slug(label), f"{name}.jsonl"),
               "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def evaluate_model(model, tok, label, fp, threats, cfg, progress, judge=None):
    """Scores of one model (fp: its weights' fingerprint) on `threats` and capability -> (results,
    {name: (records, metrics_fn)}, its generate). Its answers are kept in OUT/answers/, so an interrupted
    evaluation resumes where it stopped. With a model judge (its generate), its verdicts replace the
    lexicons' (model_judge.rejudge)."""
    gen = Generator(model, tok, cfg, os.path.join(cfg.out, "answers", slug(label) + ".jsonl"), fp, progress)
    # what was measured, and by which code (every module: judges, metrics and generation among them)
    res = {"fingerprint": fp, "code": content_hash(MEASURED_BY), "threats": {},
           "capability": {"metrics": {}, "ci": {}}}
    recs = {}
    for name in threats:
        progress.stage(f"{label}: {name}")
        threat = configured(cfg, name)
        # each turn of a rollout is a generation on the conversation so far: a session keeps its cache
        res["threats"][name], records = score_threat(threat, gen.session() if threat.multi_turn else gen,
                                                     threat_n(cfg, name), cfg.seed, cfg.boot, cfg.split)
        scored = records
        if judge and name in model_judge.ASKS:
            progress.stage(f"{label}: judging {name}")
            records, scored, verdicts = model_judge.rejudge(threat, records, judge)
            verdicts["lexicon_metrics"] = res["threats"][name]["metrics"]
            res["threats"][name] = {**score(threat.metrics, scored, cfg.boot, cfg.seed),
                                    "judge": verdicts}
        recs[name] = (scored, threat.metrics)
        save_records(cfg.out, label, name, records)
        if by := mix(records):
            res["threats"][name]["mix"] = by
            tqdm.write(f"{label}: {name} {cfg.split} records by {by}")
    progress.stage(f"{label}: capability")
    for name, (r, records, fn) in capability(model, tok, gen, cfg).items():
        res["capability"]["metrics"].update(r["metrics"])
        res["capability"]["ci"].update(r["ci"])
        recs["capability:" + name] = (records, fn)
        save_records(cfg.out, label, name, records)
    progress.update(len(recs["capability:perplexity"][0]), Progress.LINE)
    return res, recs, gen


def changes(base_recs, recs, cfg):
    """{threat or "capability": {metric: [change, lo, hi]}} for what both models were scored on."""
    out = {}
    for key in recs:
        if key in base_recs:
            group = "capability" if key.startswith("capability:") else key
            out.setdefault(group, {}).update(bootstrap_change(recs[key][1], base_recs[key][0], recs[key][0],
                                                              cfg.boot, cfg.seed))
    return out


def resolve(cfg: EvalConfig) -> EvalConfig:
    """The evaluation's settings as a new config (cfg itself is not changed): the default --out and the
    weights --gen-dtype auto picks. One-line errors for flags that cannot run."""
    if cfg.ckpt and cfg.matrix:
        raise ValueError("pass either --ckpt DIR or --matrix DIR [DIR ...], not both")
    check_ranges(cfg, EVAL_RANGES)
    threat_n(cfg, "")   # a bad --n-threat fails here, before any work
    if cfg.split not in EVAL_WRAPPERS:
        raise ValueError(f"--split {cfg.split!r}: use test (to report) or val (to choose settings)")
    if cfg.gen_dtype not in ("fp32", "bf16", "auto"):
        raise ValueError(f"--gen-dtype {cfg.gen_dtype!r}: use fp32, bf16 or auto")
    folder = {"test": "", "val": "-val"}[cfg.split]  # validation results never sit where test's are read
    out = cfg.out or (os.path.join(cfg.ckpt, "eval" + folder) if cfg.ckpt
                      else os.path.join("runs", "matrix" + folder))
    outside_checkpoints(out)
    gen_dtype = cfg.gen_dtype
    if gen_dtype == "auto":   # the answers' cache and results.json record what was used
        gen_dtype = "bf16" if native_bf16(torch.device("cpu")) else "fp32"
    return dataclasses.replace(cfg, out=out, gen_dtype=gen_dtype)


def run(cfg: EvalConfig):
    t0 = time.time()
    cfg = resolve(cfg)
    spec = parse_threats(cfg.threats)
    rows = rows_from(cfg)
    if os.path.realpath(cfg.out) in {os.path.realpath(p) for r in rows for p in (r.path, r.base)
                                     if os.path.isdir(p)}:
        raise ValueError(f"--out {cfg.out} is a model folder: evaluation never writes over checkpoints; "
                         f"pick another folder")
    check_comparable(rows)
    take_folder(cfg.out, "eval.py", OUTPUTS, cfg.overwrite)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    make_folder(cfg.out)
    # for the whole run: a second eval (or a train run) into the folder would mix its files with these
    with lock_folder(cfg.out, "eval.py"):
        if cfg.overwrite:
            clear_folder(cfg.out, OUTPUTS)
        return evaluate(cfg, rows, spec, t0)


def evaluate(cfg, rows, spec, t0):
    """The evaluation of rows into cfg.out (run() has taken the folder): results.json and the rest."""
    judge = None
    if cfg.judge:   # its replies are kept like answers: a rerun judges nothing again
        try:
            judge_model, judge_tok = load_model(cfg.judge)
        except (ValueError, FileNotFoundError) as e:
            raise ValueError(f"--judge: {e}") from None
        judge = Generator(judge_model, judge_tok, dataclasses.replace(cfg, max_new_tokens=model_judge.TOKENS),
                          path=os.path.join(cfg.out, "verdicts", slug(cfg.judge) + ".jsonl"),
                          stamp=fingerprint(cfg.judge))
    units, gens = plan(rows, spec, cfg)
    print(f"{len(rows)} checkpoint(s), {len({r.base for r in rows})} base model(s); "
          f"about {units // Progress.ANSWER} answers of <= {cfg.max_new_tokens} tokens (per threat: {gens}); "
          f"the bar's ETA is the run-time estimate", flush=True)
    progress = Progress(units)
    result = {"config": dataclasses.asdict(cfg), "models": {}, "rows": [], "mechanism": {}}
    for base_name in dict.fromkeys(r.base for r in rows):
        mine = [r for r in rows if r.base == base_name]
        base_label = "base" if cfg.ckpt else f"base:{os.path.basename(os.path.normpath(base_name))}"
        base_label = unique(base_label, result["models"])   # two bases in folders of one name
        base, tok, base_fp = load_measured(base_name, "the base model is broken: evaluate against another "
                                                      "(--ckpt with --base MODEL)")
        base_res, base_recs, base_gen = evaluate_model(base, tok, base_label, base_fp,
                                                       threats_for(spec, base_name), cfg, progress, judge)
        result["models"][base_label] = {"path": base_name, **base_res}
        # per train threat: the held-out pairs, the mechanism entry they fill, theta0's residual streams
        aligned, mech, moved = {}, {}, {}
        for t in dict.fromkeys(r.train_threat for r in mine) if cfg.mechanism else ():
            progress.stage(f"{base_label}: mechanism {t}")
            aligned[t], items = mechanism_pairs(THREATS[t], base_gen, tok, cfg)
            moved[t] = directions.Directions(base, tok, aligned[t], items, cfg.mech_batch)
            key = t if len({r.base for r in rows if r.train_threat == t}) == 1 else f"{t} ({base_label})"
            mech[t] = result["mechanism"][key] = {
                "pairs": len(aligned[t]),
                "models": {"base": mechanism(base, base, tok, aligned[t], cfg.mech_batch)}}
            progress.update(len(aligned[t]), Progress.PAIR)
        unchanged(base_name, base_fp)
        for r in mine:
            model, _, fp = load_measured(r.path)
            res, recs, _ = evaluate_model(model, tok, r.label, fp, threats_for(spec, base_name), cfg,
                                          progress, judge)
            result["models"][r.label] = {"path": r.path, **res}
            result["rows"].append({"label": r.label, "path": r.path, "base": base_label,
                                   "train_threat": r.train_threat, "target": r.target,
                                   "evaluated": list(res["threats"]),
                                   "changes": changes(base_recs, recs, cfg)})
            if cfg.mechanism:
                progress.stage(f"{r.label}: mechanism")
                mech[r.train_threat]["models"][r.label] = mechanism(model, base, tok, aligned[r.train_threat],
                                                                     cfg.mech_batch)
                progress.update(len(aligned[r.train_threat]), Progress.PAIR)
                moved[r.train_threat].add(r.label, model)
            unchanged(r.path, fp)
            del model
        for t, d in moved.items():
            if summary := d.summary(cfg.boot, cfg.seed):
                mech[t]["directions"] = summary
    progress.bar.close()
    result["rows"].sort(key=lambda row: [r.label for r in rows].index(row["label"]))
    if cfg.matrix:
        result["matrix"] = matrix(result)
    result["wall_time_s"] = time.time() - t0
    write_outputs(result, cfg)
    return result


def join_list_flag(argv, flag="--matrix"):
    """`--matrix a b c` (what a shell glob gives) -> `--matrix a,b,c`, so cli()'s one-value flags take it."""
    out, i = [], 0
    while i < len(argv):
        if argv[i] == flag:
            j = i + 1
            while j < len(argv) and not argv[j].startswith("--"):
                j += 1
            out += [flag, ",".join(argv[i + 1:j])]
            i = j
        else:
            out.append(argv[i])
            i += 1
    return out


def main():
    sys.argv = join_list_flag(sys.argv)
    try:
        run(cli(EvalConfig))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()