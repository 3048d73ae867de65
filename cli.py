"""
What train.py, eval.py and bench.py share around their work: a command line generated from the script's
config dataclass, one-line errors for flags out of range, the output folder made before any work and never
one that holds others' files (take_folder, clear_folder), figures drawn to files, and whether the hardware
computes in bf16 natively.
"""

import argparse
import dataclasses
import glob
import json
import fnmatch
import math
import os
import shutil
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


MARKER = ".written-by"   # names the tool that took the folder (runs.lock_folder writes it)
TAKING = (".lock", ".write-test-*", MARKER + "*")   # what taking a folder puts there


def owner(path):
    """The tool that wrote the folder path: its marker's name or, for a folder from before the marker,
    train.py where its run.json or train_config.json is, eval.py where its kept answers are (each file opens
    with eval's header line, naming the answers' format); None for a folder no tool took."""
    try:
        return open(os.path.join(path, MARKER), encoding="utf-8").read().strip()
    except (OSError, UnicodeDecodeError):
        if any(os.path.exists(os.path.join(path, f)) for f in ("run.json", "train_config.json")):
            return "train.py"
        for kept in glob.glob(os.path.join(path, "answers", "*.jsonl")):
            try:
                if json.loads(open(kept, encoding="utf-8").readline()).get("format") == "ids":
                    return "eval.py"
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                continue
        return None


def take_folder(path, tool, writes, overwrite, flag="--out"):
    """Refuse, before any work, an output folder that holds files `tool` did not write: a new or empty folder,
    or one the tool wrote itself, is taken; one another tool wrote never is (each would write over the
    other's results.md); one with a user's files only with --overwrite, and never where any of them bears a
    name the tool writes (writes: names and fnmatch patterns), so nothing of theirs is replaced or cleared."""
    if not os.path.isdir(path):
        return
    by = owner(path)
    if by == tool:
        return
    if by:
        raise ValueError(f"{flag} {path} holds the output of {by}, which {tool} would write over: "
                         f"pick another {flag}")
    # the lock, make_folder's probe and the marker on its way: another process of this run (a rank) may be
    # taking the folder now
    found = sorted(n for n in os.listdir(path) if not any(fnmatch.fnmatch(n, p) for p in TAKING))
    if not found:
        return
    clash = [n for n in found if any(fnmatch.fnmatch(n, w) for w in writes)]
    if clash:
        what = "model weights" if "model.safetensors" in clash else ", ".join(clash[:4])
        raise ValueError(f"{flag} {path} holds {what} that {tool} did not write: pick another {flag}")
    if not overwrite:
        raise ValueError(f"{flag} {path} holds files that {tool} did not write ({', '.join(found[:4])}"
                         f"{', ...' if len(found) > 4 else ''}): pick a new or empty {flag}, or pass "
                         f"--overwrite to write beside them")


def clear_folder(path, writes):
    """--overwrite: remove what the tool wrote there before (writes: names and fnmatch patterns), so nothing
    of an earlier run is read back or left to look current; every other file stays."""
    for name in os.listdir(path) if os.path.isdir(path) else ():
        if any(fnmatch.fnmatch(name, w) for w in writes):
            if os.path.isdir(os.path.join(path, name)):
                shutil.rmtree(os.path.join(path, name))
            else:
                os.remove(os.path.join(path, name))


def pyplot():
    """matplotlib's pyplot drawing to files (no display needed)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def save_figure(fig, path):
    """fig as a PNG at path, through a temporary file and a rename (a crash leaves no cut image), closed."""
    from checkpoint import write_atomic   # imported here, as torch is in native_bf16: cli loads light
    write_atomic(path, lambda f: fig.savefig(f, format="png", dpi=110))
    pyplot().close(fig)


def native_bf16(device) -> bool:
    """Whether bf16 matmuls run natively on `device` (a torch.device): CPUs without them emulate bf16, slower
    than fp32."""
    import torch
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    return os.path.exists("/proc/cpuinfo") and "avx512_bf16" in open("/proc/cpuinfo").read()
