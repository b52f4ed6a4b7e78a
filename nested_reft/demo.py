"""The demo: the whole Nested-ReFT pipeline on the embedded toy task, on CPU, in about 5 minutes on 2 cores
(295 s on 2026-12-06; 822 s on 2026-12-03's virtual machine, 2.5 times slower at everything).

Builds the toy task (data, tokenizer, 28-layer Qwen2 model), runs the SFT warm-up once (with layer drop, so
that the checkpoint's nested models work too), then RL from that checkpoint: the baseline (x = 0, b = 0,
m = base) and Nested-ReFT at x = 0.15 (U = 4 of 28 layers, b = 1) with practical and retrace; evaluates the
SFT checkpoint and every RL run on the held-out toy problems (several samples each, with standard errors);
prints and writes a comparison table (results.md, results.json) and figures (PNG) into the output directory.

Choices:
- It is a sweep (sweep.py) with a one-ratio grid, so a rerun with the same options skips what is finished
  and resumes what is not; `report.py` computes the deltas. demo.json records the options, and another
  option set in the same directory is an error rather than a silent mix of results.
- The RL settings for the toy are `TOY_RL` (configs/toy.yaml holds the same values for `nested-reft train`;
  a test keeps them equal); SFT uses `synthetic.TOY_SFT`. Rollouts end at EOS (max 64 tokens, enough for
  the longest toy solution) rather than the paper's fixed length: forced to continue past its answer, the
  small model writes a second `\boxed{}` and the reward reads the last one (docs/rollout.md measures the
  loss). lr 3e-5 for 12 steps of 8 prompts x 8 samples: on the SFT checkpoint (0.765 test accuracy),
  lr 1e-5 / 3e-5 / 5e-5 / 1e-4 gave 0.790 / 0.820 / 0.805 / 0.700 after RL (2026-11-22, one seed each).
- The SFT warm-up drops layers (`sft --layer-drop 0.15`, every other update through a fresh nested model)
  for DEMO_SFT_EPOCHS epochs: on the plain 3-epoch checkpoint the nested models score 0.1-0.3 against the
  full model's 0.765 and the nested runs lose 3-16 points to the baseline; docs/results.md measures the
  choice. `--layer-drop 0` gives the paper's plain SFT (3 epochs).
- Skip sets are the paper's uniform draw by default: after layer-drop SFT the importance policy did not
  give better nested models (docs/results.md); `--skip-policy importance` runs it instead.
- Accuracy is pass@1 over `eval_samples` samples per held-out problem; results.json has each run's
  standard error over problems and, for the deltas, the standard error of the per-problem differences
  (paired: the same problems), which is what "within 3 points of the baseline" is judged against.
- The RL runs train in lockstep (sweep.py: one step of each in turn), so that other load on the machine
  falls on all of them alike and their token speeds compare fairly.
- torch uses `threads` CPU threads (default: 2, or the number of cores if fewer). On a quiet 2-core
  machine two threads made the SFT about 1.2x faster (the whole demo took 453 s); on a machine shared
  with other work they oversubscribe the cores and small ops get several times slower: use `--threads 1`
  there. The demo's wall time (summed over the invocations that built it), the machine and the thread
  count are recorded in results.json.
- `--quick` is a tiny preset (a minute) that runs every stage for tests, with no claim about results.
"""

import dataclasses
import json
import os
import platform
import sys
import time
from pathlib import Path

from nested_reft.config import MITIGATIONS

MODEL_LABEL = "toy-28L"
# RL hyperparameters of the toy task (mirrored in configs/toy.yaml).
TOY_RL = dict(num_generations=8, max_new_tokens=64, min_new_tokens=0, temperature=1.0, top_p=1.0, steps=12,
              batch_size=8, micro_batch_size=8, rollout_batch_size=8, lr=3e-5, lr_scheduler="constant",
              warmup_ratio=0.0, loss_type="bnpo", beta=0.0, save_steps=4, keep_checkpoints=1)
TOY_EVAL = dict(benchmarks=["toy"], split="test", temperature=0.6, top_p=0.95, max_new_tokens=80, batch_size=100)
# The demo's default pipeline (docs/results.md measures the choices).
DEMO_LAYER_DROP = 0.15
DEMO_SFT_EPOCHS = 5
DEMO_SKIP_POLICY = "uniform"
DEMO_EVAL_SAMPLES = 4
DEMO_MITIGATIONS = ("practical", "retrace")
PARITY = 0.03  # "matches the baseline": |accuracy delta| at most this (issue 12)
QUICK = dict(num_train=48, num_test=16, steps=2, sft_epochs=1, rl=dict(batch_size=2, micro_batch_size=2,
             rollout_batch_size=2, num_generations=4, max_new_tokens=12, min_new_tokens=12, save_steps=1),
             eval=dict(max_new_tokens=12))


