"""Report: each Nested-ReFT run against its baseline (the paper's deltas, Table 2, Figure 1, linear fits).

Input: run directories as `nested-reft train` / `sweep` / `demo` write them:
  config.yaml         the resolved TrainConfig (model, dataset, skip_ratio, border, mitigation, skip_policy)
  summary.json        the trainer's summary (token_speed, runtime_s, num_layers)
  eval/summary.json   evaluate's summary (optional; `mean` = unweighted mean accuracy over benchmarks)
  run.json            optional labels from sweep/demo: {"model": short name} (default: config's model)
A directory without config.yaml is searched one level down, so `report runs/sweep-toy` works; runs
without summary.json (unfinished) are listed as skipped, never silently dropped.

Choices:
- The baseline of a run = the run with x = 0 of the same (model, dataset); two candidates are an error.
- Delta(z) = 100 (z - z_base) / z_base (None when z_base = 0); absolute delta = z - z_base. Accuracy is a
  fraction in [0, 1], so an absolute delta of +0.008 is +0.8 points, as in the paper's Table 2.
- Table 2: per model and data set, the best (max) and worst (min) absolute accuracy delta over the nested
  instances; the last column is the mean over data sets, signed. The paper prints its magnitude: its
  numbers match the signed mean truncated to 3 decimals (7B best: (0.022 + 0.010 - 0.003) / 3 = 0.0097 -> 0.009).
- Linear fit: least squares Delta = a + b x over one (model, data set)'s nested runs and its baseline
  (x = 0, Delta = 0), pooled over mitigations (with fixed-length rollouts the mitigation does not change
  the cost); R^2 = 1 - SS_res / SS_tot. Fitted only with >= 2 distinct nested ratios.
- Figures (matplotlib, Agg): one PNG per metric like the paper's Figure 1a-c; a panel per (model, data
  set), a line per mitigation, the baseline at 0, red / green annotations on the smallest / largest value,
  and the fitted line on the efficiency panels. reward_curves.png: every run's training reward per step
  from metrics.jsonl, with a moving mean (one step's reward is noisy). offpolicy_kl.png: every run's
  per-step off-policy KL (k3 estimate of KL(eta' || pi_old), `rollout_corr/k3_kl`) on the left axis and
  its per-step reward on the right, one line pair per run; runs whose metrics.jsonl lacks the field
  (older runs) are left out of this figure only.
"""

import json
import math
from pathlib import Path
from typing import NamedTuple

import yaml

from nested_reft.layer_skip import num_skipped

MITIGATION_ORDER = ("base", "practical", "retrace", "tis", "mis")
COLORS = {"base": "tab:blue", "practical": "tab:orange", "retrace": "tab:green", "tis": "tab:red", "mis": "tab:purple"}
OFFPOLICY_KL = "rollout_corr/k3_kl"  # the metrics.jsonl field offpolicy_kl.png plots
METRICS = {  # name: (Run field, axis label, figure file)
    "accuracy": ("accuracy", "Δ accuracy (% of baseline)", "delta_accuracy.png"),
    "token_speed": ("token_speed", "Δ token speed (% of baseline tokens/s)", "delta_token_speed.png"),
    "runtime": ("runtime_s", "Δ runtime (% of baseline seconds)", "delta_runtime.png"),
}


class ReportError(ValueError):
    """A run directory that cannot be read, or runs that cannot be matched to a baseline."""


class Run(NamedTuple):
    path: str
    model: str  # label: run.json's model, else config.yaml's
    dataset: str
    skip_ratio: float
    border: int
    mitigation: str
    num_layers: int | None
    accuracy: float | None  # mean over benchmarks (fraction); None without eval/summary.json
    benchmarks: dict  # benchmark -> accuracy
    token_speed: float  # tokens processed / RL runtime (tokens/s)
    runtime_s: float
    skip_policy: str = "uniform"  # which layers the nested models skipped (train --skip-policy)

    @property
    def skipped_layers(self) -> int | None:
        return num_skipped(self.num_layers, self.skip_ratio) if self.num_layers else None


