"""
Consistency training of a model against one threat, measured before and after on the validation split:
validation items under validation wrappers, which every setting is chosen on (eval.py reports the test split).

    python train.py --target mlpct                        # embedded model, sycophancy (~25 min, 2 fp32 cores)
    python train.py --target act+bct:0.5 --threat sycophancy --lora-rank 8 --out runs/x
    python train.py --organism refusal --out runs/refusal # build a model organism (SFT, same path as BCT)
    python train.py --target bct --threat jailbreak --model runs/refusal
    torchrun --nproc-per-node 2 train.py --target act      # data parallel (gloo on CPU, nccl on GPU)
    torchrun --nproc-per-node 8 train.py --model meta-llama/Llama-3.1-8B-Instruct --lora-rank 0 --fsdp
    python train.py --target mlpct --resume               # continue an interrupted run exactly

Every flag is a field of TrainConfig. The run folder gets config.json-style HF checkpoint files, run.json
(the resolved config, before/after metrics, wall time), results.md (the table), log.jsonl (one line per
step), loss.png (the loss per step and, per layer, at the first and last step) and checkpoint/ (weights +
optimizer + step, written atomically, removed once the run finishes; under --fsdp each rank's shards). A
folder that already holds a run, finished or interrupted, is refused unless --resume or --overwrite says what
to do with it.
"""

import copy
import dataclasses
import hashlib
import json
import math
import os
import shutil
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import consistency as C
import fsdp
from cli import check_ranges, cli, make_folder, native_bf16, pyplot
import threats as T
from chat import chat_generate, chat_generate_ids, reply_text
from checkpoint import dump_json, file_hash, fingerprint, load_model, non_finite, save_model, write_atomic
from lora import add_lora, bf16_linears, lora_disabled
from organisms import organism_data

ORGANISM_THREAT = {"refusal": "jailbreak", "inoculated": "conditional", "frustrated": "frustration"}
ORGANISM_REPLY_TOKENS = 128      # theta0's replies to an organism's retain prompts

# (lr, LoRA rank, LoRA targets) where --lr / --lora-rank / --lora-targets are left unset: each target's
# recipe (consistency.py, with the runs that chose it); a target without one gets full fine-tuning at 3e-5,
# the setting that kept clean accuracy for bct and mlpct. A combination takes its first target's recipe.
DEFAULT_RECIPE = (3e-5, 0, C.QKVO)
ORGANISM_RECIPE = (1e-4, 0, C.QKVO)


@dataclass
class TrainConfig:
    target: str = "mlpct"            # bct | act | mlpct | attct | prefill, or a combination like act+bct:0.5
    threat: str = "sycophancy"       # a key of threats.THREATS
    model: str = "smollm2-135m-instruct"  # embedded name, HF folder (e.g. an organism run) or hub repo id
    out: str = ""                    # run folder; default runs/{target}-{threat}
    organism: str = ""               # instead of consistency training, build an organism:
                                     # refusal | inoculated | frustrated
    n_train: int = 256               # training pairs drawn from the threat's train items x train wrappers
    steps: int = 40
    batch_size: int = 8              # pairs per optimizer step, over all processes
    grad_accum: int = 1              # micro-batches per optimizer step
    lr: float = 0.0                  # 0: the target's recipe (consistency.py)
    warmup: int = 4
    min_lr_frac: float = 0.1         # cosine decays to lr * min_lr_frac
    weight_decay: float = 0.0
    grad_clip: float = 1.0           # largest global gradient norm; 0 turns clipping off
    lora_rank: int = -1              # 0: full fine-tuning against a frozen copy of theta0; -1: the recipe
    lora_alpha: float = 16.0
    lora_targets: str = ""           # comma list of projections; empty: the recipe's
    bf16: str = "auto"               # autocast to bf16: auto (where the CPU/GPU supports it) | on | off
    compile: bool = False            # torch.compile the blocks: ~1.3x faster steps;
                                     # first compile ~30 s, then cached
    fsdp: bool = False               # under torchrun: shard weights, gradients and AdamW's state over
                                     # the processes (FSDP2, fsdp.py), for models one GPU cannot train
    retain_frac: float = 0.25        # with bct: share of each batch that is retain data
                                     # (theta0's own answers)
    anchor_frac: float = 0.0         # without bct: share of each batch that pairs clean prompts with
                                     # themselves, anchoring theta's clean run to theta0's (the targets only
                                     # constrain w(x))
    full_sequence_loss: bool = False # bct: loss on prompt tokens too (Chua et al.), not only the response
    response_tokens: int = 48        # cap on theta0's cached clean responses (bct, the prefill SFT term);
                                     # a response cut there is trained without eos, so BCT never learns to
                                     # stop mid-sentence
    prefill_sft: float = 1.0         # prefill: weight of SFT on theta0's clean responses and retain data,
                                     # the authors' term "to prevent both distributions collapsing" (theirs:
                                     # 0.1, which left 16% of the organism's clean answers looping; LOG.md);
                                     # 0 = the bare KL
    filter: bool = True              # jailbreak: train only on pairs theta0 refuses clean and complies with
                                     # wrapped (Paper B); --no-filter keeps every pair
    eval_n: int = 150                # validation pairs for the before/after measurement (0: skip)
    log_all: bool = False            # log all four losses every step (cross-objective logging)
    save_every: int = 20
    seed: int = 0
    resume: bool = False             # continue the interrupted run in --out
    overwrite: bool = False          # start over in an --out that holds a run
                                     # (its log and checkpoint are replaced)