@dataclasses.dataclass
class DemoConfig:
    output_dir: str = "runs/demo"  # everything goes here
    seed: int = 0  # toy task, weights, SFT order, RL sampling
    num_train: int = 2000  # toy training problems (SFT and RL prompts)
    num_test: int = 200  # held-out toy problems
    eval_limit: int | None = None  # evaluate on the first N test problems (None: all)
    steps: int = TOY_RL["steps"]  # RL steps per run
    skip_ratio: float = 0.15  # x of the nested runs
    mitigations: list = dataclasses.field(default_factory=lambda: list(DEMO_MITIGATIONS))
    sft_epochs: int | None = None  # None: DEMO_SFT_EPOCHS with layer drop, synthetic.TOY_SFT's without
    layer_drop: float = DEMO_LAYER_DROP  # SFT's layer-drop ratio, so that the nested models work (0: plain SFT)
    skip_policy: str = DEMO_SKIP_POLICY  # which layers the nested runs skip (train --skip-policy)
    eval_samples: int = DEMO_EVAL_SAMPLES  # samples per held-out problem (pass@1 over them)
    threads: int = min(2, os.cpu_count() or 1)  # torch CPU threads (1 on a machine busy with other work)
    quick: bool = False  # tiny preset for tests (overrides the sizes above)


def check(cfg: DemoConfig) -> None:
    """Raise ValueError naming the first bad option."""
    for name in ("num_train", "num_test", "steps", "threads"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"demo: --{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if cfg.eval_limit is not None and cfg.eval_limit < 1:
        raise ValueError(f"demo: --eval-limit must be >= 1, got {cfg.eval_limit}")
    if cfg.sft_epochs is not None and cfg.sft_epochs < 1:
        raise ValueError(f"demo: --sft-epochs must be >= 1, got {cfg.sft_epochs}")
    if cfg.eval_samples < 1:
        raise ValueError(f"demo: --eval-samples must be >= 1, got {cfg.eval_samples}")
    if not 0 <= cfg.layer_drop < 1:
        raise ValueError(f"demo: --layer-drop must be in [0, 1), got {cfg.layer_drop}")
    if cfg.skip_policy not in ("uniform", "importance"):
        raise ValueError(f"demo: --skip-policy must be uniform or importance, got {cfg.skip_policy!r}")
    if not 0 < cfg.skip_ratio <= 0.5:
        raise ValueError(f"demo: --skip-ratio must be in (0, 0.5], got {cfg.skip_ratio}")
    bad = [m for m in cfg.mitigations if m not in MITIGATIONS]
    if bad or not cfg.mitigations or len(set(cfg.mitigations)) != len(cfg.mitigations):
        raise ValueError(f"demo: --mitigations must be distinct values of {', '.join(MITIGATIONS)}, got {cfg.mitigations}")


def apply_quick(cfg: DemoConfig) -> DemoConfig:
    if not cfg.quick:
        return cfg
    return dataclasses.replace(cfg, num_train=QUICK["num_train"], num_test=QUICK["num_test"], steps=QUICK["steps"],
                               sft_epochs=QUICK["sft_epochs"])


def sweep_spec(cfg: DemoConfig):
    """The demo as a one-ratio sweep over the toy task."""
    from nested_reft.sweep import SweepSpec
    from nested_reft.synthetic import TOY_SFT

    out = Path(cfg.output_dir)
    rl = {**TOY_RL, "steps": cfg.steps, "seed": cfg.seed, "skip_policy": cfg.skip_policy, **(QUICK["rl"] if cfg.quick else {})}
    epochs = cfg.sft_epochs or (DEMO_SFT_EPOCHS if cfg.layer_drop > 0 else TOY_SFT["epochs"])
    sft = {**TOY_SFT, "seed": cfg.seed, "epochs": epochs, "layer_drop": cfg.layer_drop}
    ev = {**TOY_EVAL, "seed": cfg.seed, "limit": cfg.eval_limit, "num_samples": cfg.eval_samples,
          **(QUICK["eval"] if cfg.quick else {})}
    return SweepSpec(output_dir=str(out), models={MODEL_LABEL: str(out / "toy" / "model")}, datasets=["toy"],
                     data_dir=str(out / "toy" / "data"), skip_ratios=[cfg.skip_ratio], mitigations=list(cfg.mitigations),
                     baseline=True, train=rl, sft=sft, eval=ev, lockstep=True, threads=cfg.threads,
                     toy={"output_dir": str(out / "toy"), "seed": cfg.seed, "num_train": cfg.num_train, "num_test": cfg.num_test})


def claim_output_dir(cfg: DemoConfig) -> None:
    """Write demo.json, or check that the directory holds a demo with the same options."""
    out = Path(cfg.output_dir)
    path = out / "demo.json"
    options = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("output_dir", "threads")}
    if path.is_file():
        old = json.loads(path.read_text())
        if old != options:
            diff = ", ".join(f"{k}: {old.get(k)} -> {v}" for k, v in options.items() if old.get(k) != v)
            raise ValueError(f"demo: {out} holds a demo with other options ({diff}); use another --output-dir or delete it")
    out.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(options, indent=2) + "\n")


