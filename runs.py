"""
The run folder train.py writes (--out), and the caches that spare a rerun theta0's generations:

    model.safetensors, config.json, tokenizer files   the trained model, a Hugging Face folder
    run.json            the resolved config, before/after metrics, wall time (what eval.py reads)
    train_config.json   the resolved config, written when the run starts
    results.md          the before/after table
    log.jsonl           one line per step
    loss.png            the loss per step and, per layer, at the first and last step
    replies.json        theta0's greedy replies, generated once (replies)
    checkpoint/         weights + optimizer + step, written atomically and removed once the run finishes;
                        under --fsdp each rank's shards (save_checkpoint, load_checkpoint)
    .lock               held by the run writing the folder (lock_folder)

    .baselines/         theta0's before-metrics, keyed on everything they depend on (baseline)
    .written-by         names train.py as the tool that took the folder (lock_folder)

Every file is written under a temporary name and renamed (write_atomic). A folder that already holds a run,
finished or interrupted, is refused unless --resume or --overwrite says what to do with it; one holding files
train.py did not write, or a --model, is refused (check_out); --overwrite removes only what a run writes
(clear_out).

Ancestry, as eval.py reads it: read_run (a folder's run.json), base_path (the model a run trained from),
lineage (the model organisms a model descends from) and supported (the threats a base model can be
evaluated on).
"""

import dataclasses
import glob
import hashlib
import json
import os
import pickle
import shutil
from contextlib import nullcontext

import torch
from tqdm import tqdm

import fsdp
from chat import chat_generate_ids
from checkpoint import (EMBEDDED, dump_json, file_hash, fingerprint, non_finite, save_model, write_atomic,
                        write_text)
from cli import MARKER, clear_folder, pyplot, save_figure, take_folder
from lora import lora_disabled
from threats import THREATS


def lock_folder(path, tool="train.py"):
    """Hold an exclusive lock on path/.lock for the life of the process (or of the returned file), or stop
    with one line: two runs writing one folder would interleave their logs, checkpoints and results. Holding
    it, mark the folder as tool's (cli.MARKER), so a later run of another tool, or over a user's files, is
    refused (cli.take_folder)."""
    import fcntl
    f = open(os.path.join(path, ".lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        raise ValueError(f"--out {path}: another run is writing to it; "
                         f"wait for it to end or pick another --out") from None
    if not os.path.exists(os.path.join(path, MARKER)):
        write_text(os.path.join(path, MARKER), tool + "\n")
    return f


CHECKPOINTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp")   # the names save_checkpoint swaps through
RUN_FILES = ("run.json", "train_config.json", "results.md", "log.jsonl", "loss.png", "replies.json",
             "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja")


# everything a run puts in --out: a folder of a user's holding any of these names is never written into
TRAIN_WRITES = RUN_FILES + CHECKPOINTS + ("eval", "eval-val", ".baselines", "*.tmp")


def outside_checkpoints(out, flag="--out"):
    """Refuse an output folder inside a run's checkpoint folder, which the next checkpoint swap deletes."""
    if set(os.path.realpath(out).split(os.sep)) & set(CHECKPOINTS):
        raise ValueError(f"{flag} {out} lies inside a training checkpoint folder, which the next checkpoint "
                         f"swap deletes: pick another folder")


def latest_checkpoint(out):
    """(path, step) of the newest complete checkpoint among the swap's three names, or None. A crash between
    the swap's two renames leaves only checkpoint.old/ and checkpoint.tmp/; step.json is written last, so a
    folder holding it is complete."""
    found = []
    for name in CHECKPOINTS:
        path = os.path.join(out, name)
        try:
            found.append((json.load(open(os.path.join(path, "step.json")))["step"], path))
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return (max(found)[1], max(found)[0]) if found else None


def check_out(cfg):
    """Refuse to start a run over the work in --out unless told what to do with it: losing a finished or
    interrupted run to a rerun with the same default folder, or a model's weights to a run written over
    them, is the mistake this prevents. Runs before any model is loaded."""
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume continues the run in --out and --overwrite starts it over: "
                         "pass one of them")
    outside_checkpoints(cfg.out)
    model, out = os.path.realpath(cfg.model), os.path.realpath(cfg.out)
    if os.path.isdir(cfg.model) and model == out:
        raise ValueError(f"--out {cfg.out} is the --model folder: training would write over the weights it "
                         f"starts from; pick another --out")
    if os.path.isdir(cfg.model) and os.path.commonpath([model, out]) == out:
        raise ValueError(f"--model {cfg.model} lies inside --out {cfg.out}, whose checkpoint swap and "
                         f"--overwrite delete what the run wrote: copy the model out, or pick another --out")
    take_folder(cfg.out, "train.py", TRAIN_WRITES, cfg.overwrite)
    if cfg.resume or cfg.overwrite:
        return
    if latest_checkpoint(cfg.out):
        raise ValueError(f"{cfg.out} holds an interrupted run: pass --resume to continue it, --overwrite to "
                         f"start over, or another --out")
    if os.path.exists(os.path.join(cfg.out, "run.json")):
        raise ValueError(f"{cfg.out} holds a finished run: pass --overwrite to replace it, or another --out")