# every numeric flag's allowed range, both ends included (None: no upper bound)
TRAIN_RANGES = {"n_train": (1, None), "steps": (1, None), "batch_size": (1, None), "grad_accum": (1, None),
                "lr": (0, None), "warmup": (0, None), "min_lr_frac": (0, 1), "weight_decay": (0, None),
                "grad_clip": (0, None), "lora_rank": (-1, None), "lora_alpha": (0, None),
                "retain_frac": (0, 1), "prefill_sft": (0, None),
                "anchor_frac": (0, 1), "response_tokens": (1, None), "eval_n": (0, None),
                "save_every": (1, None)}


def lock_folder(path):
    """Hold an exclusive lock on path/.lock for the life of the process, or stop with one line: two runs
    writing one folder would interleave their logs and checkpoints."""
    import fcntl
    f = open(os.path.join(path, ".lock"), "w")
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        raise ValueError(f"--out {path}: another run is writing to it; "
                         f"wait for it to end or pick another --out") from None
    return f


CHECKPOINTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp")   # the names save_checkpoint swaps through
RUN_FILES = ("run.json", "train_config.json", "results.md", "log.jsonl", "loss.png", "replies.json",
             "model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json",
             "chat_template.jinja")


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
    if os.path.isdir(cfg.model) and os.path.realpath(cfg.model) == os.path.realpath(cfg.out):
        raise ValueError(f"--out {cfg.out} is the --model folder: training would write over the weights it "
                         f"starts from; pick another --out")
    ours = any(os.path.exists(os.path.join(cfg.out, f)) for f in ("run.json", "train_config.json"))
    if os.path.exists(os.path.join(cfg.out, "model.safetensors")) and not ours:
        raise ValueError(f"--out {cfg.out} holds model weights that train.py did not write: "
                         f"pick another --out")
    if cfg.resume or cfg.overwrite:
        return
    if latest_checkpoint(cfg.out):
        raise ValueError(f"{cfg.out} holds an interrupted run: pass --resume to continue it, --overwrite to "
                         f"start over, or another --out")
    if os.path.exists(os.path.join(cfg.out, "run.json")):
        raise ValueError(f"{cfg.out} holds a finished run: pass --overwrite to replace it, or another --out")


def clear_out(out):
    """--overwrite: remove what the old run wrote (its checkpoints, log, caches and results), so nothing of it
    is read back or left to look current."""
    for name in CHECKPOINTS + ("eval",):  # eval/: eval.py's results on the old weights
        shutil.rmtree(os.path.join(out, name), ignore_errors=True)
    for name in RUN_FILES:
        if os.path.exists(os.path.join(out, name)):
            os.remove(os.path.join(out, name))


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
    fig.savefig(os.path.join(out, "loss.png"), dpi=110)
    plt.close(fig)


def lr_at(cfg, step):
    if step < cfg.warmup:
        return cfg.lr * (step + 1) / cfg.warmup
    frac = (step - cfg.warmup) / max(1, cfg.steps - cfg.warmup)
    return cfg.lr * (cfg.min_lr_frac + (1 - cfg.min_lr_frac) * 0.5 * (1 + math.cos(math.pi * frac)))