# ---- results ----------------------------------------------------------------------------------


def read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def problem_scores(eval_dir: Path) -> list[float] | None:
    """Each held-out problem's mean reward over its samples (pass@1), in data order; None if not evaluated."""
    path = eval_dir / "samples.jsonl"
    if not path.is_file():
        return None
    sums, counts = {}, {}
    for line in path.read_text().splitlines():
        r = json.loads(line)
        key = (r["benchmark"], r["problem_index"])
        sums[key], counts[key] = sums.get(key, 0.0) + r["reward"], counts.get(key, 0) + 1
    return [sums[k] / counts[k] for k in sorted(sums)]


def paired_stderr(run: list[float] | None, base: list[float] | None) -> float | None:
    """Standard error of the accuracy difference run - base over the same problems (paired by problem)."""
    from nested_reft.evaluate import standard_error

    if run is None or base is None or len(run) != len(base):
        return None
    return standard_error([a - b for a, b in zip(run, base)])


def collect(cfg: DemoConfig, rep: dict, wall_s: float) -> dict:
    """results.json: the SFT checkpoint, one row per RL run (deltas to the baseline), machine, timing."""
    import torch

    out = Path(cfg.output_dir)
    sft_dir = out / "sft" / f"{MODEL_LABEL}__toy"
    sft_eval, sft_summary = read_json(sft_dir / "eval" / "summary.json"), read_json(sft_dir / "sft_summary.json")
    by_run = {d["run"]: d for d in rep["deltas"]}
    scores = {r["path"]: problem_scores(Path(r["path"]) / "eval") for r in rep["runs"]}
    base_path = next((r["path"] for r in rep["runs"] if r["skip_ratio"] == 0), None)
    rows = []
    for r in rep["runs"]:
        d = by_run.get(r["path"], {})
        metrics = [json.loads(line) for line in (Path(r["path"]) / "metrics.jsonl").read_text().splitlines() if line]
        summary = read_json(Path(r["path"]) / "summary.json")
        ev = read_json(Path(r["path"]) / "eval" / "summary.json")
        rows.append({"run": Path(r["path"]).name, "skip_ratio": r["skip_ratio"], "skipped_layers": r["skipped_layers"],
                     "border": r["border"], "mitigation": r["mitigation"],
                     "skip_policy": summary.get("skip_policy", "uniform") if r["skip_ratio"] > 0 else None,
                     "accuracy": r["accuracy"], "accuracy_stderr": ev and ev["benchmarks"]["toy"]["stderr"],
                     "accuracy_abs_delta": d.get("accuracy_abs"),
                     "accuracy_delta_stderr": None if r["path"] == base_path else paired_stderr(scores[r["path"]], scores.get(base_path)),
                     "token_speed": r["token_speed"],
                     "token_speed_rel_delta": d.get("token_speed_rel"), "runtime_s": r["runtime_s"],
                     "runtime_rel_delta": d.get("runtime_rel"),
                     "rollout_tokens_per_s": summary["rollout_tokens_per_s"],
                     "reward_per_step": [m["reward_mean"] for m in metrics]})
    return {"options": dataclasses.asdict(cfg), "date": time.strftime("%Y-%m-%d"), "wall_s": wall_s,
            "machine": {"cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(), "platform": platform.platform(),
                        "python": platform.python_version(), "torch": torch.__version__},
            "sft": {"accuracy": sft_eval and sft_eval["mean"], "accuracy_stderr": sft_eval and sft_eval["benchmarks"]["toy"]["stderr"],
                    "layer_drop": cfg.layer_drop,
                    "baseline_delta_stderr": paired_stderr(scores.get(base_path), problem_scores(sft_dir / "eval")),
                    "runtime_s": sft_summary and sft_summary["runtime_s"],
                    "loss_last": sft_summary and sft_summary["loss_last"], "updates": sft_summary and sft_summary["updates"]},
            "runs": rows}


