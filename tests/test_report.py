"""Runs side by side, run lookup, and the ``lpeer eval`` / ``lpeer report`` commands."""

from __future__ import annotations

import json
import math
import shlex

import numpy as np
import pytest
from peer_helpers import toy_workspace
from typer.testing import CliRunner

from lifelong_peer import advice
from lifelong_peer.cli.main import app
from lifelong_peer.errors import UserError
from lifelong_peer.metrics import EvalRow, PhaseRecord, RunResults, SplitEval, save_results
from lifelong_peer.report import compare_runs, evaluate_run, find_run_dir, markdown, report, write_report

SLICES = ["1790-1860", "1861-1932", "1933-2024"]
#: loss matrix (bpb) of a run that forgets (naive) and one that barely does (lifelong)
NAIVE = [[1.0, 2.0, 2.2], [1.6, 1.1, 2.0], [1.8, 1.5, 1.2]]
LIFELONG = [[1.0, 2.0, 2.2], [1.05, 1.15, 2.0], [1.1, 1.2, 1.25]]


def fabricate(run: str, strategy: str, matrix, phases: int = 3, slices=SLICES) -> RunResults:
    def row(bpb):
        return EvalRow([b * math.log(2) for b in bpb], list(bpb), [100] * len(slices), [100] * len(slices))

    r = RunResults(run, strategy, list(slices), eval={"test": SplitEval(row([8.0] * len(slices)))})
    for i in range(phases):
        r.add_phase(PhaseRecord(slices[i], 500, 2.0, 256 * (i + 1), 0.5, 1000 + i, 100), {"test": row(matrix[i])})
    return r


@pytest.fixture()
def runs(tmp_path):
    """Two run directories with results.json, and a third with two seeds of one strategy."""
    dirs = {}
    for name, strategy, matrix in [("naive-s0", "naive", NAIVE), ("lifelong-s0", "lifelong", LIFELONG)]:
        dirs[name] = tmp_path / name
        save_results(dirs[name], fabricate(name, strategy, matrix))
    return dirs


def test_compare_two_runs(runs):
    c = compare_runs([fabricate("a", "naive", NAIVE), fabricate("b", "lifelong", LIFELONG)])
    base, a, b = c["runs"]
    assert base["strategy"] == "base" and base["final_avg_bpb"] == 8.0 and base["avg_forgetting_bpb"] is None
    assert (a["run"], b["run"]) == ("a", "b") and c["slices"] == SLICES
    assert a["avg_forgetting_bpb"] == pytest.approx(((1.8 - 1.0) + (1.5 - 1.1)) / 2)
    assert b["avg_forgetting_bpb"] == pytest.approx(((1.1 - 1.0) + (1.2 - 1.15)) / 2)
    assert a["newest_bpb"] == 1.2 and b["newest_bpb"] == 1.25
    assert a["num_experts"] == 768 and a["train_tokens"] == 1500 and a["wall_time_s"] == 6.0
    assert [s["strategy"] for s in c["strategies"]] == ["base", "naive", "lifelong"]
    assert a["share_of_joint"] is None and c["joint_gain_bpb"] is None  # no joint run compared


def test_strategy_mean_and_std_over_seeds():
    shifted = [[x + 0.2 for x in row] for row in NAIVE]
    c = compare_runs([fabricate("s0", "naive", NAIVE), fabricate("s1", "naive", shifted)])
    _, entry = c["strategies"]
    assert entry["runs"] == 2
    assert entry["final_avg_bpb"]["mean"] == pytest.approx((1.8 + 1.5 + 1.2) / 3 + 0.1)
    assert entry["final_avg_bpb"]["std"] == pytest.approx(0.2 / math.sqrt(2))  # sample std of x, x + 0.2
    assert entry["avg_forgetting_bpb"]["std"] == pytest.approx(0.0)
    assert "± " in markdown(c)


def test_single_phase_run_in_a_comparison():
    c = compare_runs([fabricate("one", "naive", NAIVE, phases=1), fabricate("b", "lifelong", LIFELONG)])
    assert c["runs"][1]["avg_forgetting_bpb"] is None and c["runs"][1]["phases_done"] == 1
    assert c["strategies"][1]["avg_forgetting_bpb"] == {"mean": None, "std": None, "n": 0}
    assert "| — |" in markdown(c)


#: a joint run (the reference of the share column) and a base whose losses differ by slice
JOINT = [[1.0, 1.9, 2.1], [1.05, 1.1, 1.9], [1.1, 1.15, 1.1]]
BASE = [2.0, 3.0, 4.0]


