"""
LoRA adapters, and theta0 from them: an adapted Linear keeps its frozen weight under its HF name, so theta0 is
the same model with the adapters switched off (`lora_disabled`), and merging folds them in exactly.

    from lora import add_lora, lora_disabled, merge_lora
    params = add_lora(model, rank=8, alpha=16, targets=("q_proj", "v_proj"))   # the parameters to train
    with lora_disabled(model):
        theta0_out = model(ids)
    merge_lora(model)                                   # a plain model again, the update folded in
"""

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from model import Transformer


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


