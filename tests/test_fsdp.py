"""train.py --fsdp (FSDP2, fsdp.py) on two gloo processes against one process with the same global batch:
every target with full fine-tuning (tied embeddings) and with LoRA (untied, a rank that shards unevenly), the
before/after measurement, and an interrupted sharded run resumed from its sharded checkpoint. One torchrun
launch runs every multi-process case (this file is its script), as process startup costs more than the runs.
BCT's batches hold 2 retain rows, one for each process (train.resolve refuses a share that is uneven)."""

import gc
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import fsdp
import runs as R
import threats as T
import train
from conftest import dies_at, write_tiny_hf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TARGETS = ("bct", "act", "mlpct", "attct")
ALL_PROJ = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


def cases(tied, untied):
    """name -> TrainConfig fields; the sharded run adds fsdp=True."""
    common = dict(n_train=16, steps=2, batch_size=4, save_every=2, eval_n=0, bf16="off", lr=1e-3, warmup=0,
                  response_tokens=8)
    out = {f"{t}-full": dict(common, target=t, model=tied, lora_rank=0) for t in TARGETS}
    out |= {f"{t}-lora": dict(common, target=t, model=untied, lora_rank=3, lora_targets=ALL_PROJ, lr=1e-2)
            for t in TARGETS}
    for mode in ("full", "lora"):
        out[f"bct-{mode}"]["retain_frac"] = 0.5
    out["bct-full"]["eval_n"] = 1  # theta0's and the trained model's generations, measured on every rank
    return out


def quick():
    """Each side of the comparison alike: no loss.png (most of a tiny run's time; tested in test_train), and
    8-token answers in the measurement."""
    R.plot_log = lambda out: None
    T.THREATS["sycophancy"].max_new_tokens = 8


def interrupted(cfg, at_call):
    """train(cfg) stopped at its `at_call`-th loss evaluation, as Ctrl-C would stop it (on every rank)."""
    real = train.consistency_loss
    train.consistency_loss = dies_at(at_call)
    try:
        train.train(cfg)
    except KeyboardInterrupt:
        pass
    train.consistency_loss = real
    gc.collect()  # the interrupted run's frames hold its folder lock


def sharded_runs(spec):
    """Under torchrun: every case of spec, sharded, in one process group (train() keeps a group it did not
    start), then the resume case: mlpct-full cut at step 1 (a checkpoint at step 1) and resumed."""
    import torch.distributed as dist
    quick()
    dist.init_process_group("gloo")
    for name, kw in spec["cases"].items():
        train.train(train.TrainConfig(**kw, fsdp=True, out=os.path.join(spec["out"], "two", name)))
    resume = dict(spec["cases"]["mlpct-full"], fsdp=True, save_every=1,
                  out=os.path.join(spec["out"], "two", "resumed"))
    interrupted(train.TrainConfig(**resume), at_call=2)
    train.train(train.TrainConfig(**resume, resume=True))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The folder holding the runs (one/, two/: sharded) and the untrained weights by model."""
    tmp = tmp_path_factory.mktemp("fsdp")
    tied, untied = str(tmp / "tied"), str(tmp / "untied")
    write_tiny_hf(tied, "llama", tied=True)
    write_tiny_hf(untied, "qwen2", tied=False, seed=1)
    spec = {"cases": cases(tied, untied), "out": str(tmp)}
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": ROOT}  # this file runs as torchrun's script
    with open(tmp / "torchrun.log", "w") as log_file:
        launch = subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2",
                                   __file__, json.dumps(spec)], cwd=ROOT, env=env, stdout=log_file,
                                  stderr=subprocess.STDOUT)
        # meanwhile, on the core its two processes leave idle while they wait on each other
        real = R.plot_log, T.THREATS["sycophancy"].max_new_tokens
        quick()
        for name, kw in spec["cases"].items():  # separate folders: the sharded runs measure, not read a cache
            train.train(train.TrainConfig(**kw, out=str(tmp / "one" / name)))
        R.plot_log, T.THREATS["sycophancy"].max_new_tokens = real
        launch.wait(timeout=600)
    assert launch.returncode == 0, open(tmp / "torchrun.log").read()[-5000:]
    return tmp, {"tied": load_file(os.path.join(tied, "model.safetensors")),
                 "untied": load_file(os.path.join(untied, "model.safetensors"))}


def log(folder):
    return [json.loads(line) for line in open(folder / "log.jsonl")]


@pytest.mark.slow
@pytest.mark.parametrize("case", list(cases("", "")))
def test_sharded_run_matches_one_process(runs, case):
    tmp, base = runs
    one, two = tmp / "one" / case, tmp / "two" / case
    base = base["tied" if case.endswith("full") else "untied"]
    a, b = load_file(one / "model.safetensors"), load_file(two / "model.safetensors")
    assert a.keys() == b.keys() == base.keys()
    assert [r["loss"] for r in log(one)] == pytest.approx([r["loss"] for r in log(two)], rel=1e-4)
    # the reduction order differs between one and two processes, and Adam's step is g / sqrt(v): where two
    # ranks' gradients nearly cancel, that rounding moves a weight by a few percent of one step (seen: 3e-5 at
    # lr 1e-3), against the whole lr per step that a wrong gradient, a lost update or a wrong shard moves it
    far = {k: (a[k] - b[k]).abs().max().item() for k in a
           if not torch.allclose(a[k], b[k], rtol=1e-4, atol=5e-5)}
    assert not far, far
    assert max((a[k] - base[k]).abs().max().item() for k in a) > 1e-3  # the weights compared are trained
    one_report, two_report = (json.load(open(d / "run.json")) for d in (one, two))
    assert one_report["before"] == two_report["before"] and one_report["after"] == two_report["after"]
    assert not os.path.exists(two / "checkpoint")  # removed once the run finished


@pytest.mark.slow
def test_sharded_run_resumes_exactly(runs):
    """The sharded checkpoint (each rank's shards of the weights and AdamW's state) carries the run on as if
    it had never stopped: the same losses, the same final weights, bit for bit."""
    two = runs[0] / "two"
    straight = {r["step"]: r["loss"] for r in log(two / "mlpct-full")}
    resumed = [(r["step"], r["loss"]) for r in log(two / "resumed")]
    assert [s for s, _ in resumed] == [0, 1]
    assert resumed == [(s, straight[s]) for s, _ in resumed]
    a, b = (load_file(two / name / "model.safetensors") for name in ("mlpct-full", "resumed"))
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_fsdp_needs_torchrun_and_refuses_compile(tmp_path):
    with pytest.raises(ValueError, match="--fsdp shards the model over torchrun's processes: launch with"):
        train.train(train.TrainConfig(fsdp=True, out=str(tmp_path / "x"), eval_n=0))
    with pytest.raises(ValueError, match="--compile with --fsdp: .*drop --compile"):
        train.resolve(train.TrainConfig(fsdp=True, compile=True))
    with pytest.raises(ValueError, match="holds 1 retain or anchor rows, which 2 processes cannot share"):
        train.resolve(train.TrainConfig(target="bct", batch_size=4, retain_frac=0.25), world=2)


if __name__ == "__main__":
    sharded_runs(json.loads(sys.argv[1]))


def test_own_range_splits_rows_as_torch_chunk_does():
    for n in (1, 2, 5, 7, 258):
        for world in (1, 2, 3, 4, 8):
            chunks = torch.arange(n).chunk(world)
            for rank in range(world):
                start, stop = fsdp.own_range(n, rank, world)
                expected = chunks[rank].tolist() if rank < len(chunks) else []
                assert list(range(start, stop)) == expected, (n, world, rank)
