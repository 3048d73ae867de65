"""
Consistency training targets: make the model on a wrapped prompt w(x) look like the frozen initial model
theta0 on the clean prompt x, at one level of the stack each.

    bct     output     cross-entropy of theta0's own clean response y given w(x)           (Chua et al.)
    act     residual   squared L2 of each block's output (the last after the final norm), shared suffix
                       (Paper B)
    mlpct   MLP        1 - cos of blocks.{l}.mlp.hook_post over the clean-content tokens   (Paper A)
    attct   attention  per-head JSD of blocks.{l}.attn.hook_pattern, content x content     (Paper A)
    prefill output     KL(theta0 first-token dist. on x || theta predicting each prefill token)  (Paper A)

A pair is aligned once (`align`): the shared suffix and the clean-content span are found through
per-token character offsets, and only positions whose token ids agree in both renderings are kept.
Batches (`collate`) carry per-example index tensors, so pairs with different boundaries share a batch.
Adding a target is one function under `@target(...)` that maps (wrapped out, clean out, batch) to a
per-layer loss vector, here or in a file of your own (`train.py --plugin FILE`, imported by `load_plugin`).

    loss, logs = consistency_loss(model, reference, batch, parse_targets("act+bct"))
"""

import hashlib
import importlib.util
import os
import sys
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from model import gather

# ----------------------------------------------------------------------------- alignment


@dataclass
class AlignedPair:
    clean: list[int]               # clean prompt ids (generation prompt included)
    wrapped: list[int]             # wrapped prompt ids + prefill ids
    response: list[int]            # theta0's clean response ids, eos last only if it finished (or empty)
    suffix: tuple[list, list]      # positions of the shared token suffix in (clean, wrapped)
    content: tuple[list, list]     # positions of the clean-content tokens in (clean, wrapped), ids equal
    prefill: list[int]             # wrapped positions that predict a prefill token (the last prompt token on)
    trimmed: int                   # content tokens dropped because a BPE merge crossed the boundary
    content_moved: bool            # False when the wrapper only follows the content: mlpct/attct see no
                                   # change


def shared_suffix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return n


def content_tokens(ids, offsets, start, end):
    """(position, id, start, end relative to the span) of tokens lying wholly inside [start, end)."""
    return {(s - start, e - start, i): p for p, (i, (s, e)) in enumerate(zip(ids, offsets))
            if start <= s and e <= end}


def align(tok, pair, response: list[int] | None = None) -> AlignedPair:
    """Render a threats.Pair with the model's chat template and locate the shared suffix and the clean
    content in both renderings. The content is found at its last occurrence in each text (the user turn
    being answered); a token that straddles the content boundary because of a BPE merge is dropped."""
    clean_text = tok.render_text(pair.clean)
    wrapped_text = tok.render_text(pair.wrapped) + pair.prefill
    clean, c_off = tok.encode_with_offsets(clean_text)
    wrapped, w_off = tok.encode_with_offsets(wrapped_text)
    cs, ws = clean_text.rfind(pair.content), wrapped_text.rfind(pair.content)
    if not pair.content or cs < 0 or ws < 0:
        raise ValueError(f"pair {pair.meta.get('id', '?')}: its content is not inside both rendered prompts; "
                         f"a wrapper must keep the clean user text verbatim")
    c_tok = content_tokens(clean, c_off, cs, cs + len(pair.content))
    w_tok = content_tokens(wrapped, w_off, ws, ws + len(pair.content))
    both = sorted(c_tok.keys() & w_tok.keys())
    n_prompt = len(tok.encode(tok.render_text(pair.wrapped))) if pair.prefill else len(wrapped)
    # the authors' window (c-wei/AttCT prefill_bct.py): from the last prompt token, whose prediction is the
    # first response token, up to the one before the last prefill token; prefill tokens count as input
    # here, so nothing is shared after them (a prefill ending in the prompt's last token, "\n", shares it only
    # by chance)
    n = 0 if pair.prefill else shared_suffix(clean, wrapped)
    content = ([c_tok[k] for k in both], [w_tok[k] for k in both])
    last = content[0][-1] + 1 if both else 0
    return AlignedPair(
        clean=clean, wrapped=wrapped, response=list(response or []),
        suffix=(list(range(len(clean) - n, len(clean))), list(range(len(wrapped) - n, len(wrapped)))),
        content=content, prefill=list(range(n_prompt - 1, len(wrapped) - 1)),
        trimmed=max(len(c_tok), len(w_tok)) - len(both),
        # causal attention: if everything up to the content's end is identical, so are its internals
        content_moved=not both or clean[:last] != wrapped[:content[1][-1] + 1])