def test_gain_and_share_recomputed_from_the_matrix():
    """gain = base average − final average, share = gain / joint's mean gain, against plain loops."""
    weights = [100, 300, 200]

    def run(name, strategy, matrix, base=BASE):
        def row(bpb):
            return EvalRow([b * math.log(2) for b in bpb], list(bpb), weights, weights)

        r = RunResults(name, strategy, SLICES, eval={"test": SplitEval(row(base))})
        for i in range(3):
            r.add_phase(PhaseRecord(SLICES[i], 500, 2.0, 256, 0.5, 1000, 100), {"test": row(matrix[i])})
        return r

    joint2 = [[x + 0.1 for x in r] for r in JOINT]
    runs = [
        run("n", "naive", NAIVE),
        run("l", "lifelong", LIFELONG),
        run("j0", "joint", JOINT),
        run("j1", "joint", joint2),
    ]
    c = compare_runs(runs)

    def avg(values):
        total = 0.0
        for w, v in zip(weights, values, strict=True):
            total += w * v
        return total / sum(weights)

    gains = {r.run: avg(BASE) - avg(m[-1]) for r, m in zip(runs, [NAIVE, LIFELONG, JOINT, joint2], strict=True)}
    joint_gain = (gains["j0"] + gains["j1"]) / 2
    rows = {r["run"]: r for r in c["runs"]}
    assert c["joint_gain_bpb"] == pytest.approx(joint_gain)
    for name, gain in gains.items():
        assert rows[name]["base_avg_bpb"] == pytest.approx(avg(BASE))
        assert rows[name]["gain_bpb"] == pytest.approx(gain)
        assert rows[name]["share_of_joint"] == pytest.approx(gain / joint_gain)
    # the frozen base: first, its own average, no gain, no share, no training
    base = c["runs"][0]
    assert (base["run"], base["strategy"], base["train_tokens"]) == ("base", "base", 0)
    assert base["final_avg_bpb"] == pytest.approx(avg(BASE)) and base["newest_bpb"] == BASE[-1]
    assert base["gain_bpb"] == 0.0 and base["share_of_joint"] == 0.0
    strategies = {s["strategy"]: s for s in c["strategies"]}
    assert strategies["joint"]["share_of_joint"]["mean"] == pytest.approx(1.0)
    assert strategies["naive"]["share_of_joint"]["mean"] == pytest.approx(gains["n"] / joint_gain)
    md = markdown(c)
    assert "share of joint's gain" in md and "| base | base |" in md
    # a second starting model gets a base row of its own
    other = compare_runs([*runs, run("d", "dense", NAIVE, base=[2.5, 3.0, 4.0])])
    assert [r["run"] for r in other["runs"] if r["strategy"] == "base"] == ["base", "base-2"]
    # the same base scored by another build of the kernels (losses 4e-4 apart) is the same base
    rebuilt = compare_runs([*runs, run("e", "dense", NAIVE, base=[b + 4e-4 for b in BASE])])
    assert [r["run"] for r in rebuilt["runs"] if r["strategy"] == "base"] == ["base"]
    sized = [run(name, "dense", NAIVE) for name in ("f", "g")]  # the same losses, bases of other sizes
    for r, params in zip(sized, (1_000, 2_000), strict=True):
        r.extra["base"] = {"num_experts": 8, "params": params, "active_params": 10}
    resized = compare_runs([*sized, *runs])
    assert [r["params"] for r in resized["runs"] if r["strategy"] == "base"] == [1_000, 2_000]


def test_different_slices_are_refused():
    other = fabricate("b", "naive", NAIVE, slices=["x", "y", "z"])
    with pytest.raises(UserError, match="different slices"):
        compare_runs([fabricate("a", "naive", NAIVE), other])


def test_report_writes_files(runs, tmp_path):
    out = tmp_path / "out"
    c = report([str(d) for d in runs.values()], out)
    assert {p.name for p in out.iterdir()} == {"report.json", "report.md", "report.png", "heatmaps", "cost.png"}
    assert sorted(p.name for p in (out / "heatmaps").iterdir()) == ["lifelong-s0.png", "naive-s0.png"]
    assert json.loads((out / "report.json").read_text())["runs"][2]["run"] == "lifelong-s0"
    assert (out / "report.png").read_bytes().startswith(b"\x89PNG") and (out / "report.png").stat().st_size > 5000
    assert c["files"]["plot"] == str(out / "report.png")


# ---------------------------------------------------------------------------------------------
# plots (issue 17): a forgetting view, one colour scale per report, a colour per strategy


