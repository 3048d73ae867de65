"""train.py on a tiny random model: exact resume, clear refusals of bad runs, NaN handling, and data parallel
training under torchrun (gloo) against one process with the same global batch."""

import copy
import json
import os
import subprocess
import sys
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file

import cli
import consistency as C
import parallel
import runs
import threats as T
import train
from conftest import dies_at, nan_copy, write_tiny_hf
from checkpoint import load_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny")
    write_tiny_hf(path, "llama", tied=True)
    return str(path)


def config(tiny_dir, out, **kw):
    return train.TrainConfig(**{**dict(target="mlpct", model=tiny_dir, out=str(out), n_train=16, steps=6,
                                       batch_size=4, save_every=3, eval_n=0, bf16="off", lr=1e-3), **kw})


def weights(out):
    return load_file(os.path.join(out, "model.safetensors"))


def interrupted_run(cfg, at_call, monkeypatch):
    """Run train() until its `at_call`-th loss evaluation, then interrupt it the way Ctrl-C would."""
    real = train.consistency_loss
    monkeypatch.setattr(train, "consistency_loss", dies_at(at_call))
    with pytest.raises(KeyboardInterrupt):
        train.train(cfg)
    monkeypatch.setattr(train, "consistency_loss", real)


def test_interrupt_and_resume_equals_uninterrupted(tiny_dir, tmp_path, monkeypatch):
    train.train(config(tiny_dir, tmp_path / "straight"))
    first = json.loads(open(tmp_path / "straight" / "log.jsonl").readline())
    # a bias-corrected EMA of one value is that value
    assert first["loss_ema"] == pytest.approx(first["loss"])
    interrupted_run(config(tiny_dir, tmp_path / "cut"), at_call=5, monkeypatch=monkeypatch)
    state = torch.load(tmp_path / "cut" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 3
    train.train(config(tiny_dir, tmp_path / "cut", resume=True))
    # the log keeps what happened: step 3 ran once before the interruption and again after the resume; every
    # step's loss, both runs of step 3 included, is the uninterrupted run's (the first step that differs
    # tells a nondeterministic kernel, from step 0 on, from a resume that lost state, from step 3 on)
    straight = {r["step"]: r["loss"] for r in map(json.loads, open(tmp_path / "straight" / "log.jsonl"))}
    cut = [(r["step"], r["loss"]) for r in map(json.loads, open(tmp_path / "cut" / "log.jsonl"))]
    assert [s for s, _ in cut] == [0, 1, 2, 3, 3, 4, 5]
    assert cut == [(s, straight[s]) for s, _ in cut]
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), f"{k}: max difference {(a[k] - b[k]).abs().max().item():.3g}"
    for run in ("straight", "cut"):  # its picture, the repeated step included
        assert (tmp_path / run / "loss.png").stat().st_size > 10_000


def test_compiled_run_matches_the_eager_one_and_resumes_it(tiny_dir, tmp_path, monkeypatch):
    """--compile really compiles (dynamo builds graphs) and trains the same weights as the eager run; a run
    interrupted eagerly resumes compiled, since compiling changes how steps run, not what they compute."""
    from torch._dynamo.utils import counters
    train.train(config(tiny_dir, tmp_path / "eager"))
    graphs = counters["stats"]["unique_graphs"]
    train.train(config(tiny_dir, tmp_path / "compiled", compile=True))
    assert counters["stats"]["unique_graphs"] > graphs
    interrupted_run(config(tiny_dir, tmp_path / "cut"), at_call=5, monkeypatch=monkeypatch)
    train.train(config(tiny_dir, tmp_path / "cut", resume=True, compile=True))
    eager = weights(tmp_path / "eager")
    for run in ("compiled", "cut"):
        other = weights(tmp_path / run)
        assert other.keys() == eager.keys()
        # compiled kernels sum in another order; Adam divides by sqrt(v), so where a gradient is near zero
        # that rounding moves a weight by up to ~1e-5, against the lr x steps = 6e-3 a computation that
        # differs gives
        far = {k: (other[k] - eager[k]).abs().max().item() for k in eager
               if not torch.allclose(other[k], eager[k], rtol=1e-4, atol=2e-5)}
        assert not far, (run, far)


