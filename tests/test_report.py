"""report.py on hand-written run directories (tests/fixtures/runs): deltas, Table 2, linear fit, outputs.

Expected values are computed by hand from the fixture's numbers (see tests/fixtures/runs/README.md):
m1 on svamp has baseline accuracy 0.500, 1000 tokens/s, 200 s; m1 on gsm8k 0.400, 500 tokens/s, 400 s.
"""

import json
import shutil
from pathlib import Path

import pytest

from nested_reft import cli, report

FIXTURE = Path(__file__).parent / "fixtures" / "runs"


@pytest.fixture(scope="module")
def rep():
    runs, skipped = report.find_runs([FIXTURE])
    deltas, orphans = report.match(runs)
    return runs, skipped, deltas, orphans


def by_name(deltas):
    return {Path(d.run.path).name: d for d in deltas}


def test_finds_finished_runs_and_lists_the_rest(rep):
    runs, skipped, deltas, orphans = rep
    assert len(runs) == 11 and len(deltas) == 7
    assert [Path(s.split()[0]).name for s in skipped] == ["m1__svamp__x0.10__retrace"]  # no summary.json
    assert [Path(s.split()[0]).name for s in orphans] == ["m3__svamp__x0.05__base"]  # no baseline for m3


def test_deltas_match_hand_computed_values(rep):
    d = by_name(rep[2])
    r = d["m1__svamp__x0.15__retrace"]  # acc 0.525, 1120 tok/s, 178 s vs 0.500, 1000, 200
    assert Path(r.base.path).name == "m1__svamp__x0.00__base"
    assert r.accuracy_abs == pytest.approx(0.025) and r.accuracy_rel == pytest.approx(5.0)
    assert r.token_speed_abs == pytest.approx(120.0) and r.token_speed_rel == pytest.approx(12.0)
    assert r.runtime_abs == pytest.approx(-22.0) and r.runtime_rel == pytest.approx(-11.0)
    p = d["m1__svamp__x0.10__practical"]  # 0.480, 1080, 186
    assert (p.accuracy_abs, p.accuracy_rel) == (pytest.approx(-0.02), pytest.approx(-4.0))
    assert (p.token_speed_rel, p.runtime_rel) == (pytest.approx(8.0), pytest.approx(-7.0))


def test_runs_are_matched_within_model_and_dataset(rep):
    g = by_name(rep[2])["m1__gsm8k__x0.15__practical"]  # 0.410, 550, 360 vs the gsm8k baseline 0.400, 500, 400
    assert Path(g.base.path).name == "m1__gsm8k__x0.00__base"
    assert g.accuracy_abs == pytest.approx(0.010) and g.accuracy_rel == pytest.approx(2.5)
    assert g.token_speed_rel == pytest.approx(10.0) and g.runtime_rel == pytest.approx(-10.0)


def test_runs_without_eval_have_efficiency_deltas_only(rep):
    m2 = by_name(rep[2])["m2__svamp__x0.10__base"]
    assert m2.run.model == "m2"  # the label from run.json, not config.yaml's /ckpt/m2-sft
    assert m2.accuracy_abs is None and m2.accuracy_rel is None
    assert m2.token_speed_rel == pytest.approx(10.0) and m2.runtime_rel == pytest.approx(-10.0)
    assert m2.run.skipped_layers == 3  # U(28, 0.10)


def test_table2_best_and_worst_per_dataset(rep):
    t2 = report.table2(rep[2])
    assert set(t2) == {"ckpt/m1"}  # m2 has no accuracy
    row = t2["ckpt/m1"]["datasets"]
    assert row["svamp"]["best"] == (pytest.approx(0.025), "x=15% retrace")
    assert row["svamp"]["worst"] == (pytest.approx(-0.020), "x=10% practical")
    assert row["gsm8k"]["best"] == (pytest.approx(0.010), "x=15% practical")
    assert row["gsm8k"]["worst"] == (pytest.approx(-0.010), "x=5% retrace")
    assert t2["ckpt/m1"]["mean_best"] == pytest.approx((0.025 + 0.010) / 2)
    assert t2["ckpt/m1"]["mean_worst"] == pytest.approx((-0.020 - 0.010) / 2)


