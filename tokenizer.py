"""Tokenizers built from the model's own files, behind one interface (encode, encode_with_offsets, decode,
render, save) that consistency.py uses.

Byte-level BPE (SmolLM/SmolLM2, Llama 3, Qwen2/3) runs on tiktoken: Tokenizer reads the vocabulary, merges,
special tokens and chat template from a GGUF file or a Hugging Face folder and encodes exactly as the
model's Hugging Face tokenizer does. SentencePiece-style BPE with byte fallback and the "▁" space marker
(Gemma, Llama 2, Mistral), which tiktoken cannot express, runs on the `tokenizers` library, which reads
tokenizer.json exactly (SentencePieceBPE); Tokenizer.from_dir picks it for such a folder.

    import gguf
    from tokenizer import Tokenizer
    tok = Tokenizer.from_gguf(gguf.GGUFReader("SmolLM2-135M-Instruct.Q4_1.gguf"))
                                                              # or Tokenizer.from_dir(folder)
    ids = tok.encode("<|im_start|>user\nHi<|im_end|>")        # special-token strings become their ids
    ids = tok.render([{"role": "user", "content": "Hi"}])     # the model's own chat template
    text = tok.decode(ids, skip_special=True)
    tok.save(folder)  # tokenizer.json + tokenizer_config.json; transformers.AutoTokenizer loads them too

encode never adds a BOS token: chat templates that want one write it themselves.
"""

import json
import os
import unicodedata
from datetime import datetime
from functools import cached_property

import jinja2
import jinja2.ext
import jinja2.sandbox
import regex
import tiktoken

SUPPORTED = ("only byte-level BPE tokenizers (SmolLM, Llama 3, Qwen2/3) and BPE with byte fallback (Gemma, "
             "Llama 2, Mistral) are supported")

# Pre-tokenizer regexes. SmolLM2 was trained with HF's Digits(individual_digits) followed by the GPT-2
# regex; this single regex is the same split (the lookahead keeps whitespace before a digit in one piece).
SMOLLM_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+|\s+(?![^\s\p{N}])|\s+"""
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
LLAMA3_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}|"""
                  r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