def test_a_failing_compile_is_a_one_line_error(tiny_dir, tmp_path):
    """No C++ compiler for inductor: train.py --compile exits with one line naming the fix, no traceback."""
    script = ("import runpy, torch._inductor.config as c; c.cpp.cxx = ('/nonexistent/g++',); "
              "runpy.run_path('train.py', run_name='__main__')")
    res = subprocess.run([sys.executable, "-c", script, "--model", tiny_dir, "--out", str(tmp_path / "c"),
                          "--compile", "--n-train", "8", "--steps", "1", "--batch-size", "2", "--eval-n", "0",
                          "--bf16", "off"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines()[-1].startswith("error: --compile failed "
                                                          "(InvalidCxxCompiler"), res.stderr[-2000:]


PLUGIN = '''"""A target of my own: squared distance of each layer's MLP activations over the clean content."""
from consistency import layers, masked_mean, over_layers, target


@target("mlp_sq", reads="content", capture="blocks.*.mlp.hook_post")
def mlp_sq(w, c, b):
    return over_layers(w, c, layers(w, "mlp.hook_post"), b.content_w, b.content_c,
                       lambda mw, mc: masked_mean((mw - mc).float().pow(2).sum(-1), b.content_valid))
'''


@pytest.fixture
def plugin(tmp_path):
    """A file outside the repository registering the target mlp_sq; the registry forgets it after."""
    path = tmp_path / "plugins" / "my_targets.py"
    path.parent.mkdir()
    path.write_text(PLUGIN)
    yield path
    C.TARGETS.pop("mlp_sq", None)
    for name in [n for n, m in sys.modules.items()
                 if os.path.realpath(getattr(m, "__file__", None) or "") == os.path.realpath(path)]:
        del sys.modules[name]


def test_a_plugin_target_trains_is_recorded_and_resumes(tiny_dir, tmp_path, plugin, monkeypatch):
    """--plugin FILE registers its targets before --target is read; run.json records the file's real path (what
    eval.py reads), and a resume naming the same file by another path continues the run."""
    assert "mlp_sq" not in C.TARGETS
    interrupted_run(config(tiny_dir, tmp_path / "mine", target="mlp_sq", plugin=str(plugin)), at_call=5,
                    monkeypatch=monkeypatch)
    monkeypatch.chdir(plugin.parent)
    train.train(config(tiny_dir, tmp_path / "mine", target="mlp_sq", plugin="my_targets.py", resume=True))
    report = json.load(open(tmp_path / "mine" / "run.json"))
    assert report["config"]["plugin"] == os.path.realpath(plugin) and os.path.isabs(report["config"]["plugin"])
    log = [json.loads(line) for line in open(tmp_path / "mine" / "log.jsonl")]
    assert [r["step"] for r in log] == [0, 1, 2, 3, 3, 4, 5]
    # the only term of the loss, and the wrappers move the content's MLP activations
    assert all(r["mlp_sq"] > 0 and r["loss"] == pytest.approx(r["mlp_sq"], rel=1e-6) for r in log)


def test_a_resume_refuses_a_plugin_edited_since_the_checkpoint(tiny_dir, tmp_path, plugin, monkeypatch):
    """The plugin's targets decide what every step computes: an edited file is another run, never resumed."""
    interrupted_run(config(tiny_dir, tmp_path / "mine", target="mlp_sq", plugin=str(plugin)), at_call=5,
                    monkeypatch=monkeypatch)
    plugin.write_text(plugin.read_text().replace("pow(2)", "abs()"))
    with pytest.raises(ValueError, match="--resume: the plugin .* changed since"):
        train.train(config(tiny_dir, tmp_path / "mine", target="mlp_sq", plugin=str(plugin), resume=True))


def test_a_missing_plugin_is_a_one_line_error(tiny_dir, tmp_path):
    res = subprocess.run([sys.executable, "train.py", "--plugin", str(tmp_path / "nope.py"), "--target", "mine",
                          "--model", tiny_dir, "--out", str(tmp_path / "x"), "--eval-n", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode != 0 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert res.stderr.strip().splitlines() == [f"error: --plugin {tmp_path / 'nope.py'}: no such .py file; "
                                               f"pass a Python file that registers targets with @target"]
    assert not (tmp_path / "x").exists()


def test_resume_without_a_checkpoint_is_refused(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="no checkpoint"):
        train.train(config(tiny_dir, tmp_path / "fresh", resume=True))


def test_resume_mismatch_names_the_field(tiny_dir, tmp_path, monkeypatch):
    interrupted_run(config(tiny_dir, tmp_path / "m"), at_call=4, monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match="n_train=16"):
        train.train(config(tiny_dir, tmp_path / "m", n_train=12, resume=True))
    # a checkpoint written before a field existed held that field's default: it resumes
    saved = tmp_path / "m" / "checkpoint" / "train_config.json"
    fields = json.loads(saved.read_text())
    del fields["fsdp"]
    saved.write_text(json.dumps(fields))
    train.train(config(tiny_dir, tmp_path / "m", resume=True))
    assert (tmp_path / "m" / "run.json").exists()


def test_resume_takes_a_lower_lr_and_the_same_folders_spelled_otherwise(tiny_dir, tmp_path, monkeypatch,
                                                                        capsys):
    """The NaN guard's advice (a lower --lr, then --resume) works; --out and --model are compared as the
    folders they name, so a trailing slash or another working directory does not refuse the resume."""
    interrupted_run(config(tiny_dir, tmp_path / "m"), at_call=5, monkeypatch=monkeypatch)
    monkeypatch.chdir(tmp_path)
    train.train(config(os.path.relpath(tiny_dir, tmp_path) + "/", "m/", lr=5e-4, resume=True))
    assert "lr 0.001 -> 0.0005" in capsys.readouterr().out
    assert [r["lr"] for r in map(json.loads, open(tmp_path / "m" / "log.jsonl"))][-1] < 5e-4


def swap_states(cut):
    """The folder states a crash inside save_checkpoint's swap can leave, made by hand from a checkpoint."""
    ck = lambda name: os.path.join(cut, name)
    import shutil
    def only_old_and_tmp():       # between the two renames
        os.replace(ck("checkpoint"), ck("checkpoint.old"))
        shutil.copytree(ck("checkpoint.old"), ck("checkpoint.tmp"))
    def only_old():               # the same, with the new one lost
        os.replace(ck("checkpoint"), ck("checkpoint.old"))
    def half_written_tmp():       # killed while writing the new one: it has no step.json yet
        shutil.copytree(ck("checkpoint"), ck("checkpoint.tmp"))
        os.remove(os.path.join(ck("checkpoint.tmp"), "step.json"))
        with open(os.path.join(ck("checkpoint.tmp"), "train_state.pt"), "wb") as f:
            f.write(b"torn")
    return [only_old_and_tmp, only_old, half_written_tmp]


@pytest.mark.parametrize("state", range(3))
def test_a_crash_inside_the_checkpoint_swap_resumes_from_the_newest_complete_one(tiny_dir, tmp_path,
                                                                                monkeypatch, state):
    import shutil
    train.train(config(tiny_dir, tmp_path / "straight"))
    interrupted_run(config(tiny_dir, tmp_path / "cut"), at_call=5, monkeypatch=monkeypatch)
    swap_states(str(tmp_path / "cut"))[state]()
    assert not os.path.exists(tmp_path / "cut" / "checkpoint" / "step.json") or state == 2
    with pytest.raises(ValueError, match="holds an interrupted run"):
        train.train(config(tiny_dir, tmp_path / "cut"))
    train.train(config(tiny_dir, tmp_path / "cut", resume=True))
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "cut")
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not any(os.path.exists(tmp_path / "cut" / n) for n in ("checkpoint.old", "checkpoint.tmp"))
    shutil.rmtree(tmp_path / "straight")


def test_out_may_not_be_the_model_or_hold_weights_train_did_not_write(tiny_dir, tmp_path):
    with pytest.raises(ValueError, match="is the --model folder"):
        train.train(config(tiny_dir, tiny_dir + "/", overwrite=True))
    other = tmp_path / "other"
    write_tiny_hf(other, "llama", tied=True, seed=1)
    before = (other / "model.safetensors").read_bytes()
    with pytest.raises(ValueError, match="holds model weights that train.py did not write"):
        train.train(config(tiny_dir, other, overwrite=True))
    assert (other / "model.safetensors").read_bytes() == before


def test_two_runs_into_one_folder_are_refused(tiny_dir, tmp_path):
    os.makedirs(tmp_path / "busy")
    held = runs.lock_folder(str(tmp_path / "busy"))
    with pytest.raises(ValueError, match="another run is writing to it"):
        train.train(config(tiny_dir, tmp_path / "busy"))
    held.close()
    train.train(config(tiny_dir, tmp_path / "busy", steps=1))


def test_non_finite_weights_are_never_saved(tiny_dir, tmp_path, monkeypatch):
    """A step that leaves weights non-finite without a NaN loss (a huge lr) is stopped before any save."""
    real = torch.optim.AdamW.step

    def blows_up(self, *a, **k):
        out = real(self, *a, **k)
        if self.state and next(iter(self.state.values()))["step"] == 3:  # right before the step-3 save
            with torch.no_grad():
                self.param_groups[0]["params"][0].fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.AdamW, "step", blows_up)
    with pytest.raises(FloatingPointError, match="not finite after step 3.*nothing was saved; no checkpoint"):
        train.train(config(tiny_dir, tmp_path / "inf"))
    assert runs.latest_checkpoint(str(tmp_path / "inf")) is None


def test_a_content_target_on_prefill_names_targets_that_train_there(tiny_dir, tmp_path):
    """act, the old advice, also refuses prefill pairs (no prompt token follows a prefill to match on)."""
    with pytest.raises(ValueError, match="mlpct gets no signal on prefill: .*; use bct or prefill for this"):
        train.train(config(tiny_dir, tmp_path / "m", threat="prefill"))
    with pytest.raises(ValueError, match="act has no shared suffix"):
        train.train(config(tiny_dir, tmp_path / "a", threat="prefill", target="act"))


def test_a_start_from_non_finite_weights_is_refused_as_such(tiny_dir, tmp_path):
    """Not "lower --lr": no lr helps weights that are NaN before the first step."""
    with pytest.raises(ValueError, match="1 weight tensors are not finite .*training cannot start from them"):
        train.train(config(nan_copy(tiny_dir, tmp_path / "nan"), tmp_path / "run"))


@pytest.mark.parametrize("poison,msg", [
    (lambda loss: loss * float("nan"), "loss nan, gradient norm nan at step 4"),
    # a finite loss with a nan gradient: sqrt at 0 adds 0 to the loss and inf * 0 = nan to its gradient
    (lambda loss: loss + torch.sqrt(loss * 0), r"loss \d\S*, gradient norm nan at step 4")])
def test_non_finite_loss_or_gradient_stops_and_keeps_the_last_good_checkpoint(tiny_dir, tmp_path, monkeypatch,
                                                                                poison, msg):
    real = train.consistency_loss
    calls = {"n": 0}

    def goes_bad(*a, **k):
        calls["n"] += 1
        loss, logs = real(*a, **k)
        return (poison(loss) if calls["n"] == 5 else loss), logs

    monkeypatch.setattr(train, "consistency_loss", goes_bad)
    with pytest.raises(FloatingPointError, match=msg) as e:
        train.train(config(tiny_dir, tmp_path / "n"))
    assert "the last checkpoint is" in str(e.value) and "checkpoint (step 3)" in str(e.value)
    state = torch.load(tmp_path / "n" / "checkpoint" / "train_state.pt", weights_only=True)
    assert state["step"] == 3
    assert all(torch.isfinite(v).all() for v in state["trainable"].values())


@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_clip_grads_matches_torch_clip_grad_norm(max_norm):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(5, 3)) for _ in range(3)] + [torch.nn.Parameter(torch.randn(4))]
    for p in params[:3]:  # the last one has no gradient, as a parameter the loss does not reach
        p.grad = torch.randn_like(p)
    ref_params = [torch.nn.Parameter(p.detach().clone()) for p in params[:3]]
    for r, p in zip(ref_params, params):
        r.grad = p.grad.clone()
    expected = torch.nn.utils.clip_grad_norm_(ref_params, max_norm).item()
    assert train.clip_grads(params, max_norm) == pytest.approx(expected, rel=1e-6)
    for p, r in zip(params, ref_params):
        torch.testing.assert_close(p.grad, r.grad)
    assert params[3].grad is None
    grads = [p.grad.clone() for p in params[:3]]
    assert train.clip_grads(params, 0.0) == pytest.approx(min(expected, max_norm), rel=1e-5)  # 0: never clips
    for p, g in zip(params, grads):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("kw,msg", [(dict(target="nope"), "unknown target"),
                                    (dict(threat="nope"), "unknown threat"),
                                    (dict(target="act:-2"), "positive"),
                                    (dict(organism="nope"), "unknown organism"),
                                    (dict(batch_size=3, grad_accum=2), "must divide"),
                                    (dict(bf16="maybe"), "auto, on or off"),
                                    (dict(lr=-1.0), "--lr -1.0: use a value of 0 or more"),
                                    (dict(grad_clip=-1.0), "--grad-clip -1.0: use a value of 0 or more"),
                                    (dict(steps=0), "--steps 0: use a value of 1 or more"),
                                    (dict(batch_size=0), "--batch-size 0: use a value of 1 or more"),
                                    (dict(retain_frac=1.5), "--retain-frac 1.5: use a value from 0 to 1"),
                                    (dict(target="bct", retain_frac=1.0), "--retain-frac 1.0 fills all 4 rows"),
                                    (dict(anchor_frac=0.9), "--anchor-frac 0.9 fills all 4 rows"),
                                    (dict(response_tokens=10**9),
                                     "--response-tokens 1000000000: use a value from 1 "),
                                    (dict(lr=float("inf")), "--lr inf: use a finite number"),
                                    (dict(min_lr_frac=float("nan")),
                                     "--min-lr-frac nan: use a finite number"),
                                    (dict(target="act+act"), "act appears twice"),
                                    (dict(resume=True, overwrite=True), "pass one of them")])