def test_heatmap_has_a_forgetting_view_centred_at_zero():
    from lifelong_peer import plots

    fig = plots.heatmap_figure(SLICES, NAIVE, [8.0] * 3, "t")
    (ax,) = [a for a in fig.axes if a.get_title().startswith("forgetting")]
    (image,) = ax.images
    shown = np.ma.filled(image.get_array().astype(float), np.nan)
    want = [[NAIVE[i][j] - NAIVE[j][j] if j <= i else np.nan for j in range(3)] for i in range(3)]
    np.testing.assert_allclose(shown, want)  # change since the phase that trained the slice
    low, high = image.get_clim()
    assert low == -high and high == pytest.approx(0.8)  # centred at zero, reaching the largest change
    assert image.get_cmap().name.startswith("RdBu")  # diverging


def test_report_heatmaps_share_one_colour_scale(tmp_path, monkeypatch):
    from lifelong_peer import plots

    wider = [[x + 1.0 for x in row] for row in LIFELONG]  # another range of bits per byte
    seen = {}
    real = plots.heatmap
    monkeypatch.setattr(
        plots, "heatmap", lambda path, *a, **k: seen.setdefault(path.name, (a, k)) and real(path, *a, **k)
    )
    runs = [fabricate("naive-s0", "naive", NAIVE), fabricate("lifelong-s0", "lifelong", wider)]
    write_report(tmp_path, compare_runs(runs), runs)
    scales = {name: args[-1] for name, (args, _) in seen.items()}
    assert set(scales) == {"naive-s0.png", "lifelong-s0.png"}
    assert scales["naive-s0.png"] == scales["lifelong-s0.png"]
    assert scales["naive-s0.png"].bpb == (1.0, 3.2)  # the union of the two runs' ranges
    assert scales["naive-s0.png"].change == pytest.approx(0.8)
    assert plots.shared_scale([(NAIVE, [8.0] * 3)]).bpb == (1.0, 2.2)  # a run alone: its own range


def test_report_plot_colours_follow_the_strategy_not_the_argument_order():
    from matplotlib.colors import to_rgb

    from lifelong_peer import plots

    rows = compare_runs([fabricate("a", "naive", NAIVE), fabricate("b", "lifelong", LIFELONG)])["runs"]

    def colours(rows):
        fig = plots.forgetting_scatter_figure(rows, "t")
        (ax,) = fig.axes
        assert "lower is better" in ax.get_ylabel() and "lower is better" in ax.get_xlabel()
        return {c.get_label(): to_rgb(c.get_facecolor()[0]) for c in ax.collections}

    assert colours(rows) == colours(rows[::-1])
    assert colours(rows)["lifelong"] != colours(rows)["naive"]
    assert (
        plots.strategy_colour("my-own")
        == plots.strategy_colour("my-own")
        not in map(plots.strategy_colour, ["naive", "lifelong", "replay", "ewc", "smf", "dense", "joint"])
    )


def test_missing_results_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=r"results\.json not found"):
        evaluate_run(str(tmp_path))
    with pytest.raises(UserError, match="no such run directory"):
        evaluate_run(str(tmp_path / "gone"))


def test_run_id_resolves_through_the_workspace(tmp_path):
    from lifelong_peer.workspace import Workspace

    ws = Workspace.init(tmp_path / "ws")
    ws.register_run("naive-s0", {"strategy": "naive"})
    save_results(ws.run_dir("naive-s0"), fabricate("naive-s0", "naive", NAIVE))
    assert find_run_dir("naive-s0", tmp_path / "ws") == ws.run_dir("naive-s0")
    assert evaluate_run("naive-s0", "test", tmp_path / "ws")["matrix_bpb"] == NAIVE
    with pytest.raises(UserError, match="no run 'nope'"):
        find_run_dir("nope", tmp_path / "ws")


# ---------------------------------------------------------------------------------------------
# the commands

cli = CliRunner()