class Delta(NamedTuple):
    run: Run
    base: Run
    accuracy_abs: float | None
    accuracy_rel: float | None
    token_speed_abs: float
    token_speed_rel: float | None
    runtime_abs: float
    runtime_rel: float | None


class Fit(NamedTuple):
    model: str
    dataset: str
    metric: str  # token_speed or runtime
    slope: float  # percentage points of Delta per unit of x (x = 1.0 is all layers)
    intercept: float
    r2: float | None  # None when all points are equal
    n: int  # points (runs, baseline included)


# ---- loading ----------------------------------------------------------------------------------


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ReportError(f"{path}: cannot read ({exc})") from None


def load_run(path) -> Run:
    """One finished run directory as a Run (raises ReportError naming the file and field)."""
    path = Path(path)
    try:
        cfg = yaml.safe_load((path / "config.yaml").read_text()) or {}
    except (OSError, yaml.YAMLError) as exc:
        raise ReportError(f"{path / 'config.yaml'}: cannot read ({exc})") from None
    summary = _read_json(path / "summary.json")
    labels = _read_json(path / "run.json") if (path / "run.json").is_file() else {}
    ev = _read_json(path / "eval" / "summary.json") if (path / "eval" / "summary.json").is_file() else None
    try:
        ratio = float(cfg["skip_ratio"])
        return Run(str(path), str(labels.get("model") or cfg["model"]), str(cfg["dataset"]), ratio,
                   int(cfg.get("border") if cfg.get("border") is not None else int(ratio > 0)),
                   str(cfg.get("mitigation", "base")), summary.get("num_layers"),
                   None if ev is None else float(ev["mean"]),
                   {} if ev is None else {k: float(v["accuracy"]) for k, v in ev["benchmarks"].items()},
                   float(summary["token_speed"]), float(summary["runtime_s"]), str(cfg.get("skip_policy", "uniform")))
    except (KeyError, TypeError, ValueError) as exc:
        raise ReportError(f"{path}: missing or bad field {exc}") from None


def find_runs(paths) -> tuple[list[Run], list[str]]:
    """(finished runs, skipped directories with the reason); a directory without config.yaml is
    searched one level down."""
    runs, skipped = [], []
    for p in map(Path, paths):
        if not p.is_dir():
            raise ReportError(f"{p} is not a directory")
        candidates = [p] if (p / "config.yaml").is_file() else sorted(c for c in p.iterdir() if (c / "config.yaml").is_file())
        if not candidates:
            raise ReportError(f"{p} holds no run (no config.yaml in it or its subdirectories)")
        for c in candidates:
            if (c / "summary.json").is_file():
                runs.append(load_run(c))
            else:
                skipped.append(f"{c} (unfinished: no summary.json)")
    return runs, skipped


# ---- deltas -----------------------------------------------------------------------------------


def rel_delta(z: float | None, base: float | None) -> float | None:
    """Delta(z) = 100 (z - z_base) / z_base; None when either is missing or z_base = 0."""
    if z is None or base is None or base == 0:
        return None
    return 100.0 * (z - base) / base


def abs_delta(z: float | None, base: float | None) -> float | None:
    return None if z is None or base is None else z - base


def delta(run: Run, base: Run) -> Delta:
    return Delta(run, base, abs_delta(run.accuracy, base.accuracy), rel_delta(run.accuracy, base.accuracy),
                 run.token_speed - base.token_speed, rel_delta(run.token_speed, base.token_speed),
                 run.runtime_s - base.runtime_s, rel_delta(run.runtime_s, base.runtime_s))


def _order(run: Run):
    m = MITIGATION_ORDER.index(run.mitigation) if run.mitigation in MITIGATION_ORDER else len(MITIGATION_ORDER)
    return run.model, run.dataset, run.skip_ratio, m, run.path


