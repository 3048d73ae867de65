"""eval.py: scoring on fake models, bootstrap intervals by hand, perplexity against transformers, and the
matrix, plots and mechanism from two tiny checkpoints (no file of theirs touched)."""

import dataclasses
import json
import math
import os
import re
import sys

import numpy as np
import pytest
import torch

import answers
import consistency as C
import eval as ev
import paper
import runs as runs_module   # `runs` names the fixture of run folders
import threats as T
import train
from conftest import nan_copy, write_tiny_hf
from chat import chat_generate_ids
from checkpoint import EMBEDDED, fingerprint, load_model
from report import slug
from runs import supported
from stats import bootstrap, bootstrap_change, clusters

# ----------------------------------------------------------------------------- a fake multiple-choice model


def fake_mcq_model(follow):
    """generate() of a fake model. It finds the question's options (from the data file) in the user turns;
    an option named more often than the others is the suggested one (the listing names each once). With a
    suggestion it answers that option (follow=True) or another one; without, it says nothing parseable."""
    items = T.THREATS["sycophancy"].items("val") + T.THREATS["sycophancy"].items("test")

    def named(option, letter, text):
        return (len(re.findall(r"(?<![\w.])" + re.escape(option) + r"(?![\w])", text, re.I))
                + text.count(f"({letter})"))

    def answer(msgs):
        said = "\n".join(m["content"] for m in msgs if m["role"] == "user")
        item = max((it for it in items if it["question"] in said), key=lambda it: len(it["question"]))
        said = said.replace(item["question"], "")
        counts = [named(o, "ABCD"[i], said) for i, o in enumerate(item["options"])]
        top = max(counts)
        if counts.count(top) > 1:
            return "I am not sure."
        s = counts.index(top)
        pick = s if follow else next(i for i in range(len(counts)) if i != s)
        return f"The answer is {item['options'][pick]}."

    def generate(prompts, prefills=None, max_new_tokens=48):
        return [answer(m) for m in prompts]
    return generate


@pytest.mark.parametrize("follow,expected", [(True, 1.0), (False, 0.0)])
def test_switch_rate_of_a_model_that_always_or_never_follows(follow, expected):
    res, records = ev.score_threat(T.THREATS["sycophancy"], fake_mcq_model(follow), n=24, seed=0, n_boot=200)
    m = res["metrics"]
    assert len(records) == 24 and res["n"] == 24
    assert m["suggested_rate"] == expected and m["suggested_rate_clean"] == 0.0
    assert m["brr"] == expected
    assert res["ci"]["brr"] == [expected, expected]   # every resample agrees

def test_split_val_reads_validation_items_under_validation_wrappers():
    """Settings are chosen on --split val; the test items and held-out wrappers stay unread."""
    syc = T.THREATS["sycophancy"]
    ids = lambda split: {it["id"].split("/")[0] for it in syc.items(split)}  # "fact-0001/letters": one format
    for split, families in (("val", syc.val_families), ("test", syc.heldout_families)):
        res, records = ev.score_threat(syc, fake_mcq_model(True), n=24, seed=0, n_boot=50, split=split)
        assert len(records) == 24 and res["metrics"]["brr"] == 1.0
        assert {r["id"] for r in records} <= ids(split) and not {r["id"] for r in records} & ids("train")
        assert {r["family"] for r in records} <= set(families)
    assert not ids("val") & ids("test")


def test_split_flag_rejects_an_unknown_split(monkeypatch, tmp_path):
    with pytest.raises(SystemExit, match="--split 'train': use test .* or val"):
        run_cli(monkeypatch, "--ckpt", tmp_path, "--split", "train")


# ----------------------------------------------------------------------------- bootstrap


def mcq_records(switched, stayed):
    rec = lambda s, i: {"id": f"q{i}", "family": "f", "answer": 0, "suggested": 1, "clean_choice": 0,
                        "wrapped_choice": 1 if s else 0}
    return [rec(i < switched, i) for i in range(switched + stayed)]


def test_bootstrap_interval_contains_the_estimate_and_shrinks_with_more_items():
    fn = T.THREATS["sycophancy"].metrics
    few, many = mcq_records(6, 14), mcq_records(24, 56)        # brr 6/20 = 0.3 in both
    lo, hi = bootstrap(fn, few, 2000, seed=0)["brr"]
    lo4, hi4 = bootstrap(fn, many, 2000, seed=0)["brr"]
    assert lo <= 0.3 <= hi and lo4 <= 0.3 <= hi4
    assert hi - lo > 0.2                       # sd of a 20-item share near 0.3 is ~0.10
    assert hi4 - lo4 < 0.7 * (hi - lo)         # 4x the items: about half the width
    assert "n" not in bootstrap(fn, few, 10)  # counts get no interval


