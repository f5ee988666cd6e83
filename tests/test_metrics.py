"""Forgetting metrics against hand-computed matrices and a brute-force reference; results.json; run outputs."""

from __future__ import annotations

import copy
import csv
import json
import math

import numpy as np
import pytest

from lifelong_peer.errors import UserError
from lifelong_peer.metrics import (
    EvalRow,
    PhaseRecord,
    RunResults,
    SplitEval,
    forgetting_table,
    load_results,
    matrix_metrics,
    save_results,
    summarize,
)
from lifelong_peer.run_outputs import METRICS_COLUMNS, write_run_outputs

# Hand-computed example (lower is better). Phase 1 *improves* slice 0 (0.8 < 1.0), so forgetting
# (against the best earlier value) and BWT (against the diagonal) differ.
L = [
    [1.0, 2.0, 3.0],
    [0.8, 1.2, 2.5],
    [1.3, 1.4, 1.1],
]
BEFORE = [4.0, 4.0, 4.0]
WEIGHTS = [1, 1, 2]
SLICES = ["s0", "s1", "s2"]


def reference(L, before, w):
    """The definitions of RESEARCH.md written as plain loops (T = last phase, 0-based)."""
    T = len(L) - 1
    F = [L[T][j] - min(L[k][j] for k in range(j, T)) for j in range(T)]
    bwt = [L[j][j] - L[T][j] for j in range(T)]
    fwt = [before[j] - L[j - 1][j] for j in range(1, T + 1)]
    final_avg = sum(w[j] * L[T][j] for j in range(T + 1)) / sum(w[: T + 1])
    base_avg = sum(w[j] * before[j] for j in range(T + 1)) / sum(w[: T + 1])
    return {
        "final_avg": final_avg,
        "base_avg": base_avg,
        "gain": base_avg - final_avg,
        "final_avg_unweighted": sum(L[T][: T + 1]) / (T + 1),
        "forgetting": F,
        "avg_forgetting": sum(F) / T if T else None,
        "bwt": sum(bwt) / T if T else None,
        "fwt": sum(fwt) / T if T else None,
        "plasticity": [L[j][j] for j in range(T + 1)],
        "newest": L[T][T],
    }


def assert_close(got: dict, want: dict):
    assert got.keys() == want.keys()
    for k in want:
        if want[k] is None:
            assert got[k] is None, k
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=0, atol=1e-12, err_msg=k)


def test_hand_computed_full_run():
    m = matrix_metrics(np.array(L), np.array(BEFORE), np.array(WEIGHTS))
    assert m["forgetting"] == pytest.approx([1.3 - 0.8, 1.4 - 1.2])  # positive = forgot
    assert m["avg_forgetting"] == pytest.approx(0.35)
    assert m["base_avg"] == pytest.approx(4.0) and m["gain"] == pytest.approx(4.0 - (1.3 + 1.4 + 2 * 1.1) / 4)
    assert m["bwt"] == pytest.approx(((1.0 - 1.3) + (1.2 - 1.4)) / 2)  # -0.25: negative = forgot
    assert m["fwt"] == pytest.approx(((4.0 - 2.0) + (4.0 - 2.5)) / 2)  # 1.75: earlier phases helped
    assert m["final_avg"] == pytest.approx((1.3 + 1.4 + 2 * 1.1) / 4)  # weighted by held-out size
    assert m["final_avg_unweighted"] == pytest.approx((1.3 + 1.4 + 1.1) / 3)
    assert m["plasticity"] == pytest.approx([1.0, 1.2, 1.1])
    assert m["newest"] == pytest.approx(1.1)


def test_partial_run_uses_only_seen_slices():
    m = matrix_metrics(np.array(L[:2]), np.array(BEFORE), np.array(WEIGHTS))
    assert m["forgetting"] == pytest.approx([-0.2])  # slice 0 got better: negative forgetting
    assert m["avg_forgetting"] == pytest.approx(-0.2)
    assert m["bwt"] == pytest.approx(0.2)
    assert m["fwt"] == pytest.approx(2.0)
    assert m["final_avg"] == pytest.approx(1.0)  # slices 0 and 1 only; slice 2 is not trained yet
    assert m["newest"] == pytest.approx(1.2)


def test_single_phase_has_nothing_to_forget():
    m = matrix_metrics(np.array(L[:1]), np.array(BEFORE), np.array(WEIGHTS))
    assert m["forgetting"] == []
    assert m["avg_forgetting"] is None and m["bwt"] is None and m["fwt"] is None
    assert m["final_avg"] == m["final_avg_unweighted"] == m["newest"] == 1.0