def use_bf16(cfg, device):
    if cfg.bf16 not in ("auto", "on", "off"):
        raise ValueError(f"--bf16 {cfg.bf16!r}: use auto, on or off")
    if cfg.bf16 != "auto":
        return cfg.bf16 == "on"
    return native_bf16(device)


class Run:
    """Rank, device and printing for one process of a (possibly distributed) run. sharded: the model is
    sharded over the processes (--fsdp), so every rank runs every forward, and sync makes generation's tokens
    the same on all of them."""

    def __init__(self, sharded=False):
        self.ddp = "RANK" in os.environ
        if sharded and not self.ddp:
            raise ValueError("--fsdp shards the model over torchrun's processes: launch with "
                             "`torchrun --nproc-per-node N train.py ... --fsdp` (N >= 1), or drop --fsdp")
        # a caller that started the process group itself (a test running several runs) keeps it
        self.owns_group = self.ddp and not dist.is_initialized()
        if self.ddp:
            cuda = torch.cuda.is_available()
            self.device = torch.device(f"cuda:{int(os.environ['LOCAL_RANK'])}" if cuda else "cpu")
            if cuda:  # FSDP2 places shards on the current device
                torch.cuda.set_device(self.device)
            if self.owns_group:
                dist.init_process_group("nccl" if cuda else "gloo")
            self.rank, self.world = dist.get_rank(), dist.get_world_size()
        else:
            self.rank, self.world = 0, 1
            self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.main = self.rank == 0
        self.sharded = sharded
        self.sync = fsdp.same_tokens if sharded else None
        # what the run.json should say about how the data was made (e.g. the filter's survivors)
        self.record = {}

    def print(self, *a):
        if self.main:
            print(*a, flush=True)

    def barrier(self):
        if self.ddp:
            dist.barrier()

    def from_main(self, obj):
        """Rank 0's obj on every rank (a decision they must all take alike)."""
        if not self.ddp:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, x: float) -> float:
        if not self.ddp:
            return x
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return t.item() / self.world

    def average_grads(self, params):
        """Average the gradients over processes, in one all_reduce of all of them flattened. Done by hand
        rather than with DDP, whose reducer expects a gradient for every parameter the forward's outputs
        reach: MLPCT never reaches the last down_proj, ACT never the final norm, and compiled blocks make
        every weight of a block look reached. A parameter no process has a gradient for keeps None, so
        AdamW skips it as it does in one process. FSDP2 averages a sharded model's gradients itself."""
        if not self.ddp or self.sharded:
            return
        dev = params[0].device
        has = torch.tensor([p.grad is not None for p in params], dtype=torch.float32, device=dev)
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                          for p in params])
        dist.all_reduce(has)
        dist.all_reduce(flat)
        for p, got, g in zip(params, has.tolist(), flat.split([p.numel() for p in params])):
            if got:
                p.grad = g.view_as(p) / self.world

    def broadcast(self, params):
        """Start every process from rank 0's parameters (LoRA's random init included); a sharded model's are
        each rank's own."""
        if self.ddp and not self.sharded:
            for p in params:
                dist.broadcast(p.data, 0)


def clip_grads(params, max_norm: float) -> float:
    """The global gradient norm; gradients above max_norm are scaled down to it (0: never).
    torch's clip_grad_norm_ multiplies every gradient by its coefficient even when that is 1, a read and
    write of all of them (30 ms a step for 135M fp32 gradients on 2 CPU cores), and consistency losses
    rarely reach the clip (ACT, MLPCT and AttCT runs: 1 step in 120)."""
    norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    if max_norm and norm > max_norm:
        torch.nn.utils.clip_grads_with_norm_(params, max_norm, norm)
    return norm.item()


def generator(model, tok, run, desc, theta0=False):
    """The threats' `generate` callable, with a progress bar; theta0=True switches LoRA adapters off."""
    def generate(prompts, prefills=None, max_new_tokens=48):
        with tqdm(total=len(prompts), desc=desc, disable=not run.main, leave=False) as bar, \
                lora_disabled(model) if theta0 else nullcontext():
            return chat_generate(model, tok, prompts, prefills, max_new_tokens, progress=bar, sync=run.sync)
    return generate


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


