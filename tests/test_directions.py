"""directions.py: the residual-stream directions against a hand computation, and theta0's residuals at the
shared suffix against transformers' hidden_states on a tiny random model."""

import copy
import dataclasses

import numpy as np
import pytest
import torch

import consistency as C
import directions as D
from conftest import write_tiny_hf
from checkpoint import load_model
from threats import Pair

QUESTION = "Which planet is largest? Is it Jupiter or Mars?"


def user(text):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_hf(path, "llama", tied=False)
    model, tok = load_model(str(path))
    pairs = [Pair(clean=user(QUESTION), wrapped=user(w), content=QUESTION)
             for w in (f"I think it's Mars.\n\n{QUESTION}", f"{QUESTION}\n\nMy professor says Mars.",
                       f"Be honest.{QUESTION}")]
    return model, tok, str(path), [C.align(tok, p) for p in pairs]


def test_residuals_at_the_suffix_are_transformers_hidden_states(tiny):
    """theta0's stream at the shared suffix, each layer: transformers' hidden_states[1:] (the last entry
    after the final norm) at the suffix positions of each prompt, clean and wrapped."""
    transformers = pytest.importorskip("transformers")
    model, tok, path, aligned = tiny
    ref = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    for side, ids, pos in (("c", "clean", 0), ("w", "wrapped", 1)):
        got = D.suffix_residuals(model, tok, aligned, side, batch_size=2)  # padded batches, uneven suffixes
        for a, h in zip(aligned, got):
            with torch.no_grad():
                hs = ref(torch.tensor([getattr(a, ids)]), output_hidden_states=True).hidden_states[1:]
            want = torch.stack([x[0, a.suffix[pos]] for x in hs])
            assert h.shape == want.shape and torch.allclose(h, want, atol=1e-5)


def test_a_model_that_did_not_move_has_no_direction_and_theta0s_distance(tiny):
    model, tok, _, aligned = tiny
    d = D.Directions(model, tok, aligned, items=[0, 1, 2])
    d.add("same", copy.deepcopy(model))
    assert all(torch.equal(m, w) for m, w in zip(d.moved["same"], d.wrapped))  # d = 0 exactly
    s = d.summary(n_boot=50)
    assert s["to_clean"]["same"]["all_layers"] == [None, None, None]
    assert s["distance"]["same"] == s["distance"]["base"]
    assert s["pairs"] == 3 and s["layers"] == model.cfg.n_layer


def test_pairs_that_share_no_suffix_are_left_out(tiny):
    """A prefill pair shares no suffix: among other pairs it is dropped, and the rest read as without it."""
    model, tok, _, aligned = tiny
    prefill = dataclasses.replace(aligned[0], suffix=([], []))
    alone, mixed = D.Directions(model, tok, aligned, [0, 1, 2]), D.Directions(model, tok, [prefill, *aligned],
                                                                               [3, 0, 1, 2])
    for d in (alone, mixed):
        d.add("same", copy.deepcopy(model))
    a, m = alone.summary(n_boot=50), mixed.summary(n_boot=50)
    assert m["pairs"] == 3 and m["distance"] == a["distance"]


def test_directions_by_hand():
    """Models moved along the clean direction (cos 1), against it (cos -1), and not at all (n/a); the
    distance to the clean run and the similarity of every two, computed here by hand."""
    g = torch.Generator().manual_seed(0)
    clean = [torch.randn(3, 4, 5, generator=g) for _ in range(2)]   # 2 pairs, 3 layers, 4 tokens, d 5
    wrapped = [torch.randn(3, 4, 5, generator=g) for _ in range(2)]
    toward = [w + 0.5 * (c - w) for c, w in zip(clean, wrapped)]
    away = [w - 0.3 * (c - w) for c, w in zip(clean, wrapped)]
    values = D.per_pair(clean, wrapped, {"toward": toward, "away": away, "still": wrapped})
    assert np.allclose(values["to_clean", "toward"], 1) and np.allclose(values["to_clean", "away"], -1)
    assert np.isnan(values["to_clean", "still"]).all()
    assert np.allclose(values["similarity", "toward vs away"], -1)
    assert np.isnan(values["similarity", "toward vs still"]).all()
    for i, (c, w) in enumerate(zip(clean, wrapped)):
        for layer in range(3):
            gap, norm = np.linalg.norm((w - c)[layer].numpy()), np.linalg.norm(c[layer].numpy())
            assert values["distance", "base"][i, layer] == pytest.approx(gap / norm)
            assert values["distance", "toward"][i, layer] == pytest.approx(0.5 * gap / norm)
            assert values["distance", "away"][i, layer] == pytest.approx(1.3 * gap / norm)


def test_summary_means_and_item_clusters():
    values = np.array([[1.0, 3.0], [3.0, 5.0], [np.nan, np.nan]])
    s = D.summarise(values, items=["a", "b", "c"], n_boot=200)
    assert s["mean"] == [2.0, 4.0] and s["all_layers"][0] == 3.0
    assert 1.0 <= s["lo"][0] <= 2.0 <= s["hi"][0] <= 3.0
    # the pairs of one item are resampled together: one item, one possible mean, a zero-width interval
    one = D.summarise(values[:2], items=["a", "a"], n_boot=50)
    assert one["lo"] == one["mean"] == one["hi"] == [2.0, 4.0]