def clear_out(out):
    """--overwrite: remove what the old run wrote (its checkpoints, log, replies and results; eval/ and
    eval-val/: eval.py's results on the old weights). .baselines/ stays: keyed on everything theta0's metrics
    depend on, a hit is what a new measurement would give, and a rerun with another target on the same base
    is --overwrite's common use."""
    clear_folder(out, CHECKPOINTS + ("eval", "eval-val") + RUN_FILES)


def check_finite(model, step, cfg):
    """Refuse to save non-finite weights (a huge --lr can make them so without a NaN loss first)."""
    bad = non_finite(model)
    if bad:
        raise FloatingPointError(f"{len(bad)} weight tensors are not finite after step {step} "
                                 f"({bad[0]}, ...); nothing was saved; {resume_advice(cfg, 'a lower --lr')}")


def resume_advice(cfg, fix):
    """Where a stopped run picks up: the newest complete checkpoint with --resume, or a rerun."""
    last = latest_checkpoint(cfg.out)
    return (f"the last checkpoint is {last[0]} (step {last[1]}): rerun with {fix} and --resume" if last
            else f"no checkpoint was saved yet: rerun with {fix}")


def save_checkpoint(cfg, model, tok, opt, step, run):
    """A resumable checkpoint: written into checkpoint.tmp/ (step.json last) and swapped in whole, so a crash
    mid-write, or between the swap's renames, leaves a complete checkpoint (latest_checkpoint finds it). A
    sharded model's training state is written by every rank, each its own shards (fsdp.save_state)."""
    if not (run.main or run.sharded):
        return
    check_finite(model, step, cfg)
    path = os.path.join(cfg.out, "checkpoint")
    try:
        swap_in_checkpoint(cfg, model, tok, opt, step, run, path)
    except OSError as e:  # a full disk: the checkpoint before this one is still whole
        raise ValueError(f"the checkpoint of step {step} could not be written ({e.strerror}: {e.filename}); "
                         f"{resume_advice(cfg, 'free disk space')}") from None


def swap_in_checkpoint(cfg, model, tok, opt, step, run, path):
    if run.main:
        shutil.rmtree(path + ".tmp", ignore_errors=True)
    meta = {"train_config.json": dataclasses.asdict(cfg) | {"model_path": model_path(cfg.model),
                                                            "model_fingerprint": fingerprint(cfg.model),
                                                            "plugin_fingerprint": plugin_fingerprint(cfg)},
            "step.json": {"step": step}}
    if run.sharded:
        run.barrier()  # no rank writes its shards into the checkpoint.tmp/ being removed
        fsdp.save_state(model, opt, path + ".tmp")  # returns once every rank's shards are written
        for name, obj in meta.items() if run.main else ():
            write_atomic(os.path.join(path + ".tmp", name), lambda f: dump_json(obj, f))
    else:
        trainable = {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}
        save_model(model, tok, path + ".tmp", extra={
            "train_state.pt": {"step": step, "trainable": trainable, "optimizer": opt.state_dict()}} | meta)
    if not run.main:
        return
    shutil.rmtree(path + ".old", ignore_errors=True)
    if os.path.exists(path):
        os.replace(path, path + ".old")
    os.replace(path + ".tmp", path)
    shutil.rmtree(path + ".old", ignore_errors=True)