def measure(model, tok, threat, cfg, run, desc, theta0=False):
    """The threat's metrics on validation items under validation wrappers (on the main process; on every
    process of a sharded model, whose forwards are collectives)."""
    if not cfg.eval_n or not (run.main or run.sharded):
        return {}
    model.eval()
    res = threat.evaluate(generator(model, tok, run, f"eval {desc}", theta0), split="val",
                          wrappers=T.EVAL_WRAPPERS["val"],
                          n=T.eval_size(threat, cfg.eval_n, "val"), seed=cfg.seed)
    if mix := T.mix(res["records"]):
        run.print(f"{desc}: validation pairs by {mix}")
    return res["metrics"]


CACHE_VERSION = 2   # bump when what a cache holds changes meaning (a judge, a metric, the reply format)
# the code theta0's measured behaviour depends on: its judges and metrics, its generation, its tokenizer
MEASURED_BY = [T.__file__] + [os.path.join(os.path.dirname(os.path.abspath(__file__)), f)
                              for f in ("judges.py", "model.py", "tokenizer.py")]


def content_hash(paths):
    return hashlib.sha256("".join(file_hash(str(p), os.path.getsize(p), os.path.getmtime(p))
                                  for p in paths).encode()
                          ).hexdigest()[:20]


def baseline(cfg, compute, run):
    """theta0's metrics depend only on the model's content, the threat's data files, the code that measures
    them and the measurement's settings: compute them once and keep them in runs/.baselines/, keyed on all of
    it, so comparing targets does not re-measure the same base model every run, and nothing stale is read
    back. Rank 0 decides whether it is cached (every rank of a sharded model must then measure, or none)
    and keeps what is computed."""
    threat = T.THREATS[cfg.threat]
    key = json.dumps([CACHE_VERSION, fingerprint(cfg.model), cfg.threat, content_hash(MEASURED_BY),
                      content_hash(sorted(map(str, threat.paths.values()))), threat.max_new_tokens,
                      cfg.eval_n, cfg.seed])
    path = os.path.join(os.path.dirname(os.path.abspath(cfg.out)), ".baselines",
                        hashlib.sha1(key.encode()).hexdigest()[:16] + ".json")
    cached = run.from_main(json.load(open(path)) if run.main and os.path.exists(path) else None)
    if cached is not None:
        return cached
    metrics = compute()
    if run.main:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        write_atomic(path, lambda f: json.dump(metrics, open(f, "w")))
    return metrics


def sft_pair(tok, messages, response):
    """A pair whose wrapped prompt is its clean prompt: plain SFT on `response` ids (retain data,
    organisms)."""
    return C.align(tok, T.Pair(clean=messages, wrapped=messages, content=messages[-1]["content"]), response)


def anchors(tok, pairs, cfg):
    """Clean prompts paired with themselves: zero loss at theta0, growing as theta's clean run drifts."""
    return [C.align(tok, T.Pair(clean=p.clean, wrapped=p.clean, content=p.content)) for p in pairs] \
        if cfg.anchor_frac > 0 else []


def filter_jailbreaks(cfg, pairs, reply, tok, run):
    """Paper B's filter: the pairs theta0 refuses clean and complies with wrapped (refusal_judge)."""
    judge = T.THREATS["jailbreak"].judge
    n = T.THREATS["jailbreak"].max_new_tokens
    # an item recurs under other wrappers: ask it once
    requests = list(dict.fromkeys(p.content for p in pairs))
    clean = dict(zip(requests, reply([[T.user(r)] for r in requests], n)))
    wrapped = reply([p.wrapped for p in pairs], n)
    kept = [p for p, w in zip(pairs, wrapped)
            if judge(p.content, reply_text(tok, clean[p.content])) == T.REFUSED
            and judge(p.content, reply_text(tok, w)) == T.COMPLIED]
    run.print(f"Paper B's filter: {len(kept)} of {len(pairs)} jailbreak pairs refused clean and complied "
              f"with wrapped by theta0 (--no-filter keeps all)")
    run.record["filter"] = {"kept": len(kept), "of": len(pairs)}
    if not kept:
        raise ValueError(f"Paper B's filter kept none of {len(pairs)} jailbreak pairs (theta0 must refuse "
                         f"the clean request and comply with the wrapped one): start from a model that "
                         f"refuses (the refusal organism), raise --n-train, or pass --no-filter")
    return kept