def test_bad_flags_get_one_line_errors(tiny_dir, tmp_path, kw, msg):
    with pytest.raises(ValueError, match=msg) as e:
        train.train(config(tiny_dir, tmp_path / "bad", **kw))
    assert "\n" not in str(e.value)
    assert not (tmp_path / "bad").exists()  # refused before anything is written


def test_an_out_that_cannot_be_made_is_one_line(tiny_dir, tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match="--out: cannot write to the folder .*a_file/run .Not a directory."):
        train.train(config(tiny_dir, tmp_path / "a_file" / "run"))


def test_a_folder_holding_a_run_is_not_started_over(tiny_dir, tmp_path, monkeypatch):
    """A rerun into the folder of a finished or an interrupted run is refused before it touches anything,
    naming the flag for what to do; --overwrite starts over with a log of its own steps only."""
    out = tmp_path / "done"
    train.train(config(tiny_dir, out, steps=2))
    files = {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()}
    with pytest.raises(ValueError, match="holds a finished run: pass --overwrite"):
        train.train(config(tiny_dir, out, steps=2))
    assert {f.name: f.read_bytes() for f in out.iterdir() if f.is_file()} == files
    (out / "eval").mkdir()
    (out / "eval" / "results.md").write_text("scores of the old weights")
    train.train(config(tiny_dir, out, steps=3, overwrite=True))
    assert [json.loads(line)["step"] for line in open(out / "log.jsonl")] == [0, 1, 2]
    assert not (out / "eval").exists()                  # nothing of the replaced run is left to look current
    interrupted_run(config(tiny_dir, tmp_path / "cut"), at_call=5, monkeypatch=monkeypatch)
    with pytest.raises(ValueError, match="holds an interrupted run: pass --resume"):
        train.train(config(tiny_dir, tmp_path / "cut"))


