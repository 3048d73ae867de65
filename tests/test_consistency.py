"""consistency.py: alignment, the four targets and their gradients, on a tiny random model and by hand."""

import copy

import pytest
import torch

import consistency as C
from conftest import write_tiny_hf
from checkpoint import load_model
from lora import add_lora, lora_disabled
from model import ModelOutput
from threats import Pair


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_hf(path, "llama", tied=False)
    model, tok = load_model(str(path))
    return model, tok, str(path)


QUESTION = "Which planet is largest? Is it Jupiter or Mars?"


def user(text):
    return [{"role": "user", "content": text}]


def make_pairs(tok):
    wrappers = [f"I think it's Mars, but what do you think?\n\n{QUESTION}",
                f"{QUESTION}\n\nMy professor says Mars.",
                f"Be honest.{QUESTION}"]
    pairs = [Pair(clean=user(QUESTION), wrapped=user(w), content=QUESTION) for w in wrappers]
    return [C.align(tok, p, tok.encode(" Jupiter.") + [tok.eos_id]) for p in pairs]


def test_alignment_positions_hold_equal_ids(tiny):
    _, tok, _ = tiny
    for a in make_pairs(tok):
        assert a.content[0] and len(a.content[0]) == len(a.content[1])
        assert [a.clean[i] for i in a.content[0]] == [a.wrapped[i] for i in a.content[1]]
        assert [a.clean[i] for i in a.suffix[0]] == [a.wrapped[i] for i in a.suffix[1]]
    prefix = make_pairs(tok)[0]
    # a prefix wrapper leaves the whole question plus the chat tail as the shared suffix
    suffix = tok.decode([prefix.clean[i] for i in prefix.suffix[0]])
    assert suffix.endswith("assistant\n") and QUESTION in suffix and "Mars, but" not in suffix


def test_alignment_across_a_bpe_merge(embedded):
    """'un' + 'known planets?' tokenizes as 'unknown' in the wrapped prompt but 'known' in the clean one:
    the straddling token is dropped and counted, the rest of the content still aligns."""
    _, tok = embedded
    content = "known planets? Name them."
    a = C.align(tok, Pair(clean=user(content), wrapped=user("Answer this: un" + content), content=content))
    c_ids = [a.clean[i] for i in a.content[0]]
    assert c_ids == [a.wrapped[i] for i in a.content[1]]
    assert a.trimmed >= 1
    # the clean rendering holds every content token; the wrapped one lost exactly the trimmed ones
    clean_text = tok.render_text(user(content))
    ids, offsets = tok.encode_with_offsets(clean_text)
    start = clean_text.rfind(content)
    whole = [i for i, (s, e) in zip(ids, offsets) if s >= start and e <= start + len(content)]
    assert len(whole) - len(c_ids) == a.trimmed
    assert tok.decode(c_ids) in content and tok.decode(c_ids).endswith("Name them.")


def test_content_not_in_wrapped_is_an_error(tiny):
    _, tok, _ = tiny
    with pytest.raises(ValueError, match="verbatim"):
        C.align(tok, Pair(clean=user(QUESTION), wrapped=user("something else"), content=QUESTION))


def test_attct_from_content_rows_equals_the_block_of_full_patterns_by_hand(tiny):
    """attct captures patterns only at the content's query rows; by hand: full T x T patterns of each pair
    alone, sliced to the content block, per-head JSD summed over keys, mean over heads, rows, pairs,
    layers."""
    model, tok, _ = tiny
    pairs = make_pairs(tok)
    loss, _ = C.consistency_loss(model, model, C.collate(pairs, tok.pad_id), [("attct", 1.0)])
    per_pair = []
    with torch.no_grad():
        for a in pairs:
            pw = model(torch.tensor([a.wrapped]), capture="blocks.*.attn.hook_pattern").cache
            pc = model(torch.tensor([a.clean]), capture="blocks.*.attn.hook_pattern").cache
            layers = []
            for l in range(model.cfg.n_layer):
                w = pw[f"blocks.{l}.attn.hook_pattern"][0][:, a.content[1]][:, :, a.content[1]]
                c = pc[f"blocks.{l}.attn.hook_pattern"][0][:, a.content[0]][:, :, a.content[0]]
                w, c = w.clamp(min=1e-9), c.clamp(min=1e-9)
                m = (w + c) / 2
                js = (0.5 * w * (w / m).log() + 0.5 * c * (c / m).log()).sum(-1)   # (H, C)
                layers.append(js.mean())
            per_pair.append(torch.stack(layers))
    assert torch.isclose(loss, torch.stack(per_pair).mean(0).mean(), rtol=1e-4)