def baselines(runs: list[Run]) -> dict[tuple[str, str], Run]:
    """(model, dataset) -> its x = 0 run; raises ReportError when one has two."""
    out = {}
    for r in runs:
        if r.skip_ratio == 0:
            key = (r.model, r.dataset)
            if key in out:
                raise ReportError(f"two baselines (x = 0) for model {key[0]} on {key[1]}: {out[key].path} and {r.path}")
            out[key] = r
    return out


def match(runs: list[Run]) -> tuple[list[Delta], list[str]]:
    """Deltas of every nested run to its baseline, and the nested runs that have none."""
    base = baselines(runs)
    deltas, orphans = [], []
    for r in sorted(runs, key=_order):
        if r.skip_ratio > 0:
            b = base.get((r.model, r.dataset))
            deltas.append(delta(r, b)) if b else orphans.append(f"{r.path} (no baseline with x = 0 for {r.model} on {r.dataset})")
    return deltas, orphans


# ---- Table 2 and the linear fit ----------------------------------------------------------------


def variant(run: Run) -> str:
    """The mitigation, and the skip policy when it is not the paper's uniform draw: 'retrace (importance)'."""
    policy = run.skip_ratio > 0 and run.skip_policy != "uniform"
    return f"{run.mitigation} ({run.skip_policy})" if policy else run.mitigation


def instance(run: Run) -> str:
    return f"x={100 * run.skip_ratio:g}% {variant(run)}"


def table2(deltas: list[Delta]) -> dict:
    """{model: {"datasets": {dataset: {"best": (abs delta, instance), "worst": ...}},
    "mean_best": ..., "mean_worst": ...}} over the runs that have an accuracy."""
    out: dict = {}
    for d in deltas:
        if d.accuracy_abs is None:
            continue
        cell = out.setdefault(d.run.model, {"datasets": {}})["datasets"].setdefault(d.run.dataset, {})
        if "best" not in cell or d.accuracy_abs > cell["best"][0]:
            cell["best"] = (d.accuracy_abs, instance(d.run))
        if "worst" not in cell or d.accuracy_abs < cell["worst"][0]:
            cell["worst"] = (d.accuracy_abs, instance(d.run))
    for row in out.values():
        for case in ("best", "worst"):
            values = [cell[case][0] for cell in row["datasets"].values()]
            row[f"mean_{case}"] = sum(values) / len(values)
    return out


def linear_fit(xs: list[float], ys: list[float]) -> tuple[float, float, float | None]:
    """Least-squares (slope, intercept, R^2) of y = intercept + slope * x."""
    n = len(xs)
    mx, my = sum(xs) / n, sum(ys) / n
    sxx = sum((x - mx) ** 2 for x in xs)
    if sxx == 0:
        raise ValueError("linear fit needs at least two distinct x values")
    slope = sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / sxx
    intercept = my - slope * mx
    ss_tot = sum((y - my) ** 2 for y in ys)
    ss_res = sum((y - intercept - slope * x) ** 2 for x, y in zip(xs, ys))
    return slope, intercept, (1.0 - ss_res / ss_tot) if ss_tot > 0 else None


def fits(deltas: list[Delta]) -> list[Fit]:
    """Delta token speed and Delta runtime against x per (model, dataset), baseline point included."""
    groups: dict[tuple[str, str], list[Delta]] = {}
    for d in deltas:
        groups.setdefault((d.run.model, d.run.dataset), []).append(d)
    out = []
    for (model, dataset), ds in groups.items():
        if len({d.run.skip_ratio for d in ds}) < 2:
            continue
        for metric in ("token_speed", "runtime"):
            ys = [getattr(d, f"{metric}_rel") for d in ds]
            if any(y is None for y in ys):
                continue
            xs = [0.0] + [d.run.skip_ratio for d in ds]
            slope, intercept, r2 = linear_fit(xs, [0.0] + ys)
            out.append(Fit(model, dataset, metric, slope, intercept, r2, len(xs)))
    return out