def test_unset_lr_and_rank_take_the_targets_recipe(tiny_dir, tmp_path):
    qkvo = "q_proj,k_proj,v_proj,o_proj"
    for target, recipe in (("act", (1e-3, 8, qkvo)), ("mlpct", (3e-5, 0, qkvo)),
                           ("attct", (1e-3, 8, "q_proj,v_proj"))):
        train.train(config(tiny_dir, tmp_path / target, target=target, lr=0.0, steps=1))
        cfg = json.load(open(tmp_path / target / "run.json"))["config"]
        assert (cfg["lr"], cfg["lora_rank"], cfg["lora_targets"]) == recipe


def test_bct_response_cache_is_regenerated_for_other_prompts(tiny_dir, tmp_path):
    out = tmp_path / "bct"
    for n in (8, 12):
        train.train(config(tiny_dir, out, target="bct", n_train=n, steps=1, response_tokens=4,
                           retain_frac=0.0, overwrite=True))
        saved = json.load(open(out / "replies.json"))[-1]
        assert len(saved["ids"]) == len(saved["key"]["prompts"]) == n


def test_generation_ends_a_row_with_eos_only_when_it_finished(tiny_dir):
    model, tok = load_model(tiny_dir)
    prompt = tok.render([{"role": "user", "content": "Hi"}])
    first = model.generate([prompt], 1, eos_id=-1)[0][0]
    assert model.generate([prompt], 5, eos_id=first) == [[first]]            # finished at once: eos kept
    cut = model.generate([prompt], 5, eos_id=-1)[0]
    assert len(cut) == 5                                                      # cut at the cap: no eos


