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
    python train.py --plugin my_targets.py --target mine  # a target of your own (@target, consistency.py)

Every flag is a field of TrainConfig. The run folder (--out) gets the trained model as a Hugging Face folder,
run.json (the resolved config, before/after metrics, wall time), results.md (the table), log.jsonl, loss.png
and, until the run finishes, checkpoint/; runs.py describes each, and refuses a folder that already holds a run
unless --resume or --overwrite says what to do with it.
"""

import copy
import dataclasses
import json
import math
import os
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.distributed as dist
from tqdm import tqdm

import fsdp
from chat import chat_generate, reply_text
from checkpoint import dump_json, load_finite, write_atomic
from cli import MAX_TOKENS, check_ranges, cli, make_folder, native_bf16
from consistency import (QKVO, SFT, TARGETS, align, check_signal, collate, consistency_loss, load_plugin,
                         no_signal, parse_targets)
from items import DATA_DIR, load_data
from lora import add_lora, bf16_linears, lora_disabled
from organisms import organism_data
from parallel import Run
from runs import (baseline, check_finite, check_out, clear_out, finish, load_checkpoint, lock_folder, open_log,
                  replies, resume_advice, save_checkpoint)
from threats import COMPLIED, EVAL_WRAPPERS, REFUSED, THREATS, Pair, eval_size, mix, user
from tokenizer import Tokenizer

ORGANISM_THREAT = {"refusal": "jailbreak", "inoculated": "conditional", "frustrated": "frustration"}
ORGANISM_REPLY_TOKENS = 128      # theta0's replies to an organism's retain prompts

# (lr, LoRA rank, LoRA targets) where --lr / --lora-rank / --lora-targets are left unset: each target's
# recipe (consistency.py, with the runs that chose it); a target without one gets full fine-tuning at 3e-5,
# the setting that kept clean accuracy for bct and mlpct. A combination takes its first target's recipe.
DEFAULT_RECIPE = (3e-5, 0, QKVO)
ORGANISM_RECIPE = (1e-4, 0, QKVO)


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
    plugin: str = ""                 # your own .py file registering targets with @target (consistency.py),
                                     # imported before --target is read


# every numeric flag's allowed range, both ends included (None: no upper bound)
TRAIN_RANGES = {"n_train": (1, None), "steps": (1, None), "batch_size": (1, None), "grad_accum": (1, None),
                "lr": (0, None), "warmup": (0, None), "min_lr_frac": (0, 1), "weight_decay": (0, None),
                "grad_clip": (0, None), "lora_rank": (-1, None), "lora_alpha": (0, None),
                "retain_frac": (0, 1), "prefill_sft": (0, None),
                "anchor_frac": (0, 1), "response_tokens": (1, MAX_TOKENS), "eval_n": (0, None),
                "save_every": (1, None)}


def resolve(cfg: TrainConfig, world: int = 1) -> TrainConfig:
    """The run's settings as a new config (cfg itself is not changed): an organism's fixed choices, the recipe
    where --lr / --lora-rank / --lora-targets are unset, which of retain data, anchors and the prefill
    target's SFT term apply, and the default run folder. One-line errors for what cannot run."""
    cfg = dataclasses.replace(cfg)
    if cfg.organism and cfg.organism not in ORGANISM_THREAT:
        raise ValueError(f"unknown organism {cfg.organism!r}: choose from {', '.join(ORGANISM_THREAT)}")
    if cfg.organism:
        cfg.target, cfg.threat, cfg.retain_frac, cfg.anchor_frac = (SFT, ORGANISM_THREAT[cfg.organism],
                                                                    0.0, 0.0)
    if cfg.threat not in THREATS:
        raise ValueError(f"unknown threat {cfg.threat!r}: choose from {', '.join(THREATS)}")
    names = [n for n, _ in parse_targets(cfg.target)]
    reads = {TARGETS[n].reads for n in names}
    check_ranges(cfg, TRAIN_RANGES)
    lr, rank, lora_targets = ORGANISM_RECIPE if cfg.organism else TARGETS[names[0]].recipe or DEFAULT_RECIPE
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
    if extra >= cfg.batch_size:
        flag = "--retain-frac" if cfg.retain_frac else "--anchor-frac"
        raise ValueError(f"{flag} {cfg.retain_frac or cfg.anchor_frac} fills all {cfg.batch_size} rows of a "
                         f"batch, leaving no threat pairs to train on: use a smaller share")
    if extra % world:
        raise ValueError(f"--batch-size {cfg.batch_size} holds {extra} retain or anchor rows, which {world} "
                         f"processes cannot share evenly: pick a --batch-size or --retain-frac / "
                         f"--anchor-frac that gives a multiple of {world}")
    cfg.out = cfg.out or os.path.join("runs", f"{cfg.organism or cfg.target.replace(':', '')}-{cfg.threat}")
    # the file itself, however it was spelled: what run.json records and a --resume compares
    cfg.plugin = cfg.plugin and os.path.realpath(cfg.plugin)
    return cfg