QWEN2_PATTERN = (r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"""
                 r""" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+""")
# tokenizer.ggml.pre -> (regex, NFC-normalise, ignore_merges), as the models' HF tokenizer.json files have
# them
GGUF_PRE = {
    "smollm": (SMOLLM_PATTERN, False, False),
    "llama-bpe": (LLAMA3_PATTERN, False, True),
    "qwen2": (QWEN2_PATTERN, True, False),
}
GGUF_CONTROL, GGUF_USER_DEFINED = 3, 4


def _byte_chars():
    # GPT-2's printable stand-in for each byte, the alphabet byte-level vocabularies are written in
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    moved = [b for b in range(256) if b not in keep]
    return {**{b: chr(b) for b in keep}, **{b: chr(256 + i) for i, b in enumerate(moved)}}


BYTE_TO_CHAR = _byte_chars()
CHAR_TO_BYTE = {c: b for b, c in BYTE_TO_CHAR.items()}


def _to_bytes(token, where):
    try:
        return bytes(CHAR_TO_BYTE[c] for c in token)
    except KeyError:
        raise ValueError(f"{where}: token {token!r} is not byte-level; {SUPPORTED}") from None


def _to_chars(b):
    return "".join(BYTE_TO_CHAR[x] for x in b)


def _read_json(path, fix):
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found; {fix}")
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}); re-download or re-save it") from None


def _folder(path):
    """A Hugging Face tokenizer folder -> (tokenizer.json's path, its content, tokenizer_config.json, the chat
    template from chat_template.jinja or the config)."""
    json_path = os.path.join(path, "tokenizer.json")
    spec = _read_json(json_path, "from_dir needs a Hugging Face tokenizer folder that has tokenizer.json")
    config = _read_json(os.path.join(path, "tokenizer_config.json"),
                        "from_dir needs the tokenizer_config.json saved with tokenizer.json")
    template_path = os.path.join(path, "chat_template.jinja")
    if os.path.isfile(template_path):
        with open(template_path, encoding="utf-8") as f:
            template = f.read()
    else:
        template = config.get("chat_template")
    if isinstance(template, list):  # several named templates; the chat one is "default"
        template = {t["name"]: t["template"] for t in template}.get("default")
    return json_path, spec, config, template


def _special_ids(config, vocab, path):
    """(eos, bos, pad) ids of tokenizer_config.json's tokens in vocab (token -> id); pad defaults to eos."""
    def token_id(key):
        token = config.get(key)
        token = token.get("content") if isinstance(token, dict) else token
        if token is None:
            return None
        if token not in vocab:
            raise ValueError(f"{path}/tokenizer_config.json: {key} {token!r} is not in the vocabulary of "
                             f"{path}/tokenizer.json")
        return vocab[token]

    eos, bos, pad = token_id("eos_token"), token_id("bos_token"), token_id("pad_token")
    if eos is None:
        raise ValueError(f'{path}/tokenizer_config.json has no eos_token; add one, e.g. '
                         f'"eos_token": "<|im_end|>"')
    return eos, bos, eos if pad is None else pad


def _pattern_from_json(pre, where):
    """The regex a tokenizer.json pre_tokenizer splits with, for the layouts byte-level models ship."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds and kinds[-1] == "ByteLevel" and steps[-1].get("add_prefix_space", False):
        raise ValueError(f"{where}: ByteLevel add_prefix_space=true is not supported; {SUPPORTED}")
    byte_level_regex = kinds and kinds[-1] == "ByteLevel" and steps[-1].get("use_regex", True)
    if kinds == ["Split", "ByteLevel"] and not byte_level_regex:  # Llama 3, Qwen2/3
        split = steps[0]
        if ("Regex" in split.get("pattern", {}) and split.get("behavior") == "Isolated"
                and not split.get("invert")):
            return split["pattern"]["Regex"]
    if kinds == ["Digits", "ByteLevel"] and byte_level_regex and steps[0].get("individual_digits"):  # SmolLM
        return SMOLLM_PATTERN
    if kinds == ["ByteLevel"] and byte_level_regex:  # GPT-2
        return GPT2_PATTERN
    raise ValueError(f"{where}: pre_tokenizer {kinds or None} is not a byte-level BPE layout "
                     f"(Split regex + ByteLevel, Digits + ByteLevel or ByteLevel); {SUPPORTED}")


class TokenizerBase:
    """What both tokenizers share: the model's chat template rendered as transformers renders it, where a
    reply ends, the special tokens' texts and the id check. A tokenizer class supplies encode, decode,
    chat_template, vocab_size and the bos / eos / pad ids."""

    def special_texts(self):
        """{"bos_token", "eos_token", "pad_token"} -> the configured token's text, or None."""
        ids = {"bos_token": self.bos_id, "eos_token": self._configured_eos, "pad_token": self.pad_id}
        return {k: None if i is None else self.decode([i]) for k, i in ids.items()}

    def _checked(self, ids):
        ids = [int(i) for i in ids]
        if ids and not (0 <= min(ids) and max(ids) < self.vocab_size):
            raise ValueError(f"decode: ids must lie in [0, {self.vocab_size}), got {min(ids)}..{max(ids)}")
        return ids

    @cached_property
    def _template(self):
        # the environment transformers renders chat templates in, so the text matches apply_chat_template
        env = jinja2.sandbox.ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                                           extensions=[jinja2.ext.loopcontrols])

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
            # jinja's own tojson HTML-escapes; transformers' does not
            return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                              sort_keys=sort_keys)

        env.filters["tojson"] = tojson
        env.globals["raise_exception"] = raise_exception
        env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
        return env.from_string(self.chat_template)

    def render_text(self, messages, add_generation_prompt=True):
        """messages ([{"role": ..., "content": ...}]) through the model's chat template, as transformers
        renders it."""
        if self.chat_template is None:
            raise ValueError("this tokenizer has no chat template (base model?); "
                             "format the prompt with encode instead")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         tools=None, documents=None,
                                         **{k: t for k, t in self.special_texts().items() if t is not None})
        except (jinja2.exceptions.TemplateError, TypeError, ArithmeticError) as e:
            # a syntax error, the sandbox (its ranges overflow, it has no loader for include/import), the
            # template's raise_exception, or its own arithmetic
            raise ValueError(f"the chat template failed ({type(e).__name__}: {e}): "
                             f"fix the model's chat template (chat_template.jinja or tokenizer_config.json), "
                             f"or pass messages it accepts") from None

    def render(self, messages, add_generation_prompt=True):
        return self.encode(self.render_text(messages, add_generation_prompt))

    def _end_turns(self):
        """Make eos_id the special token the chat template closes an assistant turn with, where that is not
        eos (Gemma's <end_of_turn>): a reply ends there, so generation stops on it and SFT targets end with
        it. The configured eos is kept for saving."""
        self._configured_eos, mark = self.eos_id, "Zq7Xw"
        try:
            turns = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": mark}]
            text = self.render_text(turns, add_generation_prompt=False) if self.chat_template else ""
        except ValueError:  # a template that takes no such conversation keeps eos
            return
        tail = text[text.rfind(mark) + len(mark):] if mark in text else ""
        ends = [i for t, i in sorted(self.special_tokens.items(), key=lambda kv: -len(kv[0]))
                if tail.startswith(t)]
        self.eos_id = ends[0] if ends else self.eos_id


