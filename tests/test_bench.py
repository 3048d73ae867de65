"""bench.py's own helpers on small cases: the FLOP count by hand and against torch's FLOP counter, the timer,
the memory meter, and the transformers implementation of each target against consistency.py (the same loss
from both sides is what makes the speed comparison fair). The benchmark itself is not a timed test."""

import copy
import os
import statistics
import time

import pytest
import torch

import bench
import consistency as C
from conftest import write_tiny_hf
from checkpoint import load_model
from model import ModelConfig, Transformer
from threats import Pair

TINY = ModelConfig(vocab_size=10, n_layer=2, n_head=2, n_kv_head=1, d_model=8, d_ff=12, head_dim=4)


def test_forward_flops_by_hand():
    # per layer: q 8*8 + k 8*4 + v 8*4 + o 8*8 = 192 weights, MLP 3*8*12 = 288; lm_head 8*10
    assert bench.matmul_weights(TINY, logits=False) == 2 * (192 + 288)
    assert bench.matmul_weights(TINY, logits=True) == 2 * (192 + 288) + 80
    # T=3: 6 (query, key <= query) pairs, each QK^T + AV = 2 * 2 * (n_head * head_dim = 8) FLOPs, in 2 layers
    assert bench.forward_flops(TINY, [3], logits=False) == 2 * 960 * 3 + 6 * 32 * 2
    assert bench.forward_flops(TINY, [3, 1], logits=True) == 2 * 1040 * 4 + (6 + 1) * 32 * 2


def test_forward_flops_match_torch_flop_counter():
    """torch counts every matmul the model really runs. Capturing the pattern makes attention explicit
    matmuls over the full T x T square: ours must equal that with the causal half put in its place, so no
    weight or layer is missed."""
    from torch.utils.flop_counter import FlopCounterMode
    torch.manual_seed(0)
    model = Transformer(TINY)
    T = 7
    with FlopCounterMode(display=False) as counter:
        model(torch.randint(0, 10, (1, T)), capture="blocks.*.attn.hook_pattern")
    full_square = 4 * TINY.n_head * TINY.head_dim * TINY.n_layer * T * T
    causal_half = 4 * TINY.n_head * TINY.head_dim * TINY.n_layer * T * (T + 1) // 2
    assert counter.get_total_flops() == (bench.forward_flops(TINY, [T], logits=True)
                                         - causal_half + full_square)


def aligned(clean_len, wrapped_len, response_len):
    return C.AlignedPair(clean=[0] * clean_len, wrapped=[0] * wrapped_len, response=[0] * response_len,
                         suffix=([], []), content=([], []), prefill=[], trimmed=0,
                         content_moved=True)


def test_step_flops_by_target():
    pairs = [aligned(3, 5, 2), aligned(4, 4, 0)]
    fwd = lambda lengths, logits: bench.forward_flops(TINY, lengths, logits)  # noqa: E731
    # act reads the reference's clean pass and no logits; the wrapped pass runs forward and backward
    assert bench.step_flops(TINY, pairs, "act") == fwd([3, 4], False) + 3 * fwd([7, 4], False)
    # bct needs no reference pass, and logits (lm_head: 2 * 8 * 10 FLOPs) only at the 2 response predictors
    head = 3 * 2 * 80 * 2
    assert bench.step_flops(TINY, pairs, "bct") == 3 * fwd([7, 4], False) + head
    assert bench.step_flops(TINY, pairs, "act+bct") == fwd([3, 4], False) + 3 * fwd([7, 4], False) + head


def test_pairs_carry_responses_only_for_bct():
    """train.py generates theta0's responses only where BCT reads them, so the other targets' wrapped
    sequences end at the prompt and their FLOPs count no response tokens."""
    pairs = [aligned(3, 5, 2), aligned(4, 4, 0)]
    assert bench.for_targets(pairs, "act+bct:0.5") == pairs
    for spec in ("act", "mlpct+attct"):
        stripped = bench.for_targets(pairs, spec)
        assert ([p.response for p in stripped] == [[], []]
                and [p.wrapped for p in stripped] == [p.wrapped for p in pairs])
        assert bench.step_flops(TINY, stripped, spec) < bench.step_flops(TINY, pairs, spec)