@dataclass
class Batch:
    clean_ids: torch.Tensor        # (B, Tc) right-padded clean prompts
    wrapped_ids: torch.Tensor      # (B, Tw) right-padded wrapped prompt + prefill + response
    label_pos: torch.Tensor        # (B, N) wrapped positions that predict a response token (BCT)
    label_ids: torch.Tensor        # (B, N) the token each of them predicts
    label_valid: torch.Tensor
    suffix_c: torch.Tensor         # (B, S) index tensors, with a validity mask each
    suffix_w: torch.Tensor
    suffix_valid: torch.Tensor
    content_c: torch.Tensor        # (B, C)
    content_w: torch.Tensor
    content_valid: torch.Tensor
    prefill_w: torch.Tensor        # (B, K)
    prefill_valid: torch.Tensor
    clean_last: torch.Tensor       # (B,) last clean prompt position: theta0's first-token distribution

    n_tokens: int                  # real (unpadded) tokens in both passes, for throughput

    def to(self, device):
        return Batch(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in self.__dict__.items()})


def pad(rows, value):
    width = max(1, max(map(len, rows)))
    return torch.tensor([list(r) + [value] * (width - len(r)) for r in rows])


def index(rows):
    return pad(rows, 0), pad([[True] * len(r) for r in rows], False)


def collate(pairs: list[AlignedPair], pad_id: int, full_sequence_loss: bool = False) -> Batch:
    """Right padding needs no attention mask: under causal attention a real token never sees the pads
    after it, so training batches take SDPA's plain causal path and still match per-example results."""
    wrapped = [p.wrapped + p.response for p in pairs]
    # position t predicts token t + 1; the first token of a sequence has no predictor
    first = [(1 if full_sequence_loss else len(p.wrapped)) if p.response else len(seq)
             for p, seq in zip(pairs, wrapped)]
    (lp, lv), (li, _) = (index([range(f - 1, len(seq) - 1) for f, seq in zip(first, wrapped)]),
                         index([seq[f:] for f, seq in zip(first, wrapped)]))
    (sc, sv), (sw, _) = index([p.suffix[0] for p in pairs]), index([p.suffix[1] for p in pairs])
    (cc, cv), (cw, _) = index([p.content[0] for p in pairs]), index([p.content[1] for p in pairs])
    pw, pv = index([p.prefill for p in pairs])
    return Batch(clean_ids=pad([p.clean for p in pairs], pad_id), wrapped_ids=pad(wrapped, pad_id),
                 label_pos=lp, label_ids=li, label_valid=lv, suffix_c=sc, suffix_w=sw, suffix_valid=sv,
                 content_c=cc, content_w=cw, content_valid=cv, prefill_w=pw, prefill_valid=pv,
                 clean_last=torch.tensor([len(p.clean) - 1 for p in pairs]),
                 n_tokens=sum(len(p.clean) + len(seq) for p, seq in zip(pairs, wrapped)))

# ----------------------------------------------------------------------------- targets


# The positions a target reads, as the Batch mask that marks them. A new target declares one, and what
# follows from it needs no other edit: whether a batch gives it any signal (no_signal), which training
# pairs it can learn from (train.py keeps only pairs whose content moved for "content" targets, and
# generates theta0's responses for "labels" ones) and the mechanism pass in eval.py.
READS = {"labels": "label_valid",     # theta0's clean response tokens after the wrapped prompt (SFT)
         "suffix": "suffix_valid",    # the token suffix clean and wrapped share
         "content": "content_valid",  # the clean content's tokens inside the wrapped prompt
         "prefill": "prefill_valid"}  # the positions that predict a prefill's tokens


@dataclass
class Target:
    fn: callable
    reads: str                    # a key of READS
    capture: tuple | str | None   # internals it reads, as capture names or globs
    content_rows: bool            # reads attention patterns only at the content's query rows
    reference: bool               # reads theta0's clean pass
    weight: float                 # default weight inside a combination
    recipe: tuple | None          # (lr, LoRA rank (0: full fine-tuning), LoRA targets) train.py uses by
                                  # default