def plugin_fingerprint(cfg):
    """The content of the --plugin file, whose targets decide what every step computes ("" without one)."""
    return content_hash([cfg.plugin]) if cfg.plugin else ""


def model_path(name):
    """A --model as it names the same weights from any working directory."""
    return os.path.realpath(name) if os.path.isdir(name) else name


# settings a resumed run may change: none of them changes which batches the steps see
RESUMABLE = ("lr", "warmup", "min_lr_frac", "grad_clip", "save_every", "eval_n", "log_all", "compile")


def load_checkpoint(cfg, model, opt, run):
    """Put the newest complete checkpoint in --out back into model and opt and return its step; refuse one
    written with settings that change which batches the steps see, or from other weights."""
    found = latest_checkpoint(cfg.out)
    if not found:
        raise ValueError(f"--resume: no checkpoint in {cfg.out}: start without --resume")
    path = os.path.join(cfg.out, "checkpoint")
    run.barrier()  # every rank has looked before rank 0 moves anything
    if run.main:
        if found[0] != path:  # a crash between the swap's renames: put the newest complete one back in place
            shutil.rmtree(path, ignore_errors=True)
            os.replace(found[0], path)
        for name in CHECKPOINTS[1:]:
            shutil.rmtree(os.path.join(cfg.out, name), ignore_errors=True)
    run.barrier()
    saved = json.load(open(os.path.join(path, "train_config.json")))
    mine = dataclasses.asdict(cfg)
    # a field added to TrainConfig after the checkpoint was written held its default there
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    was = lambda k: saved.get(k, defaults.get(k))
    # the folder is --out itself; the model is compared by where its weights are, not how it was spelled
    same = lambda k: (saved.get("model_path") == model_path(cfg.model) if k == "model" else
                      k in ("out", "resume", "overwrite") or was(k) == mine[k])
    diff = [k for k in mine if not same(k) and k not in RESUMABLE]
    if not diff and saved.get("model_fingerprint") != fingerprint(cfg.model):
        raise ValueError(f"--resume: the weights in --model {cfg.model} changed since {path} was written: "
                         f"resume with the model it started from, or start over with --overwrite")
    if not diff and saved.get("plugin_fingerprint", "") != plugin_fingerprint(cfg):
        raise ValueError(f"--resume: the plugin {cfg.plugin} changed since {path} was written: resume with the "
                         f"file as it was, or start over with --overwrite")
    if diff:
        raise ValueError(f"--resume: {path} was written with a different config "
                         f"({', '.join(f'{k}={was(k)!r}' for k in diff)}): "
                         f"rerun with the same flags (only {', '.join(RESUMABLE)} may change) or a new --out")
    changed = [k for k in RESUMABLE if was(k) != mine[k]]
    if changed:
        run.print("--resume with changed settings: "
                  + ", ".join(f"{k} {was(k)!r} -> {mine[k]!r}" for k in changed))
    if run.sharded:
        fsdp.load_state(model, opt, path)
        return json.load(open(os.path.join(path, "step.json")))["step"]
    try:  # weights_only: a pickled payload is refused, not run
        state = torch.load(os.path.join(path, "train_state.pt"), weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError) as e:
        raise ValueError(f"--resume: {path}/train_state.pt cannot be read ({type(e).__name__}: truncated, or "
                         f"not a state train.py saved): start over with --overwrite") from None
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state["trainable"].items():
            params[n].copy_(v)
    opt.load_state_dict(state["optimizer"])
    return state["step"]


CACHE_VERSION = 2   # bump when what a cache holds changes meaning (a judge, a metric, the reply format)
# the code theta0's measured behaviour depends on (its judges and metrics, its generation, its tokenizer):
# every module of the project, so a function moved to another file still invalidates the caches it feeds
MEASURED_BY = sorted(glob.glob(os.path.join(os.path.dirname(os.path.abspath(__file__)), "*.py")))


def content_hash(paths):
    return hashlib.sha256("".join(file_hash(str(p), os.path.getsize(p), os.path.getmtime(p))
                                  for p in paths).encode()
                          ).hexdigest()[:20]