def test_no_phase_yet():
    m = matrix_metrics(np.zeros((0, 3)), np.array(BEFORE), np.array(WEIGHTS))
    assert m["final_avg"] is None and m["plasticity"] == []


@pytest.mark.parametrize("seed", range(20))
def test_matches_brute_force_reference(seed):
    rng = np.random.default_rng(seed)
    S = int(rng.integers(1, 6))
    P = int(rng.integers(1, S + 1))
    M, before, w = rng.uniform(0.5, 3, (P, S)), rng.uniform(2, 5, S), rng.integers(1, 1000, S)
    assert_close(matrix_metrics(M, before, w), reference(M.tolist(), before.tolist(), w.tolist()))


def test_a_slice_without_held_out_data_is_left_out_of_averages():
    M = np.array(L)
    M[:, 1] = np.nan  # slice 1 has an empty held-out split
    m = matrix_metrics(M, np.array([4.0, np.nan, 4.0]), np.array([1, 0, 2]))
    assert m["forgetting"][0] == pytest.approx(0.5) and math.isnan(m["forgetting"][1])
    assert m["avg_forgetting"] == pytest.approx(0.5)
    assert m["bwt"] == pytest.approx(1.0 - 1.3)
    assert m["fwt"] == pytest.approx(4.0 - 2.5)  # j = 1 is undefined, j = 2 remains
    assert m["final_avg"] == pytest.approx((1.3 + 2 * 1.1) / 3)
    assert m["final_avg_unweighted"] == pytest.approx((1.3 + 1.1) / 2)


def test_forgetting_table_rows_are_the_forgetting_after_each_phase():
    F = forgetting_table(np.array(L))
    for i in range(3):
        want = reference(L[: i + 1], BEFORE, WEIGHTS)["forgetting"]
        np.testing.assert_allclose(F[i, :i], want)
        assert np.isnan(F[i, i:]).all()


def test_no_forgetting_when_nothing_changes():
    M = np.tril(np.ones((3, 3))) + np.triu(np.full((3, 3), 2.0), 1)  # trained slices stay at 1.0
    m = matrix_metrics(M, np.full(3, 2.0), np.ones(3))
    assert m["avg_forgetting"] == 0 and m["bwt"] == 0 and m["fwt"] == 0


# ---------------------------------------------------------------------------------------------
# results.json


def make_results(phases=3, run="r1", strategy="naive", offset=0.0, tokens=(100, 100, 200), num_bytes=None):
    """A fabricated run on SLICES; test bpb = L + offset, nll = bpb · ln 2 (by default tokens = bytes)."""

    def row(bpb):
        bpb = [b + offset for b in bpb]
        return EvalRow([b * math.log(2) for b in bpb], bpb, list(tokens), list(num_bytes or tokens))

    r = RunResults(
        run=run,
        strategy=strategy,
        slices=list(SLICES),
        eval={"validation": SplitEval(row([4.5] * 3)), "test": SplitEval(row(BEFORE))},
        extra={"seed": 0},
    )
    for i in range(phases):
        phase = PhaseRecord(SLICES[i], 1000 * (i + 1), 1.5, 64 * (i + 1), i / (i + 1), 10_000 + i, 2_000, {"grown": 64})
        r.add_phase(phase, {"validation": row([x + 0.5 for x in L[i]]), "test": row(L[i])})
    return r


def test_from_totals_defines_bits_per_byte():
    row = EvalRow.from_totals([100 * math.log(2), 50.0], [100, 10], [100, 40])
    assert row.bpb[0] == pytest.approx(1.0) and row.nll[0] == pytest.approx(math.log(2))
    assert row.nll[1] == pytest.approx(5.0) and row.bpb[1] == pytest.approx(50 / (40 * math.log(2)))


def test_empty_held_out_split_round_trips_as_null(tmp_path):
    r = make_results()
    for e in r.eval.values():
        for row in [e.before, *e.after]:
            row.nll[1] = row.bpb[1] = math.nan
            row.tokens[1] = row.bytes[1] = 0
    text = save_results(tmp_path, r).read_text()
    data = json.loads(text, parse_constant=lambda c: pytest.fail(f"non-standard JSON constant {c}"))
    assert data["eval"]["test"]["after"][0]["bpb"][1] is None
    back = load_results(tmp_path)
    assert math.isnan(back.eval["test"].after[2].bpb[1]) and back.eval["test"].after[2].bpb[0] == 1.3
    s = summarize(back, "test")
    assert s["matrix_bpb"][0][1] is None and s["forgetting_bpb"][1] is None
    assert s["avg_forgetting_bpb"] == pytest.approx(0.5)
    json.dumps(s, allow_nan=False)  # the eval command's JSON is standard JSON
    write_run_outputs(tmp_path, back)  # plots and CSVs cope with the gap
    rows = list(csv.DictReader((tmp_path / "metrics.csv").open()))
    assert {r["bpb"] for r in rows if r["eval_slice"] == "s1"} == {""}