@pytest.mark.parametrize("kw,msg", [(dict(steps=0), "--steps 0: use a value of 1 or more"),
                                    (dict(gen_tokens=10**9), "--gen-tokens 1000000000: use a value from 1 to"),
                                    (dict(rollout_turns=10**8), "--rollout-turns 100000000: use a value from 1"),
                                    (dict(regimes="short,medium"),
                                     "--regimes medium: choose from short,long"),
                                    (dict(adamw="sgd"), "--adamw sgd: choose from default,foreach,fused"),
                                    (dict(gen_batches="1,0"), "--gen-batches 0: use positive batch sizes"),
                                    (dict(device="tpu"), "--device tpu: use cpu, cuda or cuda:N")])
def test_bad_flags_are_refused_before_any_work(kw, msg):
    with pytest.raises(ValueError, match=msg):
        bench.run(bench.BenchConfig(**kw))


def test_an_unwritable_out_is_refused_before_any_work(tmp_path):
    """The table is written at the end of an hour's run: a path it cannot go to must fail at the start."""
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="--out .*a_file/bench.json: cannot write to the folder .*a_file "):
        bench.run(bench.BenchConfig(out=str(tmp_path / "a_file" / "bench.json")))
    (tmp_path / "a_folder").mkdir()
    with pytest.raises(ValueError, match="--out .*a_folder is a folder: name the file the table goes to"):
        bench.run(bench.BenchConfig(out=str(tmp_path / "a_folder")))
    assert sorted(os.listdir(tmp_path)) == ["a_file", "a_folder"]  # nothing written beside it either


PLUGIN = """
from consistency import target


@target("bench_probe", reads="suffix", capture="blocks.*.hook_resid_post")
def bench_probe(w, c, b):
    raise AssertionError("no step runs in this test")
"""


def test_a_plugin_target_is_benchmarked_as_ours_only(tmp_path):
    """A target of the user's own (--plugin) has no transformers version: the hf sides are refused in one line
    before any work, and ours alone gets past that check (to the next one: the unwritable --out)."""
    plugin = tmp_path / "probe.py"
    plugin.write_text(PLUGIN)
    (tmp_path / "a_file").write_text("")
    try:
        with pytest.raises(ValueError, match="--targets act\\+bench_probe: bench_hf.py has no transformers "
                                             "version of bench_probe: benchmark it with --impls ours"):
            bench.run(bench.BenchConfig(plugin=str(plugin), targets="act+bench_probe"))
        with pytest.raises(ValueError, match="--out .*a_file/bench.json: cannot write"):
            bench.run(bench.BenchConfig(plugin=str(plugin), targets="act+bench_probe", impls="ours",
                                        out=str(tmp_path / "a_file" / "bench.json")))
    finally:
        C.TARGETS.pop("bench_probe", None)


def test_default_targets_are_the_registered_ones_with_a_transformers_version():
    assert bench.BenchConfig().targets == "bct,act,mlpct,attct"  # prefill has none


def test_timeit_excludes_warmup_and_takes_the_median():
    calls = []

    def fn():
        calls.append(1)
        time.sleep(0.25 if len(calls) == 1 else 0.02 if len(calls) != 3 else 0.12)
        return len(calls)

    t = bench.timeit(fn, warmup=1, repeat=3)
    assert len(calls) == 4 and len(t.times) == 3 and t.first == 1
    assert 0.02 <= t.median < 0.1      # the slow warmup call and the one slow timed call do not count
    assert max(t.times) >= 0.12