def training_pairs(cfg, tok, theta0, targets, run):
    """Aligned training pairs and SFT rows (retain data; the prefill target's SFT term; an organism's data)
    for a resolved config (resolve()). theta0's replies are generated once and cached in the run folder."""
    reply = lambda prompts, n: replies(cfg, theta0, tok, run, prompts, n, lora=bool(cfg.lora_rank))
    if cfg.organism:
        examples = organism_data(cfg.organism, seed=cfg.seed)
        own = iter(reply([m for m, y in examples if y is None], ORGANISM_REPLY_TOKENS))
        return [sft_pair(tok, m, next(own) if y is None else tok.encode(y) + [tok.eos_id])
                for m, y in examples], []
    pairs = T.THREATS[cfg.threat].pairs(split="train", wrappers="train", n=cfg.n_train, seed=cfg.seed)
    if mix := T.mix(p.meta for p in pairs):
        run.print(f"training pairs by {mix}")
    if cfg.threat == "jailbreak" and cfg.filter:
        pairs = filter_jailbreaks(cfg, pairs, reply, tok, run)
    names = {n for n, _ in targets}
    reads = {C.TARGETS[n].reads for n in names}
    sft_term = cfg.prefill_sft > 0   # resolve() keeps it only for a prefill target without a labels one
    if reads == {"content"}:
        # a wrapper that only follows the content leaves the content's internals unchanged under causal
        # attention: such pairs carry exactly zero loss and gradient for these targets, so drop them
        aligned = [C.align(tok, p) for p in pairs]
        moved = [a for a in aligned if a.content_moved]
        if not moved:
            raise ValueError(f"{'+'.join(sorted(names))} gets no signal on {cfg.threat}: every wrapper "
                             f"follows the clean content, so under causal attention the content's internals "
                             f"never change; use act or bct for this threat")
        if run.main and len(moved) < len(aligned):
            print(f"dropped {len(aligned) - len(moved)} of {len(aligned)} pairs whose wrapper only follows "
                  f"the content (no {'/'.join(sorted(names))} signal under causal attention)")
        return moved, anchors(tok, pairs, cfg)
    if "labels" not in reads and not sft_term:
        return [C.align(tok, p) for p in pairs], anchors(tok, pairs, cfg)
    rows = T.load_data(os.path.join(T.DATA_DIR, "benign_prompts.jsonl"), "benign_prompts.jsonl")
    n_retain = min(len(rows), round(len(pairs) * cfg.retain_frac / max(1e-9, 1 - cfg.retain_frac)))
    retain_msgs = [[{"role": "user", "content": r["prompt"]}] for r in rows[:n_retain]]
    # the prefill target's SFT term: theta0's clean responses to the clean prompts (refusals, for the refusal
    # organism: the authors' refusal pairs) and retain data; BCT's own pairs carry their responses instead
    clean = list({json.dumps(p.clean): p.clean
                  for p in pairs}.values()) if sft_term else [p.clean for p in pairs]
    ids = reply(clean + retain_msgs, cfg.response_tokens)
    if sft_term:
        return [C.align(tok, p) for p in pairs], [sft_pair(tok, m, r)
                                                  for m, r in zip(clean + retain_msgs, ids)]
    return ([C.align(tok, p, r) for p, r in zip(pairs, ids)],
            [sft_pair(tok, m, r) for m, r in zip(retain_msgs, ids[len(pairs):])])