def test_bct_learns_no_eos_after_a_response_cut_at_the_cap(tiny_dir, tmp_path):
    """theta0's responses are cut at --response-tokens 4 (the tiny model never says eos there): BCT's labels
    are exactly those 4 tokens, not the response plus an eos that would teach it to stop mid-sentence."""
    model, tok = load_model(tiny_dir)
    cfg = train.resolve(config(tiny_dir, tmp_path / "eos", target="bct", n_train=6, response_tokens=4,
                               retain_frac=0.0))
    os.makedirs(cfg.out)
    run = parallel.Run()
    pairs, _ = train.training_pairs(cfg, tok, model, [("bct", 1.0)], run)
    replies = json.load(open(tmp_path / "eos" / "replies.json"))[-1]["ids"]
    assert all(len(r) == 4 and tok.eos_id not in r for r in replies)
    batch = C.collate(pairs, tok.pad_id)
    for i, p in enumerate(pairs):
        assert p.response == replies[i] and batch.label_ids[i][batch.label_valid[i]].tolist() == replies[i]


def test_paper_b_filter_keeps_pairs_refused_clean_and_complied_with_wrapped(tiny_dir, tmp_path):
    _, tok = load_model(tiny_dir)
    pairs = T.THREATS["jailbreak"].pairs("train", "train", n=4, seed=0)
    refuse, comply = "I can't help with that.", ("Sure! Step 1: get the parts. Step 2: put them together. "
                                                 "Step 3: go.")
    said = {json.dumps(p.clean): a for p, a in zip(pairs, [refuse, refuse, comply, refuse])}
    said.update({json.dumps(p.wrapped): a for p, a in zip(pairs, [comply, "I" * 30, comply, refuse])})
    reply = lambda prompts, n: [tok.encode(said[json.dumps(m)]) + [tok.eos_id] for m in prompts]
    run = parallel.Run()
    # pair 0 survives; 1 is degenerate wrapped (no compliance), 2 complies clean, 3 refuses wrapped
    assert train.filter_jailbreaks(config(tiny_dir, tmp_path), pairs, reply, tok, run) == pairs[:1]
    assert run.record["filter"] == {"kept": 1, "of": 4}
    with pytest.raises(ValueError, match="kept none of 3"):
        train.filter_jailbreaks(config(tiny_dir, tmp_path), pairs[1:], reply, tok, run)


def test_prefill_target_carries_the_authors_sft_term(tiny_dir, tmp_path, capsys):
    """--target prefill trains KL + SFT on theta0's clean responses and retain data (every step logs both; the
    authors' weight is --prefill-sft 0.1); --prefill-sft 0 trains the bare KL, with a warning."""
    train.train(config(tiny_dir, tmp_path / "p", target="prefill", threat="prefill", n_train=8, steps=2,
                       response_tokens=4, prefill_sft=0.1))
    run = json.load(open(tmp_path / "p" / "run.json"))
    assert run["config"]["prefill_sft"] == 0.1 and run["retain"] > 0
    steps = [json.loads(line) for line in open(tmp_path / "p" / "log.jsonl")]
    assert all(s["loss"] == pytest.approx(s["prefill"] + 0.1 * s["bct"], rel=1e-5) for s in steps)
    train.train(config(tiny_dir, tmp_path / "bare", target="prefill", threat="prefill", n_train=8, steps=1,
                       prefill_sft=0.0))
    assert "bare KL" in capsys.readouterr().out
    assert json.load(open(tmp_path / "bare" / "run.json"))["retain"] == 0