def _f(value, fmt: str) -> str:
    return "—" if value is None else format(value, fmt)


def _kind(r: dict) -> str:
    return "baseline" if r["skip_ratio"] == 0 else f"Nested-ReFT ({r.get('skip_policy') or 'uniform'})"


def _pm(value, se, fmt: str = ".3f") -> str:
    """value ± se, or a dash without a value."""
    return "—" if value is None else format(value, fmt) + ("" if se is None else f" ± {se:.3f}")


def table(res: dict) -> str:
    """The comparison table (markdown; readable as plain text too). ± is one standard error."""
    sft = res["sft"]
    lines = ["| run (skip policy) | x | U | b | mitigation | acc. after SFT | acc. after RL | Δabs acc. | tokens/s "
             "| Δ tokens/s (%) | runtime (s) | Δ runtime (%) |", "| --- | ---: | ---: | ---: | --- |" + " ---: |" * 7]
    for r in res["runs"]:
        lines.append(f"| {_kind(r)} | {r['skip_ratio']:.2f} | {r['skipped_layers']} | {r['border']} | {r['mitigation']} | "
                     f"{_pm(sft['accuracy'], sft.get('accuracy_stderr'))} | {_pm(r['accuracy'], r.get('accuracy_stderr'))} | "
                     f"{_pm(r['accuracy_abs_delta'], r.get('accuracy_delta_stderr'), '+.3f')} | "
                     f"{r['token_speed']:.0f} | {_f(r['token_speed_rel_delta'], '+.1f')} | {r['runtime_s']:.1f} | "
                     f"{_f(r['runtime_rel_delta'], '+.1f')} |")
    return "\n".join(lines)


def verdicts(res: dict) -> list[str]:
    """One line per claim the demo checks, with the measured numbers."""
    base = next((r for r in res["runs"] if r["skip_ratio"] == 0), None)
    sft = res["sft"]["accuracy"]
    out = []
    if base and sft is not None and base["accuracy"] is not None:
        word = "improves" if base["accuracy"] > sft else "does NOT improve"
        se = res["sft"].get("baseline_delta_stderr")
        out.append(f"RL {word} the baseline's accuracy over SFT: {sft:.3f} -> {base['accuracy']:.3f} "
                   f"({base['accuracy'] - sft:+.3f}" + ("" if se is None else f" ± {se:.3f} paired SE") + ")")
    for r in res["runs"]:
        if r["skip_ratio"] == 0 or base is None:
            continue
        name = f"{r['mitigation']:9} x={r['skip_ratio']:.2f}"
        if r["accuracy_abs_delta"] is not None:
            word = "within" if abs(r["accuracy_abs_delta"]) <= PARITY else "NOT within"
            se = r.get("accuracy_delta_stderr")
            out.append(f"{name}: accuracy {word} {100 * PARITY:.0f} points of the baseline's ({r['accuracy']:.3f} vs "
                       f"{base['accuracy']:.3f}, {r['accuracy_abs_delta']:+.3f}" + ("" if se is None else f" ± {se:.3f} paired SE") + ")")
        if r["token_speed_rel_delta"] is not None:
            word = "above" if r["token_speed_rel_delta"] > 0 else "NOT above"
            out.append(f"{name}: token speed {word} the baseline's "
                       f"({r['token_speed']:.0f} vs {base['token_speed']:.0f} tokens/s, {r['token_speed_rel_delta']:+.1f}%)")
    return out


def markdown(res: dict, figures: list[str]) -> str:
    o = res["options"]
    m = res["machine"]
    head = [f"# Nested-ReFT demo ({res['date']})", "",
            f"Toy task: {o['num_train']} train / {o['num_test']} test problems, 28-layer Qwen2 model; "
            f"SFT ({res['sft']['updates']} updates, layer drop {res['sft'].get('layer_drop', 0):g}, {_f(res['sft']['runtime_s'], '.0f')} s), then {o['steps']} RL steps per run. "
            f"Wall time {res['wall_s']:.0f} s on {m['cpus']} CPUs ({m['torch_threads']} torch threads), {m['platform']}.", "",
            f"Accuracy: pass@1 over {o.get('eval_samples', 1)} samples per held-out problem; ± is one standard error "
            "(over problems; for Δ, paired by problem).", "",
            table(res), "", *[f"- {v}" for v in verdicts(res)], ""]
    return "\n".join(head + [f"![{Path(f).stem}]({Path(f).name})" for f in figures] + [""])