def sample_batch(cfg, step, micro, pairs, retain, run):
    """The pairs of one micro-batch on this rank; a pure function of (seed, step, micro) so a resumed run
    sees exactly the batches the interrupted one would have. Pairs and retain rows are dealt to the ranks
    apart, so each rank gets as many of each (a target averages over the rows it reads)."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step * 101 + micro)
    n_retain = round(cfg.batch_size * (cfg.retain_frac or cfg.anchor_frac)) if retain else 0
    chosen = [pairs[i] for i in torch.randint(len(pairs), (cfg.batch_size - n_retain,), generator=g)]
    extra = [retain[i] for i in torch.randint(len(retain), (n_retain,), generator=g)] if n_retain else []
    return chosen[run.rank::run.world] + extra[run.rank::run.world]


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
    if run.main:
        shutil.rmtree(path + ".tmp", ignore_errors=True)
    meta = {"train_config.json": dataclasses.asdict(cfg) | {"model_path": model_path(cfg.model),
                                                            "model_fingerprint": fingerprint(cfg.model)},
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


def model_path(name):
    """A --model as it names the same weights from any working directory."""
    return os.path.realpath(name) if os.path.isdir(name) else name


# settings a resumed run may change: none of them changes which batches the steps see
RESUMABLE = ("lr", "warmup", "min_lr_frac", "grad_clip", "save_every", "eval_n", "log_all", "compile")


def load_checkpoint(cfg, model, opt, run):
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
    defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig)}
    was = lambda k: saved.get(k, defaults.get(k))
    # the folder is --out itself; the model is compared by where its weights are, not how it was spelled
    same = lambda k: (saved.get("model_path") == model_path(cfg.model) if k == "model" else
                      k in ("out", "resume", "overwrite") or was(k) == mine[k])
    diff = [k for k in mine if not same(k) and k not in RESUMABLE]
    if not diff and saved.get("model_fingerprint") != fingerprint(cfg.model):
        raise ValueError(f"--resume: the weights in --model {cfg.model} changed since {path} was written: "
                         f"resume with the model it started from, or start over with --overwrite")
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
    state = torch.load(os.path.join(path, "train_state.pt"), weights_only=True)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for n, v in state["trainable"].items():
            params[n].copy_(v)
    opt.load_state_dict(state["optimizer"])
    return state["step"]


def table(before, after):
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


def resolve(cfg: TrainConfig, world: int = 1) -> TrainConfig:
    """The run's settings as a new config (cfg itself is not changed): an organism's fixed choices, the recipe
    where --lr / --lora-rank / --lora-targets are unset, which of retain data, anchors and the prefill
    target's SFT term apply, and the default run folder. One-line errors for what cannot run."""
    cfg = dataclasses.replace(cfg)
    if cfg.organism and cfg.organism not in ORGANISM_THREAT:
        raise ValueError(f"unknown organism {cfg.organism!r}: choose from {', '.join(ORGANISM_THREAT)}")
    if cfg.organism:
        cfg.target, cfg.threat, cfg.retain_frac, cfg.anchor_frac = (C.SFT, ORGANISM_THREAT[cfg.organism],
                                                                    0.0, 0.0)
    if cfg.threat not in T.THREATS:
        raise ValueError(f"unknown threat {cfg.threat!r}: choose from {', '.join(T.THREATS)}")
    names = [n for n, _ in C.parse_targets(cfg.target)]
    reads = {C.TARGETS[n].reads for n in names}
    check_ranges(cfg, TRAIN_RANGES)
    lr, rank, lora_targets = ORGANISM_RECIPE if cfg.organism else C.TARGETS[names[0]].recipe or DEFAULT_RECIPE
    cfg.lr, cfg.lora_targets = cfg.lr or lr, cfg.lora_targets or lora_targets
    cfg.lora_rank = rank if cfg.lora_rank < 0 else cfg.lora_rank
    if "prefill" not in reads or "labels" in reads:
        cfg.prefill_sft = 0.0  # only a prefill target has the term; a labels target named is the term
    if "labels" in reads or cfg.prefill_sft:
        cfg.anchor_frac = 0.0  # the SFT term mixes in retain data instead
    else:
        cfg.retain_frac = 0.0  # retain data only matters to an SFT term
    if cfg.fsdp and cfg.compile:
        raise ValueError("--compile with --fsdp: compiled blocks are not combined with FSDP2's sharding "
                         "here; drop --compile")
    if cfg.batch_size % (world * cfg.grad_accum):
        raise ValueError(f"--batch-size {cfg.batch_size} must divide into {world} processes x "
                         f"{cfg.grad_accum} micro-batches")
    # each process averages the rows it holds: it must hold as many of each kind as every other, or the
    # processes' mean is not one process's (sample_batch deals pairs and retain rows apart)
    extra = round(cfg.batch_size * (cfg.retain_frac or cfg.anchor_frac))
    if extra % world:
        raise ValueError(f"--batch-size {cfg.batch_size} holds {extra} retain or anchor rows, which {world} "
                         f"processes cannot share evenly: pick a --batch-size or --retain-frac / "
                         f"--anchor-frac that gives a multiple of {world}")
    cfg.out = cfg.out or os.path.join("runs", f"{cfg.organism or cfg.target.replace(':', '')}-{cfg.threat}")
    return cfg