# ---- figures ----------------------------------------------------------------------------------


def plot_metric(deltas: list[Delta], metric: str, fit_list: list[Fit], path: Path) -> Path:
    """One Figure-1-style PNG: Delta(metric) in % against x in %, a panel per (model, dataset), a line per
    mitigation; panels without runs are left blank."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    field = "accuracy_rel" if metric == "accuracy" else f"{metric}_rel"
    deltas = [d for d in deltas if getattr(d, field) is not None]  # e.g. runs without an evaluation
    models, datasets = sorted({d.run.model for d in deltas}), sorted({d.run.dataset for d in deltas})
    ticks = sorted({0.0} | {100 * d.run.skip_ratio for d in deltas})
    height = 3.8 * len(models) + 0.8  # inches; the bottom 0.8 hold the legend
    width = max(4.8 * len(datasets), 7.5)  # one data set: wide enough for the title and the legend
    fig, axes = plt.subplots(len(models), len(datasets), figsize=(width, height), squeeze=False)
    for i, model in enumerate(models):
        for j, dataset in enumerate(datasets):
            ax, ds = axes[i][j], [d for d in deltas if (d.run.model, d.run.dataset) == (model, dataset)]
            if not ds:
                ax.axis("off")
                continue
            _plot_panel(ax, ds, metric, [f for f in fit_list if (f.model, f.dataset, f.metric) == (model, dataset, metric)])
            ax.set(title=f"{model} on {dataset}", xlabel="skip ratio x (% of layers skipped)", ylabel=METRICS[metric][1],
                   xticks=ticks, xlim=(-1, ticks[-1] + 3))
            ax.title.set_fontsize(10)
    present = [m for m in MITIGATION_ORDER if any(d.run.mitigation == m for d in deltas)]
    handles = [Line2D([], [], marker="s", color="black", linestyle="none", label="baseline (x = 0, b = 0, base)")]
    handles += [Line2D([], [], marker="o", color=COLORS[m], label=f"Nested-ReFT, {m}") for m in present]
    if metric != "accuracy" and fit_list:
        handles.append(Line2D([], [], color="black", linestyle=":", label="linear fit (all mitigations)"))
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 3 if width > 9 else 2), fontsize=9, frameon=False)
    goal = "lower is better" if metric == "runtime" else "higher is better"
    fig.suptitle(f"Nested-ReFT: Δ {metric.replace('_', ' ')} to the baseline (ReFT, x = 0); {goal}", fontsize=11)
    fig.tight_layout(rect=(0, 0.8 / height, 1, 1 - 0.35 / height))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_panel(ax, ds: list[Delta], metric: str, panel_fits: list[Fit]) -> None:
    field = "accuracy_rel" if metric == "accuracy" else f"{metric}_rel"
    points = [(100 * d.run.skip_ratio, getattr(d, field), d.run.mitigation) for d in ds if getattr(d, field) is not None]
    ax.axhline(0.0, color="gray", linestyle="--", linewidth=1)
    ax.plot([0], [0], marker="s", color="black", linestyle="none")
    for m in sorted({p[2] for p in points}, key=lambda m: (m not in MITIGATION_ORDER, m)):
        xs, ys = zip(*sorted((x, y) for x, y, mm in points if mm == m))
        ax.plot(xs, ys, marker="o", color=COLORS.get(m, "gray"))
    for f in panel_fits:
        xmax = max(p[0] for p in points)
        ax.plot([0, xmax], [f.intercept, f.intercept + f.slope * xmax / 100], color="black", linestyle=":", linewidth=1.2)
        r2 = "n/a" if f.r2 is None else f"{f.r2:.3f}"
        ax.text(0.03, 0.95 if f.slope > 0 else 0.05, f"fit: {f.slope / 10:+.2f}% per +10% x, R² = {r2}",
                transform=ax.transAxes, fontsize=8, va="top" if f.slope > 0 else "bottom")
    if len(points) > 1:
        lo, hi = min(points, key=lambda p: p[1]), max(points, key=lambda p: p[1])
        ax.annotate(f"{lo[1]:+.1f}%", lo[:2], textcoords="offset points", xytext=(5, -11), color="red", fontsize=8)
        ax.annotate(f"{hi[1]:+.1f}%", hi[:2], textcoords="offset points", xytext=(5, 4), color="green", fontsize=8)
    ax.margins(y=0.15)
    ax.grid(alpha=0.3)


def plot_figures(deltas: list[Delta], fit_list: list[Fit], out: Path) -> list[str]:
    """The three Figure-1 PNGs in `out` (accuracy only when some run has an accuracy)."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for metric, (_, _, name) in METRICS.items():
        field = "accuracy_rel" if metric == "accuracy" else f"{metric}_rel"
        if any(getattr(d, field) is not None for d in deltas):
            paths.append(str(plot_metric(deltas, metric, fit_list, out / name)))
    return paths