class Tokenizer(TokenizerBase):
    def __init__(self, vocab, merges, specials, control, pattern, chat_template, eos_id, bos_id, pad_id,
                 nfc=False, ignore_merges=False):
        """vocab: bytes -> id for ordinary tokens; merges: (bytes, bytes) pairs in priority order;
        specials: str -> id for tokens matched verbatim in text; control: the subset of their ids that
        decode(skip_special=True) drops."""
        self.special_tokens = dict(specials)
        self.chat_template = chat_template
        self.eos_id, self.bos_id, self.pad_id = eos_id, bos_id, pad_id
        self.vocab_size = max([*vocab.values(), *specials.values()]) + 1
        self._vocab, self._merges, self._control = vocab, merges, set(control)
        self._pattern, self._nfc, self._ignore_merges = pattern, nfc, ignore_merges

        # tiktoken merges the adjacent pair whose result has the lowest rank, HF the pair with the earliest
        # merge, so ranks follow merge order. Ids usually do too (SmolLM2: merge k makes id 252+k), but the
        # rank -> id table keeps this right for any vocabulary. All 256 bytes need a rank; those the
        # vocabulary lacks map to -1 and are dropped, as HF's BPE (no unk token) drops them. tiktoken also
        # takes a pre-token piece that is itself a token whole, like HF's ignore_merges; without that flag
        # HF agrees as long as every token's own bytes merge back into it (true on SmolLM2, checked in tests).
        ranks = {bytes([b]): b for b in range(256)}
        for a, b in merges:
            if a + b not in vocab:
                raise ValueError(f"merge {a!r} + {b!r} makes a token the vocabulary lacks; the tokenizer "
                                 "files are inconsistent, re-download them")
            ranks.setdefault(a + b, len(ranks))
        self._known_bytes = {t[0] for t in vocab if len(t) == 1}
        self._id_of_rank = [vocab.get(t, -1) for t in ranks] + list(specials.values())
        self._enc = tiktoken.Encoding("bpe", pat_str=pattern, mergeable_ranks=ranks,
                                      special_tokens={t: len(ranks) + k for k, t in enumerate(specials)})
        self._bytes = [b""] * self.vocab_size
        for t, i in [*vocab.items(), *((t.encode("utf-8"), i) for t, i in specials.items())]:
            self._bytes[i] = t
        self._end_turns()

    @classmethod
    def from_gguf(cls, reader):
        """From an opened gguf.GGUFReader (llama.cpp's tokenizer.ggml.* fields)."""
        def field(name, default=None):
            return reader.fields[name].contents() if name in reader.fields else default

        where = getattr(reader.data, "filename", "GGUF file")
        model, pre = field("tokenizer.ggml.model"), field("tokenizer.ggml.pre")
        if model != "gpt2":
            raise ValueError(f"{where}: tokenizer.ggml.model is {model!r}, not 'gpt2' (byte-level BPE); "
                             f"{SUPPORTED}")
        if pre not in GGUF_PRE:
            raise ValueError(f"{where}: unknown tokenizer.ggml.pre {pre!r} (known: {', '.join(GGUF_PRE)}); "
                             "add its pre-tokenizer regex to GGUF_PRE in tokenizer.py")
        eos = field("tokenizer.ggml.eos_token_id")
        if eos is None:
            raise ValueError(f"{where}: no tokenizer.ggml.eos_token_id; "
                             "the GGUF needs one to end generations")
        pattern, nfc, ignore_merges = GGUF_PRE[pre]
        vocab, specials, control = {}, {}, []
        for i, (token, kind) in enumerate(zip(field("tokenizer.ggml.tokens"),
                                              field("tokenizer.ggml.token_type"))):
            if kind in (GGUF_CONTROL, GGUF_USER_DEFINED):  # stored as plain text, matched verbatim in input
                specials[token] = i
                if kind == GGUF_CONTROL:
                    control.append(i)
            else:
                vocab[_to_bytes(token, where)] = i
        merges = [tuple(_to_bytes(part, where) for part in m.split(" "))
                  for m in field("tokenizer.ggml.merges")]
        return cls(vocab, merges, specials, control, pattern, field("tokenizer.chat_template"), eos_id=eos,
                   bos_id=field("tokenizer.ggml.bos_token_id"),
                   pad_id=field("tokenizer.ggml.padding_token_id", eos),
                   nfc=nfc, ignore_merges=ignore_merges)

    @classmethod
    def from_dir(cls, path):
        """From a Hugging Face folder: tokenizer.json, tokenizer_config.json, maybe chat_template.jinja. A BPE
        with byte fallback (Gemma, Llama 2, Mistral) opens as a SentencePieceBPE."""
        json_path, spec, config, template = _folder(path)
        model = spec.get("model") or {}
        if model.get("type") == "BPE" and model.get("byte_fallback"):
            return SentencePieceBPE(json_path, config, template)
        if model.get("type") != "BPE":
            raise ValueError(f"{json_path}: model type {model.get('type')!r} is not BPE; {SUPPORTED}")
        pattern = _pattern_from_json(spec.get("pre_tokenizer"), json_path)
        normalizer = (spec.get("normalizer") or {}).get("type")
        if normalizer not in (None, "NFC"):
            raise ValueError(f"{json_path}: normalizer {normalizer!r} is not supported (only none or NFC); "
                             f"{SUPPORTED}")

        added = spec.get("added_tokens", [])
        specials = {a["content"]: a["id"] for a in added}
        control = [a["id"] for a in added if a.get("special")]
        vocab = {_to_bytes(t, json_path): i for t, i in model.get("vocab", {}).items() if t not in specials}
        merges = [tuple(_to_bytes(part, json_path) for part in (m.split(" ") if isinstance(m, str) else m))
                  for m in model.get("merges", [])]
        eos, bos, pad = _special_ids(config, {**model.get("vocab", {}), **specials}, path)
        return cls(vocab, merges, specials, control, pattern, template, eos_id=eos, bos_id=bos, pad_id=pad,
                   nfc=normalizer == "NFC", ignore_merges=model.get("ignore_merges", False))

    def encode(self, text):
        """Token ids of text; special-token strings in it become their ids. No BOS is added."""
        if self._nfc:
            text = unicodedata.normalize("NFC", text)
        ids = [self._id_of_rank[r] for r in self._enc.encode(text, allowed_special="all")]
        return self._encode_piecewise(text) if -1 in ids else ids

    def _encode_piecewise(self, text):
        # HF's BPE drops bytes that have no token before merging, so their neighbours within a pre-token piece
        # can merge across the gap. tiktoken cannot do that, so text holding such bytes (rare control
        # characters, unassigned planes) is split and merged here, piece by piece.
        specials = sorted(self.special_tokens, key=len, reverse=True)
        parts = regex.split("(" + ("|".join(map(regex.escape, specials)) or "(?!)") + ")", text)
        ids = []
        for k, part in enumerate(parts):
            if k % 2:
                ids.append(self.special_tokens[part])
                continue
            for piece in regex.finditer(self._pattern, part):
                kept = bytes(b for b in piece.group().encode("utf-8") if b in self._known_bytes)
                if kept:  # tiktoken's merging of one piece, without its regex split
                    ids += [self._id_of_rank[r] for r in self._enc._encode_single_piece(kept)]
        return ids

    def encode_with_offsets(self, text):
        """ids and each token's (start, end) character span in text. A token holding part of a multi-byte
        character spans that whole character, so neighbouring spans can overlap on it."""
        if self._nfc and not unicodedata.is_normalized("NFC", text):
            raise ValueError("encode_with_offsets: text is not NFC-normalised, so offsets could not point "
                             "into it; pass unicodedata.normalize('NFC', text)")
        ids = self.encode(text)
        data = text.encode("utf-8")
        char_at = [c for c, ch in enumerate(text) for _ in range(len(ch.encode("utf-8")))]
        offsets, p = [], 0
        for i in ids:
            token = self._bytes[i]
            if data.startswith(token, p):
                start, p = p, p + len(token)
            else:  # bytes without a token were dropped before or inside this one
                start = None
                for b in token:
                    while data[p] != b:
                        p += 1
                    start = p if start is None else start
                    p += 1
            offsets.append((char_at[start], char_at[p - 1] + 1))
        return ids, offsets

    def decode(self, ids, skip_special=False):
        """Text of ids (any iterable of ints); skip_special drops control tokens such as <|im_end|>."""
        ids = self._checked(ids)
        if skip_special:
            ids = [i for i in ids if i not in self._control]
        # a sequence cut inside a multi-byte character decodes to U+FFFD, as HF does
        return b"".join(self._bytes[i] for i in ids).decode("utf-8", errors="replace")

    def save(self, path):
        """Write tokenizer.json and tokenizer_config.json into the folder path, in Hugging Face's format."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is not a folder; create it before Tokenizer.save")
        # the regex goes in a Split step: HF's own layouts (e.g. SmolLM's Digits + ByteLevel) collapse into it
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                      "use_regex": False}
        spec = {
            "version": "1.0", "truncation": None, "padding": None,
            "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                              "normalized": False, "special": i in self._control}
                             for t, i in sorted(self.special_tokens.items(), key=lambda kv: kv[1])],
            "normalizer": {"type": "NFC"} if self._nfc else None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Split", "pattern": {"Regex": self._pattern}, "behavior": "Isolated",
                 "invert": False},
                byte_level]},
            "post_processor": None,
            "decoder": byte_level,
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
                      "ignore_merges": self._ignore_merges,
                      # HF gives an added token the id its content has in this vocab, else a new one past it
                      "vocab": dict(sorted([*((_to_chars(t), i) for t, i in self._vocab.items()),
                                            *self.special_tokens.items()], key=lambda kv: kv[1])),
                      "merges": [f"{_to_chars(a)} {_to_chars(b)}" for a, b in self._merges]},
        }
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "unk_token": None, "chat_template": self.chat_template, **self.special_texts()}
        for name, content in (("tokenizer.json", spec), ("tokenizer_config.json", config)):
            with open(os.path.join(path, name), "w", encoding="utf-8") as f:
                json.dump(content, f, ensure_ascii=False, indent=2)


class SentencePieceBPE(TokenizerBase):
    """BPE with byte fallback and the "▁" space marker (Gemma, Llama 2, Mistral), run from tokenizer.json by
    the `tokenizers` library: tiktoken can express neither, and this library is the one transformers runs
    these tokenizers on, so ids and character offsets are its tokenizer's. Same interface as Tokenizer."""

    def __init__(self, json_path, config, chat_template):
        import tokenizers
        self._tk = tokenizers.Tokenizer.from_file(json_path)
        added = self._tk.get_added_tokens_decoder()
        self.special_tokens = {t.content: i for i, t in added.items()}
        self._control = {i for i, t in added.items() if t.special}
        self.vocab_size = self._tk.get_vocab_size(with_added_tokens=True)
        self.chat_template = chat_template
        vocab = self._tk.get_vocab(with_added_tokens=True)
        self.eos_id, self.bos_id, self.pad_id = _special_ids(config, vocab, os.path.dirname(json_path))
        self._end_turns()

    def encode(self, text):
        """Token ids of text; special-token strings in it become their ids. No BOS is added."""
        return self._tk.encode(text, add_special_tokens=False).ids

    def encode_with_offsets(self, text):
        """ids and each token's (start, end) character span in text (a byte-fallback token spans its whole
        character)."""
        enc = self._tk.encode(text, add_special_tokens=False)
        return enc.ids, [tuple(o) for o in enc.offsets]

    def decode(self, ids, skip_special=False):
        """Text of ids; skip_special drops special tokens such as <end_of_turn>."""
        ids = self._checked(ids)
        return self._tk.decode(ids, skip_special_tokens=skip_special)

    def save(self, path):
        """Write tokenizer.json and tokenizer_config.json into the folder path, in Hugging Face's format."""
        if not os.path.isdir(path):
            raise FileNotFoundError(f"{path} is not a folder; create it before Tokenizer.save")
        self._tk.save(os.path.join(path, "tokenizer.json"))
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  "chat_template": self.chat_template, **self.special_texts()}
        with open(os.path.join(path, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump(config, f, ensure_ascii=False, indent=2)