def test_from_totals_marks_empty_splits():
    row = EvalRow.from_totals([3.0, 0.0], [2, 0], [2, 0])
    assert row.nll[0] == 1.5 and math.isnan(row.nll[1]) and math.isnan(row.bpb[1]) and row.tokens == [2, 0]


def test_round_trip_keeps_extra_keys(tmp_path):
    r = make_results()
    path = save_results(tmp_path, r)
    data = json.loads(path.read_text())
    assert data["format"] == "lifelong-peer/results/1" and data["seed"] == 0 and data["phases"][0]["grown"] == 64
    assert load_results(tmp_path) == r


def test_summary_weights_nll_by_tokens_and_bpb_by_bytes():
    # e.g. a multi-byte tokenizer: tokens ≠ bytes, and the two averages weigh slices differently
    r = make_results(phases=2, tokens=(100, 300, 100), num_bytes=(300, 100, 100))
    r.eval["test"].after[1].nll, r.eval["test"].after[1].bpb = [1.0, 2.0, 3.0], [2.0, 4.0, 6.0]
    s = summarize(r, "test")
    assert s["final_avg_nll"] == pytest.approx((100 * 1.0 + 300 * 2.0) / 400)
    assert s["final_avg_bpb"] == pytest.approx((300 * 2.0 + 100 * 4.0) / 400)
    assert s["final_avg_unweighted_nll"] == pytest.approx(1.5)
    assert s["final_avg_unweighted_bpb"] == pytest.approx(3.0)
    assert s["eval_tokens"] == [100, 300, 100] and s["eval_bytes"] == [300, 100, 100]


def test_summary_keys_and_values():
    s = summarize(make_results(), "test")
    assert s["matrix_bpb"] == L and s["before_bpb"] == BEFORE and s["slices"] == SLICES
    assert s["avg_forgetting_bpb"] == pytest.approx(0.35)
    assert s["avg_forgetting_nll"] == pytest.approx(0.35 * math.log(2))
    assert s["bwt_bpb"] == pytest.approx(-0.25) and s["fwt_bpb"] == pytest.approx(1.75)
    assert s["complete"] and s["phases_done"] == 3
    assert s["num_experts"] == [64, 128, 192] and s["total_train_tokens"] == 6000
    assert summarize(make_results(), "validation")["avg_forgetting_bpb"] == pytest.approx(0.35)
    with pytest.raises(UserError, match="no 'dev' evaluation"):
        summarize(make_results(), "dev")


def test_partial_and_single_phase_runs_summarize():
    s = summarize(make_results(phases=1), "test")
    assert not s["complete"] and s["avg_forgetting_bpb"] is None and s["final_avg_bpb"] == 1.0
    assert len(s["matrix_bpb"]) == 1


def _broken(edit) -> dict:
    data = copy.deepcopy(make_results().to_dict())
    edit(data)
    return data


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda d: d.pop("strategy"), "missing key 'strategy'"),
        (lambda d: d["phases"][1].update(slice="s2"), r"phases\[1\].slice is 's2', expected 's1'"),
        (lambda d: d["phases"][0].update(num_experts=-1), r"phases\[0\].num_experts: expected a non-negative integer"),
        (lambda d: d["phases"][0].update(frozen_fraction=1.5), "frozen_fraction: expected a fraction"),
        (lambda d: d["eval"]["test"]["after"].pop(), "after has 2 rows but there are 3 phases"),
        (lambda d: d["eval"]["test"]["after"][0]["bpb"].pop(), r"after\[0\].bpb has 2 values but there are 3 slices"),
        (lambda d: d["eval"]["test"]["before"]["nll"].__setitem__(0, float("nan")), "expected a finite number"),
        (lambda d: d["eval"]["test"]["before"]["tokens"].__setitem__(0, 0), "0 tokens or bytes but has loss"),
        (lambda d: d["eval"]["test"]["before"]["bpb"].__setitem__(0, None), "expected a finite number, got None"),
        (lambda d: d.update(slices=["a", "a", "b"]), "distinct names"),
        (lambda d: d.update(format="other/1"), "format 'other/1'"),
        (lambda d: d.update(eval={}), "eval has no split"),
        (lambda d: d["eval"]["test"]["after"][2]["bytes"].__setitem__(0, 7), r"after\[2\] scored other tokens"),
    ],
)
def test_malformed_results_are_user_errors(edit, message):
    with pytest.raises(UserError, match=message):
        RunResults.from_dict(_broken(edit), "x/results.json")