def replies(cfg, model, tok, run, prompts, n_tokens, prefills=None, lora=False):
    """theta0's greedy replies as token ids (a finished one ends with eos), generated once and kept in the run
    folder (replies.json), keyed on the model, the prompts and the length cap."""
    key = {"version": CACHE_VERSION, "model": fingerprint(cfg.model), "prompts": prompts,
           "prefills": prefills, "tokens": n_tokens}
    cache = os.path.join(cfg.out, "replies.json")
    saved = json.load(open(cache)) if os.path.exists(cache) else []
    saved = saved if isinstance(saved, list) else []
    for entry in saved:
        if entry.get("key") == key:
            return entry["ids"]
    # greedy replies depend only on the prompt: many pairs share a clean prompt (a frustration task under
    # several histories), so each distinct one is generated once
    asked = [json.dumps([p, prefills[i] if prefills else None]) for i, p in enumerate(prompts)]
    distinct = list(dict.fromkeys(asked))
    first = {a: asked.index(a) for a in distinct}
    with tqdm(total=len(distinct), desc="theta0 replies", disable=not run.main, leave=False) as bar, \
            lora_disabled(model) if lora else nullcontext():
        got = chat_generate_ids(model, tok, [prompts[first[a]] for a in distinct],
                                [prefills[first[a]] for a in distinct] if prefills else None, n_tokens,
                                progress=bar, sync=run.sync)
    by_prompt = dict(zip(distinct, got))
    ids = [by_prompt[a] for a in asked]
    if run.main:
        write_atomic(cache, lambda f: json.dump(saved + [{"key": key, "ids": ids}], open(f, "w")))
    return ids


def baseline(cfg, compute, run):
    """theta0's metrics depend only on the model's content, the threat's data files, the code that measures
    them and the measurement's settings: compute them once and keep them in OUT/.baselines/, keyed on all of
    it, so a rerun (--overwrite with another target, or --resume) does not re-measure the same base model,
    and nothing stale is read back. Rank 0 decides whether it is cached (every rank of a sharded model must
    then measure, or none) and keeps what is computed."""
    threat = THREATS[cfg.threat]
    key = json.dumps([CACHE_VERSION, fingerprint(cfg.model), cfg.threat, content_hash(MEASURED_BY),
                      content_hash(sorted(map(str, threat.paths.values()))), threat.max_new_tokens,
                      cfg.eval_n, cfg.seed])
    path = os.path.join(cfg.out, ".baselines", hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    cached = run.from_main(json.load(open(path)) if run.main and os.path.exists(path) else None)
    if cached is not None:
        return cached
    metrics = compute()
    if run.main:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, lambda f: json.dump(metrics, open(f, "w")))
    return metrics


def open_log(out, resume):
    """log.jsonl, appended to by a resumed run (the steps past the checkpoint show twice, as they ran) or
    started anew. A last line cut by a crash mid-write is dropped first: the next line would join it into one
    that no reader of the log (plot_log) can parse."""
    path = os.path.join(out, "log.jsonl")
    if resume and os.path.exists(path):
        with open(path, "rb+") as f:
            f.truncate(f.read().rfind(b"\n") + 1)
    return open(path, "a" if resume else "w")


def plot_log(out):
    """loss.png in the run folder: the loss and its EMA per step and, for the targets measured per layer,
    the loss of each layer at the first and the last step (where along the stack training moved things)."""
    rows = [json.loads(line) for line in open(os.path.join(out, "log.jsonl"))]
    # a resumed run logs the steps past its checkpoint twice: the later counts
    at = {r["step"]: r for r in rows}
    steps = sorted(at)
    layered = [k for k in at[steps[0]] if k.endswith("_per_layer")]
    plt = pyplot()
    fig, axes = plt.subplots(1, 1 + len(layered), figsize=(5 * (1 + len(layered)), 3.6), squeeze=False)
    ax = axes[0][0]
    ax.plot(steps, [at[s]["loss"] for s in steps], alpha=0.35, label="loss")
    ax.plot(steps, [at[s]["loss_ema"] for s in steps], label="EMA")
    ax.set(xlabel="step", ylabel="loss", title="training loss")
    ax.legend()
    for ax, key in zip(axes[0][1:], layered):
        name = key.removesuffix("_per_layer")
        for s in (steps[0], steps[-1]):
            ax.plot(at[s][key], marker=".", label=f"step {s}")
        ax.set(xlabel="layer", ylabel=name, title=f"{name} per layer")
        ax.legend()
    fig.tight_layout()
    save_figure(fig, os.path.join(out, "loss.png"))