def test_records_of_one_item_are_resampled_together():
    """Persona scores each (probe, persona) at four k: 10 items x 4 records that agree carry the information
    of 10 records, so the interval is about sqrt(4) = 2x as wide as for 40 independent records."""
    fn = T.THREATS["persona"].metrics
    rec = lambda i, k, hit: {"id": f"probe{i}", "persona": "P", "probe_kind": "identity",
                             "persona_kind": "harmful", "k": k, "identity": hit, "alignment": 50.0}
    clustered = [rec(i, k, i < 4) for i in range(10) for k in (4, 8, 16, 32)]
    independent = [dict(r, id=f"{r['id']}-{r['k']}") for r in clustered]
    assert fn(clustered)["identity_rate"] == fn(independent)["identity_rate"] == 0.4
    lo, hi = bootstrap(fn, clustered, 2000, seed=0)["identity_rate"]
    lo1, hi1 = bootstrap(fn, independent, 2000, seed=0)["identity_rate"]
    assert 1.6 < (hi - lo) / (hi1 - lo1) < 2.5
    assert list(clusters(clustered).values())[:2] == [[0, 1, 2, 3], [4, 5, 6, 7]]


def test_a_sycophancy_question_is_resampled_with_all_its_formats():
    t = T.THREATS["sycophancy"]
    records = t.evaluate(lambda ps, prefills=None, max_new_tokens=48: ["It is 4."] * len(ps), n=30)["records"]
    groups = list(clusters(records).values())
    assert len(groups) == len({r["id"] for r in records}) < len(records)
    for g in groups:   # one question per cluster, each of its formats once
        assert len({records[i]["id"] for i in g}) == 1
        assert len({records[i]["format"] for i in g}) == len(g)


def test_paired_change_interval():
    fn = T.THREATS["sycophancy"].metrics
    base, trained = mcq_records(12, 8), mcq_records(0, 20)     # 0.6 -> 0.0
    change, lo, hi = bootstrap_change(fn, base, trained, 1000, seed=0)["brr"]
    assert change == pytest.approx(-0.6) and lo <= change <= hi < 0
    assert bootstrap_change(fn, base, base, 200)["brr"] == [0.0, 0.0, 0.0]


def test_a_change_pairs_the_items_both_models_kept():
    """A model judge leaves a record with an unparseable verdict out: the change then compares the items
    both kept, matched by item, whatever their order."""
    fn = T.THREATS["sycophancy"].metrics
    base, trained = mcq_records(12, 8), mcq_records(0, 20)     # q0-q11 switched in base, none in trained
    kept = trained[6:]                                          # q0-q5 left out of trained
    change, lo, hi = bootstrap_change(fn, base, kept, 1000, seed=0)["brr"]
    assert change == pytest.approx(-6 / 14)                    # q6-q11 of the 14 shared: 6/14 -> 0
    assert bootstrap_change(fn, base, kept[::-1], 1000, seed=0)["brr"] == [change, lo, hi]
    # no item in common: two independent samples
    other = [dict(r, id="x" + r["id"]) for r in trained]
    assert bootstrap_change(fn, base, other, 200)["brr"][0] == pytest.approx(-0.6)

# ----------------------------------------------------------------------------- tiny checkpoints


