"""
Generation for chat conversations: batched greedy replies to rendered conversations, and `Chat`, which keeps
each conversation's keys and values between turns so a multi-turn rollout computes only the tokens a turn adds.

    from chat import Chat, chat_generate, chat_prompt_ids
    chat_generate(model, tok, [[{"role": "user", "content": "Hi"}]])   # -> ["Hello! How can I help?"]
    chat = Chat(model, tok.eos_id, tok.pad_id)
    ids = chat.generate(chat_prompt_ids(tok, conversations), 48)   # every turn: computes only what it adds
"""

import torch

from model import KVCache, Transformer
from tokenizer import Tokenizer


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
        # a row's positions are its conversation's tokens: held slots masked out count none
        model.check_length(max(map(len, prompts)) + max(max_new_tokens, 1))
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