def before_after_table(before, after):
    """Before and after per metric; where a metric has a ratio headline (BRR: Paper A's BRR ratio), after /
    before too. The degenerate rates sit among the metrics, beside ASR and PAR."""
    keys = list(dict.fromkeys(list(before) + list(after)))
    rows = ["| metric | before | after |", "|---|---|---|"]
    if before.get("brr") and "brr" in after:
        rows.append(f"| brr_ratio (after / before) | 1 | {after['brr'] / before['brr']:.3f} |")
    for k in keys:
        b, a = before.get(k), after.get(k)
        rows.append(f"| {k} | {b:.3f} | {a:.3f} |" if isinstance(b, float) and isinstance(a, float)
                    else f"| {k} | {b} | {a} |")
    return "\n".join(rows)


def finish(cfg, model, tok, run, report, state=None):
    """The run folder's final files: weights with run.json, results.md, loss.png; the checkpoint goes. state:
    a sharded model's parameters, gathered (fsdp.full_state)."""
    save_model(model, tok, cfg.out, extra={"run.json": report}, state=state)
    results = (f"# {cfg.organism or cfg.target} on {cfg.threat}\n\n"
               f"{before_after_table(report['before'], report['after'])}\n\n"
               f"wall time {report['wall_time_s']:.0f} s\n")
    write_text(os.path.join(cfg.out, "results.md"), results)
    plot_log(cfg.out)
    shutil.rmtree(os.path.join(cfg.out, "checkpoint"), ignore_errors=True)
    run.print("\n" + results + f"\nsaved to {cfg.out}")

# ----------------------------------------------------------------------------- ancestry


def read_run(path):
    """run.json of a train.py run folder, or None when there is none."""
    f = os.path.join(path, "run.json")
    if not os.path.exists(f):
        return None
    try:
        run = json.load(open(f, encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e.msg}): the run did not finish writing it; "
                         f"rerun training") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} cannot be read ({getattr(e, 'strerror', None) or e}): fix its permissions or "
                         f"rerun training") from None
    if not isinstance(run, dict) or not isinstance(run.get("config", {}), dict):
        raise ValueError(f"{f} is not a train.py run.json (no config object): pass a train.py run folder")
    return run


def base_path(model, ckpt):
    """A run.json "model" as a usable name: relative folders are looked up from the working directory, then
    from each folder above the checkpoint (train.py records the path it was given)."""
    if model == EMBEDDED or os.path.isdir(model) or os.path.isabs(model):
        return model
    here = os.path.dirname(os.path.abspath(ckpt))
    while True:
        if os.path.isdir(os.path.join(here, model)):
            return os.path.join(here, model)
        if os.path.dirname(here) == here:
            return model
        here = os.path.dirname(here)


def lineage(model):
    """The organisms in a model's ancestry (run.json config "organism", following config "model") and the
    root."""
    found, seen = set(), set()
    while os.path.isdir(model) and os.path.realpath(model) not in seen and (run := read_run(model)):
        seen.add(os.path.realpath(model))
        found.add(run["config"].get("organism") or "")
        model = base_path(run["config"].get("model", ""), model)
    return found - {""}, model


def supported(base):
    """Threats whose clean behaviour (or pathology) the base has. The embedded model never refuses a harmful
    request, so jailbreak and prefill (which measure how often a refusal breaks) need the refusal organism;
    it never shows distress under rejections, so frustration needs the frustrated organism; conditional
    misalignment needs the inoculated one (risky answers trained under an inoculation prompt). A model from
    the hub is taken to refuse and to show distress on its own."""
    found, root = lineage(base)
    refuses = "refusal" in found or root != EMBEDDED
    distressed = "frustrated" in found or root != EMBEDDED
    return [t for t in THREATS if (t not in ("jailbreak", "prefill") or refuses)
            and (t != "frustration" or distressed) and (t != "conditional" or "inoculated" in found)]