def test_eval_json(runs):
    result = cli.invoke(app, ["eval", str(runs["naive-s0"]), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    for key in ("slices", "matrix_bpb", "matrix_nll", "avg_forgetting_bpb", "bwt_bpb", "fwt_bpb", "final_avg_bpb"):
        assert key in data
    assert data["base_avg_bpb"] == 8.0 and data["gain_bpb"] == pytest.approx(8.0 - (1.8 + 1.5 + 1.2) / 3)
    assert data["matrix_bpb"] == NAIVE and data["slices"] == SLICES
    assert data["avg_forgetting_bpb"] == pytest.approx(0.6)
    assert data["bwt_bpb"] == pytest.approx(-0.6)
    assert data["fwt_bpb"] == pytest.approx(((8.0 - 2.0) + (8.0 - 2.0)) / 2)


def test_eval_human_table(runs):
    result = cli.invoke(app, ["eval", str(runs["naive-s0"])])
    assert result.exit_code == 0, result.output
    assert "1861-1932" in result.stdout and "avg_forgetting" in result.stdout and "+0.8000" in result.stdout


def test_eval_human_table_with_an_empty_held_out_split(tmp_path):
    r = fabricate("gap", "naive", NAIVE, phases=2)
    for row in [r.eval["test"].before, *r.eval["test"].after]:
        row.nll[2] = row.bpb[2] = math.nan
        row.tokens[2] = row.bytes[2] = 0
    save_results(tmp_path, r)
    result = cli.invoke(app, ["eval", str(tmp_path)])
    assert result.exit_code == 0, result.output
    assert "—" in result.stdout
    data = json.loads(cli.invoke(app, ["eval", str(tmp_path), "--format", "json"]).stdout)
    assert data["matrix_bpb"][1] == [1.6, 1.1, None]


def test_eval_unknown_split_and_missing_results(runs, tmp_path):
    result = cli.invoke(app, ["eval", str(runs["naive-s0"]), "--split", "validation"])
    assert isinstance(result.exception, UserError) and "no 'validation' evaluation" in str(result.exception)
    result = cli.invoke(app, ["eval", str(tmp_path)])
    assert isinstance(result.exception, UserError)


def test_report_command(runs, tmp_path):
    out = tmp_path / "rep"
    result = cli.invoke(app, ["report", *map(str, runs.values()), "--out", str(out), "--format", "json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    assert [r["run"] for r in data["runs"]] == ["base", "naive-s0", "lifelong-s0"]
    assert (out / "report.png").is_file()
    human = cli.invoke(app, ["report", *map(str, runs.values()), "--out", str(out)])
    assert human.exit_code == 0 and "lifelong-s0" in human.stdout and "forgetting" in human.stdout


def test_help_has_examples():
    for command in ("eval", "report"):
        result = cli.invoke(app, [command, "--help"])
        assert result.exit_code == 0 and "Example: lpeer " + command in result.stdout


# ---------------------------------------------------------------------------------------------
# issue 25: the base row's own size, a verdict with its cost first, an honest scale


def test_base_row_shows_the_base_not_phase_0_after_growth():
    """Runs before the base record: phase 0's growth record says what the base had; the order of runs never
    matters (the base row showed 2,304 experts, phase 0 after growth, for a 1,024-expert base)."""
    grown = fabricate("grown", "lifelong", LIFELONG)
    grown.phases[0].extra["grow"] = [{"layer": 0, "k": 16, "experts_before": 1024, "experts_after": 2304}]
    grown.phases[0].num_experts = 2304
    plain = fabricate("plain", "naive", NAIVE)
    plain.phases[0].num_experts = 1024
    for order in ([grown, plain], [plain, grown]):
        (base,) = [r for r in compare_runs(order)["runs"] if r["strategy"] == "base"]
        assert base["num_experts"] == 1024
    recorded = fabricate("rec", "naive", NAIVE)
    recorded.extra["base"] = {"num_experts": 100, "params": 5000, "active_params": 700}
    base = compare_runs([recorded])["runs"][0]
    assert (base["num_experts"], base["params"], base["active_params"]) == (100, 5000, 700)


TOY_MODEL = {"dim": 32, "layers": 1, "heads": 2, "context": 32, "peer": {"num_subkeys": 4, "heads": 2, "topk": 2}}
TOY_TRAIN = {"steps": 2, "batch_size": 2, "eval_tokens": 128, "usage_tokens": 128, "warmup": 1, "base_steps": 2}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """A workspace with an ingested two-year stream ``toy`` and two runs from one trained base: ``grow``
    (lifelong-grow: 4 → 20 sub-keys before phase 0) and ``plain`` (naive)."""
    import torch

    from lifelong_peer.run import new_run
    from lifelong_peer.train import run_phases

    root = tmp_path_factory.mktemp("toy")
    ws = toy_workspace(root)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for run_id, strategy in (("grow", "lifelong-grow"), ("plain", "naive")):
            run_phases(new_run(ws, "toy", strategy, TOY_TRAIN, TOY_MODEL, run_id=run_id))
    finally:
        torch.set_num_threads(threads)
    return ws


def test_the_trainer_records_the_base_size_and_the_report_shows_it_in_any_order(toy, tmp_path):
    results = json.loads((toy.run_dir("grow") / "results.json").read_text())
    assert results["base"]["num_experts"] == 16 and results["phases"][0]["num_experts"] == 400  # grew 4 → 20
    assert results["machine"]["threads"] == 1 and results["machine"]["cpu"]["model"]
    for order in (["grow", "plain"], ["plain", "grow"]):
        c = report(order, tmp_path / "-".join(order), workspace=toy.root)
        (base,) = [r for r in c["runs"] if r["strategy"] == "base"]
        assert base["num_experts"] == 16 and base["params"] == results["base"]["params"]


def test_the_summary_comes_first_with_costs_and_the_command_adding_joint(toy, tmp_path):
    out = tmp_path / "rep"
    c = report(["grow", "plain"], out, workspace=toy.root)
    md = (out / "report.md").read_text()
    first_table = md.index("| run |")
    for phrase in ("best final average", "least forgetting", "best newest slice", "cost of naive"):
        assert phrase in md[:first_table], phrase
    rows = {r["run"]: r for r in c["runs"]}
    assert rows["plain"]["ms_per_step"] > 0 and rows["plain"]["disk_mb"] > 0.01
    assert "ms per step" in md[:first_table] and "MB on disk" in md[:first_table]
    # no joint run: no column of "—", but the exact command that adds one
    assert "share of joint" not in md[first_table:] and c["add_joint"] in md[:first_table]
    prefix = shlex.split(advice.lpeer_command())  # `lpeer`, or this installation's script (issue 25, item 1)
    args = shlex.split(c["add_joint"])
    assert args[: len(prefix) + 1] == [*prefix, "run"]
    # as printed: it names the workspace itself (no --workspace added here)
    result = cli.invoke(app, [*args[len(prefix) :], "--quiet"])
    assert result.exit_code == 0, result.output
    joint = args[args.index("--name") + 1]
    with_joint = report(["grow", "plain", joint], tmp_path / "with-joint", workspace=toy.root)
    assert with_joint["joint_gain_bpb"] is not None and with_joint["add_joint"] is None
    # the joint run started from the same base model, so the three runs share one base row
    assert [r["run"] for r in with_joint["runs"] if r["strategy"] == "base"] == ["base"]
    assert "share of joint's gain" in (tmp_path / "with-joint" / "report.md").read_text()


def test_the_verdict_weighs_a_gap_against_the_seed_noise():
    two = lambda shift: [[x + shift for x in row] for row in LIFELONG]  # noqa: E731
    runs = [fabricate("n0", "naive", NAIVE), fabricate("n1", "naive", [[x + 0.02 for x in r] for r in NAIVE])]
    runs += [fabricate("l0", "lifelong", two(0.0)), fabricate("l1", "lifelong", two(0.01))]
    summary = compare_runs(runs)["summary"]
    (final,) = [line for line in summary if "best final average" in line]
    # final averages: lifelong 1.1833 and 1.1933, naive 1.5 and 1.52 → gap 0.3217, SE sqrt(.01²/2 + .02²/2)/sqrt(2)
    gap = (1.5 + 1.52) / 2 - (1.1833333 + 1.1933333) / 2
    error = math.sqrt((0.01 / math.sqrt(2)) ** 2 / 2 + (0.02 / math.sqrt(2)) ** 2 / 2)
    assert "**best final average: lifelong**" in final and f"{gap:.4f} bits per byte better than naive" in final
    assert f"{gap / error:.1f}× the standard error" in final and "larger than the seed noise" in final
    single = compare_runs([fabricate("a", "naive", NAIVE), fabricate("b", "lifelong", LIFELONG)])["summary"]
    assert any("seed noise is not measured" in line for line in single)
    assert any("no joint run" in line for line in single)


def test_the_report_plot_shows_the_base_and_the_seed_spread():
    """Two strategies 0.0014 apart on the newest slice no longer fill the y axis: the base's line is on it,
    and a strategy with two runs has error bars."""
    near = [[*row[:2], row[2] + 0.0014] for row in NAIVE]
    runs = [fabricate("a", "naive", NAIVE), fabricate("b", "lifelong", near), fabricate("c", "lifelong", near)]
    c = compare_runs(runs)
    from lifelong_peer import plots

    rows = [r for r in c["runs"] if r["strategy"] != "base"]
    fig = plots.forgetting_scatter_figure(rows, "t", [r for r in c["runs"] if r["strategy"] == "base"])
    (ax,) = fig.axes
    low, high = ax.get_ylim()
    assert low <= 1.2 and high >= 8.0  # from the runs' newest slice up to the base's (8 bpb before training)
    assert len(ax.containers) == 1  # the error bars of lifelong's two runs