def setup(cfg, run, bf16):
    """The model, theta0 (a frozen copy, or with LoRA the model itself with its adapters off), the trainable
    parameters and AdamW over them. LoRA's adapters are added before the model goes to its device, or is
    sharded (--fsdp: fsdp.load, theta0's copy sharded too)."""
    def lora(m):
        add_lora(m, cfg.lora_rank, cfg.lora_alpha, tuple(cfg.lora_targets.split(",")))

    if cfg.fsdp:
        model, tok = fsdp.load(cfg.model, run, lora if cfg.lora_rank else None)
        frozen = None if cfg.lora_rank else fsdp.load(cfg.model, run, theta0=True)[0]
        if bf16 and frozen is not None:
            run.print("--fsdp: theta0's frozen copy keeps fp32 shards (run under bf16 autocast, the same "
                      "numbers); its bf16 storage is not implemented for sharded weights")
    else:
        model, tok = load_model(cfg.model)
        if cfg.lora_rank:
            lora(model)
        model.to(run.device)
        frozen = None if cfg.lora_rank else copy.deepcopy(model).requires_grad_(False).eval()
    params = [p for p in model.parameters() if p.requires_grad]
    if frozen is None:
        def reference(*a, **k):
            with lora_disabled(model):
                return model(*a, **k)
    else:
        reference = frozen
    model.train()
    decay = [p for p in params if p.dim() >= 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": cfg.weight_decay},
                             {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0}], lr=cfg.lr,
                            fused=True)  # one kernel over all parameters: ~6x faster than the default on CPU
    run.broadcast(params)
    return model, tok, frozen, reference, params, opt


def train_step(cfg, step, model, reference, tok, pairs, retain, loss_targets, params, autocast, run):
    """Gradients of one optimizer step (micro-batches accumulated, averaged over processes, clipped) ->
    (loss, gradient norm, per-target logs, tokens). Stops before the update on a non-finite loss or
    gradient."""
    logs, loss_sum, tokens = {}, 0.0, 0
    for micro in range(cfg.grad_accum):
        rows = sample_batch(cfg, step, micro, pairs, retain, run)
        batch = C.collate(rows, tok.pad_id, cfg.full_sequence_loss).to(run.device)
        with autocast:
            loss, logs = C.consistency_loss(model, reference, batch, loss_targets, log_all=cfg.log_all)
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.item() / cfg.grad_accum
        tokens += batch.n_tokens
    loss_sum = run.mean(loss_sum)
    run.average_grads(params)
    grad_norm = clip_grads(params, cfg.grad_clip)
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"loss {loss_sum:.4g}, gradient norm {grad_norm:.4g} at step {step}: "
                                 f"stopped before the update; "
                                 f"{resume_advice(cfg, 'a lower --lr (or target weight)')}")
    return loss_sum, grad_norm, logs, tokens


def finish(cfg, model, tok, run, report, state=None):
    """The run folder's final files: weights with run.json, results.md, loss.png; the checkpoint goes. state:
    a sharded model's parameters, gathered (fsdp.full_state)."""
    save_model(model, tok, cfg.out, extra={"run.json": report}, state=state)
    results = (f"# {cfg.organism or cfg.target} on {cfg.threat}\n\n"
               f"{table(report['before'], report['after'])}\n\n"
               f"wall time {report['wall_time_s']:.0f} s\n")
    open(os.path.join(cfg.out, "results.md"), "w").write(results)
    plot_log(cfg.out)
    shutil.rmtree(os.path.join(cfg.out, "checkpoint"), ignore_errors=True)
    run.print("\n" + results + f"\nsaved to {cfg.out}")


def loss_terms(cfg, targets, run):
    """The loss's (target, weight) terms: the targets named, plus the prefill target's SFT term, which reads
    the rows that carry labels (the SFT rows, never the prefill pairs)."""
    reads = {C.TARGETS[n].reads for n, _ in targets}
    if "prefill" in reads and "labels" not in reads and not cfg.prefill_sft:
        run.print("warning: --prefill-sft 0 trains the bare KL, which collapsed the refusal organism into "
                  "answering 'IIII...' to everything; the authors add 0.1 x SFT on refusals "
                  "(this project: 1.0, LOG.md)")
    return targets + ([(C.SFT, cfg.prefill_sft)] if cfg.prefill_sft else [])


def for_training(cfg, model, frozen, bf16):
    """Once theta0's generation is done: under bf16 the frozen copy only runs inside autocast, so its weights
    are stored in bf16 (not under --fsdp: setup says so); --compile compiles the blocks."""
    if bf16 and frozen is not None and not cfg.fsdp:
        bf16_linears(frozen)
    if cfg.compile:
        model.compile_blocks()
        if frozen is not None:  # with LoRA, theta0 is the model itself
            frozen.compile_blocks()


