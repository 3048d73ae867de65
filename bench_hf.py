"""
The other side of bench.py's comparison: the consistency losses and greedy generation written on Hugging Face
transformers, the way a user would (and the papers' code does), for bench.py to time against ours on the same
batch. tests/test_bench.py checks that each loss here equals consistency.py's.

    w = hf_forward(hf_model, ids, mask, ["act"])          # what the targets read, from transformers' outputs
    loss = HF_LOSSES["act"](w, c, batch, labels)           # at the positions of our collated batch

A target with no entry in HF_LOSSES (prefill, a plugin's) is benchmarked as ours only (bench.py --impls ours).
"""

import torch
import torch.nn.functional as F


def hf_forward(hf, ids, mask, names, labels=None):
    """One forward of a transformers causal LM, returning what the targets in `names` read, the way the
    papers' code gets it: hidden states, hooks on down_proj, eager attention probabilities, logits."""
    store, handles = {"mlp": []}, []
    if "mlpct" in names:
        for layer in hf.model.layers:
            handles.append(layer.mlp.down_proj.register_forward_pre_hook(
                lambda m, a: store["mlp"].append(a[0])))
    kw = dict(input_ids=ids, attention_mask=mask, output_hidden_states="act" in names,
              output_attentions="attct" in names)
    try:
        if "bct" in names:
            out = hf(**kw, labels=labels)
        else:
            out = hf.model(**kw)  # the base model: no lm_head when no target reads logits
    finally:
        for h in handles:
            h.remove()
    res = {"logits": getattr(out, "logits", None), "loss": getattr(out, "loss", None), "mlp": store["mlp"]}
    if "act" in names:
        res["resid"] = list(out.hidden_states[1:])  # the authors' ACT: the last entry is after the final norm
    if "attct" in names:
        res["attn"] = list(out.attentions)
    return res


# Each target's unweighted loss from hf_forward's outputs w (wrapped) and c (clean), at the positions of our
# collated batch b (so both sides use the same tokens): per pair over its valid positions, then the mean over
# pairs, and over layers. Vectorised over the batch, as a competent user would write it; only the models
# differ from ours. labels: transformers' (B, T) form, the response tokens and -100 elsewhere.

def pair_mean(x, valid):
    """x (B, N): the mean over each pair's valid positions, then over the pairs."""
    return ((x * valid).sum(1) / valid.sum(1).clamp(min=1)).mean()


def batch_rows(b):
    return torch.arange(len(b.clean_ids), device=b.clean_ids.device)[:, None]


def hf_bct(w, c, b, labels):
    if w["loss"] is not None and len(labels) == 1:
        return w["loss"]  # transformers' own shifted cross-entropy, exactly the per-pair mean at batch 1
    labels = labels[:, 1:]
    # flattened, as transformers' own loss does (the (B, V, T) layout is less accurate on a CPU)
    nll = F.cross_entropy(w["logits"][:, :-1].float().flatten(0, 1), labels.flatten(),
                          reduction="none").view(labels.shape)
    return pair_mean(nll, labels != -100)


def hf_act(w, c, b, labels):  # squared L2 over d_model on the shared suffix
    rows, per_layer = batch_rows(b), []
    for hw, hc in zip(w["resid"], c["resid"]):
        d = (hw[rows, b.suffix_w].float() - hc[rows, b.suffix_c].float()).pow(2).sum(-1)
        per_layer.append(pair_mean(d, b.suffix_valid))
    return torch.stack(per_layer).mean()


def hf_mlpct(w, c, b, labels):  # 1 - cosine over d_ff on the content tokens
    rows, per_layer = batch_rows(b), []
    for mw, mc in zip(w["mlp"], c["mlp"]):
        cos = F.cosine_similarity(mw[rows, b.content_w].float(), mc[rows, b.content_c].float(), dim=-1)
        per_layer.append(pair_mean(1 - cos, b.content_valid))
    return torch.stack(per_layer).mean()


def hf_attct(w, c, b, labels):  # per-head JSD on the content x content block, not renormalised, clamped at 1e-9
    rows, keys, per_layer = batch_rows(b), b.content_valid[:, None, :, None], []
    for aw, ac in zip(w["attn"], c["attn"]):
        # (B, H, T, T) indexed at (query, key) content pairs -> (B, C, C, H)
        p = aw[rows[:, :, None], :, b.content_w[:, :, None], b.content_w[:, None, :]].float().clamp(min=1e-9)
        q = ac[rows[:, :, None], :, b.content_c[:, :, None], b.content_c[:, None, :]].float().clamp(min=1e-9)
        m = (p + q) / 2
        js = ((0.5 * p * (p / m).log() + 0.5 * q * (q / m).log()) * keys).sum(2)  # (B, C, H)
        per_layer.append(pair_mean(js.mean(-1), b.content_valid))
    return torch.stack(per_layer).mean()


HF_LOSSES = {"bct": hf_bct, "act": hf_act, "mlpct": hf_mlpct, "attct": hf_attct}


def padded(rows, pad_id, device):
    """Right-padded ids and their attention mask."""
    width = max(map(len, rows))
    ids = torch.tensor([list(r) + [pad_id] * (width - len(r)) for r in rows], device=device)
    mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    return ids, mask


def generate_hf(hf, prompts, n, pad_id):
    """transformers' greedy generate on left-padded prompts, n new tokens a row (eos switched off)."""
    width = max(map(len, prompts))
    ids = torch.tensor([[pad_id] * (width - len(p)) + list(p) for p in prompts], device=hf.device)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=hf.device)
    eos, hf.generation_config.eos_token_id = hf.generation_config.eos_token_id, None
    try:  # (passing eos_token_id=None to generate falls back to the model's own, so switch it off there)
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=n,
                          pad_token_id=pad_id, temperature=None, top_p=None, top_k=None)
    finally:
        hf.generation_config.eos_token_id = eos
    return out[:, width:].tolist()