def read_rewards(path) -> list[float] | None:
    """reward_mean per step from a run's metrics.jsonl (None when the run has no metrics.jsonl)."""
    f = Path(path) / "metrics.jsonl"
    if not f.is_file():
        return None
    rewards = []
    for i, line in enumerate(f.read_text().splitlines(), 1):
        if line.strip():
            try:
                rewards.append(float(json.loads(line)["reward_mean"]))
            except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
                raise ReportError(f"{f}:{i}: bad metrics line ({exc!r})") from None
    return rewards


def read_offpolicy(path) -> list[tuple[float, float]] | None:
    """(k3 KL, reward_mean) per step from a run's metrics.jsonl; None when there is no metrics.jsonl or a
    line lacks the KL field (a run from before it was logged). A null (non-finite) KL is NaN (a gap)."""
    f = Path(path) / "metrics.jsonl"
    if not f.is_file():
        return None
    points = []
    for i, line in enumerate(f.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            m = json.loads(line)
            if OFFPOLICY_KL not in m:
                return None
            kl = m[OFFPOLICY_KL]
            points.append((math.nan if kl is None else float(kl), float(m["reward_mean"])))
        except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
            raise ReportError(f"{f}:{i}: bad metrics line ({exc!r})") from None
    return points


def moving_average(values: list[float], window: int) -> list[float]:
    """Mean of the last `window` values at every position (fewer at the start)."""
    return [sum(values[max(0, i - window + 1):i + 1]) / (i + 1 - max(0, i - window + 1)) for i in range(len(values))]


def run_label(run: Run, with_model: bool) -> str:
    name = "baseline" if run.skip_ratio == 0 else f"x = {run.skip_ratio:.2f}, {variant(run)}"
    return f"{Path(run.model).name} on {run.dataset}: {name}" if with_model else name


def plot_rewards(runs: list[Run], path: Path, window: int | None = None) -> Path | None:
    """Training reward per RL step of every run with a metrics.jsonl: faint per step, solid the mean of the
    last `window` steps (default: a tenth of the longest run, at least 4). None when no run has metrics."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r, rw) for r in sorted(runs, key=_order) if (rw := read_rewards(r.path))]
    if not curves:
        return None
    window = window or max(4, max(len(rw) for _, rw in curves) // 10)
    with_model = len({(r.model, r.dataset) for r, _ in curves}) > 1
    kinds = sorted({(r.skip_ratio, r.skip_policy) for r, _ in curves if r.skip_ratio})  # a line style each
    styles = {kind: ls for kind, ls in zip(kinds, ("-", "--", ":", "-."))}
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    for r, rewards in curves:
        color = "black" if r.skip_ratio == 0 else COLORS.get(r.mitigation, "gray")
        steps = range(1, len(rewards) + 1)
        ax.plot(steps, rewards, color=color, alpha=0.2, linewidth=1)
        ax.plot(steps, moving_average(rewards, window), color=color, linewidth=2, linestyle=styles.get((r.skip_ratio, r.skip_policy), "-"),
                label=run_label(r, with_model))
    ax.set(title=f"Training reward per RL step (faint: each step; solid: mean of the last {window} steps)",
           xlabel="RL step", ylabel="mean reward of the step's rollouts", ylim=(0, None))
    return _save_step_figure(fig, ax, path)


def _save_step_figure(fig, ax, path: Path) -> Path:
    """The per-step figures' common finish: integer steps, legend, grid, saved at 110 dpi."""
    import matplotlib.pyplot as plt

    ax.title.set_fontsize(10)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_offpolicy(runs: list[Run], path: Path) -> Path | None:
    """Per-step off-policy KL (k3, left axis, solid) and reward (right axis, dashed) of every run whose
    metrics.jsonl has the KL field, one colour per run. None when no run has it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(r, pts) for r in sorted(runs, key=_order) if (pts := read_offpolicy(r.path))]
    if not series:
        return None
    with_model = len({(r.model, r.dataset) for r, _ in series}) > 1
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    fig, ax = plt.subplots(figsize=(7.5, 4.4))
    right = ax.twinx()
    for k, (r, pts) in enumerate(series):
        color = "black" if r.skip_ratio == 0 else colors[k % len(colors)]
        steps = range(1, len(pts) + 1)
        kl, reward = zip(*pts)
        ax.plot(steps, kl, color=color, linewidth=1.6, label=run_label(r, with_model))
        right.plot(steps, reward, color=color, linewidth=1.2, linestyle="--", alpha=0.7)
    ax.set(title="Off-policy KL(η' || π_old) per RL step (solid, k3, left) and reward (dashed, right)",
           xlabel="RL step", ylabel="k3 estimate of KL(η' || π_old)", ylim=(0, None))
    right.set(ylabel="mean reward of the step's rollouts", ylim=(0, None))
    return _save_step_figure(fig, ax, path)


# ---- output -----------------------------------------------------------------------------------


def _f(value, fmt: str, none: str = "—") -> str:
    return none if value is None or (isinstance(value, float) and math.isnan(value)) else format(value, fmt)


def run_row(r: Run, d: Delta | None) -> str:
    u = _f(r.skipped_layers, "d")
    cells = [r.model, r.dataset, f"{100 * r.skip_ratio:g}", u, str(r.border), variant(r),
             _f(r.accuracy, ".3f"), _f(d and d.accuracy_abs, "+.3f"), _f(d and d.accuracy_rel, "+.1f"),
             _f(r.token_speed, ".1f"), _f(d and d.token_speed_rel, "+.1f"),
             _f(r.runtime_s, ".1f"), _f(d and d.runtime_rel, "+.1f")]
    return "| " + " | ".join(cells) + " |"


def runs_table(runs: list[Run], deltas: list[Delta]) -> str:
    by_path = {d.run.path: d for d in deltas}
    head = ("| model | dataset | x (%) | U | b | mitigation | accuracy | Δabs acc | Δ acc (%) | tokens/s "
            "| Δ tok/s (%) | runtime (s) | Δ runtime (%) |")
    lines = [head, "|" + " --- |" * 6 + " ---: |" * 7]
    lines += [run_row(r, by_path.get(r.path)) for r in sorted(runs, key=_order)]
    return "\n".join(lines)


def table2_markdown(t2: dict) -> str:
    datasets = sorted({ds for row in t2.values() for ds in row["datasets"]})
    lines = ["| model | instance | " + " | ".join(datasets) + " | mean Δabs |", "| --- | --- |" + " ---: |" * (len(datasets) + 1)]
    for model, row in sorted(t2.items()):
        for case in ("best", "worst"):
            cells = [_f(row["datasets"][ds][case][0], "+.3f") + f" ({row['datasets'][ds][case][1]})"
                     if ds in row["datasets"] else "—" for ds in datasets]
            lines.append(f"| {model} | {case} | " + " | ".join(cells) + f" | {row[f'mean_{case}']:+.4f} |")
    return "\n".join(lines)


def fits_markdown(fit_list: list[Fit]) -> str:
    lines = ["| model | dataset | metric | slope (Δ% per +10% of layers skipped) | intercept (%) | R² | points |",
             "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for f in fit_list:
        lines.append(f"| {f.model} | {f.dataset} | Δ {f.metric.replace('_', ' ')} | {f.slope / 10:+.2f} | "
                     f"{f.intercept:+.2f} | {_f(f.r2, '.3f')} | {f.n} |")
    return "\n".join(lines)


def to_markdown(rep: dict, runs: list[Run], deltas: list[Delta], fit_list: list[Fit]) -> str:
    parts = ["# Nested-ReFT report", "",
             f"{len(runs)} runs: {len(deltas)} nested runs matched to {len({d.base.path for d in deltas})} baseline(s). "
             "Δ(z) = 100 (z − z_base) / z_base; Δabs(z) = z − z_base; accuracy is the unweighted mean over "
             "benchmarks (fraction); token speed = tokens processed / RL runtime.", "",
             "## Runs and deltas to the baseline", "", runs_table(runs, deltas), ""]
    if rep["table2"]:
        parts += ["## Table 2: absolute accuracy delta to the baseline, best and worst instance", "",
                  table2_markdown(rep["table2"]), ""]
    if fit_list:
        parts += ["## Efficiency gain against the skip ratio (least-squares line, baseline point included)", "",
                  fits_markdown(fit_list), ""]
    if rep["figures"]:
        parts += ["## Figures", ""] + [f"![{Path(p).stem}]({Path(p).name})" for p in rep["figures"]] + [""]
    if rep["skipped"]:
        parts += ["## Unfinished or unmatched runs (no deltas)", ""] + [f"- {s}" for s in rep["skipped"]] + [""]
    return "\n".join(parts)


def _json_delta(d: Delta) -> dict:
    return {"run": d.run.path, "baseline": d.base.path, "model": d.run.model, "dataset": d.run.dataset,
            "skip_ratio": d.run.skip_ratio, "mitigation": d.run.mitigation,
            "skip_policy": d.run.skip_policy, "skipped_layers": d.run.skipped_layers,
            **{k: getattr(d, k) for k in Delta._fields if k not in ("run", "base")}}


def build_report(paths, output_dir=None, figures: bool = True) -> dict:
    """Everything as a JSON-able dict; with `output_dir`, also writes report.md, report.json and the PNGs."""
    runs, skipped = find_runs(paths)
    deltas, orphans = match(runs)
    fit_list = fits(deltas)
    t2 = table2(deltas)
    out = Path(output_dir) if output_dir else None
    rep = {"runs": [r._asdict() | {"skipped_layers": r.skipped_layers} for r in sorted(runs, key=_order)],
           "deltas": [_json_delta(d) for d in deltas], "table2": t2, "fits": [f._asdict() for f in fit_list],
           "figures": plot_figures(deltas, fit_list, out) if (out and figures and deltas) else [],
           "skipped": skipped + orphans}
    if out and figures and (curve := plot_rewards(runs, out / "reward_curves.png")):
        rep["figures"].append(str(curve))
    if out and figures and (kl := plot_offpolicy(runs, out / "offpolicy_kl.png")):
        rep["figures"].append(str(kl))
    rep["markdown"] = to_markdown(rep, runs, deltas, fit_list)
    if out:
        out.mkdir(parents=True, exist_ok=True)
        (out / "report.md").write_text(rep["markdown"])
        (out / "report.json").write_text(json.dumps({k: v for k, v in rep.items() if k != "markdown"}, indent=2) + "\n")
    return rep
