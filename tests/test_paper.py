"""The paper-against-project table: each verdict worked by hand on hand-built matrix results."""

import math

import paper as P

NAN = math.nan


def test_verdicts_by_hand():
    live = (0.32, 0.25, 0.40)
    assert P.verdict(live, (-0.16, -0.25, -0.05), -1)[0] == "agree"
    assert P.verdict(live, (0.10, 0.02, 0.20), -1)[0] == "disagree"
    assert P.verdict(live, (-0.05, -0.15, 0.04), -1) == ("not shown", "the 95% interval spans 0")
    # the base shows no pathology: a reduction cannot be measured, whatever the change
    v, why = P.verdict((0.06, 0.00, 0.18), (-0.06, -0.18, -0.01), -1)
    assert v == "not measurable here" and "0.06 [0.00, 0.18]" in why
    # a ratio is compared with 1
    assert P.verdict(live, (0.49, 0.30, 0.76), -1, ratio=True)[0] == "agree"
    assert P.verdict(live, (0.83, 0.51, 1.31), -1, ratio=True)[0] == "not shown"
    # the paper reports an increase: no base check, the sides swap
    assert P.verdict((0.0, 0.0, 0.0), (0.3, 0.1, 0.5), +1)[0] == "agree"
    assert P.verdict(live, (-0.3, -0.5, -0.1), +1)[0] == "disagree"
    assert P.verdict(None, None, -1)[0] == "not run"
    assert P.verdict(live, (NAN, NAN, NAN), -1)[0] == "not measurable here"
    # a ratio over a base of 0 is nan: the reason is the base's
    assert "shows none to reduce" in P.verdict((0.0, 0.0, 0.0), (NAN, NAN, NAN), -1, ratio=True)[1]


def sim(mean, lo, hi):
    return {"all_layers": [mean, lo, hi]}


def test_mechanism_verdict_by_hand():
    targets = {"s/act": "act", "s/mlpct (runs/x)": "mlpct", "s/attct": "attct", "s/bct": "bct"}
    shared = {"s/act vs s/mlpct (runs/x)": sim(0.56, 0.50, 0.61), "s/act vs s/attct": sim(0.45, 0.39, 0.51),
              "s/mlpct (runs/x) vs s/attct": sim(0.74, 0.73, 0.75)}
    bct = {"s/bct vs s/act": sim(0.17, 0.14, 0.20), "s/bct vs s/mlpct (runs/x)": sim(0.10, 0.06, 0.14),
           "s/bct vs s/attct": sim(0.09, 0.06, 0.12)}
    v, why, here = P.mechanism_verdict({**shared, **bct}, targets)
    assert v == "agree" and here == "cos(d_a, d_b) 0.45 to 0.74 among act/mlpct/attct, 0.09 to 0.17 with bct"
    # one BCT pair reaching into the shared pairs' range: the intervals overlap
    overlap = {**bct, "s/bct vs s/act": sim(0.42, 0.35, 0.45)}
    assert P.mechanism_verdict({**shared, **overlap}, targets)[0] == "not shown"
    # BCT moving the stream like each of them, they unlike each other
    flipped = {k: sim(0.1, 0.05, 0.15) for k in shared} | {k: sim(0.8, 0.7, 0.9) for k in bct}
    assert P.mechanism_verdict(flipped, targets)[0] == "disagree"
    # without a BCT model there is nothing to compare; a model that did not move has no cosine
    assert P.mechanism_verdict(shared, targets) is None
    assert P.mechanism_verdict({**shared, "s/bct vs s/act": sim(None, None, None)}, targets) is None


def test_rows_read_the_matrix_result():
    result = {
        "models": {
            "base:m": {"threats": {"sycophancy": {"metrics": {"brr": 0.32}, "ci": {"brr": [0.25, 0.40]},
                                                  "n": 150}}},
            "sycophancy/bct": {"threats": {"sycophancy": {"metrics": {"brr": 0.15},
                                                          "ci": {"brr": [0.09, 0.22]}, "n": 150}}},
            "sycophancy/act": {"threats": {"sycophancy": {"metrics": {"brr": 0.30}, "ci": {"brr": [0.2, 0.4]},
                                                          "n": 150}}}},
        "rows": [{"label": "sycophancy/bct", "base": "base:m", "train_threat": "sycophancy", "target": "bct",
                  "evaluated": ["sycophancy"],
                  "changes": {"sycophancy": {"brr": [-0.16, -0.25, -0.07], "brr_ratio": [0.49, 0.30, 0.76]}}},
                 {"label": "sycophancy/act", "base": "base:m", "train_threat": "sycophancy", "target": "act",
                  "evaluated": ["sycophancy"],
                  "changes": {"sycophancy": {"brr": [-0.02, -0.1, 0.06], "brr_ratio": [0.95, 0.58, 1.51]}}}],
        "mechanism": {}}
    rows = {r[0]: r for r in P.rows(result)}
    assert rows["sycophancy/bct, brr_ratio"][2:4] == ("0.49 [0.30, 0.76], n=150", "agree")
    assert rows["sycophancy/act, brr_ratio"][2:4] == ("0.95 [0.58, 1.51], n=150", "not shown")
    assert rows["sycophancy/mlpct, brr_ratio"][2:4] == ("-", "not run")
    transfer = rows["jailbreak/bct -> sycophancy, brr_ratio"]
    assert transfer[3:] == ("not run", "no such checkpoint in the matrix")
    result["rows"][0]["evaluated"] = []   # trained, but not evaluated on the threat
    assert P.rows(result)[0][3:] == ("not run", "not evaluated on sycophancy")
    assert len(rows) == len(P.FINDINGS)
    table = P.table(result).splitlines()
    assert table[0].startswith("| finding | paper") and len(table) == 2 + len(P.FINDINGS)
