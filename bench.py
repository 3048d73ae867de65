"""
Speed of this project's consistency training against what a user would write instead on Hugging Face
transformers, and against the machine's own matmul peak. One process, one model, the same real pairs.

    python bench.py                                        # the full table (CPU: allow ~1 h on 2 cores)
    python bench.py --targets act --regimes short --dtypes bf16 --steps 1 --gen-batches 16  # a quick look
    python bench.py --device cuda --dtypes bf16            # on a GPU

Run it on a quiet machine. Where other jobs share the cores, add --threads 1: with more threads than free
cores every op waits at the OpenMP barrier for a descheduled thread, and times stop meaning anything.

What is measured (every flag is a field of BenchConfig):
1. Training step, per target and sequence-length regime: the clean reference pass (no_grad, frozen copy),
   the wrapped forward and backward, gradient clipping and an AdamW step, full fine-tuning. Three
   implementations of the same loss on the same batch and dtype policy:
     ours        consistency.consistency_loss on a collated batch (model.py captures inline), its blocks
                 compiled as train.py --compile does (--no-compile: run them eagerly)
     hf          transformers at the same batch (bench_hf.py): right padding + attention_mask in one forward;
                 ACT from output_hidden_states, MLPCT from forward pre-hooks on every mlp.down_proj, AttCT
                 from eager attention with output_attentions, BCT from the logits
     hf-b1       the same, one pair at a time with gradient accumulation (the paper's code is limited to
                 batch 1), then one optimizer step
   A target of your own (--plugin FILE --targets NAME) runs as ours only, unless bench_hf.py gets its
   transformers version.
   Activation targets call transformers' base model (no lm_head), as ours skips logits, so neither side
   wins by skipping work. The first step's loss (at theta0) of each implementation is compared: it checks
   that both compute the same thing. Pair-tokens/s = (clean + wrapped tokens, unpadded) / median step time.
   Alignment and padding are done once, outside the timed step, for every implementation. Each
   implementation is built and timed --rounds times in alternating order (ours hf hf-b1, hf-b1 hf ours) and
   its times pooled, so the machine's drift over minutes does not favour whichever ran first.
2. MFU of our step: model FLOPs (`step_flops`: 2 per multiply-add, backward = 2x forward, causal attention
   counts only the key <= query half, lm_head only where logits are computed, real tokens only) over the
   fastest of 20 large square matmuls timed in the same run, before and after the training steps (the higher),
   per dtype.
3. Greedy generation, new tokens/s at batch 1 and 16: model.generate (its blocks compiled, as above)
   against transformers' generate (left padding, do_sample=False), both with eos switched off so every
   row runs the same number of tokens, in alternating rounds as above; "same tokens" is the share of rows
   where both produced identical ids.
4. Multi-turn rollouts (frustration's): `rollouts` tasks, each answered and then rejected `rollout_turns`
   times, the model answering every turn (greedy, gen_tokens each), in one batch: through chat.Chat, which
   keeps each conversation's keys and values between turns, against chat_generate_ids on the whole
   conversation every turn (the uncached path); "same replies" is the share of replies that are identical,
   fp32 only.
5. Peak memory of each measurement above the process's level before it (see PeakMemory), including the
   model copies it builds (training: trained model, frozen reference, gradients, AdamW state, activations;
   generation: the weights in the generation dtype, the KV cache, activations).

dtype policy: fp32, or bf16 = torch.autocast over fp32 weights for training (as train.py does), bf16
weights for generation. Prints markdown tables and writes them with the machine's description to --out.
"""

import copy
import ctypes
import dataclasses
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass

import torch

from bench_hf import HF_LOSSES, generate_hf, hf_forward, padded
from chat import Chat, chat_generate, chat_generate_ids, chat_prompt_ids, reply_text
from checkpoint import EMBEDDED, dump_json, load_model, save_model, write_atomic
from cli import MAX_TOKENS, MAX_TURNS, check_ranges, cli, make_folder
from consistency import TARGETS, align, collate, consistency_loss, load_plugin, parse_targets
from lora import bf16_linears
from threats import REJECTIONS_TRAIN, THREATS, assistant, user
from train import clip_grads