TARGETS: dict[str, Target] = {}
QKVO = "q_proj,k_proj,v_proj,o_proj"


def target(name, reads, capture=None, content_rows=False, reference=True, weight=1.0, recipe=None):
    """Register `fn(w, c, batch) -> per-layer losses` as a target; see READS for what `reads` decides."""
    if reads not in READS:
        raise ValueError(f"target {name!r} reads {reads!r}: use one of {', '.join(READS)}")

    def register(fn):
        # a file may define its own target again (a notebook cell run twice); another's is never replaced, or
        # one run's plugin would silently change what every run of a matrix calls by that name
        if name in TARGETS and TARGETS[name].fn.__module__ != fn.__module__:
            raise ValueError(f"target {name!r} is already registered (by {TARGETS[name].fn.__module__}): "
                             f"give yours another name")
        TARGETS[name] = Target(fn, reads, capture, content_rows, reference, weight, recipe)
        return fn
    return register


def load_plugin(path: str, named_by: str = "--plugin"):
    """Import a file of your own whose `@target`s join the registry, once per file (train.py and bench.py
    --plugin FILE; eval.py, the file a run.json records). It imports this module by name
    (`from consistency import target`), so its targets land in TARGETS. named_by: what errors call it."""
    if not path:
        return
    if not os.path.isfile(path) or not path.endswith(".py"):
        raise FileNotFoundError(f"{named_by} {path}: no such .py file; pass a Python file that registers "
                                f"targets with @target")
    name = "plugin_" + hashlib.sha1(os.path.realpath(path).encode()).hexdigest()[:12]
    if name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before it runs, as import does: dataclasses and pickle look a module up there
    registered = set(TARGETS)
    try:
        spec.loader.exec_module(module)
    except Exception as e:  # the user's own code: its error in one line, naming the file; none of it is kept
        del sys.modules[name]
        for added in set(TARGETS) - registered:
            del TARGETS[added]
        raise ValueError(f"{named_by} {path} failed to import ({type(e).__name__}: {e}): fix the file") from None


# Devices where the activation losses run layer by layer, so each layer's tensors stay in cache (stacking
# the layers first made a CPU MLPCT step 14% slower). Elsewhere all layers go through the loss at once, so
# each op launches once instead of L times: a small model's GPU step is bound by its launches.
LAYERWISE_DEVICES = ("cpu",)


def layers(out, kind):
    """The cache names of every layer's captured `kind`, in layer order."""
    return [f"blocks.{l}.{kind}" for l in range(len([k for k in out.cache if k.endswith("." + kind)]))]


def over_layers(w, c, names, idx_w, idx_c, loss, select=gather):
    """loss(wrapped, clean) on each captured tensor in `names` (one a layer), each first taken at the
    positions the loss reads, select(x, idx_w) and select(x, idx_c) -> (L,). loss takes (B, ...) or
    (L, B, ...) tensors."""
    ws = [select(w.cache[name], idx_w) for name in names]
    cs = [select(c.cache[name], idx_c) for name in names]
    if ws[0].device.type in LAYERWISE_DEVICES:
        return torch.stack([loss(x, y) for x, y in zip(ws, cs)])
    return loss(torch.stack(ws), torch.stack(cs))


def masked_mean(x, valid):
    """Mean over each example's valid positions, then over the examples that have any: every pair weighs
    the same, and a row a target does not read (an SFT row for the prefill KL, a prefill pair for the SFT
    term) does not dilute it. Shards with as many such rows each have the mean of the whole batch, so
    data-parallel training reproduces one process.
    x (..., B, N...) and valid (B, N...): leading axes (layers) are kept."""
    dims = tuple(range(1 - valid.dim(), 0))
    n = valid.sum(dims)
    has = (n > 0).to(x.dtype)
    return ((x * valid).sum(dims) / n.clamp(min=1) * has).sum(-1) / has.sum().clamp(min=1)


def token_nll(logits, ids):
    """(B, N, V) logits and (B, N) ids -> (B, N) cross-entropy, in fp32 over the last axis: passing the
    (B, V, N) layout F.cross_entropy also takes puts the log-softmax on a middle axis, where torch's CPU
    kernel is off by ~1e-4 at a 49k vocabulary (against ~1e-5 here, both checked against fp64)."""
    return F.cross_entropy(logits.float().flatten(0, 1), ids.flatten(), reduction="none").view(ids.shape)