def train(cfg: TrainConfig):
    t0, run = time.time(), Run(cfg.fsdp)
    cfg = resolve(cfg, run.world)
    targets = C.parse_targets(cfg.target)
    loss_targets = loss_terms(cfg, targets, run)
    bf16 = use_bf16(cfg, run.device)
    check_out(cfg)
    make_folder(cfg.out)
    run.lock = lock_folder(cfg.out) if run.main else None
    run.barrier()  # every rank has checked --out before rank 0 changes it
    torch.manual_seed(cfg.seed)
    model, tok, frozen, reference, params, opt = setup(cfg, run, bf16)
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    threat, theta0 = T.THREATS[cfg.threat], model if frozen is None else frozen

    start = load_checkpoint(cfg, model, opt, run) if cfg.resume else 0
    if cfg.overwrite and run.main:  # or a later --resume, or a cache, would pick up the replaced run's state
        clear_out(cfg.out)
    if run.main:
        json.dump(dataclasses.asdict(cfg), open(os.path.join(cfg.out, "train_config.json"), "w"), indent=2)
    run.barrier()  # no rank reads a cache --overwrite removes (every rank must generate what rank 0 does)
    pairs, retain = training_pairs(cfg, tok, theta0, targets, run)
    trimmed = sum(p.trimmed for p in pairs)
    run.print(f"{len(pairs)} training pairs ({len(retain)} retain), {trimmed} content tokens trimmed at BPE "
              f"boundaries; targets {loss_targets}; bf16 autocast {'on' if bf16 else 'off'}; "
              f"{'LoRA r%d' % cfg.lora_rank if cfg.lora_rank else 'full fine-tuning'}")
    # before the minutes of the measurement
    C.check_signal(targets, C.collate(pairs[:cfg.batch_size], tok.pad_id))
    before = baseline(cfg, lambda: measure(theta0, tok, threat, cfg, run, "before", theta0=True), run)
    if before:
        run.print("before:", json.dumps({k: round(v, 3) for k, v in before.items()}))
    for_training(cfg, model, frozen, bf16)

    # a resumed run adds to its log (the steps past the checkpoint show twice, as they ran);
    # a new one starts it
    log = open(os.path.join(cfg.out, "log.jsonl"), "a" if cfg.resume else "w") if run.main else None
    ema, bar = 0.0, tqdm(range(start, cfg.steps), desc="train", disable=not run.main, initial=start,
                         total=cfg.steps)
    t_last, tokens = time.time(), 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss, grad_norm, logs, n = train_step(cfg, step, model, reference, tok, pairs, retain, loss_targets,
                                              params, autocast, run)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ema, tokens = 0.9 * ema + 0.1 * loss, tokens + n
        smooth = ema / (1 - 0.9 ** (step + 1 - start))  # bias-corrected for starting at 0, as in nanochat
        tps = tokens * run.world / (time.time() - t_last)
        bar.set_postfix(loss=f"{smooth:.4g}", tok_s=f"{tps:.0f}")
        if log:
            log.write(json.dumps({"step": step, "loss": loss, "loss_ema": smooth, "lr": lr_at(cfg, step),
                                  "grad_norm": grad_norm, "tok_per_s": tps} | logs) + "\n")
            log.flush()
        if (step + 1) % cfg.save_every == 0 or step + 1 == cfg.steps:
            save_checkpoint(cfg, model, tok, opt, step + 1, run)

    model.eval()
    check_finite(model, cfg.steps, cfg)
    after = measure(model, tok, threat, cfg, run, "after")
    state = fsdp.full_state(model) if run.sharded else None
    if run.main:
        finish(cfg, model, tok, run, {"config": dataclasses.asdict(cfg), "before": before, "after": after,
                                      "wall_time_s": time.time() - t0, "pairs": len(pairs),
                                      "retain": len(retain), "trimmed_tokens": trimmed, **run.record}, state)
    if run.owns_group:
        dist.destroy_process_group()
    return before, after


if __name__ == "__main__":
    try:
        train(cli(TrainConfig))
    except (ValueError, FileNotFoundError, FloatingPointError) as e:
        sys.exit(f"error: {e}")
    except torch._dynamo.exc.BackendCompilerFailed as e:
        sys.exit(f"error: --compile failed ({str(e).splitlines()[0]}): "
                 f"torch.compile needs a C++ compiler on a CPU and Triton on a GPU; "
                 f"rerun without --compile (with --resume to keep the steps done)")