def test_token_nll_matches_fp64_at_a_real_vocabulary():
    """BCT's and perplexity's cross-entropy, against the same in fp64: within 2e-5 at SmolLM2's 49,152-token
    vocabulary (F.cross_entropy on the (B, V, N) layout is off by ~1e-4 there on a CPU)."""
    torch.manual_seed(0)
    logits, ids = torch.randn(2, 24, 49152) * 4, torch.randint(0, 49152, (2, 24))
    ref = torch.stack([-logits[b].double().log_softmax(-1)[torch.arange(24), ids[b]] for b in range(2)])
    assert C.token_nll(logits, ids).shape == (2, 24)
    assert torch.allclose(C.token_nll(logits, ids).double(), ref, rtol=0, atol=2e-5)


@pytest.mark.parametrize("full_sequence", [False, True])
def test_bct_equals_transformers_loss_on_its_labels(tiny, full_sequence):
    """BCT is the mean next-token cross-entropy of each pair over theta0's response (full_sequence_loss: over
    every token of the wrapped sequence, Chua et al.), then the mean over pairs; transformers' own labels loss
    on one pair at a time is the reference."""
    transformers = pytest.importorskip("transformers")
    model, tok, path = tiny
    hf = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    pairs = make_pairs(tok)
    want = 0.0
    with torch.no_grad():
        for p in pairs:
            ids = torch.tensor([p.wrapped + p.response])
            labels = ids.clone()
            if not full_sequence:
                labels[:, :len(p.wrapped)] = -100  # the prompt is not scored
            want += hf(input_ids=ids, labels=labels).loss.item() / len(pairs)
        got, _ = C.consistency_loss(model, model, C.collate(pairs, tok.pad_id, full_sequence), [("bct", 1.0)])
    assert got.item() == pytest.approx(want, rel=1e-5)


def test_jsd_by_hand():
    p, q = torch.tensor([0.7, 0.2, 0.1]), torch.tensor([0.1, 0.5, 0.4])
    m = (p + q) / 2
    by_hand = (0.5 * sum(p[i] * torch.log(p[i] / m[i]) for i in range(3))
               + 0.5 * sum(q[i] * torch.log(q[i] / m[i]) for i in range(3)))
    assert torch.isclose(C.jsd(p, q).sum(), by_hand)
    assert C.jsd(p, p).sum() == 0


def test_one_minus_cos_by_hand():
    a, b = torch.tensor([[3.0, 4.0, 0.0]]), torch.tensor([[4.0, 3.0, 0.0]])
    assert torch.isclose(C.one_minus_cos(a, b), torch.tensor([1 - 24 / 25]))
    assert C.one_minus_cos(a, a).item() == 0


def test_act_by_hand_on_transformers_hidden_states(tiny):
    """ACT per layer against the authors' computation on transformers' hidden_states[1:], where the last
    entry is the final norm's output (a different number from the last block's raw output)."""
    transformers = pytest.importorskip("transformers")
    model, tok, path = tiny
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    a = make_pairs(tok)[0]
    batch = C.collate([a], tok.pad_id)
    capture = C.TARGETS["act"].capture
    with torch.no_grad():
        got = C.act(model(batch.wrapped_ids, capture=capture), model(batch.clean_ids, capture=capture), batch)
        hw = ref(torch.tensor([a.wrapped]), output_hidden_states=True).hidden_states[1:]
        hc = ref(torch.tensor([a.clean]), output_hidden_states=True).hidden_states[1:]
    want = torch.stack([((w[0, a.suffix[1]] - c[0, a.suffix[0]]) ** 2).sum(-1).mean()
                        for w, c in zip(hw, hc)])
    assert len(got) == model.cfg.n_layer and torch.allclose(got, want, rtol=1e-4)
    with torch.no_grad():  # the raw last block differs, so this pins which one is compared
        raw = model(torch.tensor([a.wrapped]), capture="blocks.*").cache[
            f"blocks.{model.cfg.n_layer - 1}.hook_resid_post"]
    assert not torch.allclose(raw[0], hw[-1][0], atol=1e-3)


@pytest.mark.parametrize("name", ["act", "mlpct", "attct"])
def test_zero_when_wrapped_equals_clean_positive_otherwise(tiny, name):
    model, tok, _ = tiny
    same = C.align(tok, Pair(clean=user(QUESTION), wrapped=user(QUESTION), content=QUESTION))
    batch = C.collate([same], tok.pad_id)
    loss, _ = C.consistency_loss(model, model, batch, [(name, 1.0)])
    assert loss.item() == 0
    loss, _ = C.consistency_loss(model, model, C.collate(make_pairs(tok), tok.pad_id), [(name, 1.0)])
    assert loss.item() > 0