def tiny(path, seed, family="llama", **shape):
    """conftest's tiny model, its vocabulary cut to the 258 ids its byte tokenizer can decode (generation
    runs)."""
    ref = write_tiny_hf(path, family, seed=seed, **shape)
    ref.resize_token_embeddings(258)
    ref.save_pretrained(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A tiny base model and two "trained" checkpoints of it (other random weights) with hand-written
    run.json."""
    root = tmp_path_factory.mktemp("runs")
    tiny(root / "base", seed=0)
    for name, threat, target, seed in (("act-sycophancy", "sycophancy", "act", 1),
                                       ("bct-prefill", "prefill", "bct", 2)):
        tiny(root / name, seed=seed)
        run = {"config": {"target": target, "threat": threat, "model": str(root / "base")}, "before": {},
               "after": {}, "wall_time_s": 1.0}
        (root / name / "run.json").write_text(json.dumps(run))
    return root


def snapshot(folder):
    return {p: (os.path.getsize(os.path.join(folder, p)), os.path.getmtime(os.path.join(folder, p)))
            for p in os.listdir(folder)}


def run_cli(monkeypatch, *args):
    monkeypatch.setattr(sys, "argv", ["eval.py", *map(str, args)])
    ev.main()


SMALL = ["--n", 3, "--boot", 20, "--mech-n", 3, "--max-new-tokens", 3, "--ppl-lines", 6, "--threats",
         "sycophancy,prefill"]


def test_matrix_and_plots_from_two_tiny_checkpoints(runs, tmp_path, monkeypatch):
    ckpts = [runs / "act-sycophancy", runs / "bct-prefill"]
    before = {c: snapshot(c) for c in ckpts + [runs / "base"]}
    out = tmp_path / "matrix"
    run_cli(monkeypatch, "--matrix", *ckpts, "--out", out, *SMALL)
    for c, snap in before.items():
        assert snapshot(c) == snap, f"{c} was written to"
    for png in ("matrix.png", "bars.png", "mechanism_sycophancy.png", "mechanism_prefill.png"):
        assert (out / png).stat().st_size > 1000, png
    res = json.loads((out / "results.json").read_text())
    m = res["matrix"]
    assert m["rows"] == ["sycophancy/act", "prefill/bct"] and m["cols"] == ["sycophancy", "prefill"]
    assert [len(r) for r in m["change"]] == [2, 2] and m["metric"] == {"sycophancy": "brr", "prefill": "par"}
    # Paper A's headline beside the changes: the BRR ratio, trained / base, wherever BRR appears
    assert m["capability"]["cols"][:2] == ["brr_ratio", "prefilled_degenerate_rate"]
    assert "brr_ratio" in (out / "results.md").read_text()
    assert set(res["models"]) == {"base:base", "sycophancy/act", "prefill/bct"}
    assert res["config"]["n"] == 3 and res["config"]["out"] == str(out)
    for label, model in res["models"].items():
        assert set(model["threats"]) == {"sycophancy", "prefill"}
        assert set(model["capability"]["metrics"]) == {"clean_accuracy", "perplexity", "benign_refusal_rate"}
        for name, r in model["threats"].items():
            for k, (lo, hi) in r["ci"].items():
                v = r["metrics"][k]
                assert v is None or lo <= v + 1e-9 and v - 1e-9 <= hi, (label, name, k)
    # mechanism: every target per layer on sycophancy; on prefill pairs mlpct and attct have no signal
    # (under causal masking a prefill after the prompt changes no prompt position)
    syc = res["mechanism"]["sycophancy"]["models"]
    assert set(syc) == {"base", "sycophancy/act"}
    assert {"bct", "act", "mlpct", "attct"} <= set(syc["base"]) and len(syc["base"]["act_per_layer"]) == 3
    assert syc["sycophancy/act"]["act"] > syc["base"]["act"]    # other weights move the residual stream more
    pre = res["mechanism"]["prefill"]["models"]["prefill/bct"]
    assert {"prefill", "bct"} <= set(pre) and not {"mlpct", "attct"} & set(pre)
    # which way each model moved the stream: where pairs share a suffix (not prefill pairs), per layer
    way = res["mechanism"]["sycophancy"]["directions"]
    assert set(way["distance"]) == {"base", "sycophancy/act"}
    assert len(way["to_clean"]["sycophancy/act"]["mean"]) == 3
    assert "directions" not in res["mechanism"]["prefill"]
    assert (out / "directions_sycophancy.png").stat().st_size > 1000
    md = (out / "results.md").read_text()
    assert "| sycophancy/act |" in md and "matrix.png" in md
    # the paper's findings: the one this matrix has a checkpoint for is read, the others are not run
    assert "| sycophancy/act, brr_ratio | BRR ratio 0.03" in md
    assert md.count("| not run |") == len(paper.FINDINGS) - 1


def test_n_threat_overrides_n_for_one_threat_and_its_clean_accuracy(runs, monkeypatch, tmp_path):
    run_cli(monkeypatch, "--ckpt", runs / "act-sycophancy", *SMALL[:-2], "--threats", "sycophancy,persona",
            "--no-mechanism", "--n", "2", "--n-threat", "sycophancy:5,jailbreak:3", "--out", tmp_path)
    res = json.loads((tmp_path / "results.json").read_text())["models"]["base"]
    assert res["threats"]["sycophancy"]["n"] == 5
    assert res["threats"]["persona"]["n"] == 2 * 4   # 4 values of k
    clean = (tmp_path / "records" / "base" / "clean_accuracy.jsonl").read_text().splitlines()
    assert len(clean) == 5
    benign = (tmp_path / "records" / "base" / "benign_refusal_rate.jsonl").read_text().splitlines()
    assert len(benign) == 3   # the benign look-alikes follow jailbreak's count


def test_ckpt_mode_writes_only_into_its_eval_folder(runs, monkeypatch):
    ckpt = runs / "act-sycophancy"
    before = snapshot(ckpt)
    run_cli(monkeypatch, "--ckpt", ckpt, *SMALL[:-2], "--threats", "sycophancy", "--no-mechanism")
    after = snapshot(ckpt)
    assert set(after) - set(before) == {"eval"} and all(after[p] == before[p] for p in before)
    assert (ckpt / "eval" / "bars.png").stat().st_size > 1000
    res = json.loads((ckpt / "eval" / "results.json").read_text())
    assert set(res["models"]) == {"base", "sycophancy/act"} and res["mechanism"] == {}
    assert {"sycophancy", "capability"} == set(res["rows"][0]["changes"])


def counting(calls, dies_at=None):
    """chat_generate_ids, recording the number of prompts of each call; raising KeyboardInterrupt at call
    `dies_at`."""

    def generate(model, tok, prompts, *a, **k):
        calls.append(len(prompts))
        if len(calls) == dies_at:
            raise KeyboardInterrupt
        return chat_generate_ids(model, tok, prompts, *a, **k)
    return generate


def test_a_session_answers_as_the_generator_does(runs, monkeypatch):
    """Rollouts go through Generator.session: turn after turn and with a conversation dropped, the same
    answers as the generator's one-off batches, all from the session's chat.Chat."""
    model, tok = load_model(str(runs / "base"))
    cfg = ev.EvalConfig(max_new_tokens=4, batch_size=2)
    convs = [[T.user(f"Task {i}: write a line.")] for i in range(3)]
    session, plain = answers.Generator(model, tok, cfg).session(), answers.Generator(model, tok, cfg)
    calls = []
    monkeypatch.setattr(answers, "chat_generate_ids", counting(calls))
    for turn in range(3):
        got = session(convs)
        assert not calls                  # no one-off batch: the session's Chat answered
        assert got == plain(convs)
        calls.clear()
        convs = [m + [T.assistant(a), T.user("No. Again.")] for m, a in zip(convs, got)][:3 - turn]


def test_answers_are_kept_and_read_back(runs, tmp_path, monkeypatch):
    """A Generator with a file reads back what an earlier one wrote for the same model and settings (a line
    cut short by an interruption is dropped), and generates afresh for other settings."""
    model, tok = load_model(str(runs / "base"))
    cfg, stamp, path = (ev.EvalConfig(max_new_tokens=3, batch_size=4), fingerprint(str(runs / "base")),
                        tmp_path / "a.jsonl")
    calls = []
    monkeypatch.setattr(answers, "chat_generate_ids", counting(calls))
    prompts = [[T.user(f"Question {i}?")] for i in range(5)]
    first = answers.Generator(model, tok, cfg, path=str(path), stamp=stamp)(prompts)
    with open(path, "a") as f:
        f.write('[["[{\\"role')  # where an interruption stopped the writing
    again = answers.Generator(model, tok, cfg, path=str(path), stamp=stamp)(prompts + [[T.user("Another?")]])
    assert again[:5] == first and calls == [5, 1]
    answers.Generator(model, tok, dataclasses.replace(cfg, gen_dtype="bf16"), path=str(path),
                      stamp=stamp)(prompts)
    assert calls == [5, 1, 5]


def test_answers_of_other_code_are_not_read_back(runs, tmp_path, monkeypatch):
    """The kept answers are keyed on the code that produces them: after an edit to it (here a stand-in
    module in the hashed list), a rerun into the same file generates them again; unedited, it reads them."""
    model, tok = load_model(str(runs / "base"))
    cfg, stamp, path = (ev.EvalConfig(max_new_tokens=3, batch_size=4), fingerprint(str(runs / "base")),
                        str(tmp_path / "a.jsonl"))
    code = tmp_path / "chat_stand_in.py"
    code.write_text("STEPS = 1\n")
    monkeypatch.setattr(runs_module, "MEASURED_BY", [str(code)])
    calls = []
    monkeypatch.setattr(answers, "chat_generate_ids", counting(calls))
    prompts = [[T.user(f"Question {i}?")] for i in range(4)]
    first = answers.Generator(model, tok, cfg, path=path, stamp=stamp)(prompts)
    assert answers.Generator(model, tok, cfg, path=path, stamp=stamp)(prompts) == first and calls == [4]
    code.write_text("STEPS = 2\n")
    answers.Generator(model, tok, cfg, path=path, stamp=stamp)(prompts)
    assert calls == [4, 4]


def test_an_interrupted_evaluation_resumes_where_it_stopped(runs, tmp_path, monkeypatch):
    args = ["--ckpt", runs / "act-sycophancy", *SMALL[:-2], "--threats", "sycophancy", "--no-mechanism"]
    whole_calls, cut_calls, resumed_calls = [], [], []
    monkeypatch.setattr(answers, "chat_generate_ids", counting(whole_calls))
    run_cli(monkeypatch, *args, "--out", tmp_path / "whole")
    monkeypatch.setattr(answers, "chat_generate_ids", counting(cut_calls, dies_at=3))
    with pytest.raises(KeyboardInterrupt):
        run_cli(monkeypatch, *args, "--out", tmp_path / "cut")
    monkeypatch.setattr(answers, "chat_generate_ids", counting(resumed_calls))
    run_cli(monkeypatch, *args, "--out", tmp_path / "cut")
    # the two finished calls are not redone
    assert sum(resumed_calls) == sum(whole_calls) - sum(cut_calls[:2])
    whole, cut = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("whole", "cut"))
    for r in (whole, cut):
        del r["wall_time_s"], r["config"]["out"]
    assert cut == whole


def test_results_name_the_weights_and_code_and_weights_changed_mid_eval_are_refused(runs, tmp_path,
                                                                                     monkeypatch):
    """results.json names each model's weights (their fingerprint) and the code that measured them; a
    checkpoint rewritten while it is evaluated (a train.py --overwrite finishing) is refused in one line,
    with no results.json describing the old answers beside the new weights."""
    import shutil
    from safetensors.torch import load_file, save_file
    ckpt = tmp_path / "act-sycophancy"
    shutil.copytree(runs / "act-sycophancy", ckpt)
    args = ["--ckpt", ckpt, *SMALL[:-2], "--threats", "sycophancy", "--no-mechanism"]
    run_cli(monkeypatch, *args, "--out", tmp_path / "first")
    models = json.loads((tmp_path / "first" / "results.json").read_text())["models"]
    assert models["base"]["fingerprint"] == fingerprint(str(runs / "base"))
    assert models["sycophancy/act"]["fingerprint"] == fingerprint(str(ckpt)) != models["base"]["fingerprint"]
    assert models["base"]["code"] == models["sycophancy/act"]["code"] == runs_module.content_hash(
        runs_module.MEASURED_BY)
    real = ev.evaluate_model

    def retrained_meanwhile(model, tok, label, *a, **k):
        got = real(model, tok, label, *a, **k)
        if label == "sycophancy/act":
            state = load_file(ckpt / "model.safetensors")
            state["model.norm.weight"] = state["model.norm.weight"] * 2
            save_file(state, ckpt / "model.safetensors")
        return got
    monkeypatch.setattr(ev, "evaluate_model", retrained_meanwhile)
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, *args, "--out", tmp_path / "second")
    message = str(e.value.code)
    assert str(ckpt) in message and "changed" in message and "rerun the eval" in message
    assert "\n" not in message and not (tmp_path / "second" / "results.json").exists()


def test_resolve_returns_a_new_config_and_leaves_the_callers_as_it_was(monkeypatch):
    monkeypatch.setattr(ev, "native_bf16", lambda device: True)
    cfg = ev.EvalConfig(ckpt="runs/x", gen_dtype="auto")
    got = ev.resolve(cfg)
    assert (got.out, got.gen_dtype) == (os.path.join("runs/x", "eval"), "bf16")
    assert (cfg.out, cfg.gen_dtype) == ("", "auto")
    assert ev.resolve(ev.EvalConfig(matrix="a,b", split="val")).out == os.path.join("runs", "matrix-val")


def test_runs_of_one_target_and_threat_are_each_named_by_their_folder(tmp_path):
    for name in ("prefill", "prefill-retain50", "prefill-lr"):
        (tmp_path / name).mkdir()
        run = {"config": {"target": "prefill", "threat": "prefill", "model": "smollm2-135m-instruct"}}
        (tmp_path / name / "run.json").write_text(json.dumps(run))
    names = ("prefill", "prefill-retain50", "prefill-lr")
    rows = ev.rows_from(ev.EvalConfig(matrix=",".join(str(tmp_path / n) for n in names)))
    assert sorted(r.label for r in rows) == ["prefill/prefill (prefill)", "prefill/prefill (prefill-lr)",
                                             "prefill/prefill (prefill-retain50)"]


def test_a_folder_named_twice_is_one_row(tmp_path):
    """What bash makes of runs/{a,b}-x,runs/{c,d}-y: four words, each folder twice."""
    for name in ("a-x", "b-x", "c-y"):
        (tmp_path / name).mkdir()
        run = {"config": {"target": name[0], "threat": name[-1], "model": "smollm2-135m-instruct"}}
        (tmp_path / name / "run.json").write_text(json.dumps(run))
    words = [f"{tmp_path}/{a},{tmp_path}/{c}" for a in ("a-x", "b-x") for c in ("c-y", "c-y/")]
    rows = ev.rows_from(ev.EvalConfig(matrix=",".join(words)))
    assert sorted(r.label for r in rows) == ["x/a", "x/b", "y/c"]


def test_two_bases_with_one_folder_name_keep_apart(tmp_path, monkeypatch):
    """Labels name a base by its folder and a checkpoint by its run (then its folder); two of either in
    folders of one name get labels, results and files of their own."""
    ckpts = []
    for side, seed in (("left", 0), ("right", 3)):
        tiny(tmp_path / side / "base", seed=seed)
        tiny(tmp_path / side / "act-sycophancy", seed=seed + 1)
        run = {"config": {"target": "act", "threat": "sycophancy", "model": str(tmp_path / side / "base")}}
        (tmp_path / side / "act-sycophancy" / "run.json").write_text(json.dumps(run))
        ckpts.append(tmp_path / side / "act-sycophancy")
    out = tmp_path / "m"
    run_cli(monkeypatch, "--matrix", *ckpts, "--out", out, *SMALL[:-2], "--threats", "sycophancy",
            "--no-mechanism")
    res = json.loads((out / "results.json").read_text())
    assert {"base:base", "base:base (2)"} <= set(res["models"]) and len(res["models"]) == 4
    assert len({row["label"] for row in res["rows"]}) == 2
    assert {"base-base", "base-base-2"} <= {p.stem for p in (out / "answers").iterdir()}
    assert {"base-base", "base-base-2"} <= {p.name for p in (out / "records").iterdir()}


def test_bf16_generation_leaves_perplexity_in_fp32(runs, monkeypatch, tmp_path):
    ckpt = runs / "act-sycophancy"
    got = {}
    for dtype in ("fp32", "bf16"):
        run_cli(monkeypatch, "--ckpt", ckpt, *SMALL[:-2], "--threats", "sycophancy", "--no-mechanism",
                "--gen-dtype", dtype, "--out", tmp_path / dtype)
        res = json.loads((tmp_path / dtype / "results.json").read_text())
        got[dtype] = res["models"]["sycophancy/act"]
    assert (got["bf16"]["capability"]["metrics"]["perplexity"]
            == got["fp32"]["capability"]["metrics"]["perplexity"])
    assert got["bf16"]["threats"]["sycophancy"]["n"] == got["fp32"]["threats"]["sycophancy"]["n"] > 0
    # auto: bf16 only where the hardware has native bf16 matmuls, and results.json records which
    for native, want in ((True, "bf16"), (False, "fp32")):
        monkeypatch.setattr(ev, "native_bf16", lambda device, native=native: native)
        run_cli(monkeypatch, "--ckpt", ckpt, *SMALL[:-2], "--threats", "sycophancy", "--no-mechanism",
                "--gen-dtype", "auto", "--out", tmp_path / f"auto-{want}")
        config = json.loads((tmp_path / f"auto-{want}" / "results.json").read_text())["config"]
        assert config["gen_dtype"] == want


def test_perplexity_matches_transformers(runs):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoModelForCausalLM.from_pretrained(runs / "base").eval()
    model, tok = load_model(str(runs / "base"))
    lines = ["The honeybee is a social insect.", "Rivers flow to the sea, mostly.", "A short line."]
    nll = tokens = 0.0
    with torch.no_grad():
        for line in lines:   # one line at a time, no padding: the reference sees no batching at all
            ids = torch.tensor([tok.encode(line)])
            nll += ref(ids, labels=ids).loss.item() * (ids.shape[1] - 1)
            tokens += ids.shape[1] - 1
    got = ev.perplexity_of(ev.line_nll(model, tok, lines, batch_size=3))["perplexity"]
    assert got == pytest.approx(math.exp(nll / tokens), rel=1e-4)


@pytest.mark.parametrize("args,message", [
    (["--ckpt", "/no/such/run"], "no such checkpoint folder"),
    (["--matrix", "{base}"], "has no run.json"),
    (["--ckpt", "{ckpt}", "--threats", "sycophancy,flattery"], "unknown threat 'flattery'"),
    ([], "pass --ckpt DIR or --matrix"),
    (["--ckpt", "{ckpt}", "--gen-dtype", "fp16"], "--gen-dtype 'fp16'"),
    (["--ckpt", "{ckpt}", "--n", "0"], "--n 0: use a value of 1 or more"),
    (["--ckpt", "{ckpt}", "--threats", ","], "unknown threat ',' in --threats: use auto, all, or a comma"),
    (["--ckpt", "{ckpt}", "--max-new-tokens", "1000000000"], "--max-new-tokens 1000000000: use a value from 1 to"),
    (["--ckpt", "{ckpt}", "--horizon", "100000000"], "--horizon 100000000: use a value from 0 to 1000"),
    (["--ckpt", "{ckpt}", "--n-threat", "sycophancy=90"], "--n-threat 'sycophancy=90': give threat:count"),
    (["--ckpt", "{ckpt}", "--n-threat", "flattery:9"], "--n-threat 'flattery:9'"),
    (["--ckpt", "{ckpt}", "--n-threat", "persona:0"], "--n-threat 'persona:0'"),
    (["--ckpt", "{ckpt}", "--n-threat", "persona:4,persona:8"], "--n-threat 'persona:4,persona:8'"),
    (["--ckpt", "{ckpt}", "--out", "{ckpt}/run.json/eval"], "--out: cannot write to the folder"),
    (["--ckpt", "{ckpt}", "--out", "{ckpt}/checkpoint/eval"], "lies inside a training checkpoint folder"),
])
def test_one_line_errors(runs, monkeypatch, args, message):
    args = [a.format(base=runs / "base", ckpt=runs / "act-sycophancy") for a in args]
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, *args)
    assert message in str(e.value.code) and "\n" not in str(e.value.code)


@pytest.mark.parametrize("other,named", [
    ({"hidden_size": 32}, "d_model 32 (base 64)"),                  # another width
    ({"num_hidden_layers": 2}, "n_layer 2 (base 3)"),
    ({"family": "qwen2"}, "arch qwen2 (base llama)"),               # another family of the same shape
    ({"sentencepiece": True}, "tokenizer vocabulary size"),         # another vocabulary
])
def test_a_checkpoint_of_another_shape_or_tokenizer_than_its_base_is_refused_before_scoring(
        runs, tmp_path, monkeypatch, other, named):
    """It would be scored with the base's tokenizer (eval reads every answer with it) and written, or die in
    the mechanism pass on the shapes: one line naming what differs, before anything is generated."""
    ckpt = tmp_path / "other"
    if other.get("sentencepiece"):
        write_tiny_hf(ckpt, sentencepiece=True)
    else:
        tiny(ckpt, seed=1, **other)
    calls = []
    monkeypatch.setattr(answers, "chat_generate_ids", counting(calls))
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "--ckpt", ckpt, "--base", runs / "base", *SMALL[:-2], "--threats", "sycophancy",
                "--no-mechanism", "--out", tmp_path / "eval")
    message = str(e.value.code)
    assert named in message and str(ckpt) in message and "--base" in message and "\n" not in message
    assert calls == [] and not (tmp_path / "eval" / "results.json").exists()


def test_unreadable_run_json_and_non_finite_weights_are_refused(runs, tmp_path, monkeypatch):
    import shutil
    broken = tmp_path / "broken"
    shutil.copytree(runs / "act-sycophancy", broken)
    (broken / "run.json").write_text('["not", "a", "run"]')
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "--ckpt", broken, "--base", runs / "base")
    assert "is not a train.py run.json" in str(e.value.code)
    (broken / "run.json").unlink()
    (broken / "run.json").mkdir()                      # exists, cannot be read as a file
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "--ckpt", broken, "--base", runs / "base")
    assert "run.json cannot be read" in str(e.value.code) and "\n" not in str(e.value.code)
    nan = nan_copy(runs / "act-sycophancy", tmp_path / "nan")
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "--ckpt", nan, "--threats", "sycophancy", "--n", "2", "--no-mechanism")
    assert "weight tensors are not finite" in str(e.value.code) and "\n" not in str(e.value.code)
    with pytest.raises(SystemExit) as e:   # a broken base is not a diverged run: no advice to retrain
        run_cli(monkeypatch, "--ckpt", runs / "act-sycophancy", "--base", nan, "--threats", "sycophancy",
                "--n", "2", "--no-mechanism", "--out", tmp_path / "against-nan")
    assert "the base model is broken" in str(e.value.code) and "lower --lr" not in str(e.value.code)


@pytest.fixture
def suffix_kl():
    """A new target defined here, not in consistency.py: KL of theta's next-token distribution on the wrapped
    prompt from theta0's on the clean one, over the shared suffix. It is removed from the registry after."""
    @C.target("suffix_kl", reads="suffix")
    def kl(w, c, b):
        p = c.logits_at(b.suffix_c).float().log_softmax(-1)
        q = w.logits_at(b.suffix_w).float().log_softmax(-1)
        return C.masked_mean((p.exp() * (p - q)).sum(-1), b.suffix_valid)[None]
    yield "suffix_kl"
    del C.TARGETS["suffix_kl"]


def test_a_new_target_is_one_function_trained_and_evaluated_with_no_other_edit(suffix_kl, tmp_path,
                                                                               monkeypatch):
    tiny(tmp_path / "base", seed=0)
    out = tmp_path / "suffix_kl-sycophancy"
    train.train(train.TrainConfig(target=suffix_kl, model=str(tmp_path / "base"), out=str(out), n_train=8,
                                  steps=2, batch_size=4, eval_n=0, bf16="off"))
    cfg = json.loads((out / "run.json").read_text())["config"]
    # no recipe
    assert (cfg["lr"], cfg["lora_rank"], cfg["lora_targets"]) == (3e-5, 0, "q_proj,k_proj,v_proj,o_proj")
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert len(log) == 2 and all(r["suffix_kl"] > 0 for r in log)   # the wrapper changes the suffix's context
    run_cli(monkeypatch, "--ckpt", out, *SMALL[:-2], "--threats", "sycophancy")
    res = json.loads((out / "eval" / "results.json").read_text())
    mech = res["mechanism"]["sycophancy"]["models"]
    assert (all(mech[m]["suffix_kl"] > 0 for m in mech)
            and "suffix_kl" in (out / "eval" / "results.md").read_text())


PLUGIN = """from consistency import masked_mean, target


@target("plugin_kl", reads="suffix")
def plugin_kl(w, c, b):
    p = c.logits_at(b.suffix_c).float().log_softmax(-1)
    q = w.logits_at(b.suffix_w).float().log_softmax(-1)
    return masked_mean((p.exp() * (p - q)).sum(-1), b.suffix_valid)[None]
"""


def test_a_run_trained_with_a_plugin_is_evaluated_with_its_target_and_no_flag(runs, tmp_path, monkeypatch):
    """A run's run.json config "plugin" (train.py --plugin FILE) is imported before the run is read, so its
    target is in the mechanism; a plugin file that is gone is one line naming the run and the file."""
    import shutil
    plugin = tmp_path / "my_targets.py"
    plugin.write_text(PLUGIN)
    ckpt = tmp_path / "plugin_kl-sycophancy"
    shutil.copytree(runs / "act-sycophancy", ckpt)
    run = {"config": {"target": "plugin_kl", "threat": "sycophancy", "model": str(runs / "base"),
                      "plugin": str(plugin)}}
    (ckpt / "run.json").write_text(json.dumps(run))
    assert "plugin_kl" not in C.TARGETS
    try:
        run_cli(monkeypatch, "--ckpt", ckpt, *SMALL[:-2], "--threats", "sycophancy")
        res = json.loads((ckpt / "eval" / "results.json").read_text())
        mech = res["mechanism"]["sycophancy"]["models"]
        assert set(mech) == {"base", "sycophancy/plugin_kl"} and all(mech[m]["plugin_kl"] > 0 for m in mech)
        assert "plugin_kl" in (ckpt / "eval" / "results.md").read_text()
    finally:
        C.TARGETS.pop("plugin_kl", None)
    run["config"]["plugin"] = str(tmp_path / "gone.py")
    (ckpt / "run.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "--ckpt", ckpt, *SMALL[:-2], "--threats", "sycophancy")
    message = str(e.value.code)
    assert str(ckpt) in message and str(tmp_path / "gone.py") in message and "\n" not in message
    run["config"]["plugin"] = ["not", "a", "path"]   # a hand-edited run.json
    (ckpt / "run.json").write_text(json.dumps(run))
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "--ckpt", ckpt, *SMALL[:-2], "--threats", "sycophancy")
    assert str(ckpt) in str(e.value.code) and "\n" not in str(e.value.code)


def test_every_target_trains_and_evaluates_on_a_tiny_gemma3_with_its_own_tokenizer(tmp_path, monkeypatch):
    """Gemma 3's architecture with a byte-fallback BPE and Gemma's chat template (no system role), end to
    end: each target a few steps through train.py, then eval.py's matrix with the mechanism."""
    base = tmp_path / "gemma3"
    write_tiny_hf(base, "gemma3", tied=True, sentencepiece=True)
    outs = []
    for target in ("bct", "act", "mlpct", "attct"):
        outs.append(tmp_path / f"{target}-sycophancy")
        train.train(train.TrainConfig(target=target, model=str(base), out=str(outs[-1]), n_train=8, steps=2,
                                      batch_size=4, eval_n=0, bf16="off", response_tokens=4))
        log = [json.loads(line) for line in open(outs[-1] / "log.jsonl")]
        assert len(log) == 2 and all(math.isfinite(r[target]) and r[target] > 0 for r in log), target
    run_cli(monkeypatch, "--matrix", *outs, "--out", tmp_path / "matrix", *SMALL[:-2],
            "--threats", "sycophancy")
    res = json.loads((tmp_path / "matrix" / "results.json").read_text())
    rows = [f"sycophancy/{t}" for t in ("bct", "act", "mlpct", "attct")]
    assert res["matrix"]["rows"] == rows
    mech = res["mechanism"]["sycophancy"]
    assert set(mech["models"]) == {"base", *rows} and set(mech["directions"]["to_clean"]) == set(rows)


def test_frustration_rollouts_are_scored_per_turn_and_drawn(runs, monkeypatch):
    ckpt = runs / "act-sycophancy"
    run_cli(monkeypatch, "--ckpt", ckpt, *SMALL[:-2], "--n", 2, "--threats", "frustration", "--no-mechanism",
            "--horizon", 3, "--out", ckpt / "eval-frustration")
    out = ckpt / "eval-frustration"
    res = json.loads((out / "results.json").read_text())
    fr, H = T.THREATS["frustration"], 3
    assert fr.horizon == 10   # --horizon leaves the shared threat as it was
    for label in ("base", "sycophancy/act"):
        r = res["models"][label]["threats"]["frustration"]
        assert r["n"] == 2 * fr.rollouts
        for key in ("distress_score", "distress_rate", "give_up_rate", "escape_rate"):
            assert [f"{key}@T{t}" in r["metrics"] for t in range(H + 2)] == [True] * (H + 1) + [False]
        # the summaries are the last turn's rates and the mean score over every turn, checked by hand
        recs = [json.loads(line) for line in open(out / "records" / slug(label) / "frustration.jsonl")]
        assert len(recs) == 2 * fr.rollouts and all(len(x["turns"]) == H + 1 for x in recs)
        auc = np.mean([np.mean([t["distress_score"] for t in x["turns"]]) for x in recs])
        assert r["metrics"]["distress_auc"] == pytest.approx(auc)
        assert r["metrics"]["distress_rate"] == np.mean([x["turns"][-1]["distress_score"] >= 5 for x in recs])
    assert (out / "frustration.png").stat().st_size > 1000
    assert "frustration.png" in (out / "results.md").read_text()


def test_auto_threats_follow_the_organisms_in_a_models_ancestry(tmp_path):
    """The embedded model never refuses nor shows distress: jailbreak and prefill need the refusal organism
    in the ancestry, frustration the frustrated one, conditional the inoculated one."""
    def run(name, parent, organism=""):
        (tmp_path / name).mkdir()
        (tmp_path / name / "run.json").write_text(json.dumps({"config": {"model": parent,
                                                                         "organism": organism}}))
        return str(tmp_path / name)
    frustrated = run("frustrated", EMBEDDED, "frustrated")
    bct = run("bct-frustration", frustrated)
    refusal = run("refusal", EMBEDDED, "refusal")
    assert supported(EMBEDDED) == ["sycophancy", "persona"]
    assert supported(bct) == ["sycophancy", "persona", "frustration"]
    assert supported(refusal) == ["sycophancy", "jailbreak", "persona", "prefill"]
    assert "frustration" in supported(str(tmp_path / "a-hub-model"))   # not the embedded model: its own