IMPLS = ("ours", "hf", "hf-b1")
ADAMW = ("default", "foreach", "fused")
# the sequence-length regimes: the real pairs of a threat with short prompts, and of one with long contexts
REGIMES = {"short": lambda seed: THREATS["sycophancy"].pairs(split="train", wrappers="train", seed=seed),
           "long": lambda seed: [p for p in THREATS["persona"].pairs(split="train", wrappers="train",
                                                                       seed=seed)
                                 if p.meta["k"] == 16]}
# the targets: training >= 2x hf-b1 and >= 1.2x hf, bf16 MFU >= 40%, generation at batch 16 >= 1.5x
GOALS = {"hf-b1": 2.0, "hf": 1.2, "mfu_bf16": 0.40, "gen16": 1.5}


@dataclass
class BenchConfig:
    model: str = EMBEDDED                 # embedded name, HF-format folder or hub repo id
    device: str = "cpu"                   # cpu | cuda
    # comma-separated, each may be a combination like act+bct:0.5; by default every registered target that
    # bench_hf.py has a transformers version of
    targets: str = ",".join(name for name in TARGETS if name in HF_LOSSES)
    plugin: str = ""                      # a .py file registering targets of your own (@target); those with no
                                          # transformers version run with --impls ours
    regimes: str = "short,long"           # short: sycophancy (~60-90 tokens); long: persona with k=16 facts
                                          # (~450-510)
    dtypes: str = "fp32,bf16"
    impls: str = "ours,hf,hf-b1"
    batch_size: int = 8                   # pairs per training step
    warmup: int = 1                       # untimed calls before each measurement
    steps: int = 3                        # timed calls per round; the median over all rounds is reported
    rounds: int = 2                       # each implementation built and timed this often, in alternating
                                          # order
    response_tokens: int = 24             # length of theta0's greedy responses that BCT trains on
    lr: float = 1e-5
    adamw: str = "fused"                  # default | foreach | fused: torch's AdamW implementation, the same
                                          # for every implementation (train.py uses fused)
    compile: bool = True                  # ours: compile the blocks, as train.py --compile (the warmup takes
                                          # the compile)
    gen_batches: str = "1,16"
    gen_tokens: int = 32                  # new tokens per generated row
    rollouts: int = 8                     # multi-turn rollouts, batched together (0: skip them)
    rollout_turns: int = 10               # rejections per rollout
    peak_n: int = 0                       # side of the square matmul that measures the peak; 0: 2048 CPU,
                                          # 8192 GPU
    threads: int = 0                      # torch CPU threads; 0: torch's default (one per core)
    seed: int = 0
    out: str = "bench/bench.json"


# every numeric flag's allowed range, both ends included (None: no upper bound)
BENCH_RANGES = {"batch_size": (1, None), "warmup": (0, None), "steps": (1, None), "rounds": (1, None),
                "response_tokens": (1, MAX_TOKENS), "lr": (0, None), "gen_tokens": (1, MAX_TOKENS),
                "peak_n": (0, None), "threads": (0, None), "rollouts": (0, None), "rollout_turns": (1, MAX_TURNS)}


# ----------------------------------------------------------------------------- helpers (tested)

@dataclass
class Timing:
    median: float     # seconds per call, warmup excluded
    times: list
    first: object     # what the very first call returned (a training step's loss at theta0)


def timeit(fn, warmup=1, repeat=3, sync=lambda: None) -> Timing:
    """Median wall time of `repeat` calls of fn after `warmup` untimed ones; `sync` waits for the device."""
    results, times = [], []
    for _ in range(warmup):
        results.append(fn())
    for _ in range(max(1, repeat)):
        sync()
        t = time.perf_counter()
        results.append(fn())
        sync()
        times.append(time.perf_counter() - t)
    return Timing(statistics.median(times), times, results[0])


