"""
A readable Llama-family transformer (Llama, SmolLM, Qwen2, Qwen3, Gemma 2 and 3) that loads open weights
offline and hands back its internals. Gemma's differences are config fields, each a few lines where it acts:
(1 + weight) norms, norms on each sublayer's output, GeGLU, scaled embeddings and queries, soft-capping,
sliding-window layers with their own RoPE base.

    from checkpoint import load_model
    model, tok = load_model("smollm2-135m-instruct")        # or a local HF folder, or a hub repo id
    out = model(torch.tensor([tok.render(msgs)]), capture=["blocks.*.hook_resid_post"])
    out.logits, out.cache["blocks.3.hook_resid_post"]

    python model.py "What is the capital of France?"       # greedy answer from the embedded model

Parameter names are Hugging Face's, so a checkpoint loads with no renaming and strict key checks.
Internals are captured inline in forward under TransformerLens names (no hooks, nothing detached): block l's
are blocks.{l}. + a name in HOOKS (listed there with their shapes), the final norm's output is
ln_final.hook_normalized. Attention runs through SDPA, or explicit matmuls where a pattern is captured (the
probabilities materialised) or scores are soft-capped. model.compile_blocks() compiles the blocks for
training (train.py --compile).
"""

import fnmatch
import math
import sys
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

# What a block can hand back, by TransformerLens name: the module whose forward computes it (block, attn or
# mlp) and its local variable there. Capturing another is one line here, e.g. the residual stream between
# attention and MLP: "hook_resid_mid": ("block", "resid_mid").
HOOKS = {
    "hook_resid_post": ("block", "resid_post"),  # (B, T, d_model) the residual stream after block l
    "mlp.hook_post": ("mlp", "post"),            # (B, T, d_ff) act(gate) * up, the input to down_proj
    "attn.hook_pattern": ("attn", "pattern"),    # (B, n_head, T, T) post-softmax attention probabilities;
                                                 # (B, n_head, C, T) with pattern_rows: the rows a loss reads
}
FINAL_NORM = "ln_final.hook_normalized"          # (B, T, d_model) the last block's output after the final norm