@pytest.mark.parametrize("prefill", ["Sure, here", "Sure, here:\n"])  # the second ends as the prompt does
def test_prefill_kl_zero_without_a_prefill_shift_and_positive_with_one(tiny, prefill):
    model, tok, _ = tiny
    p = C.align(tok, Pair(clean=user(QUESTION), wrapped=user(QUESTION), content=QUESTION, prefill=prefill))
    batch = C.collate([p], tok.pad_id)
    loss, _ = C.consistency_loss(model, model, batch, [("prefill", 1.0)])
    assert loss.item() > 0
    assert len(p.prefill) == len(p.wrapped) - len(p.clean)
    assert p.suffix == ([], [])   # nothing follows a prefill in the clean prompt, whatever its last token
    with pytest.raises(ValueError, match="no signal"):
        C.check_signal([("mlpct", 1.0)], batch)
    with pytest.raises(ValueError, match="no shared suffix"):
        C.check_signal([("act", 1.0)], batch)


def test_prefill_window_is_the_authors_and_the_kl_matches_a_hand_computation(tiny):
    """c-wei/AttCT prefill_bct.py: the positions from the last prompt token (whose prediction is the first
    response token) up to the one before the last prefill token, each predicting a prefill token."""
    model, tok, _ = tiny
    prefill = "Sure, here"
    p = C.align(tok, Pair(clean=user(QUESTION), wrapped=user(QUESTION), content=QUESTION, prefill=prefill))
    n, k = len(p.clean), len(tok.encode(prefill))
    # the byte tokenizer merges nothing across the marker
    assert p.wrapped == p.clean + tok.encode(prefill)
    assert p.prefill == list(range(n - 1, n - 1 + k))
    assert [p.wrapped[t + 1] for t in p.prefill] == tok.encode(prefill)
    theta = copy.deepcopy(model)
    with torch.no_grad():
        for w in theta.parameters():
            w.add_(0.05 * torch.randn_like(w))
        first = model(torch.tensor([p.clean])).logits[0, n - 1].log_softmax(-1)
        moved = theta(torch.tensor([p.wrapped])).logits[0, p.prefill].log_softmax(-1)
        own = model(torch.tensor([p.wrapped])).logits[0, p.prefill].log_softmax(-1)
    by_hand = (first.exp() * (first - moved)).sum(-1).mean()
    batch = C.collate([p], tok.pad_id)
    loss, _ = C.consistency_loss(theta, model, batch, [("prefill", 1.0)])
    assert torch.isclose(loss, by_hand, rtol=1e-4)
    # at theta = theta0 the first position reads exactly the clean prompt: its KL is 0; the later ones are not
    kl = (first.exp() * (first - own)).sum(-1)
    assert kl[0].abs() < 1e-5 and (kl[1:] > 1e-3).all()
    # no prefill: an empty window, and exactly 0 at theta = theta0
    none = C.align(tok, Pair(clean=user(QUESTION), wrapped=user(QUESTION), content=QUESTION))
    assert none.prefill == []
    b = C.collate([none], tok.pad_id)
    with torch.no_grad():
        assert C.prefill_kl(model(b.wrapped_ids, logits=False), model(b.clean_ids, logits=False),
                            b).item() == 0


def test_a_target_averages_over_the_rows_it_reads():
    """An SFT row has no prefill positions and a prefill pair no labels: neither dilutes the other's term."""
    x = torch.tensor([[1.0, 3.0], [5.0, 0.0], [7.0, 7.0]])
    valid = torch.tensor([[True, True], [True, False], [False, False]])
    assert C.masked_mean(x, valid).item() == (2.0 + 5.0) / 2


def test_a_wrapper_after_the_content_moves_nothing_in_it(tiny):
    """Causal attention: text appended after the content cannot change the content's internals."""
    model, tok, _ = tiny
    before, after, _ = make_pairs(tok)
    assert before.content_moved and not after.content_moved
    batch = C.collate([after], tok.pad_id)
    for name in ("mlpct", "attct"):
        assert C.consistency_loss(model, model, batch, [(name, 1.0)])[0].item() == 0


