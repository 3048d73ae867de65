"""The folders train.py and eval.py write into: never one holding files they did not write, never over the
model a run trains from, --overwrite removing only what the tool wrote, caches inside --out, every file
through a temporary name and a rename, and one writer per folder."""

import builtins
import os
import shutil

import pytest

import checkpoint
import parallel
import runs as run_folder
import train
from test_eval import SMALL, run_cli, runs  # noqa: F401 (runs: the tiny checkpoints' fixture)
from test_train import config, tiny_dir  # noqa: F401 (tiny_dir: the tiny model's fixture)

EVAL = ["--threats", "sycophancy", "--no-mechanism", *SMALL[:-2]]


def files(folder):
    return {p: open(os.path.join(folder, p), "rb").read() for p in os.listdir(folder)
            if os.path.isfile(os.path.join(folder, p))}


def test_train_refuses_a_folder_of_files_it_did_not_write(tiny_dir, tmp_path, monkeypatch):
    """`--out .` in a project folder: its config.json, results.md and log.jsonl are never written over, with
    or without --overwrite, and nothing is loaded first; a folder of other files takes --overwrite, which
    later clears the run's own files and none of the user's."""
    mine = tmp_path / "mine"
    mine.mkdir()
    for name in ("config.json", "results.md", "log.jsonl"):
        (mine / name).write_text(f"the user's {name}")
    before = files(mine)
    monkeypatch.chdir(mine)
    loads = []
    real = train.load_finite
    monkeypatch.setattr(train, "load_finite", lambda *a, **k: loads.append(1) or real(*a, **k))
    for overwrite in (False, True):
        with pytest.raises(ValueError, match="holds config.json, log.jsonl, results.md that train.py did not "
                                             "write: pick another --out") as e:
            train.train(config(tiny_dir, ".", overwrite=overwrite))
        assert "\n" not in str(e.value)
    assert files(mine) == before and not loads
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="holds files that train.py did not write .notes.txt.: pick a new or "
                                         "empty --out, or pass --overwrite"):
        train.train(config(tiny_dir, notes, steps=1))
    train.train(config(tiny_dir, notes, steps=1, overwrite=True))
    assert (notes / ".written-by").read_text() == "train.py\n" and (notes / "model.safetensors").exists()
    train.train(config(tiny_dir, notes, steps=1, overwrite=True))    # its own folder now: started over
    assert (notes / "notes.txt").read_text() == "mine"


def test_a_model_inside_out_or_an_out_inside_a_checkpoint_is_refused_before_loading(tiny_dir, tmp_path,
                                                                                     monkeypatch):
    run = tmp_path / "x"
    shutil.copytree(tiny_dir, run / "checkpoint")
    (run / ".written-by").write_text("train.py\n")
    kept = files(run / "checkpoint")
    monkeypatch.setattr(train, "load_finite", lambda *a, **k: pytest.fail("loaded"))
    with pytest.raises(ValueError, match="--model .*checkpoint lies inside --out .*x, whose checkpoint swap"):
        train.train(config(str(run / "checkpoint"), run, overwrite=True))
    with pytest.raises(ValueError, match="lies inside a training checkpoint folder"):
        train.train(config(tiny_dir, run / "checkpoint" / "sub"))
    assert files(run / "checkpoint") == kept and not (run / "checkpoint" / "sub").exists()


def test_the_baseline_cache_lives_inside_out_and_outlasts_overwrite(tiny_dir, tmp_path):
    cfg = config(tiny_dir, tmp_path / "runs" / "x")
    assert run_folder.baseline(cfg, lambda: {"brr": 0.5}, parallel.Run()) == {"brr": 0.5}
    assert os.listdir(tmp_path / "runs") == ["x"]                       # nothing beside the run folder
    assert len(os.listdir(tmp_path / "runs" / "x" / ".baselines")) == 1
    run_folder.clear_out(cfg.out)
    assert run_folder.baseline(cfg, lambda: pytest.fail("measured again"), parallel.Run()) == {"brr": 0.5}


def test_an_eval_folder_from_before_the_marker_is_eval_s_own(runs, tmp_path, monkeypatch):
    """An evaluation written before folders carried a marker (its kept answers, no .written-by) is eval.py's:
    a rerun into it is taken, as it was, and reads its answers back."""
    ckpt = runs / "act-sycophancy"
    old = tmp_path / "old-eval"
    run_cli(monkeypatch, "--ckpt", ckpt, *EVAL, "--out", old)
    (old / ".written-by").unlink()
    (old / ".lock").unlink()
    run_cli(monkeypatch, "--ckpt", ckpt, *EVAL, "--out", old)
    assert (old / ".written-by").read_text() == "eval.py\n"