def captured(want, where, local) -> dict:
    """{name: tensor} for the HOOKS in `want` that live in module `where`, from its forward's locals()."""
    return {name: local[var] for name, (at, var) in HOOKS.items() if at == where and name in want}


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

    def forward(self, x, cos, sin, mask, kv=None, want=(), rows=None):
        """mask: (B, 1, T, S) bool, or None for a plain causal batch. kv: (keys, values, slots) from a
        KVCache: this call's keys and values are written at `slots` and attention reads all S = max_len of
        them. want: the HOOKS to hand back; the pattern is (B, H, T, S), or only at query positions `rows`
        (B, C): (B, H, C, S)."""
        want_pattern = "attn.hook_pattern" in want
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
        z = y.transpose(1, 2)  # (B, T, H, head_dim): each head's output
        return self.o_proj(z.reshape(B, T, -1)), captured(want, "attn", locals())

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

    def forward(self, x, want=()):
        gate = self.gate_proj(x)
        post = (F.gelu(gate, approximate="tanh") if self.gelu else F.silu(gate)) * self.up_proj(x)
        return self.down_proj(post), captured(want, "mlp", locals())


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

    def forward(self, x, cos, sin, mask, kv=None, want=(), rows=None):
        """-> the block's output (the residual stream after it) and {name: tensor} for the HOOKS in `want`,
        only those: compiled, every output gets a gradient in the backward, zeros for one nothing reads."""
        a, attn = self.self_attn(self.input_layernorm(x), cos, sin, mask, kv, want, rows)
        if self.sandwich:  # Gemma: a norm on each sublayer's output too (post_attention_layernorm is that one
            # there, where Llama's is the norm before the MLP)
            resid_mid = x + self.post_attention_layernorm(a)
            m, mlp = self.mlp(self.pre_feedforward_layernorm(resid_mid), want)
            resid_post = resid_mid + self.post_feedforward_layernorm(m)
        else:
            resid_mid = x + a
            m, mlp = self.mlp(self.post_attention_layernorm(resid_mid), want)
            resid_post = resid_mid + m
        return resid_post, {**attn, **mlp, **captured(want, "block", locals())}


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
        self.hook_names = [f"blocks.{l}.{kind}" for l in range(cfg.n_layer) for kind in HOOKS] + [FINAL_NORM]

    def resolve_capture(self, capture) -> set:
        """Capture names may be exact or globs ("blocks.*.mlp.hook_post"); an unknown one is an error."""
        if isinstance(capture, str):
            capture = [capture]
        names = set()
        for pattern in capture or ():
            hit = fnmatch.filter(self.hook_names, pattern)
            if not hit:
                raise ValueError(f"unknown capture name {pattern!r}: "
                                 f"use blocks.{{0..{self.cfg.n_layer - 1}}}.{{{','.join(HOOKS)}}} "
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
        mask, local, pos = self.masks(idx, attention_mask, kv_cache)
        x = self.model.embed_tokens(idx)
        if self.cfg.embed_scale != 1.0:  # Gemma
            x = x * torch.tensor(self.cfg.embed_scale, dtype=x.dtype)
        rope = [self.rope(pos, self.inv_freq, x.dtype)] * 2  # [full layers, sliding layers]
        if self.cfg.rope_local_theta:  # Gemma 3's sliding layers turn at their own rate
            rope[1] = self.rope(pos, self.inv_freq_local, x.dtype)
        cache = {}
        slots = kv_cache.pos + torch.arange(idx.shape[1], device=idx.device) if kv_cache is not None else None
        for l, block in enumerate(self.model.layers):
            kv = (*kv_cache.layers[l], slots) if kv_cache is not None else None
            kinds = frozenset(kind for kind in HOOKS if f"blocks.{l}.{kind}" in want)
            x, kept = block(x, *rope[self.sliding[l]], local if self.sliding[l] else mask, kv, kinds, pattern_rows)
            cache.update((f"blocks.{l}.{kind}", value) for kind, value in kept.items())
        if kv_cache is not None:
            kv_cache.pos += idx.shape[1]
        x = self.model.norm(x)
        if FINAL_NORM in want:
            cache[FINAL_NORM] = x
        return ModelOutput(self.head(x) if logits else None, cache, x, self.head)

    def masks(self, idx, attention_mask, kv_cache):
        """-> (mask, the sliding layers' mask, each query's position): masks (B, 1, T, S) over the S keys
        attended to, or None for a plain causal batch (SDPA's own causal path); positions (B, T)."""
        B, T = idx.shape
        past = kv_cache.pos if kv_cache is not None else 0
        S = kv_cache.max_len if kv_cache is not None else T  # keys attended to
        if past + T > S:
            raise ValueError(f"{past + T} tokens do not fit a KV cache of {S}: allocate a longer one")
        if attention_mask is None:
            self.check_length(past + T)
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
            if T and past + T > self.cfg.max_seq_len:  # only then can a position pass it: read them
                self.check_length(int(pos.max()) + 1)
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
        return mask, local, pos

    def check_length(self, n):
        """A one-line error for n positions past max_position_embeddings, where RoPE leaves what the model
        was trained on and its outputs mean nothing."""
        if n > self.cfg.max_seq_len:
            raise ValueError(f"{n} tokens (prompt plus new tokens) pass the model's max_position_embeddings "
                             f"of {self.cfg.max_seq_len}: use a shorter prompt or fewer new tokens")

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
        # one graph per combination of grad mode, autocast, internals captured, LoRA switch and attention path:
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
        self.check_length(longest + max(max_new_tokens, 1))  # before a cache of that length is allocated
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


def main():
    import argparse

    from chat import chat_generate
    from checkpoint import EMBEDDED, load_finite
    p = argparse.ArgumentParser(description="greedy answer from a model to one user message")
    p.add_argument("prompt", nargs="?", default="What is the capital of France?")
    p.add_argument("--model", default=EMBEDDED)
    p.add_argument("--max-new-tokens", type=int, default=64)
    args = p.parse_args()
    try:
        model, tok = load_finite(args.model, "they answer only end-of-text: pick a --model that is not broken")
        print(chat_generate(model, tok, [[{"role": "user", "content": args.prompt}]],
                            max_new_tokens=args.max_new_tokens)[0])
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


if __name__ == "__main__":
    main()