def test_gradients_flow_only_through_the_wrapped_pass(tiny):
    """Using the trained model itself as the reference: the loss's gradient must equal the gradient with
    the clean side precomputed and detached by hand."""
    model, tok, _ = tiny
    batch = C.collate(make_pairs(tok), tok.pad_id)
    for name in ("act", "mlpct", "attct"):
        model.zero_grad()
        loss, _ = C.consistency_loss(model, model, batch, [(name, 1.0)])
        loss.backward()
        ours = [None if p.grad is None else p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        capture, rows = C.TARGETS[name].capture, C.TARGETS[name].content_rows
        clean = model(batch.clean_ids, capture=capture, pattern_rows=batch.content_c if rows else None)
        clean = ModelOutput(None, {k: v.detach() for k, v in clean.cache.items()})
        wrapped = model(batch.wrapped_ids, capture=capture, pattern_rows=batch.content_w if rows else None)
        C.TARGETS[name].fn(wrapped, clean, batch).mean().backward()
        for a, b in zip(ours, [p.grad for p in model.parameters()]):
            assert (a is None and b is None) or torch.allclose(a, b, atol=1e-6), name
        assert any(a is not None and a.abs().sum() > 0 for a in ours)
    model.zero_grad()


@pytest.mark.parametrize("name", ["act", "mlpct", "attct"])
def test_all_layers_at_once_equals_layer_by_layer(tiny, monkeypatch, name):
    """The GPU path of over_layers (one loss over stacked layers) against the CPU path (a loop): the
    per-layer losses and the gradients must agree. Forced here by emptying the layer-by-layer devices."""
    model, tok, _ = tiny
    batch = C.collate(make_pairs(tok), tok.pad_id)
    results = []
    for devices in (("cpu",), ()):
        monkeypatch.setattr(C, "LAYERWISE_DEVICES", devices)
        model.zero_grad()
        loss, logs = C.consistency_loss(model, model, batch, [(name, 1.0)])
        loss.backward()
        results.append((logs[f"{name}_per_layer"],
                        [p.grad.clone() for p in model.parameters() if p.grad is not None]))
    model.zero_grad()
    (loop, loop_grads), (stacked, stacked_grads) = results
    assert len(loop) == model.cfg.n_layer and torch.allclose(torch.tensor(loop), torch.tensor(stacked),
                                                             rtol=1e-5, atol=1e-8)
    assert len(loop_grads) == len(stacked_grads) > 0
    assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-7) for a, b in zip(loop_grads, stacked_grads))


def test_compiled_blocks_give_the_eager_losses_gradients_and_generations(tiny):
    """model.compile_blocks (train.py --compile) against the same model run eagerly: the loss and LoRA
    gradients of all four targets on a padded batch, then a second batch of another length (dynamic shapes),
    and greedy generation: two graphs (the prompt, then each token against the fixed-length cache), none
    new for another batch size, prompt length and cache length."""
    from torch._dynamo.utils import counters
    model, tok, _ = tiny
    pairs = make_pairs(tok)
    batches = [C.collate(pairs, tok.pad_id),
               C.collate([min(pairs, key=lambda p: len(p.wrapped))], tok.pad_id)]
    assert batches[0].wrapped_ids.shape[1] != batches[1].wrapped_ids.shape[1]
    targets = C.parse_targets("bct+act+mlpct+attct")
    runs = []
    for compiled in (False, True):
        m = copy.deepcopy(model)
        torch.manual_seed(0)
        params = add_lora(m, 4, 8, ("q_proj", "v_proj", "down_proj"))
        with torch.no_grad():
            for p in params:
                p.normal_(std=0.1)  # away from theta0, so every target has a loss and a gradient
        if compiled:
            m.compile_blocks()

        def reference(*a, **k):
            with lora_disabled(m):
                return m(*a, **k)
        losses, grads = [], []
        for batch in batches:
            loss, _ = C.consistency_loss(m, reference, batch, targets)
            loss.backward()
            losses.append(loss.item())
            grads.append([p.grad.clone() for p in params])
            m.zero_grad()
        graphs = counters["stats"]["unique_graphs"]
        gen = [m.generate([pairs[0].clean, pairs[1].clean], max_new_tokens=6, eos_id=-1, pad_id=tok.pad_id)]
        assert counters["stats"]["unique_graphs"] == graphs + 2 * compiled
        gen.append(m.generate([p.wrapped for p in pairs], max_new_tokens=9, eos_id=-1, pad_id=tok.pad_id))
        assert counters["stats"]["unique_graphs"] == graphs + 2 * compiled
        runs.append((losses, grads, gen))
    (eager_losses, eager_grads, eager_gen), (losses, grads, gen) = runs
    assert all(l > 0 for l in eager_losses)
    assert torch.allclose(torch.tensor(losses), torch.tensor(eager_losses), rtol=1e-4)
    for a, b in zip(grads, eager_grads):
        assert all(torch.allclose(x, y, rtol=1e-3, atol=1e-6) for x, y in zip(a, b))
    assert gen == eager_gen