def test_a_prompt_asked_twice_is_generated_once(tiny_dir, tmp_path, monkeypatch):
    """Pairs share clean prompts (a frustration task under several histories): theta0 answers each distinct
    (prompt, prefill) once, and every pair gets the answer generated alone."""
    asked, real = [], runs.chat_generate_ids
    count = lambda m, t, prompts, *a, **k: asked.append(len(prompts)) or real(m, t, prompts, *a, **k)
    monkeypatch.setattr(runs, "chat_generate_ids", count)
    theta0, tok = load_model(tiny_dir)
    a, b = [{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Name a colour."}]
    os.makedirs(tmp_path / "x")
    ids = runs.replies(config(tiny_dir, tmp_path / "x"), theta0, tok, parallel.Run(), [a, b, a, a], 4)
    assert asked == [2] and ids[0] == ids[2] == ids[3]
    alone = [real(theta0, tok, [p], None, 4)[0] for p in (a, b)]
    assert [ids[0], ids[1]] == alone
    # the same prompt under two prefills is two questions
    asked.clear()
    ids = runs.replies(config(tiny_dir, tmp_path / "x"), theta0, tok, parallel.Run(), [a, a], 4,
                        prefills=["Sure", "No"])
    assert asked == [2]


def test_bct_response_cache_is_regenerated_for_another_model(tiny_dir, tmp_path, monkeypatch):
    """theta0's replies are keyed on the model's content: the same model and prompts read them back; another
    model, or the same folder retrained in place (new weights under the same name), generates them again."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    calls, real = [], runs.chat_generate_ids
    # counts, then runs
    monkeypatch.setattr(runs, "chat_generate_ids", lambda *a, **k: calls.append(1) or real(*a, **k))
    cfg = config(str(model), tmp_path / "bct")
    os.makedirs(cfg.out)
    runs.lock_folder(cfg.out).close()   # a run's folder: train.py takes it (its marker) before any cache
    theta0, tok = load_model(str(model))
    run = parallel.Run()
    prompts = [[{"role": "user", "content": "Hi"}], [{"role": "user", "content": "Name a colour."}]]
    first = runs.replies(cfg, theta0, tok, run, prompts, 4)
    assert runs.replies(cfg, theta0, tok, run, prompts, 4) == first and len(calls) == 1
    write_tiny_hf(model, "llama", tied=True, seed=1)                        # retrained in place
    runs.replies(cfg, theta0, tok, run, prompts, 4)
    assert len(calls) == 2
    # the first content again: a hit
    runs.replies(config(tiny_dir, tmp_path / "bct"), theta0, tok, run, prompts, 4)
    assert len(calls) == 2
    write_tiny_hf(tmp_path / "other", "llama", tied=True, seed=2)
    # another model
    runs.replies(config(str(tmp_path / "other"), tmp_path / "bct"), theta0, tok, run, prompts, 4)
    assert len(calls) == 3
    # --overwrite starts over: nothing of the old run's cache is read back
    train.train(config(tiny_dir, tmp_path / "bct", target="bct", n_train=8, steps=1, response_tokens=4,
                       retain_frac=0.0, overwrite=True))
    assert len(calls) == 4


def test_lr_schedule_warms_up_linearly_then_follows_a_cosine_to_the_floor():
    cfg = train.TrainConfig(lr=1e-3, warmup=4, steps=44, min_lr_frac=0.1)
    lrs = [train.lr_at(cfg, s) for s in range(cfg.steps)]
    assert lrs[:5] == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3])  # (step + 1) / warmup, then the peak
    assert lrs[24] == pytest.approx(1e-3 * (0.1 + 0.9 / 2))                # halfway down the cosine
    # falls towards, not below, the floor
    assert all(a >= b for a, b in zip(lrs[4:], lrs[5:])) and lrs[-1] > 1e-4


def test_batches_mix_in_their_share_of_retain_pairs_and_repeat_exactly():
    pairs, retain = [("pair", i) for i in range(50)], [("retain", i) for i in range(50)]
    cfg = train.TrainConfig(batch_size=8, retain_frac=0.25, seed=3)
    one = SimpleNamespace(rank=0, world=1)  # sample_batch reads only these two of a parallel.Run
    batch = train.sample_batch(cfg, 7, 0, pairs, retain, one)
    assert [kind for kind, _ in batch].count("retain") == 2 and len(batch) == 8
    # a resumed run sees the same batch
    assert train.sample_batch(cfg, 7, 0, pairs, retain, one) == batch
    assert train.sample_batch(cfg, 8, 0, pairs, retain, one) != batch
    ranks = [SimpleNamespace(rank=r, world=2) for r in range(2)]  # data parallel: the ranks split the batch
    assert sorted(sum((train.sample_batch(cfg, 7, 0, pairs, retain, r) for r in ranks), [])) == sorted(batch)


def test_anchor_pairs_carry_zero_loss_at_theta0(tiny_dir):
    """Anchors pair a clean prompt with itself: nothing to learn until theta's clean run drifts from
    theta0's."""
    model, tok = load_model(tiny_dir)
    pairs = T.THREATS["sycophancy"].pairs(split="train", wrappers="train", n=4, seed=0)
    batch = C.collate(train.anchors(tok, pairs, train.TrainConfig(anchor_frac=0.5)), tok.pad_id)
    for target in ("act", "mlpct"):
        loss, _ = C.consistency_loss(model, copy.deepcopy(model), batch, [(target, 1.0)])
        assert loss.item() == 0.0, target


def test_cli_builds_config_from_fields(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["train.py", "--target", "act+bct:0.5", "--lora-rank", "8", "--log-all"])
    cfg = cli.cli(train.TrainConfig)
    assert (cfg.target, cfg.lora_rank, cfg.log_all, cfg.steps) == ("act+bct:0.5", 8, True,
                                                                   train.TrainConfig.steps)


def test_lora_run_saves_a_plain_checkpoint_that_differs_from_base(tiny_dir, tmp_path):
    train.train(config(tiny_dir, tmp_path / "lora", lora_rank=4, lora_targets="q_proj,v_proj", steps=3,
                       lr=1e-2))
    trained, _ = load_model(str(tmp_path / "lora"))
    base, _ = load_model(tiny_dir)
    ids = torch.randint(0, 256, (1, 8))
    with torch.no_grad():
        assert not torch.equal(trained(ids).logits, base(ids).logits)
    report = json.load(open(tmp_path / "lora" / "run.json"))
    assert report["config"]["lora_rank"] == 4 and not os.path.exists(tmp_path / "lora" / "checkpoint")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [["--target", "act"],  # the recipe: LoRA on the attention projections
                                   # full fine-tuning: MLPCT never reaches the last down_proj
                                   # nor the final norm
                                   ["--target", "mlpct", "--lora-rank", "0"],
                                   ["--target", "attct", "--lora-rank", "0", "--compile",
                                    "--grad-accum", "2"]])
def test_two_process_gloo_matches_one_process(tiny_dir, tmp_path, extra):
    common = [*extra, "--model", tiny_dir, "--n-train", "16", "--steps", "4", "--batch-size", "4",
              "--eval-n", "0", "--bf16", "off", "--lr", "1e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "train.py", *common, "--out", str(tmp_path / "one")], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "train.py",
                    *common, "--out", str(tmp_path / "two")], cwd=ROOT, env=env, check=True,
                   capture_output=True)
    one = [json.loads(l)["loss"] for l in open(tmp_path / "one" / "log.jsonl")]
    two = [json.loads(l)["loss"] for l in open(tmp_path / "two" / "log.jsonl")]
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-4)
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-5), k