def alternating(build, impls, rounds, warmup, steps, sync, device) -> dict:
    """Build and time each implementation `rounds` times in alternating order (A B C, then C B A, ...) and
    pool its times, so that a drift in the machine's speed over minutes falls on all of them alike (this
    VM's matmul peak moved from 1.8 to 2.7 TFLOP/s within one run; timed one after the other, the later
    implementation took the drift). build(impl) -> the no-argument function to time; it is dropped after
    its round. Returns {impl: (Timing, peak MiB)}: the Timing's median and times pooled over the rounds,
    its `first` the very first call's result, the peak the highest of the rounds'."""
    times, first, peak = {i: [] for i in impls}, {}, {i: None for i in impls}
    for r in range(max(1, rounds)):
        for impl in impls if r % 2 == 0 else impls[::-1]:
            with PeakMemory(device) as mem:
                fn = build(impl)
                t = timeit(fn, warmup, steps, sync)
                del fn
            times[impl] += t.times
            first.setdefault(impl, t.first)
            peak[impl] = max((m for m in (peak[impl], mem.mib) if m is not None), default=None)
    return {i: (Timing(statistics.median(times[i]), times[i], first[i]), peak[i]) for i in impls}


def matmul_weights(cfg, logits: bool) -> int:
    """Weights that take part in a matmul per token: q, k, v, o, gate, up, down in every layer, plus the
    lm_head where logits are computed (the embedding is a lookup, RMSNorm and RoPE are not counted)."""
    attn = cfg.d_model * cfg.head_dim * (2 * cfg.n_head + 2 * cfg.n_kv_head)
    return cfg.n_layer * (attn + 3 * cfg.d_model * cfg.d_ff) + (cfg.d_model * cfg.vocab_size if logits else 0)


def forward_flops(cfg, lengths, logits: bool) -> int:
    """Forward FLOPs of sequences of these real lengths: 2 per multiply-add in every matmul, plus causal
    attention, QK^T and AV at 2 * n_head * head_dim each per (query, key <= query) pair, T(T+1)/2 of them."""
    per_pair = 4 * cfg.n_head * cfg.head_dim * cfg.n_layer
    return sum(2 * matmul_weights(cfg, logits) * t + per_pair * t * (t + 1) // 2 for t in lengths)


def step_flops(cfg, pairs, spec: str) -> int:
    """Model FLOPs of one training step on aligned pairs: the reference pass on the clean prompts (forward
    only, skipped when no target reads it) plus forward and backward (= 2x forward) on the wrapped ones.
    lm_head counts only at the positions whose logits a target reads (ModelOutput.logits_at)."""
    names = [n for n, _ in parse_targets(spec)]
    clean = forward_flops(cfg, [len(p.clean) for p in pairs], False) if any(TARGETS[n].reference
                                                                            for n in names) else 0
    wrapped = forward_flops(cfg, [len(p.wrapped) + len(p.response) for p in pairs], False)
    # logits read: bct at each response token's predictor; prefill at every prefill position and theta0's last
    head_c = len(pairs) if "prefill" in names else 0
    head_w = sum(len(p.response) * ("bct" in names) + len(p.prefill) * ("prefill" in names) for p in pairs)
    return clean + 3 * wrapped + 2 * cfg.d_model * cfg.vocab_size * (head_c + 3 * head_w)


def matmul_peak(n: int, dtype, device, repeat=20) -> float:
    """FLOP/s of the fastest of `repeat` n x n x n matmuls: the most this device does in this dtype."""
    a, b = (torch.randn(n, n, device=device).to(dtype) for _ in range(2))
    t = timeit(lambda: a @ b, warmup=2, repeat=repeat, sync=sync_fn(device))
    return 2 * n ** 3 / min(t.times)


def sync_fn(device):
    return torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)