def test_eval_refuses_a_train_runs_folder_and_a_users(runs, tmp_path, monkeypatch):
    """eval.py --out at a train.py run (its results.md beside the weights) or a user's folder writes nothing;
    --overwrite in a folder eval.py wrote removes its outputs and nothing else."""
    ckpt = runs / "act-sycophancy"
    run = tmp_path / "run"
    run.mkdir()
    (run / ".written-by").write_text("train.py\n")
    (run / "results.md").write_text("the training table")
    for folder in (runs / "bct-prefill", run):   # a run from before the marker (its run.json), and one after
        before = files(folder)
        with pytest.raises(SystemExit) as e:
            run_cli(monkeypatch, "--ckpt", ckpt, *EVAL, "--out", folder, "--overwrite")
        assert "holds the output of train.py, which eval.py would write over" in str(e.value.code)
        assert "\n" not in str(e.value.code) and files(folder) == before
    user = tmp_path / "user"
    user.mkdir()
    (user / "results.md").write_text("my notes")
    with pytest.raises(SystemExit, match="holds results.md that eval.py did not write"):
        run_cli(monkeypatch, "--ckpt", ckpt, *EVAL, "--out", user, "--overwrite")
    (user / "results.md").rename(user / "notes.md")
    with pytest.raises(SystemExit, match=r"holds files that eval.py did not write \(notes.md\)"):
        run_cli(monkeypatch, "--ckpt", ckpt, *EVAL, "--out", user)
    run_cli(monkeypatch, "--ckpt", ckpt, *EVAL, "--out", user, "--overwrite")
    (user / "answers" / "stale.jsonl").write_text("answers of an earlier evaluation")
    run_cli(monkeypatch, "--ckpt", ckpt, *EVAL, "--out", user, "--overwrite")
    assert not (user / "answers" / "stale.jsonl").exists() and (user / "notes.md").read_text() == "my notes"
    assert (user / "results.json").exists() and (user / ".written-by").read_text() == "eval.py\n"
    with pytest.raises(ValueError, match="holds the output of eval.py, which train.py would write over"):
        train.train(config(str(runs / "base"), user))


def test_a_second_writer_of_an_eval_folder_is_refused(runs, tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    held = run_folder.lock_folder(str(tmp_path / "out"), "eval.py")
    with pytest.raises(SystemExit) as e:
        run_cli(monkeypatch, "--ckpt", runs / "act-sycophancy", *EVAL, "--out", tmp_path / "out")
    assert "another run is writing to it" in str(e.value.code) and "\n" not in str(e.value.code)
    assert not (tmp_path / "out" / "results.json").exists()
    held.close()


def test_every_result_file_is_written_through_a_rename(runs, tiny_dir, tmp_path, monkeypatch):
    """No result file is ever opened for writing under its own name, where a crash would leave it cut."""
    written = []
    real = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, mode="r", *a, **k: (
        written.append(str(f)) if set(mode) & set("wax") else None) or real(f, mode, *a, **k))
    train.train(config(tiny_dir, tmp_path / "t", steps=1))
    run_cli(monkeypatch, "--ckpt", runs / "act-sycophancy", *EVAL, "--out", tmp_path / "e")
    for f in ("t/train_config.json", "t/results.md", "t/run.json", "t/loss.png", "e/results.json",
              "e/results.md", "e/bars.png", "e/records/base/sycophancy.jsonl"):
        assert (tmp_path / f).exists(), f
    # under a name of its own (.tmp, or in a .tmp folder renamed whole), never a result's
    assert not [f for f in written
                if ".tmp" not in f and (f.endswith((".json", ".md", ".png")) or "records" in f)]


def test_two_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    path = str(tmp_path / "results.json")

    def outer(tmp):
        with open(tmp, "w") as f:
            f.write("this writer's")
        checkpoint.write_text(path, "the other writer's")   # starts and ends before this one renames
    checkpoint.write_atomic(path, outer)
    assert open(path).read() == "this writer's" and os.listdir(tmp_path) == ["results.json"]