def test_alternating_rounds_reverse_the_order_and_pool_the_times():
    calls, built = [], []

    def build(impl):
        built.append(impl)
        return lambda: calls.append(impl) or impl

    timed = bench.alternating(build, ["a", "b", "c"], rounds=2, warmup=1, steps=3,
                              sync=lambda: None, device="cpu")
    assert built == ["a", "b", "c", "c", "b", "a"]       # ABC then CBA: a drift falls on all alike
    assert calls == [x for impl in built for x in [impl] * 4]  # per round: 1 warmup + 3 timed calls
    for impl in "abc":
        t, _ = timed[impl]
        assert len(t.times) == 6 and t.first == impl and t.median == statistics.median(t.times)


def test_peak_memory_sees_a_temporary_allocation():
    with bench.PeakMemory("cpu") as mem:
        x = torch.ones(64 * 2 ** 20 // 4)  # 64 MiB, touched
        del x
    if mem.mib is None:
        pytest.skip("no /proc/self/clear_refs here")
    assert 60 <= mem.mib < 200


QUESTION = "Which planet is largest? Is it Jupiter or Mars?"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    path = tmp_path_factory.mktemp("tiny_bench")
    write_tiny_hf(path, "llama", tied=False)
    ours, tok = load_model(str(path))
    hf = transformers.AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    # content moves: attention changes
    wrappers = [f"I think it's Mars, but what do you think?\n\n{QUESTION}",
                # suffix shrinks to the chat tail
                f"{QUESTION}\n\nMy professor says Mars, and he is never wrong.",
                f"Be honest. {QUESTION}"]
    pairs = [C.align(tok, Pair(clean=user(QUESTION), wrapped=user(w), content=QUESTION),
                     tok.encode(r) + [tok.eos_id])
             for w, r in zip(wrappers, [" Jupiter.", " Jupiter, by far.", " It is Jupiter."])]
    return ours, hf, tok, pairs


@pytest.mark.parametrize("spec", ["bct", "act:1", "mlpct", "attct", "act:1+bct:0.5"])
def test_transformers_loss_equals_ours(tiny, spec):
    """Every implementation's first step starts at theta0 on the same pairs, so the losses must agree; the
    pairs differ in length and boundaries, so padding and per-pair averaging are exercised too."""
    ours, hf, tok, pairs = tiny
    losses = {impl: bench.build_step(impl, spec, pairs, tok.pad_id, ours, hf, 1e-3, "cpu", "fp32")()
              for impl in bench.IMPLS}
    assert losses["ours"] > 1e-4, f"{spec}: no signal on the test pairs"
    for impl in ("hf", "hf-b1"):
        assert losses[impl] == pytest.approx(losses["ours"], rel=1e-4), f"{spec} {impl}: {losses}"


def test_build_step_trains_a_copy(tiny):
    """A step updates its own copy only: the next implementation must start from the same theta0."""
    ours, hf, tok, pairs = tiny
    before = copy.deepcopy(ours.state_dict())
    step = bench.build_step("ours", "act:1", pairs, tok.pad_id, ours, hf, 1e-3, "cpu", "fp32")
    first, second = step(), step()
    assert second != first  # the first step moved the trained copy
    assert all(torch.equal(v, ours.state_dict()[k]) for k, v in before.items())


def test_generation_harness_does_the_same_work(tiny):
    """Both sides produce every requested token (eos switched off) and, greedy in fp32, the same ids."""
    ours, hf, tok, pairs = tiny
    prompts = [p.clean for p in pairs[:2]] + [pairs[0].clean[:5]]
    a = bench.generate_ours(ours, prompts, 6, tok.pad_id)
    b = bench.generate_hf(hf, prompts, 6, tok.pad_id)
    assert [len(r) for r in a] == [len(r) for r in b] == [6, 6, 6]
    assert a == b


def test_rollout_harness_does_the_same_work(tiny):
    """Both ways answer every turn of every rollout and, greedy in fp32, the same replies."""
    ours, _, tok, _ = tiny
    kept = bench.rollout(ours, tok, ["Write a haiku.", "Sort 3, 1, 2 and say why."], 2, 4, keep=True)
    whole = bench.rollout(ours, tok, ["Write a haiku.", "Sort 3, 1, 2 and say why."], 2, 4, keep=False)
    assert [len(t) for t in kept] == [2, 2, 2] and kept == whole