# Recipes: picked on the embedded model's sycophancy runs (LOG.md). ACT's was chosen on the validation split
# (three formats, validation phrasings): LoRA r8 on the attention projections at 1e-3 gave BRR 0.74 of base,
# against 0.96 at 3e-4 and 0.82 with full fine-tuning at 3e-5 (Paper B trains ACT on attention). The others
# were chosen earlier on the questions that are now the validation split, in the inline format, under the
# wrapper families that are now held out (so the test wrappers were seen when choosing them; the test
# questions were not): full fine-tuning at 1e-4 cost 5-11 points of clean accuracy, 3e-5 did not; AttCT with
# LoRA on q,v (Paper A's choice) kept accuracy where full fine-tuning lost 3.3 points. prefill on the
# refusal organism (LOG.md): 3e-5 collapsed it by step 15, 1e-5 refused 93% of benign questions, 3e-6 kept
# clean refusals and cut PAR 0.57 -> 0.39.

@target("bct", reads="labels", reference=False, recipe=(3e-5, 0, QKVO))
def bct(w, c, b):
    return masked_mean(token_nll(w.logits_at(b.label_pos), b.label_ids), b.label_valid)[None]


SFT = "bct"  # SFT on theta0's own responses: what a model organism trains, and the prefill target's SFT term


def residual_stream(out):
    """What transformers' hidden_states[1:] hold, and so what the authors' ACT compares: each block's output,
    the last one after the final norm."""
    return layers(out, "hook_resid_post")[:-1] + ["ln_final.hook_normalized"]


@target("act", reads="suffix", capture=("blocks.*.hook_resid_post", "ln_final.hook_normalized"), weight=1e-4,
        recipe=(1e-3, 8, QKVO))
def act(w, c, b):
    return over_layers(w, c, residual_stream(w), b.suffix_w, b.suffix_c,
                       lambda hw, hc: masked_mean((hw - hc).float().pow(2).sum(-1), b.suffix_valid))


def one_minus_cos(a, b):
    """1 - cos(a, b) over the last axis, written as half the squared distance of the unit vectors: the
    same value, but exactly 0 when a == b and without cancellation for nearly parallel vectors."""
    return 0.5 * (F.normalize(a.float(), dim=-1) - F.normalize(b.float(), dim=-1)).pow(2).sum(-1)


@target("mlpct", reads="content", capture="blocks.*.mlp.hook_post", recipe=(3e-5, 0, QKVO))
def mlpct(w, c, b):
    return over_layers(w, c, layers(w, "mlp.hook_post"), b.content_w, b.content_c,
                       lambda mw, mc: masked_mean(one_minus_cos(mw, mc), b.content_valid))


def content_block(pattern, idx):
    """(B, H, C, T) attention, captured at the content's query rows -> (B, H, C, C): the keys at the content
    positions too. Rows are not renormalised: mass on wrapper, system or template tokens falls outside."""
    B, H, C, _ = pattern.shape
    return pattern.gather(3, idx[:, None, None, :].expand(B, H, C, -1))


def jsd(p, q):
    """Jensen-Shannon divergence over the last axis; bounded by log 2, which is why Paper A chose it."""
    p, q = p.float().clamp(min=1e-9), q.float().clamp(min=1e-9)
    m = (p + q) / 2
    return 0.5 * (p * (p.log() - m.log())) + 0.5 * (q * (q.log() - m.log()))


@target("attct", reads="content", capture="blocks.*.attn.hook_pattern", content_rows=True,
        recipe=(1e-3, 8, "q_proj,v_proj"))
def attct(w, c, b):
    keys = b.content_valid[:, None, None, :]
    rows = b.content_valid[:, None, :].expand(-1, w.cache["blocks.0.attn.hook_pattern"].shape[1], -1)
    return over_layers(w, c, layers(w, "attn.hook_pattern"), b.content_w, b.content_c,
                       lambda aw, ac: masked_mean((jsd(aw, ac) * keys).sum(-1), rows), select=content_block)