def test_table2_mean_reproduces_the_papers_rows():
    """The paper's Table 2 last column is the magnitude of the signed mean (truncated to 3 decimals)."""
    def fake(model, dataset, acc):
        run = report.Run("p", model, dataset, 0.1, 1, "base", 28, acc, {}, 1.0, 1.0)
        return report.Delta(run, run, acc, None, 0.0, 0.0, 0.0, 0.0)
    paper = {"1.5B": {"svamp": 0.008, "gsm8k": 0.015, "math12k": 0.026}, "7B": {"svamp": 0.022, "gsm8k": 0.010, "math12k": -0.003}}
    t2 = report.table2([fake(m, ds, v) for m, row in paper.items() for ds, v in row.items()])
    assert int(t2["1.5B"]["mean_best"] * 1000) / 1000 == pytest.approx(0.016)
    assert int(t2["7B"]["mean_best"] * 1000) / 1000 == pytest.approx(0.009)


def test_linear_fit_of_token_speed_against_the_ratio(rep):
    """x = 0, .05, .10, .15, .15 and Delta = 0, 4, 8, 11, 12 (%): mean x = .09, mean y = 7, Sxx = .017,
    Sxy = 1.30, so slope = 1.30 / .017 = 76.4706, intercept = 7 - 76.4706 * .09 = 0.1176,
    SS_tot = 100, SS_res = 100 - 76.4706 * 1.30 = 0.5882, R^2 = 0.99412."""
    fit = {(f.dataset, f.metric): f for f in report.fits(rep[2]) if f.model == "ckpt/m1"}
    tok = fit[("svamp", "token_speed")]
    assert tok.slope == pytest.approx(76.4706, abs=1e-3) and tok.intercept == pytest.approx(0.11765, abs=1e-4)
    assert tok.r2 == pytest.approx(0.99412, abs=1e-5) and tok.n == 5
    run = fit[("svamp", "runtime")]  # Delta = 0, -4, -7, -10, -11: checked against numpy
    np = pytest.importorskip("numpy")
    xs, ys = [0, .05, .10, .15, .15], [0, -4, -7, -10, -11]
    slope, intercept = np.polyfit(xs, ys, 1)
    assert run.slope == pytest.approx(slope) and run.intercept == pytest.approx(intercept)
    assert run.r2 == pytest.approx(np.corrcoef(xs, ys)[0, 1] ** 2)
    assert ("gsm8k", "token_speed") in fit  # two nested ratios (0.05, 0.15) are enough
    assert all(f.model != "m2" for f in report.fits(rep[2]))  # one ratio: no fit


def test_linear_fit_edge_cases():
    assert report.linear_fit([0, 1, 2], [1, 3, 5]) == (pytest.approx(2.0), pytest.approx(1.0), pytest.approx(1.0))
    assert report.linear_fit([0, 1], [2, 2])[2] is None  # SS_tot = 0
    with pytest.raises(ValueError):
        report.linear_fit([1, 1], [0, 1])


def test_relative_delta():
    assert report.rel_delta(110, 100) == pytest.approx(10.0)
    assert report.rel_delta(1, 0) is None and report.rel_delta(None, 1) is None


def test_two_baselines_are_an_error(tmp_path):
    for name in ("m1__svamp__x0.00__base", "m1__svamp__x0.15__base"):
        shutil.copytree(FIXTURE / name, tmp_path / name)
    shutil.copytree(FIXTURE / "m1__svamp__x0.00__base", tmp_path / "again")
    with pytest.raises(report.ReportError, match="two baselines"):
        report.build_report([tmp_path])


def test_bad_run_directory_names_the_file(tmp_path):
    shutil.copytree(FIXTURE / "m1__svamp__x0.00__base", tmp_path / "r")
    (tmp_path / "r" / "summary.json").write_text('{"runtime_s": 1.0}')
    with pytest.raises(report.ReportError, match="token_speed"):
        report.load_run(tmp_path / "r")


def test_writes_markdown_json_and_figures(tmp_path):
    rep = report.build_report([FIXTURE], tmp_path)
    md = (tmp_path / "report.md").read_text()
    assert "## Table 2" in md and "| ckpt/m1 | best | +0.010 (x=15% practical) | +0.025 (x=15% retrace) | +0.0175 |" in md
    assert "R²" in md and "m3__svamp__x0.05__base" in md
    saved = json.loads((tmp_path / "report.json").read_text())
    assert len(saved["deltas"]) == 7 and saved["table2"]["ckpt/m1"]["datasets"]["svamp"]["best"][1] == "x=15% retrace"
    names = sorted(Path(p).name for p in rep["figures"])
    assert names == ["delta_accuracy.png", "delta_runtime.png", "delta_token_speed.png"]
    for p in rep["figures"]:
        assert Path(p).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and Path(p).stat().st_size > 10_000