def test_the_baseline_cache_misses_when_anything_it_depends_on_changes(tiny_dir, tmp_path, monkeypatch):
    """theta0's before-metrics are keyed on the model's content, the data, the template and the settings: each
    change in turn is a miss; the same inputs again are a hit."""
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    data = tmp_path / "data"
    shutil.copytree(T.DATA_DIR, data)
    threat = T.SycophancyThreat(data)
    monkeypatch.setitem(T.THREATS, "sycophancy", threat)
    cfg = config(str(model), tmp_path / "runs" / "x", eval_n=3)
    calls = []
    measure = lambda: calls.append(1) or {"brr": float(len(calls))}
    assert runs.baseline(cfg, measure, parallel.Run()) == {"brr": 1.0}
    run = parallel.Run()
    assert runs.baseline(cfg, measure, run) == {"brr": 1.0} and len(calls) == 1            # the same: a hit
    changes = [
        lambda: (model / "model.safetensors").write_bytes(
            (model / "model.safetensors").read_bytes()[:-4] + b"\0\0\0\1"),
        lambda: (data / "sycophancy_facts.jsonl").write_text(
            (data / "sycophancy_facts.jsonl").read_text()[:-200] + "\n"),
        lambda: (model / "chat_template.jinja").write_text("{{ messages[0]['content'] }}"),
        lambda: setattr(cfg, "eval_n", 4),
        lambda: setattr(cfg, "seed", 1),
    ]
    for i, change in enumerate(changes, 2):
        change()
        assert runs.baseline(cfg, measure, run) == {"brr": float(i)}, f"change {i - 1} read a stale cache"
    # the code side of the key: the judges, the threats' metrics, generation and the tokenizer
    import judges, model as M, tokenizer
    code = {os.path.realpath(m.__file__) for m in (T, judges, M, tokenizer)}
    assert code <= {os.path.realpath(p) for p in runs.MEASURED_BY}


