"""model.py against independent references: transformers on tiny random checkpoints and on the embedded
GGUF, hand-built padding and no-cache generation, and the exact list of captured internals."""

import copy
import json
import os
import re
import sys

import pytest
import torch

from conftest import nan_copy, write_byte_tokenizer, write_tiny_hf
from chat import Chat
from checkpoint import load_model, save_model
from lora import add_lora, bf16_linears, merge_lora
from model import KVCache

FAMILIES = [(f, tied) for f in ("llama", "qwen2", "qwen3")
            for tied in (False, True)] + [("llama3-rope", False), ("gemma2", True), ("gemma3", True)]


@pytest.mark.parametrize("family,tied", FAMILIES)
def test_parity_with_transformers(tmp_path, family, tied):
    ref = write_tiny_hf(tmp_path, family, tied)
    model, _ = load_model(str(tmp_path))
    ids = torch.randint(0, 258, (2, 40), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (model(ids).logits - ref(ids).logits).abs().max().item()
    assert diff <= 1e-4, f"{family} tied={tied}: max |logit diff| {diff}"
    if tied:
        assert model.lm_head.weight is model.model.embed_tokens.weight


def test_embedded_matches_transformers_gguf_loader(embedded):
    transformers = pytest.importorskip("transformers")
    from checkpoint import find_embedded_gguf
    model, tok = embedded
    path = find_embedded_gguf()
    ref = transformers.AutoModelForCausalLM.from_pretrained(
        os.path.dirname(path), gguf_file=os.path.basename(path), dtype=torch.float32).eval()
    ids = tok.render([{"role": "user", "content": "Name three primary colours, and explain 2 + 2."}])
    x = torch.tensor([ids])
    with torch.no_grad():
        diff = (model(x).logits - ref(x).logits).abs().max().item()
    assert diff <= 1e-3, f"max |logit diff| {diff}"
    # the greedy answer a newcomer sees is the reference's answer, token for token
    ours = model.generate([ids], max_new_tokens=24, eos_id=tok.eos_id, pad_id=tok.pad_id)[0]
    theirs = ref.generate(x, max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_id,
                          pad_token_id=tok.pad_id)[0, len(ids):].tolist()
    # a finished row keeps its eos
    theirs = theirs[:theirs.index(tok.eos_id) + 1] if tok.eos_id in theirs else theirs
    assert ours == theirs, (tok.decode(ours), tok.decode(theirs))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_hf(path, "qwen3", tied=False)
    model, tok = load_model(str(path))
    return model, tok, str(path)


def test_capture_names_and_shapes(tiny):
    model, _, _ = tiny
    cfg = model.cfg
    B, T = 2, 7
    out = model(torch.randint(0, 258, (B, T)), capture=["blocks.*"])
    expected = {}
    for l in range(cfg.n_layer):
        expected[f"blocks.{l}.hook_resid_post"] = (B, T, cfg.d_model)
        expected[f"blocks.{l}.mlp.hook_post"] = (B, T, cfg.d_ff)
        expected[f"blocks.{l}.attn.hook_pattern"] = (B, cfg.n_head, T, T)
    assert {k: tuple(v.shape) for k, v in out.cache.items()} == expected


def test_logits_at_positions_equal_the_full_logits_there(tiny):
    model, _, _ = tiny
    ids = torch.randint(0, 258, (2, 9))
    full = model(ids).logits
    pos = torch.tensor([[0, 4, 8], [3, 3, 7]])
    out = model(ids, logits=False)
    assert out.logits is None
    assert torch.allclose(out.logits_at(pos), full[torch.arange(2)[:, None], pos], atol=1e-5)


def test_lora_on_lm_head_is_refused(tiny):
    model, _, _ = tiny
    with pytest.raises(ValueError, match="LoRA on lm_head is not supported"):
        add_lora(copy.deepcopy(model), 4, 8, ("lm_head",))


def test_lora_on_an_unknown_name_is_refused_even_beside_known_ones(tiny):
    """A misspelt target beside a real one used to be skipped silently, leaving that layer untrained."""
    model, _, _ = tiny
    with pytest.raises(ValueError, match="LoRA targets v_prj: no such Linear in the blocks; "
                                         "choose from q_proj,"):
        add_lora(copy.deepcopy(model), 4, 8, ("q_proj", "v_prj"))


def test_lora_merged_and_saved_compute_what_the_adapters_do(tiny, tmp_path):
    """merge_lora and save_model fold B @ A * scale into the weight; the adapted model adds it per forward."""
    model, tok, _ = tiny
    adapted = copy.deepcopy(model)
    add_lora(adapted, 4, 8, ("q_proj", "v_proj", "down_proj"))
    with torch.no_grad():
        for m in adapted.modules():
            if hasattr(m, "lora_B"):
                m.lora_B.normal_()  # B starts at 0, where merging is trivially exact
    ids = torch.randint(0, 258, (2, 9))
    save_model(adapted, tok, str(tmp_path / "saved"))
    with torch.no_grad():
        want = adapted(ids).logits
        merged = merge_lora(copy.deepcopy(adapted))
        assert not torch.allclose(model(ids).logits, want, atol=1e-3)
        assert torch.allclose(merged(ids).logits, want, atol=1e-5)
        assert torch.allclose(load_model(str(tmp_path / "saved"))[0](ids).logits, want, atol=1e-5)
    assert not [k for k in merged.state_dict() if ".lora_" in k]


def test_capture_changes_no_logits_and_detaches_nothing(tiny):
    model, _, _ = tiny
    ids = torch.randint(0, 258, (2, 9))
    plain = model(ids).logits
    out = model(ids, capture=["blocks.*"])
    assert torch.allclose(plain, out.logits, atol=1e-5)
    for name, value in out.cache.items():
        assert value.requires_grad, name
    out.cache["blocks.0.mlp.hook_post"].sum().backward()
    assert model.model.layers[0].mlp.gate_proj.weight.grad is not None
    model.zero_grad()


def test_manual_attention_equals_sdpa_and_pattern_is_causal(tiny):
    model, _, _ = tiny
    ids = torch.randint(0, 258, (3, 11))
    with torch.no_grad():
        sdpa = model(ids, capture=["blocks.*.hook_resid_post"]).cache
        manual = model(ids, capture=["blocks.*"]).cache
    for l in range(model.cfg.n_layer):
        assert torch.allclose(sdpa[f"blocks.{l}.hook_resid_post"],
                              manual[f"blocks.{l}.hook_resid_post"], atol=1e-5)
        p = manual[f"blocks.{l}.attn.hook_pattern"]
        assert torch.allclose(p.sum(-1), torch.ones_like(p.sum(-1)), atol=1e-5)
        assert p.triu(1).abs().max() == 0


def test_pattern_matches_transformers_eager(tmp_path):
    ref = write_tiny_hf(tmp_path, "llama", tied=False)
    model, _ = load_model(str(tmp_path))
    ref.config._attn_implementation = "eager"
    ids = torch.randint(0, 258, (1, 12))
    with torch.no_grad():
        theirs = ref(ids, output_attentions=True, output_hidden_states=True)
        ours = model(ids, capture=["blocks.*.attn.hook_pattern", "blocks.*.hook_resid_post"]).cache
    for l in range(model.cfg.n_layer):
        assert torch.allclose(ours[f"blocks.{l}.attn.hook_pattern"], theirs.attentions[l], atol=1e-5)
    # HF's last hidden state is after the final norm; compare the blocks before it
    for l in range(model.cfg.n_layer - 1):
        assert torch.allclose(ours[f"blocks.{l}.hook_resid_post"], theirs.hidden_states[l + 1], atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_internals_match_transformers_past_the_sliding_window(tmp_path, family):
    """20 tokens against a window of 6: the residual stream (hidden_states), the attention probabilities
    (eager attention: soft-capping and the window included) and the input of down_proj, every layer."""
    ref = write_tiny_hf(tmp_path, family, tied=True)
    model, _ = load_model(str(tmp_path))
    ref.config._attn_implementation = "eager"
    posts = {}
    for l, layer in enumerate(ref.model.layers):
        layer.mlp.down_proj.register_forward_pre_hook(lambda m, a, l=l: posts.__setitem__(l, a[0]))
    ids = torch.randint(0, 258, (2, 20), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        theirs = ref(ids, output_attentions=True, output_hidden_states=True)
        ours = model(ids, capture=["blocks.*", "ln_final.hook_normalized"]).cache
    assert model.sliding == [True, False, True]
    for l in range(model.cfg.n_layer):
        pattern = ours[f"blocks.{l}.attn.hook_pattern"]
        assert torch.allclose(pattern, theirs.attentions[l], atol=1e-5), l
        assert torch.allclose(ours[f"blocks.{l}.mlp.hook_post"], posts[l], atol=1e-5), l
        if l < model.cfg.n_layer - 1:  # HF's last hidden state is after the final norm
            assert torch.allclose(ours[f"blocks.{l}.hook_resid_post"], theirs.hidden_states[l + 1], atol=1e-5)
        if model.sliding[l]:  # no query sees a key 6 or more positions back
            assert pattern[..., 10, :5].abs().max() == 0 and pattern[..., 10, 5:11].min() > 0
    assert torch.allclose(ours["ln_final.hook_normalized"], theirs.hidden_states[-1], atol=1e-5)


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_gemma_greedy_tokens_with_and_without_the_cache_and_transformers(tmp_path, family):
    """Prompts and replies past the sliding window: our KV-cached batch, our uncached loop and
    transformers' generate give the same tokens; saved, the folder opens in transformers unchanged."""
    ref = write_tiny_hf(tmp_path, family, tied=True)
    model, tok = load_model(str(tmp_path))
    prompts = [torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(n)).tolist()
               for n in (3, 9, 7)]
    batched = model.generate(prompts, max_new_tokens=12, eos_id=257, pad_id=257)
    for p, got in zip(prompts, batched):
        assert got == greedy_without_cache(model, p, 12, 257)
        theirs = ref.generate(torch.tensor([p]), max_new_tokens=12, do_sample=False, eos_token_id=257,
                              pad_token_id=257)[0, len(p):].tolist()
        assert got == (theirs[:theirs.index(257) + 1] if 257 in theirs else theirs)
    save_model(model, tok, str(tmp_path / "saved"))
    transformers = pytest.importorskip("transformers")
    again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "saved").eval()
    ids = torch.tensor([prompts[1] * 3])
    with torch.no_grad():
        assert (again(ids).logits - model(ids).logits).abs().max() <= 1e-4


def test_gemma3_multimodal_checkpoint_loads_as_its_text_model(tmp_path):
    """Gemma 3 4B and up ship as Gemma3ForConditionalGeneration: the language model inside it, with the
    vision tower left behind, gives transformers' logits on text."""
    transformers = pytest.importorskip("transformers")
    text = dict(vocab_size=258, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=6,
                query_pre_attn_scalar=24, eos_token_id=257, bos_token_id=256, pad_token_id=257,
                layer_types=["sliding_attention", "full_attention", "sliding_attention"])
    vision = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14)
    torch.manual_seed(0)
    ref = transformers.Gemma3ForConditionalGeneration(
        transformers.Gemma3Config(text_config=text, vision_config=vision, mm_tokens_per_image=4)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.copy_(0.1 * torch.randn_like(p))
    ref.save_pretrained(tmp_path)
    write_byte_tokenizer(tmp_path)
    model, _ = load_model(str(tmp_path))
    assert model.cfg.arch == "gemma3" and model.sliding == [True, False, True]
    ids = torch.randint(0, 256, (2, 30), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert (model(ids).logits - ref(input_ids=ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("side", ["left", "right"])
def test_padding_gives_per_example_results(tiny, side):
    model, _, _ = tiny
    lengths = [5, 12, 8]
    rows = [torch.randint(0, 258, (n,)) for n in lengths]
    T = max(lengths)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T, dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
        ids[i, sl], mask[i, sl] = r, 1
    with torch.no_grad():
        batch = model(ids, attention_mask=mask, capture=["blocks.1.*"])
        for i, r in enumerate(rows):
            alone = model(r[None], capture=["blocks.1.*"])
            sl = slice(T - len(r), T) if side == "left" else slice(0, len(r))
            assert torch.allclose(batch.logits[i, sl], alone.logits[0], atol=1e-4)
            assert torch.allclose(batch.cache["blocks.1.mlp.hook_post"][i, sl],
                                  alone.cache["blocks.1.mlp.hook_post"][0], atol=1e-5)
            assert torch.allclose(batch.cache["blocks.1.attn.hook_pattern"][i, :, sl, sl],
                                  alone.cache["blocks.1.attn.hook_pattern"][0], atol=1e-5)


def greedy_without_cache(model, prompt, n, eos):
    ids = list(prompt)
    for _ in range(n):
        with torch.no_grad():
            nxt = model(torch.tensor([ids])).logits[0, -1].argmax().item()
        ids.append(nxt)
        if nxt == eos:
            break
    return ids[len(prompt):]


def test_kv_cache_generation_equals_no_cache(tiny):
    model, _, _ = tiny
    prompts = [torch.randint(0, 256, (n,)).tolist() for n in (3, 9, 6)]
    batched = model.generate(prompts, max_new_tokens=15, eos_id=257, pad_id=257)
    for p, got in zip(prompts, batched):
        assert got == greedy_without_cache(model, p, 15, 257)


def test_chat_continues_each_conversation_as_generate_would_on_the_whole_prompt(embedded):
    """Three turns of conversations through one Chat: every reply equals generate() on the whole rendered
    conversation alone, for a row that ended at eos or ran to the cap, continued, was cut part-way through
    what it held, or is new, and with rows dropped. A turn that only continues computes only what it adds."""
    model, tok = embedded
    encode = lambda msgs: tok.encode(tok.render_text(msgs))
    alone = lambda msgs: model.generate([encode(msgs)], 8, eos_id=tok.eos_id, pad_id=tok.pad_id)[0]
    convs = [[{"role": "user", "content": q}] for q in
             ("What is 2 + 2? Answer with the number only.", "Write a long poem about the sea.",
              "Name a primary colour.")]
    chat, ended, capped = Chat(model, eos_id=tok.eos_id, pad_id=tok.pad_id), 0, 0
    for turn, rejection in enumerate(("No. Try again.", "Wrong, once more.", "Still not it.")):
        before = chat.cache.pos if chat.cache is not None else 0
        got = chat.generate([encode(m) for m in convs], 8)
        for m, r in zip(convs, got):
            assert r == alone(m)
            ended, capped = ended + (r[-1] == tok.eos_id), capped + (r[-1] != tok.eos_id)
        if turn == 2:   # every row continued: only the new user turn and the reply went through the model
            assert chat.cache.pos - before < 30 + 8
        grown = [m + [{"role": "assistant", "content": tok.decode(r[:-1] if r[-1] == tok.eos_id else r)},
                      {"role": "user", "content": rejection}] for m, r in zip(convs, got)]
        rewritten = convs[0] + [{"role": "assistant", "content": "5"}, {"role": "user", "content": "Hm?"}]
        convs = ([grown[2], rewritten, [{"role": "user", "content": "Say hello."}], grown[1]] if turn == 0
                 else grown[:3])
    assert ended and capped


@pytest.mark.parametrize("family", ["gemma2", "gemma3"])
def test_chat_counts_the_sliding_window_in_positions_not_cache_slots(tmp_path, family):
    """Turns past a window of 6 through one Chat, whose rows hold masked slots (a rewritten turn's stale end,
    a shorter row's padding): every reply equals generate() on the whole token conversation alone."""
    write_tiny_hf(tmp_path, family, tied=True)
    model, _ = load_model(str(tmp_path))
    rand = lambda n, seed: torch.randint(0, 256, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    convs, chat = [rand(n, n) for n in (3, 9, 7)], Chat(model, eos_id=257, pad_id=257)
    for turn in range(3):
        got = chat.generate(convs, 5)
        for c, r in zip(convs, got):
            assert r == model.generate([c], 5, eos_id=257, pad_id=257)[0], (turn, len(c))
        grown = [c + r + rand(2 + i, 10 * turn + i) for i, (c, r) in enumerate(zip(convs, got))]
        convs = [grown[0], grown[1][:len(convs[1]) + 2] + rand(4, 99), grown[2]]


def test_sampling_is_seeded(tiny):
    model, _, _ = tiny
    prompts = [[1, 2, 3], [4, 5]]
    a = model.generate(prompts, 10, temperature=1.0, top_k=50, seed=3)
    b = model.generate(prompts, 10, temperature=1.0, top_k=50, seed=3)
    assert a == b


def test_save_load_roundtrip_and_transformers_opens_it(tiny, tmp_path):
    transformers = pytest.importorskip("transformers")
    model, tok, _ = tiny
    out = tmp_path / "saved"
    save_model(model, tok, str(out))
    again, _ = load_model(str(out))
    ref = transformers.AutoModelForCausalLM.from_pretrained(str(out)).eval()
    ids = torch.randint(0, 258, (2, 10))
    with torch.no_grad():
        want = model(ids).logits
        assert torch.equal(again(ids).logits, want)
        assert (ref(ids).logits - want).abs().max() <= 1e-4
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


def test_chat_generate_returns_each_reply_in_the_callers_order(embedded):
    """Batched by length and regrouped: every reply equals that prompt generated alone, prefill included."""
    from chat import chat_generate
    model, tok = embedded
    questions = ["What is the capital of France?", "Name a primary colour.",
                 "In one word, what do bees make? Answer with just the word and nothing else.",
                 "What is 2 + 2?"]
    prompts = [[{"role": "user", "content": q}] for q in questions]
    prefills = ["", "Sure:", "", "The answer is"]
    replies = chat_generate(model, tok, prompts, prefills, max_new_tokens=6, batch_size=3)
    for m, prefill, reply in zip(prompts, prefills, replies):
        alone = model.generate([tok.encode(tok.render_text(m) + prefill)], 6,
                               eos_id=tok.eos_id, pad_id=tok.pad_id)[0]
        assert reply == tok.decode(alone[:-1] if alone[-1:] == [tok.eos_id] else alone)


def test_embedded_save_load_roundtrip(embedded, tmp_path):
    model, tok = embedded
    save_model(model, tok, str(tmp_path / "m"))
    again, tok2 = load_model(str(tmp_path / "m"))
    ids = torch.tensor([tok.render([{"role": "user", "content": "Hi 123"}])])
    assert tok2.render([{"role": "user", "content": "Hi 123"}]) == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)


def test_hub_repo_id_loads_through_snapshot_download(tiny, tmp_path, monkeypatch):
    """A real snapshot_download call, offline, against a hub cache laid out the way the hub client writes
    it."""
    model, tok, path = tiny
    cache = tmp_path / "hub"
    snap = cache / "models--someone--tiny-qwen3" / "snapshots" / ("a" * 40)
    snap.mkdir(parents=True)
    for f in os.listdir(path):
        os.symlink(os.path.join(path, f), snap / f)
    (cache / "models--someone--tiny-qwen3" / "refs").mkdir()
    (cache / "models--someone--tiny-qwen3" / "refs" / "main").write_text("a" * 40)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    import huggingface_hub.constants as c
    monkeypatch.setattr(c, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(c, "HF_HUB_OFFLINE", True)
    loaded, _ = load_model("someone/tiny-qwen3")
    ids = torch.randint(0, 258, (1, 6))
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_sharded_checkpoint_loads_like_one_file(tmp_path):
    """Hub checkpoints of larger models come in shards (model-0000k-of-0000n.safetensors plus an index)."""
    ref = write_tiny_hf(tmp_path / "whole", "qwen2", tied=False)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="40KB")
    write_byte_tokenizer(tmp_path / "sharded")
    assert len(list((tmp_path / "sharded").glob("*.safetensors"))) > 2
    ids = torch.randint(0, 258, (1, 7))
    with torch.no_grad():
        whole, sharded = (load_model(str(tmp_path / d))[0](ids).logits for d in ("whole", "sharded"))
        assert torch.equal(sharded, whole)
        assert torch.allclose(whole, ref(ids).logits, atol=1e-5)


def test_clear_errors(tiny, tmp_path):
    model, _, path = tiny
    with pytest.raises(ValueError, match="unknown model"):
        load_model("not a model name")
    with pytest.raises(ValueError, match="unknown capture name"):
        model(torch.zeros(1, 3, dtype=torch.long), capture=["blocks.0.hook_nope"])
    with pytest.raises(ValueError, match="out of range"):
        model(torch.tensor([[10_000]]))
    with pytest.raises(ValueError, match=r"attention_mask is \(1, 2\), expected \(1, 3\)"):
        model(torch.zeros(1, 3, dtype=torch.long), attention_mask=torch.ones(1, 2))
    with pytest.raises(ValueError, match="do not fit a KV cache of 4"):
        model(torch.zeros(1, 5, dtype=torch.long), kv_cache=KVCache(model.cfg, 1, 4, "cpu", torch.float32))
    with pytest.raises(ValueError, match="at least 1 new token"):
        model.generate([[1, 2]], 0)
    with pytest.raises(ValueError, match="at least 1 new token"):
        Chat(model).generate([[1, 2]], 0)
    with pytest.raises(FileNotFoundError, match="config.json"):
        load_model(str(tmp_path))
    import shutil, json
    bad = tmp_path / "bad"
    shutil.copytree(path, bad)
    (bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="corrupt"):
        load_model(str(bad))
    cfg = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps(cfg | {"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ValueError, match="unsupported architecture"):
        load_model(str(bad))
    (bad / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="corrupt"):
        load_model(str(bad))
    shutil.copytree(path, tmp_path / "short")
    cfg["num_hidden_layers"] += 1
    (tmp_path / "short" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="missing"):
        load_model(str(tmp_path / "short"))


def test_bf16_linears_under_autocast_give_the_same_numbers(tiny):
    """Storing the blocks' Linear weights in bf16 is exactly autocast's own cast: outputs are
    bit-identical."""
    model, _, _ = tiny
    ids = torch.randint(0, 258, (2, 9))
    stored = bf16_linears(copy.deepcopy(model))
    assert stored.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16
    assert stored.model.layers[0].input_layernorm.weight.dtype == torch.float32
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        a = model(ids, capture="blocks.*.hook_resid_post")
        b = stored(ids, capture="blocks.*.hook_resid_post")
    assert torch.equal(a.logits, b.logits)
    assert all(torch.equal(a.cache[k], b.cache[k]) for k in a.cache)


@pytest.mark.parametrize("padded", [False, True])
def test_pattern_rows_are_those_rows_of_the_full_pattern(tiny, padded):
    model, _, _ = tiny
    ids = torch.randint(0, 258, (2, 9))
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 1, 1], [1] * 9]) if padded else None
    rows = torch.tensor([[2, 5, 8], [0, 3, 3]])
    with torch.no_grad():
        full = model(ids, attention_mask=mask, capture="blocks.*.attn.hook_pattern").cache
        some = model(ids, attention_mask=mask, capture="blocks.*.attn.hook_pattern", pattern_rows=rows).cache
    for name, p in full.items():
        want = torch.stack([p[b][:, rows[b]] for b in range(2)])
        assert some[name].shape == want.shape and torch.allclose(some[name], want, atol=1e-6), name


def test_compiled_blocks_keep_compiling_past_dynamos_default_limit(tiny):
    """Each combination of grad mode, autocast and pattern capture is its own graph: bench.py needs dozens in
    one process. Past dynamo's default of 8, new ones would run eagerly without a word; compile_blocks
    raises the limit, so all 12 here compile and agree with the eager model. (Dynamo's eager backend: the
    limit is dynamo's, whatever compiles the graphs, and inductor would take minutes over 12 of them.)"""
    from torch._dynamo.utils import counters
    model, _, _ = tiny
    compiled = copy.deepcopy(model).compile_blocks(backend="eager")
    ids = torch.randint(0, 258, (2, 9))
    rows = torch.tensor([[2, 3, 4], [5, 6, 7]])
    for grad in (False, True):
        for bf16 in (False, True):
            for capture, pattern_rows in (([], None), (["blocks.*"], None), (["blocks.*"], rows)):
                graphs = counters["stats"]["unique_graphs"]
                with torch.set_grad_enabled(grad), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    ours = compiled(ids, capture=capture, pattern_rows=pattern_rows, logits=False).cache
                    eager = model(ids, capture=capture, pattern_rows=pattern_rows, logits=False).cache
                assert counters["stats"]["unique_graphs"] > graphs, (grad, bf16, capture, pattern_rows)
                tol = 2e-2 if bf16 else 1e-5
                assert all(torch.allclose(ours[k].float(), eager[k].float(), atol=tol) for k in eager)


@pytest.mark.parametrize("config,msg", [
    ("[1, 2]", "a JSON object was expected, got list"),
    ({"hidden_size": "64"}, "d_model must be a positive integer, got '64'"),
    ({"num_hidden_layers": None}, "n_layer must be a positive integer, got None"),
    ({"rope_parameters": None, "rope_scaling": "linear"}, "rope_scaling must be an object like"),  # < v5
    ('{"hidden_size": "\xe9"}'.encode("latin-1"), "UnicodeDecodeError"),
])
def test_a_wrongly_typed_config_is_one_line(tmp_path, config, msg):
    write_tiny_hf(tmp_path, "llama")
    path = tmp_path / "config.json"
    if isinstance(config, bytes):
        path.write_bytes(config)
    else:
        path.write_text(config if isinstance(config, str)
                        else json.dumps({**json.loads(path.read_text()), **config}))
    with pytest.raises(ValueError, match=re.escape(msg)) as e:
        load_model(str(tmp_path))
    assert "\n" not in str(e.value) and "config.json" in str(e.value)


@pytest.mark.parametrize("template,msg", [
    ("{% for m in messages %}{{ m.content }", "TemplateSyntaxError"),
    ("{{ ''.__class__.__mro__ }}", "SecurityError"),
    ("{{ raise_exception('System role not supported') }}", "System role not supported"),
    ("{% include 'other.jinja' %}", "TypeError: no loader"),
    ("{% for i in range(10**9) %}{% endfor %}", "OverflowError: Range too big"),
])
def test_a_broken_or_refusing_chat_template_is_one_line(tmp_path, template, msg):
    write_tiny_hf(tmp_path, "llama")
    (tmp_path / "chat_template.jinja").write_text(template)
    _, tok = load_model(str(tmp_path))
    with pytest.raises(ValueError, match=msg) as e:
        tok.render([{"role": "user", "content": "hi"}])
    assert "\n" not in str(e.value) and "chat template" in str(e.value)


def test_a_gguf_without_a_tokenizer_is_one_line(tmp_path):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(tmp_path / "bare.gguf"), "llama")
    w.add_block_count(1)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ValueError, match="the GGUF has no tokenizer .tokenizer.ggml.tokens missing.") as e:
        load_model(str(tmp_path / "bare.gguf"))
    assert "\n" not in str(e.value)


def test_fingerprint_follows_content_of_gguf_files_and_sharded_folders(tmp_path):
    """Caches are keyed on checkpoint.fingerprint: it must change when any weight shard or a GGUF file changes, and
    not when a folder is only renamed."""
    from safetensors.torch import load_file, save_file
    from checkpoint import fingerprint
    write_tiny_hf(tmp_path / "m", "llama")
    state = load_file(tmp_path / "m" / "model.safetensors")
    names = sorted(state)
    (tmp_path / "m" / "model.safetensors").unlink()
    save_file({k: state[k] for k in names[:5]}, tmp_path / "m" / "model-00001-of-00002.safetensors")
    save_file({k: state[k] for k in names[5:]}, tmp_path / "m" / "model-00002-of-00002.safetensors")
    before = fingerprint(str(tmp_path / "m"))
    os.rename(tmp_path / "m", tmp_path / "renamed")
    assert fingerprint(str(tmp_path / "renamed")) == before
    second = {k: state[k].clone() for k in names[5:]}
    second[names[-1]][0] += 1
    save_file(second, tmp_path / "renamed" / "model-00002-of-00002.safetensors")
    assert fingerprint(str(tmp_path / "renamed")) != before
    gguf = tmp_path / "x.gguf"
    gguf.write_bytes(b"GGUF" + bytes(64))
    first = fingerprint(str(gguf))
    gguf.write_bytes(b"GGUF" + bytes(63) + b"\1")
    assert fingerprint(str(gguf)) != first


def test_max_position_embeddings_is_enforced_in_the_forward_and_before_generating(tmp_path):
    write_tiny_hf(tmp_path, "llama")
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg | {"max_position_embeddings": 256}))
    model, _ = load_model(str(tmp_path))
    limit = "pass the model's max_position_embeddings of 256"
    for mask in (None, torch.ones(1, 257, dtype=torch.long)):
        with pytest.raises(ValueError, match=f"257 tokens .*{limit}"):
            model(torch.zeros(1, 257, dtype=torch.long), attention_mask=mask)
    padded = torch.cat([torch.zeros(1, 44, dtype=torch.long), torch.ones(1, 256, dtype=torch.long)], 1)
    assert model(torch.zeros(1, 300, dtype=torch.long), attention_mask=padded, logits=False).hidden.shape[1] == 300
    assert len(model.generate([[1] * 250], 6, eos_id=-1)) == 1
    with pytest.raises(ValueError, match=f"257 tokens .*{limit}"):
        model.generate([[1] * 250], 7, eos_id=-1)
    with pytest.raises(ValueError, match=f"1000000002 tokens .*{limit}"):  # refused before a cache that big
        Chat(model, eos_id=-1).generate([[1, 2]], 10**9)


def test_model_py_refuses_nan_weights_in_one_line(tiny, tmp_path, monkeypatch):
    import model as model_py
    monkeypatch.setattr(sys, "argv", ["model.py", "--model", nan_copy(tiny[2], tmp_path / "nan")])
    with pytest.raises(SystemExit) as e:
        model_py.main()
    assert "1 weight tensors are not finite (model.norm.weight, ...)" in str(e.value.code)
