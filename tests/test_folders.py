"""The folders train.py and eval.py write into: every file through a temporary name and a rename."""

import builtins
import os

import checkpoint
import train
from test_eval import SMALL, run_cli, runs  # noqa: F401 (runs: the tiny checkpoints' fixture)
from test_train import config, tiny_dir  # noqa: F401 (tiny_dir: the tiny model's fixture)

EVAL = ["--threats", "sycophancy", "--no-mechanism", *SMALL[:-2]]


def test_every_result_file_is_written_through_a_rename(runs, tiny_dir, tmp_path, monkeypatch):
    """No result file is ever opened for writing under its own name, where a crash would leave it cut."""
    written = []
    real = builtins.open
    monkeypatch.setattr(builtins, "open", lambda f, mode="r", *a, **k: (
        written.append(str(f)) if set(mode) & set("wax") else None) or real(f, mode, *a, **k))
    train.train(config(tiny_dir, tmp_path / "t", steps=1))
    run_cli(monkeypatch, "--ckpt", runs / "act-sycophancy", *EVAL, "--out", tmp_path / "e")
    for f in ("t/train_config.json", "t/results.md", "t/run.json", "e/results.json", "e/results.md",
              "e/records/base/sycophancy.jsonl"):
        assert (tmp_path / f).exists(), f
    # under a name of its own (.tmp, or in a .tmp folder renamed whole), never a result's
    assert not [f for f in written if ".tmp" not in f and (f.endswith((".json", ".md")) or "records" in f)]


def test_two_writers_of_one_file_never_share_a_temporary_name(tmp_path):
    path = str(tmp_path / "results.json")

    def outer(tmp):
        with open(tmp, "w") as f:
            f.write("this writer's")
        checkpoint.write_text(path, "the other writer's")   # starts and ends before this one renames
    checkpoint.write_atomic(path, outer)
    assert open(path).read() == "this writer's" and os.listdir(tmp_path) == ["results.json"]