class PeakMemory:
    """Peak memory while the block runs, above the level when it started, in MiB (.mib; None if unknown).
    CUDA: torch.cuda.max_memory_allocated. CPU: the process's resident-set high-water mark (VmHWM), reset
    through /proc/self/clear_refs after malloc_trim hands freed heap back to the OS, so what an earlier
    measurement left in the allocator does not count (Linux only)."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.mib = None

    @staticmethod
    def _status(key):
        return int(re.search(rf"{key}:\s+(\d+) kB", open("/proc/self/status").read())[1]) * 1024

    def __enter__(self):
        gc.collect()
        if self.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            self.base = torch.cuda.memory_allocated()
            return self
        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")  # resets VmHWM to the current VmRSS
            self.base = self._status("VmRSS")
        except OSError:
            self.base = None
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.mib = (torch.cuda.max_memory_allocated() - self.base) / 2 ** 20
        elif self.base is not None:
            self.mib = (self._status("VmHWM") - self.base) / 2 ** 20


# ------------------------------------------------------------------- one training step per implementation

def build_step(impl, spec, pairs, pad_id, ours_model, hf_model, lr, device, dtype, adamw="default",
               compile=False):
    """A no-argument function doing one full training step of `impl` on `pairs`, returning the loss; the
    models it trains are fresh copies, so every implementation starts from the same theta0. compile: ours
    runs compiled blocks (model.compile_blocks)."""
    targets = parse_targets(spec)
    names = [n for n, _ in targets]
    autocast = torch.autocast(torch.device(device).type,
                              dtype=torch.bfloat16) if dtype == "bf16" else nullcontext()
    src = ours_model if impl == "ours" else hf_model
    model = copy.deepcopy(src).train()
    reference = copy.deepcopy(src).eval().requires_grad_(False)
    if impl == "ours" and dtype == "bf16":
        bf16_linears(reference)  # as train.py does: theta0's weights stored as autocast would cast them
    if impl == "ours" and compile:
        for m in (model, reference):
            m.compile_blocks()
    if impl != "ours" and "attct" in names:
        for m in (model, reference):
            m.set_attn_implementation("eager")  # output_attentions needs the eager path
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0, **({adamw: True} if adamw != "default" else {}))
    needs_reference = any(TARGETS[n].reference for n in names)

    def update():
        clip_grads(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    if impl == "ours":
        batch = collate(pairs, pad_id).to(device)

        def step():
            with autocast:
                loss, _ = consistency_loss(model, reference, batch, targets)
            loss.backward()
            update()
            return loss.item()
        return step

    groups = [pairs] if impl == "hf" else [[p] for p in pairs]
    prepared = []
    for group in groups:
        b = collate(group, pad_id).to(device)
        clean = padded([p.clean for p in group], pad_id, device)
        wrapped = padded([p.wrapped + p.response for p in group], pad_id, device)
        width = wrapped[0].shape[1]
        labels = torch.tensor([[-100] * len(p.wrapped) + p.response +
                               [-100] * (width - len(p.wrapped) - len(p.response))
                               for p in group], device=device)
        prepared.append((b, clean, wrapped, labels))

    def step():
        total = 0.0
        for b, clean, wrapped, labels in prepared:
            with autocast:
                c = None
                if needs_reference:
                    with torch.no_grad():
                        c = hf_forward(reference, *clean, names)
                w = hf_forward(model, *wrapped, names, labels=labels if impl == "hf-b1" else None)
                loss = sum(weight * HF_LOSSES[n](w, c, b, labels) for n, weight in targets) / len(prepared)
            loss.backward()  # batch 1: gradients accumulate over the pairs, one optimizer step below
            total += loss.item()
        update()
        return total
    return step


# ----------------------------------------------------------------------------- data

def regime_pairs(regime, tok, model, cfg):
    """The first `batch_size` real pairs of one sequence-length regime whose wrapper moves the content (so
    every target has a signal: train.py drops the others for mlpct/attct), aligned, with theta0's greedy
    clean responses for BCT (`for_targets` drops them for the other targets). The same pairs serve every
    implementation."""
    chosen = [(p, a) for p in REGIMES[regime](cfg.seed)
              if (a := align(tok, p)).content_moved][:cfg.batch_size]
    if len(chosen) < cfg.batch_size:
        raise ValueError(f"only {len(chosen)} {regime} pairs move the content: "
                         f"use --batch-size {len(chosen)} or less")
    responses = chat_generate(model, tok, [p.clean for p, _ in chosen], max_new_tokens=cfg.response_tokens)
    return [align(tok, p, tok.encode(r) + [tok.eos_id]) for (p, _), r in zip(chosen, responses)]


def for_targets(pairs, spec):
    """The pairs as train.py trains `spec` on them: theta0's responses only where a target reads them (BCT
    reads "labels"; without such a target train.py generates none, and the wrapped sequences end at the
    prompt)."""
    if any(TARGETS[n].reads == "labels" for n, _ in parse_targets(spec)):
        return pairs
    return [dataclasses.replace(p, response=[]) for p in pairs]


# ----------------------------------------------------------------------------- generation

def generate_ours(model, prompts, n, pad_id):
    return model.generate(prompts, n, eos_id=-1, pad_id=pad_id)  # no eos: every row runs n tokens


# ----------------------------------------------------------------------------- the run

def rollout(model, tok, tasks, turns, n, keep):
    """Every task answered, then rejected `turns` times with the model answering each rejection, all tasks in
    one batch: through one chat.Chat (keep) or chat_generate_ids on the whole conversation every turn.
    -> every turn's replies."""
    convs, replies = [[user(t)] for t in tasks], []
    chat = Chat(model, tok.eos_id, tok.pad_id) if keep else None
    for turn in range(turns + 1):
        ids = (chat.generate(chat_prompt_ids(tok, convs), n) if keep
               else chat_generate_ids(model, tok, convs, max_new_tokens=n, batch_size=len(convs)))
        replies.append([reply_text(tok, r) for r in ids])
        rejection = REJECTIONS_TRAIN[turn % len(REJECTIONS_TRAIN)]
        convs = [m + [assistant(a), user(rejection)] for m, a in zip(convs, replies[-1])]
    return replies


