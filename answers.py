"""
A model's answers to the threats' prompts, as eval.py asks for them: Generator is the `generate` callable a
threat's evaluate() takes (a list of chat prompts -> a list of reply texts), for one model.

    gen = Generator(model, tok, cfg, path="OUT/answers/base.jsonl", stamp=fingerprint(name))
    replies = gen(prompts, max_new_tokens=48)           # batched, greedy, each prompt generated once
    rollout = gen.session()                             # for a threat whose conversations grow (multi_turn)

With a path, every answer is kept there as it comes, so a rerun after an interruption reads them back.
"""

import copy
import json
import os

import torch

import runs
from chat import Chat, chat_generate_ids, chat_prompt_ids, reply_text
from checkpoint import write_atomic


class Generator:
    """The threats' `generate` callable for one model: batched, KV-cached greedy generation through
    chat_generate_ids, answers capped at max_new_tokens, and memoised, so a prompt asked twice (clean items
    shared by a threat and the capability pass) is generated once. cfg: eval.py's EvalConfig (max_new_tokens,
    batch_size, gen_dtype). It counts its answers on `progress` (eval.Progress) as their batches finish.
    With a `path`, every answer is also appended there as it comes, under a first line naming the model
    (`stamp`), the settings that shape its answers and the code that produces them (runs.MEASURED_BY): a
    rerun after an interruption reads them back instead of generating them again (a file for another
    model, settings or code is started afresh)."""

    def __init__(self, model, tok, cfg, path=None, stamp=None, progress=None):
        self.tok, self.cfg, self.progress, self.cache, self.file = tok, cfg, progress, {}, None
        self.model = copy.deepcopy(model).to(torch.bfloat16) if cfg.gen_dtype == "bf16" else model
        if path:
            head = json.dumps({"model": stamp, "gen_dtype": cfg.gen_dtype, "batch_size": cfg.batch_size,
                               "format": "ids", "code": runs.content_hash(runs.MEASURED_BY)})
            lines = open(path, encoding="utf-8").read().splitlines() if os.path.exists(path) else []
            if lines[:1] == [head]:
                for line in lines[1:]:
                    try:
                        key, answer = json.loads(line)
                    except json.JSONDecodeError:  # the line an interruption cut short
                        break
                    self.cache[tuple(key)] = answer
            kept = [head] + [json.dumps([list(k), a]) for k, a in self.cache.items()]

            def write(tmp):
                with open(tmp, "w", encoding="utf-8") as f:
                    f.writelines(line + "\n" for line in kept)
            os.makedirs(os.path.dirname(path), exist_ok=True)
            write_atomic(path, write)  # the answers read back, without a cut line or another model's
            self.file = open(path, "a", encoding="utf-8")

    def __call__(self, prompts, prefills=None, max_new_tokens=48, chat=None):
        return [reply_text(self.tok, r) for r in self.ids(prompts, prefills, max_new_tokens, chat)]

    def session(self):
        """This generator for conversations that grow turn by turn (a threat's rollouts): each call's new
        answers come from one chat.Chat, which keeps every conversation's keys and values between calls, all
        in one batch (--batch-size does not split it: frustration's rollouts are 2 per task)."""
        chat = Chat(self.model, self.tok.eos_id, self.tok.pad_id)
        return lambda prompts, prefills=None, max_new_tokens=48: self(prompts, prefills, max_new_tokens, chat)

    def ids(self, prompts, prefills=None, max_new_tokens=48, chat=None):
        """The answers as token ids: a finished one ends with eos (chat_generate_ids)."""
        tokens = min(max_new_tokens, self.cfg.max_new_tokens)
        keys = [(json.dumps(p), prefills[i] if prefills else "", tokens) for i, p in enumerate(prompts)]
        todo = [k for k in dict.fromkeys(keys) if k not in self.cache]
        counted = 0   # the answers chat_generate_ids counted as its batches finished
        if todo:
            asked = [json.loads(k[0]) for k in todo], [k[1] for k in todo] if prefills else None
            if chat is not None:   # one batch, so every conversation keeps its row
                new = chat.generate(chat_prompt_ids(self.tok, *asked), tokens)
            else:
                new = chat_generate_ids(self.model, self.tok, *asked, tokens, batch_size=self.cfg.batch_size,
                                        progress=self.progress)
                counted = len(todo)
            self.cache.update(zip(todo, new))
            if self.file:
                self.file.writelines(json.dumps([list(k), a]) + "\n" for k, a in zip(todo, new))
                self.file.flush()
        if self.progress is not None:   # a cached answer counts as done
            self.progress.update(len(prompts) - counted)
        return [self.cache[k] for k in keys]