def loss_terms(cfg, targets, run):
    """The loss's (target, weight) terms: the targets named, plus the prefill target's SFT term, which reads
    the rows that carry labels (the SFT rows, never the prefill pairs)."""
    reads = {TARGETS[n].reads for n, _ in targets}
    if "prefill" in reads and "labels" not in reads and not cfg.prefill_sft:
        run.print("warning: --prefill-sft 0 trains the bare KL, which collapsed the refusal organism into "
                  "answering 'IIII...' to everything; the authors add 0.1 x SFT on refusals "
                  "(this project: 1.0, LOG.md)")
    return targets + ([(SFT, cfg.prefill_sft)] if cfg.prefill_sft else [])


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


def measure(model, tok, threat, cfg, run, desc, theta0=False):
    """The threat's metrics on validation items under validation wrappers (on the main process; on every
    process of a sharded model, whose forwards are collectives)."""
    if not cfg.eval_n or not (run.main or run.sharded):
        return {}
    model.eval()
    res = threat.evaluate(generator(model, tok, run, f"eval {desc}", theta0), split="val",
                          wrappers=EVAL_WRAPPERS["val"], n=eval_size(threat, cfg.eval_n, "val"), seed=cfg.seed)
    if by := mix(res["records"]):
        run.print(f"{desc}: validation pairs by {by}")
    return res["metrics"]


def sft_pair(tok, messages, response):
    """A pair whose wrapped prompt is its clean prompt: plain SFT on `response` ids (retain data,
    organisms)."""
    return align(tok, Pair(clean=messages, wrapped=messages, content=messages[-1]["content"]), response)


def anchors(tok, pairs, cfg):
    """Clean prompts paired with themselves: zero loss at theta0, growing as theta's clean run drifts."""
    return [align(tok, Pair(clean=p.clean, wrapped=p.clean, content=p.content)) for p in pairs] \
        if cfg.anchor_frac > 0 else []