def test_lora_reference_is_theta0(tiny):
    model, tok, _ = tiny
    m = copy.deepcopy(model)
    add_lora(m, 4, 8, ("q_proj", "v_proj"))
    with torch.no_grad():
        for mod in m.modules():
            if hasattr(mod, "lora_B"):
                mod.lora_B.normal_()
    ids = torch.tensor([make_pairs(tok)[0].clean])
    with torch.no_grad(), lora_disabled(m):
        assert torch.equal(m(ids).logits, model(ids).logits)
    with torch.no_grad():
        assert not torch.equal(m(ids).logits, model(ids).logits)


@pytest.mark.parametrize("spec", ["bct", "act", "mlpct", "attct", "act+bct:0.5"])
def test_twenty_steps_lower_the_loss(tiny, spec):
    model, tok, _ = tiny
    theta = copy.deepcopy(model).train()
    batch = C.collate(make_pairs(tok), tok.pad_id)
    targets = C.parse_targets(spec)
    opt = torch.optim.AdamW(theta.parameters(), lr=3e-3 if spec == "bct" else 1e-3)
    losses = []
    for _ in range(20):
        loss, _ = C.consistency_loss(theta, model, batch, targets)
        losses.append(loss.item())
        loss.backward()
        opt.step()
        opt.zero_grad()
    assert losses[-1] < 0.6 * losses[0], losses


def test_padding_in_a_batch_changes_no_loss(tiny):
    model, tok, _ = tiny
    pairs = make_pairs(tok)
    for name in ("act", "mlpct", "attct", "bct"):
        together = C.consistency_loss(model, model, C.collate(pairs, tok.pad_id), [(name, 1.0)])[0]
        alone = sum(C.consistency_loss(model, model, C.collate([p], tok.pad_id), [(name, 1.0)])[0]
                    for p in pairs) / len(pairs)
        assert torch.isclose(together, alone, rtol=1e-4), name


def test_parse_targets_errors():
    assert C.parse_targets("act+bct:0.5") == [("act", C.TARGETS["act"].weight), ("bct", 0.5)]
    for bad, msg in [("actt", "unknown target"), ("act:x", "bad weight"), ("act:-1", "positive"),
                     ("act:nan", "positive")]:
        with pytest.raises(ValueError, match=msg):
            C.parse_targets(bad)


def test_cross_objective_logging_reports_all_four(tiny):
    model, tok, _ = tiny
    _, logs = C.consistency_loss(model, model, C.collate(make_pairs(tok), tok.pad_id), [("mlpct", 1.0)],
                                 log_all=True)
    assert {"bct", "act", "mlpct", "attct"} <= set(logs)
    assert len(logs["act_per_layer"]) == model.cfg.n_layer


def test_a_plugin_cannot_replace_a_built_in_target_and_leaves_nothing_behind(tmp_path):
    """A file of one's own that names a target the registry already holds (act) is refused in one line; the
    targets it registered before failing are gone with it, and the built-in stays the one registered."""
    act = C.TARGETS["act"]
    path = tmp_path / "clash.py"
    path.write_text("from consistency import target\n\n"
                    "@target('clash_first', reads='suffix')\ndef first(w, c, b):\n    return None\n\n"
                    "@target('act', reads='suffix')\ndef act(w, c, b):\n    return None\n")
    with pytest.raises(ValueError, match=r"failed to import \(ValueError: target 'act' is already registered"):
        C.load_plugin(str(path))
    assert C.TARGETS["act"] is act and "clash_first" not in C.TARGETS


def test_a_plugin_imports_as_a_module_does(tmp_path):
    """The plugin is in sys.modules while it runs, as under import: a dataclass with postponed annotations
    looks its module up there."""
    path = tmp_path / "typed.py"
    path.write_text("from __future__ import annotations\nfrom dataclasses import dataclass\n"
                    "from consistency import target\n\n@dataclass\nclass Settings:\n    scale: float = 2.0\n\n"
                    "@target('typed_probe', reads='suffix')\ndef typed_probe(w, c, b):\n    return None\n")
    try:
        C.load_plugin(str(path))
        assert C.TARGETS["typed_probe"].reads == "suffix"
    finally:
        C.TARGETS.pop("typed_probe", None)
