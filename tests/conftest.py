"""Shared test fixtures: tiny random Hugging Face checkpoints written offline, and the embedded model."""

import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

CHAT_TEMPLATE = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + "
                 "message['content'] + '<|im_end|>' + '\n'}}{% endfor %}"
                 "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def write_byte_tokenizer(path):
    """A 256-byte BPE tokenizer plus two ChatML specials (258 ids, the tiny models' vocabulary), built with
    the `tokenizers` library (not our code)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    byte_chars = pre_tokenizers.ByteLevel.alphabet()
    vocab = {c: i for i, c in enumerate(sorted(byte_chars))}
    tk = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(["<|im_start|>", "<|im_end|>"])
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, eos_token="<|im_end|>", pad_token="<|im_end|>")
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(path)


HF_CONFIGS = {
    "llama": dict(arch="LlamaConfig", extra={}),
    "qwen2": dict(arch="Qwen2Config", extra={}),
    "qwen3": dict(arch="Qwen3Config", extra={"head_dim": 16}),
    "llama3-rope": dict(arch="LlamaConfig", extra={"rope_scaling": {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64}}),
    # a window shorter than the tests' sequences, soft-caps low enough to bend the values, an odd query scale
    "gemma2": dict(arch="Gemma2Config", extra={
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 6, "attn_logit_softcapping": 0.5,
        "final_logit_softcapping": 3.0}),
    "gemma3": dict(arch="Gemma3TextConfig", extra={
        "head_dim": 16, "query_pre_attn_scalar": 24, "sliding_window": 6,
        "layer_types": ["sliding_attention", "full_attention", "sliding_attention"],
        "rope_parameters": {"full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 1e5},
                            "sliding_attention": {"rope_type": "default", "rope_theta": 1e4}}}),
}


def write_tiny_hf(path, family="llama", tied=False, seed=0, sentencepiece=False, **shape):
    """Save a random tiny HF model of `family` plus a tokenizer into `path`; return the HF model. The
    tokenizer is the 258-id byte-level one, or with sentencepiece=True a Gemma-layout byte-fallback BPE
    with Gemma's chat template (the model's vocabulary then follows it). shape: config fields other than the
    tiny defaults (hidden_size=64, ...)."""
    transformers = pytest.importorskip("transformers")
    spec = HF_CONFIGS[family]
    if sentencepiece:
        hf = write_sentencepiece_tokenizer(path, "gemma", SP_CORPUS)
        vocab, (bos, eos, pad) = len(hf), (hf.bos_token_id, hf.eos_token_id, hf.pad_token_id)
    else:
        write_byte_tokenizer(path)
        vocab, (bos, eos, pad) = 258, (256, 257, 257)
    cfg = getattr(transformers, spec["arch"])(**dict(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=8192, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        eos_token_id=eos, bos_token_id=bos, pad_token_id=pad,
        **({} if "rope_parameters" in spec["extra"] else {"rope_theta": 10000.0}), **spec["extra"]) | shape)
    torch.manual_seed(seed)
    cls = {"LlamaConfig": transformers.LlamaForCausalLM, "Qwen2Config": transformers.Qwen2ForCausalLM,
           "Qwen3Config": transformers.Qwen3ForCausalLM, "Gemma2Config": transformers.Gemma2ForCausalLM,
           "Gemma3TextConfig": transformers.Gemma3ForCausalLM}[spec["arch"]]
    ref = cls(cfg).eval()
    with torch.no_grad():  # HF inits norms to 1 and biases to 0: randomise them so mistakes there show
        for name, p in ref.named_parameters():
            if p.dim() == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p) if "norm" in name else 0.1 * torch.randn_like(p))
    ref.save_pretrained(path)
    return ref


# Gemma 2's template: no system role, "model" for the assistant, a BOS written by the template itself
GEMMA_TEMPLATE = ("{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
                  "{{ raise_exception('System role not supported') }}{% endif %}"
                  "{% for message in messages %}"
                  "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}"
                  "{{ raise_exception('Conversation roles must alternate user/assistant/...') }}"
                  "{% endif %}{% if (message['role'] == 'assistant') %}{% set role = 'model' %}"
                  "{% else %}{% set role = message['role'] %}{% endif %}"
                  "{{ '<start_of_turn>' + role + '\n' + message['content'] | trim + '<end_of_turn>\n' }}"
                  "{% endfor %}{% if add_generation_prompt %}{{'<start_of_turn>model\n'}}{% endif %}")
SP_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
SP_CORPUS = [f"Which {w} is {v}? Is it {a} or {b}? I think {a}. The answer is {n}.\n"
             for w in ("planet", "city", "river", "number") for v in ("largest", "oldest", "right")
             for a, b in (("Mars", "Jupiter"), ("Paris", "Rome")) for n in ("12", "7", "none")]


def write_sentencepiece_tokenizer(path, style, corpus):
    """Train a small BPE with byte fallback and the "▁" space marker in Gemma's layout (spaces replaced) or
    Llama 2's (a "▁" prepended too, stripped again on decode), with the `tokenizers` library, and save it
    with transformers; return transformers' tokenizer."""
    tokenizers = pytest.importorskip("tokenizers")
    transformers = pytest.importorskip("transformers")
    import json
    from tokenizers import decoders, models, normalizers, trainers
    t = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
    replace = normalizers.Replace(" ", "▁")
    t.normalizer = (replace if style == "gemma"
                    else normalizers.Sequence([normalizers.Prepend("▁"), replace]))
    steps = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    t.decoder = decoders.Sequence(steps + ([] if style == "gemma" else [decoders.Strip(" ", 1, 0)]))
    t.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SP_SPECIALS))
    spec = json.loads(t.to_str())
    vocab = spec["model"]["vocab"]
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    t = tokenizers.Tokenizer.from_str(json.dumps(spec))
    hf = transformers.PreTrainedTokenizerFast(tokenizer_object=t, bos_token="<bos>", eos_token="<eos>",
                                              pad_token="<pad>", unk_token="<unk>")
    hf.chat_template = GEMMA_TEMPLATE
    hf.save_pretrained(path)
    return hf


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (fp32), loaded once per test session."""
    pytest.importorskip("gguf")
    from checkpoint import load_model
    try:
        return load_model("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(str(e))


def dies_at(at_call):
    """consistency.consistency_loss, raising KeyboardInterrupt at its `at_call`-th call, as Ctrl-C would."""
    import consistency as C
    real, calls = C.consistency_loss, {"n": 0}

    def dies(*a, **k):
        calls["n"] += 1
        if calls["n"] == at_call:
            raise KeyboardInterrupt
        return real(*a, **k)
    return dies


def nan_copy(src, dst):
    """A copy of the model folder src whose final norm is all NaN; -> dst as a str."""
    import shutil
    from safetensors.torch import load_file, save_file
    shutil.copytree(src, dst)
    state = load_file(os.path.join(dst, "model.safetensors"))
    state["model.norm.weight"] = torch.full_like(state["model.norm.weight"], float("nan"))
    save_file(state, os.path.join(dst, "model.safetensors"))
    return str(dst)
