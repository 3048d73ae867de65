"""
What train.py, eval.py and bench.py share around their work: a command line generated from the script's
config dataclass, one-line errors for flags out of range, the output folder made before any work, figures
drawn to files, and whether the hardware computes in bf16 natively.
"""

import argparse
import dataclasses
import math
import os
import sys


def cli(cls):
    """argparse flags from a dataclass's fields: --field-name value, typed by the field's default."""
    p = argparse.ArgumentParser(description=sys.modules[cls.__module__].__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    for f in dataclasses.fields(cls):
        flag = "--" + f.name.replace("_", "-")
        if f.type in (bool, "bool"):
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=f.default)
        else:
            p.add_argument(flag, type=type(f.default), default=f.default)
    return cls(**vars(p.parse_args()))


# upper bounds of the length flags, so that a typo stops at once and not after the model loads or an hour in:
# new tokens up to the longest max_position_embeddings of the families model.py loads (Llama 3.1, Gemma 3;
# the model's own limit is then enforced by its forward), conversation turns up to a fixed cap far past any
# paper's (20) that a rollout of a few tokens a turn still fits in such a context
MAX_TOKENS, MAX_TURNS = 131_072, 1_000


def check_ranges(cfg, ranges):
    """A one-line error naming the first numeric flag outside its range;
    ranges: {field: (lowest, highest)}."""
    for name, (lo, hi) in ranges.items():
        value = getattr(cfg, name)
        if not math.isfinite(value):
            raise ValueError(f"--{name.replace('_', '-')} {value}: use a finite number")
        if value < lo or (hi is not None and value > hi):
            allowed = f"from {lo} to {hi}" if hi is not None else f"of {lo} or more"
            raise ValueError(f"--{name.replace('_', '-')} {value}: use a value {allowed}")


def make_folder(path, flag="--out"):
    """Make an output folder before any work, or stop with one line: a path that cannot be written found only
    at the end would lose the run."""
    try:
        os.makedirs(path, exist_ok=True)
        probe = os.path.join(path, f".write-test-{os.getpid()}")
        open(probe, "w").close()
        os.remove(probe)
    except OSError as e:
        raise ValueError(f"{flag}: cannot write to the folder {path} ({e.strerror}): "
                         f"pick a writable path") from None


def pyplot():
    """matplotlib's pyplot drawing to files (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def native_bf16(device) -> bool:
    """Whether bf16 matmuls run natively on `device` (a torch.device): CPUs without them emulate bf16, slower
    than fp32."""
    import torch
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return os.path.exists("/proc/cpuinfo") and "avx512_bf16" in open("/proc/cpuinfo").read()