def test_cli(tmp_path, capsys):
    assert cli.main(["report", str(FIXTURE), "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out)["deltas"]) == 7
    assert cli.main(["report", str(tmp_path / "missing")]) == 2
    (tmp_path / "empty").mkdir()
    assert cli.main(["report", str(tmp_path / "empty")]) == 2
    assert "holds no run" in capsys.readouterr().err


def test_reward_curves_from_metrics_jsonl(tmp_path):
    runs = tmp_path / "runs"
    for name, rewards in (("m1__svamp__x0.00__base", [0.2, 0.4, 0.6]), ("m1__svamp__x0.15__retrace", [0.1, 0.3])):
        shutil.copytree(FIXTURE / name, runs / name)
        (runs / name / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, "reward_mean": r}) + "\n"
                                                           for i, r in enumerate(rewards)))
    assert report.read_rewards(runs / "m1__svamp__x0.00__base") == [0.2, 0.4, 0.6]
    assert report.read_rewards(FIXTURE / "m1__svamp__x0.00__base") is None  # no metrics.jsonl: no curve
    rep = report.build_report([runs], tmp_path / "out")
    curve = tmp_path / "out" / "reward_curves.png"
    assert str(curve) in rep["figures"] and curve.read_bytes()[:4] == b"\x89PNG"
    assert "![reward_curves](reward_curves.png)" in (tmp_path / "out" / "report.md").read_text()
    with open(runs / "m1__svamp__x0.15__retrace" / "metrics.jsonl", "a") as f:
        f.write('{"step": 3}\n')
    with pytest.raises(report.ReportError, match=r"metrics.jsonl:3: bad metrics line"):
        report.build_report([runs], tmp_path / "out2")


def test_offpolicy_kl_figure_from_metrics_jsonl(tmp_path):
    """offpolicy_kl.png plots the runs whose metrics.jsonl has rollout_corr/k3_kl; older runs are left out."""
    runs = tmp_path / "runs"
    lines = {"m1__svamp__x0.00__base": [{"reward_mean": 0.2}, {"reward_mean": 0.4}],  # an old run: no KL field
             "m1__svamp__x0.15__retrace": [{"reward_mean": 0.1, "rollout_corr/k3_kl": 0.3},
                                           {"reward_mean": 0.2, "rollout_corr/k3_kl": None}]}  # null: non-finite
    for name, rows in lines.items():
        shutil.copytree(FIXTURE / name, runs / name)
        (runs / name / "metrics.jsonl").write_text("".join(json.dumps({"step": i + 1, **r}) + "\n"
                                                           for i, r in enumerate(rows)))
    assert report.read_offpolicy(runs / "m1__svamp__x0.00__base") is None
    points = report.read_offpolicy(runs / "m1__svamp__x0.15__retrace")
    assert points[0] == (0.3, 0.1) and points[1][1] == 0.2 and points[1][0] != points[1][0]  # NaN
    rep = report.build_report([runs], tmp_path / "out")
    fig = tmp_path / "out" / "offpolicy_kl.png"
    assert str(fig) in rep["figures"] and fig.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![offpolicy_kl](offpolicy_kl.png)" in (tmp_path / "out" / "report.md").read_text()
    (runs / "m1__svamp__x0.15__retrace" / "metrics.jsonl").write_text('{"step": 1, "reward_mean": 0.1}\n')
    rep = report.build_report([runs], tmp_path / "out2")  # no run has the field: no figure, no error
    assert not any(Path(p).name == "offpolicy_kl.png" for p in rep["figures"])


def test_moving_average_uses_fewer_values_at_the_start():
    assert report.moving_average([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]


def test_an_importance_run_says_so_in_the_table_labels_and_json(tmp_path):
    for name in ("m1__svamp__x0.00__base", "m1__svamp__x0.15__retrace"):
        shutil.copytree(FIXTURE / name, tmp_path / name)
    cfg = tmp_path / "m1__svamp__x0.15__retrace" / "config.yaml"
    cfg.write_text(cfg.read_text() + "skip_policy: importance\n")
    run = report.load_run(tmp_path / "m1__svamp__x0.15__retrace")
    assert run.skip_policy == "importance" and report.run_label(run, False) == "x = 0.15, retrace (importance)"
    assert report.load_run(tmp_path / "m1__svamp__x0.00__base").skip_policy == "uniform"  # older runs: uniform
    rep = report.build_report([tmp_path], tmp_path / "out")
    assert "| retrace (importance) |" in (tmp_path / "out" / "report.md").read_text()
    assert [d["skip_policy"] for d in rep["deltas"]] == ["importance"]