@target("prefill", reads="prefill", recipe=(3e-6, 0, QKVO))
def prefill_kl(w, c, b):
    """The prefill tokens sit after the assistant marker, so every prompt position is identical in the
    clean and attacked runs: match theta0's first-response-token distribution instead, at every position
    that predicts a prefill token (the authors' window, from the last prompt token on). Alone it collapses a
    small model onto theta0's first token; train.py adds the authors' SFT term (--prefill-sft)."""
    p_clean = c.logits_at(b.clean_last[:, None]).float().log_softmax(-1)         # (B, 1, V)
    p_wrapped = w.logits_at(b.prefill_w).float().log_softmax(-1)                  # (B, K, V)
    kl = (p_clean.exp() * (p_clean - p_wrapped)).sum(-1)
    return masked_mean(kl, b.prefill_valid)[None]


def parse_targets(spec: str) -> list[tuple[str, float]]:
    """'act+bct' or 'act:1e-4+bct:1' -> [(name, weight), ...]; default weights from the registry."""
    out = []
    for part in spec.split("+"):
        name, _, weight = part.strip().partition(":")
        if name not in TARGETS:
            raise ValueError(f"unknown target {name!r} in {spec!r}: "
                             f"choose from {', '.join(TARGETS)} joined by '+'")
        try:
            w = float(weight) if weight else TARGETS[name].weight
        except ValueError:
            raise ValueError(f"bad weight {weight!r} for {name} in {spec!r}: "
                             "write name:number, e.g. act:1e-4") from None
        if not w > 0 or w == float("inf"):
            raise ValueError(f"weight of {name} in {spec!r} must be a positive finite number, got {weight}")
        if name in [n for n, _ in out]:
            raise ValueError(f"{name} appears twice in {spec!r}: "
                             "name each target once (act:2e-4 to weigh it)")
        out.append((name, w))
    return out


NO_SIGNAL = {
    "labels": "{name} needs theta0's clean responses in the batch: pass responses to align()",
    "suffix": ("{name} has no shared suffix to match on these pairs (a prefill attack sits after the "
               "assistant marker, so no prompt token follows it): use --target prefill or bct"),
    "content": "{name}: no aligned content tokens in this batch; check the threat's wrappers",
    "prefill": "the {name} target needs pairs with a prefill: use it with --threat prefill",
}


def no_signal(name, batch: Batch) -> str | None:
    """Why `name` would silently train on nothing with this batch, or None if it has a signal: the positions
    it reads (Target.reads) are empty, or, for a content target, the pairs are prefill pairs."""
    reads = TARGETS[name].reads
    if reads == "content" and batch.prefill_valid.any():
        return (f"{name} gets no signal on prefill pairs: under causal masking every prompt position is "
                f"identical in the clean and prefilled runs; use --target prefill or bct")
    if not getattr(batch, READS[reads]).any():
        return NO_SIGNAL[reads].format(name=name)
    return None


def check_signal(targets, batch: Batch):
    """Refuse targets that would silently train on nothing (e.g. activation targets on prefill pairs)."""
    for name, _ in targets:
        if reason := no_signal(name, batch):
            raise ValueError(reason)


def consistency_loss(model, reference, batch: Batch, targets, log_all=False):
    """Weighted sum of `targets` on one batch; gradients reach the model only through the wrapped pass.
    `reference` is theta0 (a frozen copy, or the model with adapters off) and runs under no_grad.
    log_all=True also computes every other target that has a signal on this batch, on the same forward
    outputs (cross-objective logging)."""
    check_signal(targets, batch)
    names = [n for n, _ in targets]
    if log_all:
        names += [n for n in TARGETS if n not in names and not no_signal(n, batch)]
    used = [TARGETS[n] for n in names]
    capture = [name for t in used if t.capture
               for name in ((t.capture,) if isinstance(t.capture, str) else t.capture)]
    rows = any(t.content_rows for t in used)  # the forward then builds C x T patterns, not T x T
    c = None
    if any(t.reference for t in used):
        with torch.no_grad():
            c = reference(batch.clean_ids, capture=capture, logits=False,
                          pattern_rows=batch.content_c if rows else None)
    # no full logits: the targets that read logits call logits_at at the positions they score
    w = model(batch.wrapped_ids, capture=capture, logits=False,
              pattern_rows=batch.content_w if rows else None)
    per_layer = {n: TARGETS[n].fn(w, c, batch) for n in names}
    loss = sum(weight * per_layer[n].mean() for n, weight in targets)
    logs = {n: v.mean().item() for n, v in per_layer.items()}
    logs.update({f"{n}_per_layer": v.detach().float().tolist() for n, v in per_layer.items() if len(v) > 1})
    return loss, logs