# ---- figures ----------------------------------------------------------------------------------


def plot(res: dict, out: Path) -> list[str]:
    """demo_results.png (accuracy, token speed, runtime per run) and demo_reward.png (report.plot_rewards)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nested_reft.report import COLORS, find_runs, plot_rewards

    runs = res["runs"]
    names = ["baseline" if r["skip_ratio"] == 0 else f"x={r['skip_ratio']:.2f}\n{r['mitigation']}" for r in runs]
    colors = ["black" if r["skip_ratio"] == 0 else COLORS.get(r["mitigation"], "gray") for r in runs]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    sft = res["sft"]["accuracy"]
    acc = [100 * (r["accuracy"] or 0) for r in runs]
    errors = [100 * (r.get("accuracy_stderr") or 0) for r in runs]
    axes[0].bar(names, acc, color=colors, yerr=errors, capsize=4, ecolor="gray")  # ± one standard error
    if sft is not None:
        axes[0].axhline(100 * sft, color="gray", linestyle="--", label=f"after SFT ({100 * sft:.1f}%)")
        axes[0].legend(loc="lower right", fontsize=8)
    axes[0].set(title="Accuracy after RL (held-out toy problems)", ylabel="pass@1 accuracy (%)")
    for ax, key, title, ylabel in ((axes[1], "token_speed", "Token speed (higher is better)", "tokens processed / RL runtime (tokens/s)"),
                                   (axes[2], "runtime_s", "RL runtime (lower is better)", "runtime (s)")):
        values = [r[key] for r in runs]
        ax.bar(names, values, color=colors)
        base = values[0] if runs and runs[0]["skip_ratio"] == 0 else None
        for i, v in enumerate(values):
            label = f"{v:.4g}" if base is None or i == 0 else f"{v:.4g}\n({100 * (v - base) / base:+.1f}%)"
            ax.annotate(label, (i, v), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
        ax.set(title=title, ylabel=ylabel)
        ax.margins(y=0.2)
    for i, v in enumerate(acc):
        axes[0].annotate(f"{v:.1f}", (i, v), ha="center", va="bottom", fontsize=8, xytext=(0, 2), textcoords="offset points")
    axes[0].set_ylim(0, max(acc + [100 * (sft or 0), 5]) * 1.25)
    for ax in axes:
        ax.tick_params(axis="x", labelsize=8)
    fig.suptitle(f"Nested-ReFT demo: baseline (x = 0) vs Nested-ReFT (U = {runs[-1]['skipped_layers']} of 28 layers skipped)", fontsize=11)
    fig.tight_layout()
    paths = [out / "demo_results.png"]
    fig.savefig(paths[0], dpi=110)
    plt.close(fig)

    paths.append(plot_rewards(find_runs([out])[0], out / "demo_reward.png"))
    return [str(p) for p in paths]


# ---- the whole thing --------------------------------------------------------------------------


def run_demo(cfg: DemoConfig, log=None) -> dict:
    """Run (or continue) the demo; returns results.json's content (also written with results.md, PNGs)."""
    import torch

    from nested_reft.report import build_report
    from nested_reft.sweep import run_sweep

    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    check(cfg)
    cfg = apply_quick(cfg)
    torch.set_num_threads(cfg.threads)
    spec = sweep_spec(cfg)
    claim_output_dir(cfg)
    start = time.perf_counter()
    rows = run_sweep(spec, log=log)
    failed = [r for r in rows if str(r.get("result", "")).startswith("failed")]
    if failed:
        raise RuntimeError("demo: " + "; ".join(f"{r['name']} {r['result']}" for r in failed))
    out = Path(cfg.output_dir)
    rep = build_report([out], figures=False)
    earlier = read_json(out / "results.json")  # a rerun adds its time to the run it continues
    res = collect(cfg, rep, time.perf_counter() - start + (earlier["wall_s"] if earlier else 0.0))
    res["figures"] = plot(res, out)
    res["table"] = table(res)
    res["verdicts"] = verdicts(res)
    (out / "results.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "results.md").write_text(markdown(res, res["figures"]))
    return res
