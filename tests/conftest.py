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


def write_tiny_hf(path, family="llama", tied=False, seed=0):
    """Save a random tiny HF model of `family` plus a tokenizer into `path`; return the HF model."""
    transformers = pytest.importorskip("transformers")
    spec = HF_CONFIGS[family]
    cfg = getattr(transformers, spec["arch"])(
        vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, tie_word_embeddings=tied,
        eos_token_id=257, bos_token_id=256, pad_token_id=257,
        **({} if "rope_parameters" in spec["extra"] else {"rope_theta": 10000.0}), **spec["extra"])
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
    write_byte_tokenizer(path)
    return ref


@pytest.fixture(scope="session")
def embedded():
    """The embedded SmolLM2-135M-Instruct (fp32), loaded once per test session."""
    pytest.importorskip("gguf")
    from model import load_model
    try:
        return load_model("smollm2-135m-instruct")
    except FileNotFoundError as e:
        pytest.skip(str(e))