def test_more_phases_than_slices_is_refused():
    data = make_results().to_dict()
    data["slices"] = ["s0", "s1"]
    with pytest.raises(UserError, match="3 phases but only 2 slices"):
        RunResults.from_dict(data)


def test_load_errors(tmp_path):
    with pytest.raises(UserError, match="no results file"):
        load_results(tmp_path)
    (tmp_path / "results.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        load_results(tmp_path)


def test_add_phase_requires_every_split():
    r = make_results(phases=0)
    phase = PhaseRecord("s0", 1, 1.0, 1, 0.0, 1, 1)
    with pytest.raises(UserError, match="evaluated splits"):
        r.add_phase(phase, {"test": r.eval["test"].before})


# ---------------------------------------------------------------------------------------------
# files of a run directory

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    paths = write_run_outputs(d, make_results())
    assert set(paths) == {"metrics.csv", "matrix.csv", "summary.json", "heatmap.png", "curves.png"}
    return d


def test_metrics_csv_long_format(run_dir):
    rows = list(csv.DictReader((run_dir / "metrics.csv").open()))
    assert tuple(rows[0].keys()) == METRICS_COLUMNS
    assert len(rows) == 2 * (1 + 3) * 3  # splits × (base + phases) × eval slices
    test = {(int(r["phase"]), r["eval_slice"]): r for r in rows if r["split"] == "test"}
    assert float(test[(1, "s0")]["bpb"]) == 0.8 and test[(1, "s0")]["train_slice"] == "s1"
    assert float(test[(2, "s0")]["forgetting"]) == pytest.approx(0.5)
    assert float(test[(2, "s1")]["forgetting"]) == pytest.approx(0.2)
    assert test[(2, "s2")]["forgetting"] == test[(0, "s0")]["forgetting"] == test[(-1, "s0")]["forgetting"] == ""
    assert int(test[(2, "s1")]["num_experts"]) == 192 and test[(-1, "s1")]["num_experts"] == ""


def test_matrix_csv_is_the_matrix(run_dir):
    rows = list(csv.DictReader((run_dir / "matrix.csv").open()))
    assert len(rows) == 2 * 2 * (1 + 3)  # splits × units × (base + phases)
    bpb = [[float(r[s]) for s in SLICES] for r in rows if r["split"] == "test" and r["unit"] == "bpb"]
    assert bpb == [BEFORE, *L]


def test_run_files_keep_their_row_order_through_a_save_and_load(tmp_path):
    """Issue 17: matrix.csv changed row order after a resume (results.json stores its splits sorted)."""
    fresh, resumed = tmp_path / "fresh", tmp_path / "resumed"
    results = make_results(phases=2)
    write_run_outputs(fresh, results)
    save_results(tmp_path, results)
    write_run_outputs(resumed, load_results(tmp_path))
    for name in ("matrix.csv", "metrics.csv"):
        assert (resumed / name).read_text() == (fresh / name).read_text(), name
    splits = [r["split"] for r in csv.DictReader((fresh / "matrix.csv").open())]
    assert splits == sorted(splits, key=("validation", "test").index)  # validation first, as the trainer evaluates


def test_summary_json(run_dir):
    s = json.loads((run_dir / "summary.json").read_text())
    assert s["reported_split"] == "test" and set(s["splits"]) == {"validation", "test"}
    assert s["splits"]["test"]["avg_forgetting_bpb"] == pytest.approx(0.35)
    assert "forgetting" in s["definitions"]


@pytest.mark.parametrize("name", ["heatmap.png", "curves.png"])
def test_plots_are_valid_pngs(run_dir, name):
    import matplotlib.image

    data = (run_dir / name).read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000
    image = matplotlib.image.imread(run_dir / name)
    assert image.shape[0] > 100 and image.shape[1] > 100
    assert image[..., :3].std() > 0.05  # not a blank canvas


def test_outputs_of_a_single_phase_run(tmp_path):
    write_run_outputs(tmp_path, make_results(phases=1))
    assert (tmp_path / "heatmap.png").read_bytes().startswith(PNG_MAGIC)
    assert json.loads((tmp_path / "summary.json").read_text())["splits"]["test"]["bwt_bpb"] is None