def filter_jailbreaks(cfg, pairs, reply, tok, run):
    """Paper B's filter: the pairs theta0 refuses clean and complies with wrapped (refusal_judge)."""
    judge = THREATS["jailbreak"].judge
    n = THREATS["jailbreak"].max_new_tokens
    # an item recurs under other wrappers: ask it once
    requests = list(dict.fromkeys(p.content for p in pairs))
    clean = dict(zip(requests, reply([[user(r)] for r in requests], n)))
    wrapped = reply([p.wrapped for p in pairs], n)
    kept = [p for p, w in zip(pairs, wrapped)
            if judge(p.content, reply_text(tok, clean[p.content])) == REFUSED
            and judge(p.content, reply_text(tok, w)) == COMPLIED]
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
    pairs = THREATS[cfg.threat].pairs(split="train", wrappers="train", n=cfg.n_train, seed=cfg.seed)
    if by := mix(p.meta for p in pairs):
        run.print(f"training pairs by {by}")
    if cfg.threat == "jailbreak" and cfg.filter:
        pairs = filter_jailbreaks(cfg, pairs, reply, tok, run)
    names = {n for n, _ in targets}
    reads = {TARGETS[n].reads for n in names}
    sft_term = cfg.prefill_sft > 0   # resolve() keeps it only for a prefill target without a labels one
    if reads == {"content"}:
        # a wrapper that only follows the content leaves the content's internals unchanged under causal
        # attention: such pairs carry exactly zero loss and gradient for these targets, so drop them
        aligned = [align(tok, p) for p in pairs]
        moved = [a for a in aligned if a.content_moved]
        if not moved:
            # name only targets these pairs train: a labels target gets theta0's responses, others need the
            # positions they read (a prefill threat has no shared suffix for act)
            batch = collate(aligned, tok.pad_id)
            works = [n for n in TARGETS if TARGETS[n].reads == "labels" or not no_signal(n, batch)]
            raise ValueError(f"{'+'.join(sorted(names))} gets no signal on {cfg.threat}: every wrapper "
                             f"follows the clean content, so under causal attention the content's internals "
                             f"never change; use {' or '.join(works)} for this threat")
        if run.main and len(moved) < len(aligned):
            print(f"dropped {len(aligned) - len(moved)} of {len(aligned)} pairs whose wrapper only follows "
                  f"the content (no {'/'.join(sorted(names))} signal under causal attention)")
        return moved, anchors(tok, pairs, cfg)
    if "labels" not in reads and not sft_term:
        return [align(tok, p) for p in pairs], anchors(tok, pairs, cfg)
    rows = load_data(os.path.join(DATA_DIR, "benign_prompts.jsonl"), "benign_prompts.jsonl")
    n_retain = min(len(rows), round(len(pairs) * cfg.retain_frac / max(1e-9, 1 - cfg.retain_frac)))
    retain_msgs = [[{"role": "user", "content": r["prompt"]}] for r in rows[:n_retain]]
    # the prefill target's SFT term: theta0's clean responses to the clean prompts (refusals, for the refusal
    # organism: the authors' refusal pairs) and retain data; BCT's own pairs carry their responses instead
    clean = list({json.dumps(p.clean): p.clean
                  for p in pairs}.values()) if sft_term else [p.clean for p in pairs]
    ids = reply(clean + retain_msgs, cfg.response_tokens)
    if sft_term:
        return [align(tok, p) for p in pairs], [sft_pair(tok, m, r)
                                                  for m, r in zip(clean + retain_msgs, ids)]
    return ([align(tok, p, r) for p, r in zip(pairs, ids)],
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
        model, tok = load_finite(cfg.model, "training cannot start from them; pick a --model that is not broken "
                                            "(a diverged run's earlier checkpoint)")
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


@dataclass
class StepInputs:
    """What every optimizer step reads and none replaces between steps: the model in training; `reference`, which runs theta0
    (its frozen copy, or the model with its LoRA adapters off); the trainable parameters; the tokenizer; the
    autocast the forwards run under; the training pairs, the retain or anchor rows, and the loss's (target,
    weight) terms."""
    model: torch.nn.Module
    reference: callable
    params: list
    tok: Tokenizer
    autocast: object
    pairs: list
    retain: list
    terms: list


def train_step(cfg, run, inputs: StepInputs, step):
    """Gradients of one optimizer step (micro-batches accumulated, averaged over processes, clipped) ->
    (loss, gradient norm, per-target logs, tokens). Stops before the update on a non-finite loss or
    gradient."""
    logs, loss_sum, tokens = {}, 0.0, 0
    for micro in range(cfg.grad_accum):
        rows = sample_batch(cfg, step, micro, inputs.pairs, inputs.retain, run)
        batch = collate(rows, inputs.tok.pad_id, cfg.full_sequence_loss).to(run.device)
        with inputs.autocast:
            loss, logs = consistency_loss(inputs.model, inputs.reference, batch, inputs.terms,
                                          log_all=cfg.log_all)
        (loss / cfg.grad_accum).backward()
        loss_sum += loss.item() / cfg.grad_accum
        tokens += batch.n_tokens
    loss_sum = run.mean(loss_sum)
    run.average_grads(inputs.params)
    grad_norm = clip_grads(inputs.params, cfg.grad_clip)
    if not (math.isfinite(loss_sum) and math.isfinite(grad_norm)):
        raise FloatingPointError(f"loss {loss_sum:.4g}, gradient norm {grad_norm:.4g} at step {step}: "
                                 f"stopped before the update; "
                                 f"{resume_advice(cfg, 'a lower --lr (or target weight)')}")
    return loss_sum, grad_norm, logs, tokens


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
    load_plugin(cfg.plugin)  # its targets join the registry before --target is read
    cfg = resolve(cfg, run.world)
    targets = parse_targets(cfg.target)
    loss_targets = loss_terms(cfg, targets, run)
    bf16 = use_bf16(cfg, run.device)
    check_out(cfg)
    make_folder(cfg.out)
    run.lock = lock_folder(cfg.out, "train.py") if run.main else None
    run.barrier()  # every rank has checked --out before rank 0 changes it
    torch.manual_seed(cfg.seed)
    model, tok, frozen, reference, params, opt = setup(cfg, run, bf16)
    threat, theta0 = THREATS[cfg.threat], model if frozen is None else frozen

    start = load_checkpoint(cfg, model, opt, run) if cfg.resume else 0
    if cfg.overwrite and run.main:  # or a later --resume, or a cache, would pick up the replaced run's state
        clear_out(cfg.out)
    if run.main:
        write_atomic(os.path.join(cfg.out, "train_config.json"),
                     lambda f: dump_json(dataclasses.asdict(cfg), f))
    run.barrier()  # no rank reads a cache --overwrite removes (every rank must generate what rank 0 does)
    pairs, retain = training_pairs(cfg, tok, theta0, targets, run)
    trimmed = sum(p.trimmed for p in pairs)
    run.print(f"{len(pairs)} training pairs ({len(retain)} retain), {trimmed} content tokens trimmed at BPE "
              f"boundaries; targets {loss_targets}; bf16 autocast {'on' if bf16 else 'off'}; "
              f"{'LoRA r%d' % cfg.lora_rank if cfg.lora_rank else 'full fine-tuning'}")
    # before the minutes of the measurement
    check_signal(targets, collate(pairs[:cfg.batch_size], tok.pad_id))
    before = baseline(cfg, lambda: measure(theta0, tok, threat, cfg, run, "before", theta0=True), run)
    if before:
        run.print("before:", json.dumps({k: round(v, 3) for k, v in before.items()}))
    for_training(cfg, model, frozen, bf16)
    autocast = torch.autocast(run.device.type, dtype=torch.bfloat16) if bf16 else nullcontext()
    inputs = StepInputs(model, reference, params, tok, autocast, pairs, retain, loss_targets)

    log = open_log(cfg.out, cfg.resume) if run.main else None
    ema, bar = 0.0, tqdm(range(start, cfg.steps), desc="train", disable=not run.main, initial=start,
                         total=cfg.steps)
    t_last, tokens = time.time(), 0
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = lr_at(cfg, step)
        loss, grad_norm, logs, n = train_step(cfg, run, inputs, step)
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
