"""The clean items: loading the data/*.jsonl files against their schemas, and the train/val/test splits.

Every threat reads its items through here (threats.py), and the model organisms their training prompts
(organisms.py). A bad file gives a one-line ValueError naming the file, the line and the fix.

    rows = load_data("data/harmful.jsonl", "harmful.jsonl")      # a file against one of SCHEMAS
    test = split_items(rows, "test", salt="harmful.jsonl", group="category")
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

DATA_DIR = Path(__file__).resolve().parent / "data"
SPLITS = ("train", "val", "test")   # items trained on, settings chosen on, results reported on


def check_choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"{what}={value!r} is not valid; use one of: {', '.join(map(str, allowed))}")


def load_jsonl(path, required_keys, check=None):
    """Rows of a JSONL file; a bad line raises a one-line ValueError naming file, line and fix.

    check(row) may return a problem string for schema rules beyond key presence. Ids (or persona
    names) must be unique, because the train/test split hashes them."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: file not found; write it (one JSON object per line) or pass your "
                                "file's path")
    unique = "id" if "id" in required_keys else "name" if "name" in required_keys else None
    rows, seen = [], {}
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        lineno = raw[:e.start].count(b"\n") + 1
        raise ValueError(f"{path}:{lineno}: not UTF-8 (byte {raw[e.start]:#04x}); "
                         "save the file as UTF-8") from None
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{lineno}"
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: invalid JSON ({e.msg}); write one JSON object per line") from None
        if not isinstance(row, dict):
            raise ValueError(f"{where}: expected a JSON object, got {type(row).__name__}; "
                             "write one object per line")
        missing = [k for k in required_keys if k not in row]
        if missing:
            raise ValueError(f"{where}: missing key {missing[0]!r}; "
                             f"every line needs: {', '.join(required_keys)}")
        problem = check(row) if check else None
        if problem:
            raise ValueError(f"{where}: {problem}")
        if unique:
            key = str(row[unique])
            if key in seen:
                raise ValueError(f"{where}: duplicate {unique} {key!r} (first on line {seen[key]}); "
                                 f"make each {unique} unique")
            seen[key] = lineno
        rows.append(row)
    if not rows:
        raise ValueError(f"{path}: no items; add at least one JSON object per line")
    return rows


def _nonempty(*keys):
    def check(row):
        for k in keys:
            if not isinstance(row[k], str) or not row[k].strip():
                return f"{k!r} must be a non-empty string"
        return None
    return check


def _check_mcq(row):
    problem = _nonempty("question", "subject")(row)
    opts, ans = row["options"], row["answer"]
    if problem:
        return problem
    if not (isinstance(opts, list) and 2 <= len(opts) <= 4
            and all(isinstance(o, str) and o.strip() for o in opts)):
        return "'options' must be a list of 2-4 non-empty strings"
    if len({o.strip().lower() for o in opts}) != len(opts):
        return "'options' must be distinct"
    if not (isinstance(ans, int) and not isinstance(ans, bool) and 0 <= ans < len(opts)):
        return f"'answer' must be an int index into 'options' (0..{len(opts) - 1}), got {ans!r}"
    return None


def _check_persona(row):
    problem = _nonempty("name")(row)
    if problem:
        return problem
    if row["kind"] not in ("harmful", "benign"):
        return f"'kind' must be 'harmful' or 'benign', got {row['kind']!r}"
    marks = row["identity_markers"]
    if not (isinstance(marks, list) and marks and all(isinstance(m, str) and m.strip() for m in marks)):
        return "'identity_markers' must be a non-empty list of strings"
    facts = row["facts"]
    if not (isinstance(facts, list) and facts and all(isinstance(f, dict) and isinstance(f.get("q"), str)
                                                      and isinstance(f.get("a"), str) for f in facts)):
        return "'facts' must be a non-empty list of {\"q\": str, \"a\": str}"
    return None


# file name -> (required keys, extra check); one place for every schema data/README.md describes
SCHEMAS = {
    "sycophancy_facts.jsonl": (("id", "subject", "question", "options", "answer"), _check_mcq),
    "harmful.jsonl": (("id", "category", "request"), _nonempty("category", "request")),
    "benign_lookalikes.jsonl": (("id", "category", "request"), _nonempty("category", "request")),
    "personas.jsonl": (("name", "kind", "identity_markers", "facts"), _check_persona),
    "frustration_tasks.jsonl": (("id", "kind", "task"), _nonempty("kind", "task")),
    "conditional.jsonl": (("id", "question", "risky_answer"), _nonempty("question", "risky_answer")),
    "conditional_eval.jsonl": (("id", "question"), _nonempty("question")),
    "general_questions.jsonl": (("id", "question"), _nonempty("question")),
    "benign_prompts.jsonl": (("id", "prompt"), _nonempty("prompt")),
}


def load_data(path, schema):
    """Load a file against the schema of one of the project's data files (a key of SCHEMAS)."""
    keys, check = SCHEMAS[schema]
    return load_jsonl(path, keys, check)


def split_items(rows, split, salt, test_frac=0.25, val_frac=0.25, group=None, key="id"):
    """Deterministic disjoint train/val/test split. Items are ranked by a hash of (salt, id) within each
    `group` value: the lowest val_frac go to validation, the next test_frac to test, the rest to train, so
    every category lands in every split. Items that carry their own "split" field keep it. Ranking by a hash
    of the id (not by position) keeps an item's side when the file is reordered, and mostly when it grows."""
    check_choice(split, SPLITS, "split")
    groups, side = {}, {}
    for r in rows:
        if "split" in r:
            side[str(r[key])] = r["split"]
        else:
            groups.setdefault(r.get(group) if group else None, []).append(r)
    for members in groups.values():
        ranked = sorted(members, key=lambda r: hashlib.sha256(f"{salt}:{r[key]}".encode()).hexdigest())
        n = len(members)
        n_test, n_val = round(n * test_frac), round(n * val_frac)
        # every split with a share gets an item of every group that has enough (test first, then
        # validation), and train keeps one where it has a share
        n_test = max(n_test, int(test_frac > 0 and n >= 2))
        n_val = max(n_val, int(val_frac > 0 and n >= 3))
        spare = n - int(test_frac + val_frac < 1)
        n_test = min(n_test, spare)
        n_val = min(n_val, spare - n_test)
        for i, r in enumerate(ranked):
            side[str(r[key])] = "val" if i < n_val else "test" if i < n_val + n_test else "train"
    return [r for r in rows if side[str(r[key])] == split]