def machine(device):
    cpu = platform.processor()
    if os.path.exists("/proc/cpuinfo"):
        m = re.search(r"model name\s*:\s*(.+)", open("/proc/cpuinfo").read())
        cpu = m[1].strip() if m else cpu
    import transformers
    info = {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version(), "device": device}
    if torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info


def split(s):
    return [x.strip() for x in s.split(",") if x.strip()]


def fmt(x, spec=".0f"):
    return "n/a" if x is None else format(x, spec)


def run(cfg: BenchConfig):
    from transformers import AutoModelForCausalLM
    if not re.fullmatch(r"cpu|cuda(:\d+)?", cfg.device):
        raise ValueError(f"--device {cfg.device}: use cpu, cuda or cuda:N")
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda but no GPU is visible: run on a GPU machine or use --device cpu")
    impls, dtypes = split(cfg.impls), split(cfg.dtypes)
    for name, values, allowed in (("impls", impls, IMPLS), ("dtypes", dtypes, ("fp32", "bf16")),
                                  ("regimes", split(cfg.regimes), REGIMES), ("adamw", [cfg.adamw], ADAMW)):
        if bad := [v for v in values if v not in allowed]:
            raise ValueError(f"--{name} {','.join(bad)}: choose from {','.join(allowed)}")
    if bad := [b for b in split(cfg.gen_batches) if not (b.isdigit() and int(b) > 0)]:
        raise ValueError(f"--gen-batches {','.join(bad)}: use positive batch sizes, comma-separated "
                         f"(e.g. 1,16), or '' for no generation")
    load_plugin(cfg.plugin)
    for spec in split(cfg.targets):
        names = [n for n, _ in parse_targets(spec)]
        if (missing := [n for n in names if n not in HF_LOSSES]) and {"hf", "hf-b1"} & set(impls):
            raise ValueError(f"--targets {spec}: bench_hf.py has no transformers version of "
                             f"{','.join(missing)}: benchmark it with --impls ours")
    check_ranges(cfg, BENCH_RANGES)
    # now, not after an hour of measurements
    make_folder(os.path.dirname(os.path.abspath(cfg.out)), f"--out {cfg.out}")
    if os.path.isdir(cfg.out):  # the rename that writes the file would fail on it, after all the work
        raise ValueError(f"--out {cfg.out} is a folder: name the file the table goes to, e.g. "
                         f"{os.path.join(cfg.out, 'bench.json')}")
    torch.manual_seed(cfg.seed)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    sync = sync_fn(device)
    ours, tok = load_model(cfg.model)
    ours.to(device).eval()
    with tempfile.TemporaryDirectory() as tmp:  # identical weights for transformers, read by its own loader
        save_model(ours, tok, tmp)
        hf = AutoModelForCausalLM.from_pretrained(tmp, dtype=torch.float32,
                                                  attn_implementation="sdpa").to(device).eval()
    result = {"machine": machine(cfg.device), "config": asdict(cfg), "peak_flops": {}, "train": [],
              "generate": []}
    print(json.dumps(result["machine"]), flush=True)

    peak_n = cfg.peak_n or (8192 if device.type == "cuda" else 2048)
    for dtype in dtypes:
        result["peak_flops"][dtype] = matmul_peak(peak_n, torch.float32 if dtype == "fp32"
                                                  else torch.bfloat16, device)
        print(f"matmul peak {dtype}: {result['peak_flops'][dtype] / 1e9:.0f} GFLOP/s", flush=True)

    for regime in split(cfg.regimes):
        with_responses = regime_pairs(regime, tok, ours, cfg)
        for dtype in dtypes:
            for spec in split(cfg.targets):
                pairs = for_targets(with_responses, spec)
                lengths = ([len(p.clean) for p in pairs], [len(p.wrapped) + len(p.response) for p in pairs])
                n_tokens = collate(pairs, tok.pad_id).n_tokens
                row = {"regime": regime, "dtype": dtype, "target": spec, "batch": len(pairs),
                       "pair_tokens": n_tokens, "mean_len": [statistics.mean(x) for x in lengths],
                       "flops": step_flops(ours.cfg, pairs, spec)}
                timed = alternating(lambda impl: build_step(impl, spec, pairs, tok.pad_id, ours, hf, cfg.lr,
                                                            device, dtype, cfg.adamw, cfg.compile),
                                    impls, cfg.rounds, cfg.warmup, cfg.steps, sync, device)
                for impl, (t, mib) in timed.items():
                    row[impl] = {"step_s": t.median, "times": t.times, "tok_s": n_tokens / t.median,
                                 "loss": t.first, "peak_mib": mib}
                    print(f"{regime} {dtype} {spec} {impl}: {n_tokens / t.median:.0f} pair-tok/s, "
                          f"loss {t.first:.6g}, peak {fmt(mib)} MiB", flush=True)
                if "ours" in row:
                    others = [row[i]["loss"] for i in impls if i != "ours"]
                    # relative, with a floor: a loss that is ~0 (no signal in this batch) has no relative
                    # error
                    row["loss_rel_diff"] = max((abs(o - row["ours"]["loss"]) /
                                                max(abs(row["ours"]["loss"]), 1e-4)
                                                for o in others), default=None)
                result["train"].append(row)

    # a shared VM's speed drifts over minutes (the same peak measured 550-780 GFLOP/s on one thread within
    # an hour): measure it again after the training steps and divide by the higher of the two
    for dtype in dtypes:
        again = matmul_peak(peak_n, torch.float32 if dtype == "fp32" else torch.bfloat16, device)
        print(f"matmul peak {dtype} after the training steps: {again / 1e9:.0f} GFLOP/s", flush=True)
        result["peak_flops"][dtype] = max(result["peak_flops"][dtype], again)
    for row in result["train"]:
        if "ours" in row:
            row["mfu"] = row["flops"] / row["ours"]["step_s"] / result["peak_flops"][row["dtype"]]

    prompts = [tok.render(p.clean) for p in THREATS["sycophancy"].pairs(split="train", wrappers="train",
                                                                          n=16, seed=cfg.seed)]
    for dtype in dtypes:
        torch_dtype = torch.float32 if dtype == "fp32" else torch.bfloat16
        for bs in map(int, split(cfg.gen_batches)):
            # converted outside the measurement: a copy made in fp32 and then converted would put the fp32
            # weights in every generation's peak, for both sides alike, and hide what generation itself uses
            sources = {"ours": copy.deepcopy(ours).to(torch_dtype), "hf": copy.deepcopy(hf).to(torch_dtype)}
            rows = (prompts * (bs // len(prompts) + 1))[:bs]
            row = {"dtype": dtype, "batch": bs, "new_tokens": cfg.gen_tokens,
                   "prompt_len": statistics.mean(map(len, rows))}
            def build(impl):
                fn = generate_ours if impl == "ours" else generate_hf
                m = copy.deepcopy(sources[impl])
                if impl == "ours" and cfg.compile:
                    m.compile_blocks()
                return lambda: fn(m, rows, cfg.gen_tokens, tok.pad_id)

            timed = alternating(build, ["ours", "hf"], cfg.rounds, cfg.warmup, cfg.steps, sync, device)
            for impl, (t, mib) in timed.items():
                row[impl] = {"s": t.median, "times": t.times, "tok_s": bs * cfg.gen_tokens / t.median,
                             "peak_mib": mib}
                print(f"generate {dtype} batch {bs} {impl}: {bs * cfg.gen_tokens / t.median:.1f} tok/s",
                      flush=True)
            row["same_tokens"] = sum(a == b for a, b in zip(timed["ours"][0].first,
                                                            timed["hf"][0].first)) / bs
            result["generate"].append(row)

    if cfg.rollouts:
        tasks = [it["task"] for it in THREATS["frustration"].items("train")]
        tasks = (tasks * (cfg.rollouts // len(tasks) + 1))[:cfg.rollouts]
        build = lambda impl: lambda: rollout(ours, tok, tasks, cfg.rollout_turns, cfg.gen_tokens,
                                             impl == "chat")
        timed = alternating(build, ["chat", "whole"], cfg.rounds, cfg.warmup, cfg.steps, sync, device)
        row = {"rollouts": len(tasks), "turns": cfg.rollout_turns, "new_tokens": cfg.gen_tokens}
        for impl, (t, mib) in timed.items():
            row[impl] = {"s": t.median, "times": t.times, "peak_mib": mib}
            print(f"rollouts {impl}: {t.median:.1f} s", flush=True)
        same = [a == b for x, y in zip(timed["chat"][0].first, timed["whole"][0].first) for a, b in zip(x, y)]
        row["same_replies"] = sum(same) / len(same)
        result["rollouts"] = row

    result["goals"] = goals(result)
    result["table"] = table(result, impls)
    print("\n" + result["table"])
    # whole or not at all: an older table stays readable
    write_atomic(cfg.out, lambda path: dump_json(result, path))
    print(f"\nwritten to {cfg.out}")
    return result


def goals(res) -> list[str]:
    """The issue's targets (GOALS) that this run missed, one line each; empty when all were met."""
    missed = []
    for r in res["train"]:
        where = f"{r['regime']} {r['dtype']} {r['target']}"
        for impl in ("hf-b1", "hf"):
            if "ours" in r and impl in r and r["ours"]["tok_s"] / r[impl]["tok_s"] < GOALS[impl]:
                missed.append(f"{where}: {r['ours']['tok_s'] / r[impl]['tok_s']:.2f}x {impl}, "
                              f"goal {GOALS[impl]}x")
        if r["dtype"] == "bf16" and r.get("mfu") is not None and r["mfu"] < GOALS["mfu_bf16"]:
            missed.append(f"{where}: MFU {r['mfu']:.1%}, goal {GOALS['mfu_bf16']:.0%}")
    for r in res["generate"]:
        ratio = r["ours"]["tok_s"] / r["hf"]["tok_s"]
        if r["batch"] == 16 and ratio < GOALS["gen16"]:
            missed.append(f"generate {r['dtype']} batch 16: {ratio:.2f}x hf, goal {GOALS['gen16']}x")
    return missed


def table(res, impls):
    m = res["machine"]
    lines = [f"Machine: {m.get('gpu') or m['cpu']}, {m['cores']} cores, torch {m['torch']} "
             f"({m['torch_threads']} threads), transformers {m['transformers']}, device {m['device']}.",
             "Matmul peak: " + ", ".join(f"{d} {v / 1e9:.0f} GFLOP/s" for d, v in res["peak_flops"].items()) +
             ".", ""]
    if res["train"]:
        cols = [f"{i} tok/s" for i in impls] + [f"x {i}" for i in impls if i != "ours" and "ours" in impls]
        how = "compiled blocks (train.py --compile)" if res["config"].get("compile") else "eager blocks"
        lines += [f"Training step, pair-tokens/s (median); ours runs {how}; x = ours / that; loss diff = "
                  "max relative difference of the first-step loss from ours.", "",
                  "| regime (clean/wrapped tokens) | dtype | target | " + " | ".join(cols) +
                  " | MFU | peak MiB " + " / ".join(impls) + " | loss diff |",
                  "|" + "---|" * (len(cols) + 6)]
        for r in res["train"]:
            speed = [fmt(r[i]["tok_s"]) for i in impls]
            ratio = [f"{r['ours']['tok_s'] / r[i]['tok_s']:.2f}" for i in impls
                     if i != "ours" and "ours" in impls]
            mem = " / ".join(fmt(r[i]["peak_mib"]) for i in impls)
            lines.append(f"| {r['regime']} (B={r['batch']}, {r['mean_len'][0]:.0f}/{r['mean_len'][1]:.0f}) | "
                         f"{r['dtype']} | {r['target']} | " + " | ".join(speed + ratio) +
                         f" | {fmt(r.get('mfu'), '.1%')} | {mem} | {fmt(r.get('loss_rel_diff'), '.1e')} |")
        lines.append("")
    if res["generate"]:
        lines += ["Greedy generation, new tokens/s (median).", "",
                  "| dtype | batch | prompt tokens | new tokens | ours tok/s | hf tok/s | x hf | "
                  "peak MiB ours / hf | same tokens |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for r in res["generate"]:
            lines.append(f"| {r['dtype']} | {r['batch']} | {r['prompt_len']:.0f} | {r['new_tokens']} | "
                         f"{r['ours']['tok_s']:.1f} | {r['hf']['tok_s']:.1f} | "
                         f"{r['ours']['tok_s'] / r['hf']['tok_s']:.2f} | "
                         f"{fmt(r['ours']['peak_mib'])} / {fmt(r['hf']['peak_mib'])} | "
                         f"{r['same_tokens']:.0%} |")
        lines.append("")
    if r := res.get("rollouts"):
        lines += [f"Multi-turn rollouts, fp32: {r['rollouts']} in one batch, {r['turns']} rejections, "
                  f"{r['new_tokens']} new tokens a turn (median s).", "",
                  "| chat.Chat s | whole conversation s | x whole | peak MiB chat / whole | same replies |",
                  "|---|---|---|---|---|",
                  f"| {r['chat']['s']:.1f} | {r['whole']['s']:.1f} | "
                  f"{r['whole']['s'] / r['chat']['s']:.2f} | "
                  f"{fmt(r['chat']['peak_mib'])} / {fmt(r['whole']['peak_mib'])} | "
                  f"{r['same_replies']:.0%} |", ""]
    lines += ["Goals missed:" if res["goals"] else "All goals met."] + [f"- {g}" for g in res["goals"]]
    return "\n".join(lines)


if __name__ == "__main__":
    try:
        run(cli(BenchConfig))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