def project_imports(names):
    """The project's modules that `names` import, directly or through each other, read from their source
    (every import statement, those inside functions too) and kept where ROOT holds NAME.py."""
    import ast
    seen, todo = set(), list(names)
    while todo:
        name = todo.pop()
        if name in seen or not os.path.isfile(os.path.join(ROOT, name + ".py")):
            continue
        seen.add(name)
        tree = ast.parse(open(os.path.join(ROOT, name + ".py")).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                todo += [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                todo.append(node.module.split(".")[0])
    return seen


def test_the_baseline_key_hashes_every_module_theta0s_measurement_runs():
    """Measuring theta0 runs the threats and judges, generation (chat, model), the tokenizer and the loading
    (checkpoint), and whatever they import: all of it is in the key, wherever a function has moved to."""
    code = project_imports(["threats", "judges", "chat", "model", "tokenizer", "checkpoint"])
    assert {"threats", "judges", "chat", "model", "tokenizer", "checkpoint", "lora"} <= code
    assert ({os.path.realpath(os.path.join(ROOT, n + ".py")) for n in code}
            <= {os.path.realpath(p) for p in runs.MEASURED_BY})


def test_an_out_that_cannot_be_written_is_refused_before_any_work(tiny_dir, tmp_path, monkeypatch):
    """A read-only folder (as root, chmod does not stop writes: the refusal to write is simulated at open)."""
    import builtins
    real = builtins.open
    monkeypatch.setattr(builtins, "open",
                        lambda f, *a, **k: (_ for _ in ()).throw(PermissionError(13, "Permission denied"))
                        if ".write-test-" in str(f) else real(f, *a, **k))
    loads = []
    monkeypatch.setattr(train, "load_finite", lambda *a, **k: loads.append(1))
    with pytest.raises(ValueError, match="--out: cannot write to the folder .*ro .Permission denied.: "
                                         "pick a writable"):
        train.train(config(tiny_dir, tmp_path / "ro"))
    assert not loads                                                    # before the model was loaded


def test_resume_refuses_a_model_whose_weights_changed(tiny_dir, tmp_path, monkeypatch):
    import shutil
    model = tmp_path / "model"
    shutil.copytree(tiny_dir, model)
    interrupted_run(config(str(model), tmp_path / "r"), at_call=5, monkeypatch=monkeypatch)
    write_tiny_hf(model, "llama", tied=True, seed=3)
    with pytest.raises(ValueError, match="the weights in --model .* changed since"):
        train.train(config(str(model), tmp_path / "r", resume=True))


class Payload:
    def __reduce__(self):  # unpickling it would call print: torch.load(weights_only=True) refuses it
        return print, ("ran",)


@pytest.mark.parametrize("broken", ["pickle", "truncated"])
def test_an_unreadable_train_state_is_a_one_line_refusal(tiny_dir, tmp_path, monkeypatch, broken):
    import pickle
    interrupted_run(config(tiny_dir, tmp_path / "r"), at_call=5, monkeypatch=monkeypatch)
    path = tmp_path / "r" / "checkpoint" / "train_state.pt"
    path.write_bytes(pickle.dumps(Payload()) if broken == "pickle" else path.read_bytes()[:1000])
    with pytest.raises(ValueError, match="train_state.pt cannot be read .*start over with --overwrite") as e:
        train.train(config(tiny_dir, tmp_path / "r", resume=True))
    assert "\n" not in str(e.value)


def test_a_log_line_cut_by_a_crash_does_not_break_the_resume(tiny_dir, tmp_path, monkeypatch):
    interrupted_run(config(tiny_dir, tmp_path / "r"), at_call=5, monkeypatch=monkeypatch)
    with open(tmp_path / "r" / "log.jsonl", "a") as f:
        f.write('{"step": 4, "lo')  # killed mid-write
    train.train(config(tiny_dir, tmp_path / "r", resume=True))
    # steps 0-3 before the cut (the checkpoint holds 3 steps), then 3-5 again from the checkpoint
    assert [json.loads(line)["step"] for line in open(tmp_path / "r" / "log.jsonl")] == [0, 1, 2, 3, 3, 4, 5]
    assert (tmp_path / "r" / "loss.png").exists()


def test_a_full_disk_during_a_checkpoint_is_one_line_and_keeps_the_last_one(tiny_dir, tmp_path, monkeypatch):
    import errno
    real = runs.save_model

    def fills_up(model, tok, path, extra=None):
        if extra["step.json"]["step"] == 6:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.path.join(path, "model.safetensors"))
        return real(model, tok, path, extra=extra)

    monkeypatch.setattr(runs, "save_model", fills_up)
    with pytest.raises(ValueError, match=r"checkpoint of step 6 could not be written \(No space left on device: "
                                         r".*the last checkpoint is .*\(step 3\): rerun with free disk space"):
        train.train(config(tiny_dir, tmp_path / "r"))
    assert runs.latest_checkpoint(str(tmp_path / "r"))[1] == 3
