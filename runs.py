"""
train.py's run folders, as train.py writes them and eval.py reads them.

    CHECKPOINTS   the folders a checkpoint swap goes through (nothing else may be written inside them)
    ancestry      read_run (a folder's run.json), base_path (the model a run trained from), organisms (the
                  model organisms a model descends from) and supported (the threats a base model can be
                  evaluated on)
"""

import json
import os

from checkpoint import EMBEDDED
from threats import THREATS

CHECKPOINTS = ("checkpoint", "checkpoint.old", "checkpoint.tmp")   # the names a checkpoint swap goes through

# ----------------------------------------------------------------------------- ancestry


def read_run(path):
    """run.json of a train.py run folder, or None when there is none."""
    f = os.path.join(path, "run.json")
    if not os.path.exists(f):
        return None
    try:
        run = json.load(open(f, encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{f} is not valid JSON ({e.msg}): the run did not finish writing it; "
                         f"rerun training") from None
    except (OSError, UnicodeDecodeError) as e:
        raise ValueError(f"{f} cannot be read ({getattr(e, 'strerror', None) or e}): fix its permissions or "
                         f"rerun training") from None
    if not isinstance(run, dict) or not isinstance(run.get("config", {}), dict):
        raise ValueError(f"{f} is not a train.py run.json (no config object): pass a train.py run folder")
    return run


def base_path(model, ckpt):
    """A run.json "model" as a usable name: relative folders are looked up from the working directory, then
    from each folder above the checkpoint (train.py records the path it was given)."""
    if model == EMBEDDED or os.path.isdir(model) or os.path.isabs(model):
        return model
    here = os.path.dirname(os.path.abspath(ckpt))
    while True:
        if os.path.isdir(os.path.join(here, model)):
            return os.path.join(here, model)
        if os.path.dirname(here) == here:
            return model
        here = os.path.dirname(here)


def organisms(model):
    """The organisms in a model's ancestry (run.json config "organism", following config "model") and the
    root."""
    found, seen = set(), set()
    while os.path.isdir(model) and os.path.realpath(model) not in seen and (run := read_run(model)):
        seen.add(os.path.realpath(model))
        found.add(run["config"].get("organism") or "")
        model = base_path(run["config"].get("model", ""), model)
    return found - {""}, model


def supported(base):
    """Threats whose clean behaviour (or pathology) the base has. The embedded model never refuses a harmful
    request, so jailbreak and prefill (which measure how often a refusal breaks) need the refusal organism;
    it never shows distress under rejections, so frustration needs the frustrated organism; conditional
    misalignment needs the inoculated one (risky answers trained under an inoculation prompt). A model from
    the hub is taken to refuse and to show distress on its own."""
    found, root = organisms(base)
    refuses = "refusal" in found or root != EMBEDDED
    distressed = "frustrated" in found or root != EMBEDDED
    return [t for t in THREATS if (t not in ("jailbreak", "prefill") or refuses)
            and (t != "frustration" or distressed) and (t != "conditional" or "inoculated" in found)]
