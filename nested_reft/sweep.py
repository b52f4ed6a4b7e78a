"""Sweep: the paper's experiment grid (models x data sets x skip ratios x mitigations, plus one baseline per
model x data set), each run trained, evaluated and kept in its own directory; rerunning continues it.

A sweep is a YAML file of `SweepSpec` fields (see configs/sweep-paper.yaml, configs/sweep-toy.yaml):
optional `toy` (build the toy task first), optional `sft` (an SFT warm-up per model x data set whose
checkpoint starts the RL runs, evaluated too), `train_config` + `train` (TrainConfig fields shared by every
run) and `eval` (EvalConfig fields; each run's `final/` checkpoint is evaluated into `<run>/eval/`).

Choices:
- A run's directory is named from its coordinates: `<model>__<dataset>__x<ratio>__<mitigation>`, the
  baseline is `..__x0.00__base` (x = 0, b = 0, m = base). Each run also gets `run.json` with its
  coordinates, which `report` uses for the model label.
- Nested runs take the border from `train` / `train_config` (default 1); the baseline always has b = 0.
- The state of a run is read from its directory: `done` (summary.json, and eval/summary.json when `eval`
  is set) is skipped; `eval` (trained, not evaluated) is only evaluated; `resume` (a complete checkpoint)
  continues with resume=True; `restart` (started, no complete checkpoint) is cleared and begins again;
  `new` starts. `--dry-run` prints this plan and does nothing.
- `lockstep: true` trains the RL runs of one model x data set in one process, one step of each in turn
  (order rotated every step): background load on a shared machine then falls on all variants alike, so
  their token speeds compare fairly. Each run's runtime is still the sum of its own step times and its
  files are the trainer's; every step is a pure function of (seed, step), so a run's samples and
  updates are those it would have alone (tested). Single process; Ctrl-C keeps the last checkpoints.
- Every config of every run is built and validated before the first run starts. A run that fails is
  reported and the sweep goes on with the next; the return value lists what happened to each.
- Paths in the YAML are relative to the current directory, as on the command line.
"""

import dataclasses
import json
import re
import shutil
import sys
import traceback
from pathlib import Path
from typing import NamedTuple

from nested_reft.config import MITIGATIONS, PAPER_MITIGATIONS, ConfigError, TrainConfig, doc, raise_if, resolve

EVAL_DIR = "eval"
GRID_FIELDS = ("model", "dataset", "data_dir", "output_dir", "skip_ratio", "mitigation", "resume")


@dataclasses.dataclass
class SweepSpec:
    """A grid of Nested-ReFT runs (one YAML file)."""

    output_dir: str = doc("runs/sweep", "directory holding one subdirectory per run")
    models: dict = doc({}, "label: model directory or hub id (a list uses each path's last part as label)")
    datasets: list[str] = doc([], "training sets (names under data_dir, .jsonl paths or hub ids)")
    data_dir: str | None = doc(None, "data root for training and eval (default: $NESTED_REFT_DATA)")
    skip_ratios: list[float] = doc([0.05, 0.10, 0.15], "skip ratios x of the nested runs")
    mitigations: list[str] = doc(list(PAPER_MITIGATIONS), "importance weights h_m of the nested runs")
    baseline: bool = doc(True, "also run the baseline (x = 0, b = 0, m = base) per model x dataset")
    train_config: str | None = doc(None, "TrainConfig YAML shared by every run")
    train: dict = doc({}, "TrainConfig fields shared by every run (override train_config)")
    sft: dict | None = doc(None, "SFTConfig fields: SFT warm-up per model x dataset; its checkpoint starts RL")
    eval: dict = doc({}, "EvalConfig fields (benchmarks, limit, max_new_tokens, ...); empty = no evaluation")
    toy: dict | None = doc(None, "build the toy task first: {output_dir, seed, num_train, num_test}")
    threads: int | None = doc(None, "torch CPU threads (default: torch's, one per core)")
    lockstep: bool = doc(False, "train the RL runs of a model x dataset together, one step of each in turn "
                                "(fair timing on a shared machine); false: one after another")


class Job(NamedTuple):
    name: str  # the run directory's name
    model: str  # label
    dataset: str
    skip_ratio: float
    mitigation: str
    out: Path
    cfg: TrainConfig


class SftJob(NamedTuple):
    model: str  # label
    source: str  # model directory or hub id
    dataset: str
    out: Path


# ---- the plan ---------------------------------------------------------------------------------


def load_spec(path) -> SweepSpec:
    """Read and check a sweep YAML (unknown keys and bad types are errors)."""
    spec = resolve(SweepSpec, path)
    if isinstance(spec.models, list):
        spec.models = {label(m): str(m) for m in spec.models}
    check_spec(spec)
    return spec


def label(model: str) -> str:
    """A short label for a model path or hub id: its last path part."""
    return Path(str(model).rstrip("/")).name or str(model)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", text).strip("-")


def run_name(model: str, dataset: str, ratio: float, mitigation: str) -> str:
    return f"{slug(model)}__{slug(Path(dataset).stem if dataset.endswith('.jsonl') else dataset)}__x{ratio:.2f}__{mitigation}"


def check_spec(spec: SweepSpec) -> None:
    """Field-level checks; raises ConfigError listing every problem."""
    e = []
    if not isinstance(spec.models, dict) or not spec.models:
        e.append("models: name at least one model (label: path or hub id)")
    if not spec.datasets:
        e.append("datasets: name at least one training set")
    e += [f"skip_ratios: {x} must be in (0, 0.99]" for x in spec.skip_ratios if not 0 < x <= 0.99]
    e += [f"mitigations: {m!r} is not one of {', '.join(MITIGATIONS)}" for m in spec.mitigations if m not in MITIGATIONS]
    e += [f"train: {k} is set by the grid, not here" for k in spec.train if k in GRID_FIELDS]
    for name, cls, own in (("sft", _sft_cls(), ("model", "dataset", "data_dir", "output_dir")),
                           ("eval", _eval_cls(), ("model", "output_dir"))):
        known = {f.name for f in dataclasses.fields(cls)} - set(own)
        e += [f"{name}: unknown or grid-set field {k!r}" for k in (getattr(spec, name) or {}) if k not in known]
    if spec.threads is not None and spec.threads < 1:
        e.append(f"threads: must be >= 1, got {spec.threads}")
    if spec.toy is not None:
        e += [f"toy: unknown field {k!r}" for k in spec.toy if k not in ("output_dir", "seed", "num_train", "num_test")]
        if "output_dir" not in spec.toy:
            e.append("toy: output_dir is required")
    raise_if(e)


def _sft_cls():
    from nested_reft.sft import SFTConfig

    return SFTConfig


def _eval_cls():
    from nested_reft.evaluate import EvalConfig

    return EvalConfig


def coordinates(spec: SweepSpec) -> list[tuple[str, str, float, str]]:
    """(model label, dataset, x, mitigation) of every run, baselines first per model x dataset."""
    out = []
    for model in spec.models:
        for dataset in spec.datasets:
            out += [(model, dataset, 0.0, "base")] if spec.baseline else []
            out += [(model, dataset, x, m) for x in spec.skip_ratios for m in spec.mitigations]
    return out


def sft_jobs(spec: SweepSpec) -> dict[tuple[str, str], SftJob]:
    if spec.sft is None:
        return {}
    return {(m, d): SftJob(m, spec.models[m], d, Path(spec.output_dir) / "sft" / f"{slug(m)}__{slug(d)}")
            for m in spec.models for d in spec.datasets}


def plan(spec: SweepSpec) -> list[Job]:
    """Every run of the grid with its resolved, validated TrainConfig (before any work)."""
    sfts, jobs, errors = sft_jobs(spec), [], []
    for model, dataset, x, m in coordinates(spec):
        name = run_name(model, dataset, x, m)
        start = str(sfts[(model, dataset)].out) if sfts else spec.models[model]
        grid = dict(model=start, dataset=dataset, data_dir=spec.data_dir, output_dir=str(Path(spec.output_dir) / name),
                    skip_ratio=x, mitigation=m, border=0 if x == 0 else spec.train.get("border"))
        try:
            cfg = resolve(TrainConfig, spec.train_config, {**spec.train, **grid})
            cfg.validate()
            jobs.append(Job(name, model, dataset, x, m, Path(cfg.output_dir), cfg))
        except ConfigError as exc:
            errors.append(f"{name}: {exc}")
    if len({j.name for j in jobs}) != len(jobs):
        errors.append("two runs map to the same directory name: make the model labels / dataset names distinct")
    raise_if(errors)
    return jobs


# ---- state of a run directory -----------------------------------------------------------------


def run_state(out: Path, needs_eval: bool) -> str:
    """done | eval | resume | restart | new (see the module docstring)."""
    from nested_reft.checkpoint import latest_checkpoint

    if (out / "summary.json").is_file():
        return "eval" if needs_eval and not (out / EVAL_DIR / "summary.json").is_file() else "done"
    if latest_checkpoint(out) is not None:
        return "resume"
    return "restart" if out.is_dir() and any(out.iterdir()) else "new"


def sft_state(job: SftJob, needs_eval: bool) -> str:
    if not (job.out / "sft_summary.json").is_file():
        return "new"
    return "eval" if needs_eval and not (job.out / EVAL_DIR / "summary.json").is_file() else "done"


# ---- doing the work ---------------------------------------------------------------------------


def build_toy_once(spec: SweepSpec, log) -> None:
    from nested_reft.synthetic import build_toy

    toy = dict(spec.toy)
    out = Path(toy.pop("output_dir"))
    if (out / "model" / "config.json").is_file() and (out / "data").is_dir():
        log(f"toy task: reusing {out}")
        return
    log(f"toy task: building {out}")
    build_toy(out, **toy)


def run_sft_job(spec: SweepSpec, job: SftJob, state: str, log) -> None:
    from nested_reft.sft import SFTConfig, run_sft

    if state == "new":
        log(f"sft {job.model} on {job.dataset} -> {job.out}")
        run_sft(SFTConfig(model=job.source, dataset=job.dataset, data_dir=spec.data_dir, output_dir=str(job.out), **spec.sft))
    if spec.eval:
        evaluate_dir(spec, job.out, job.out / EVAL_DIR, log)


def evaluate_dir(spec: SweepSpec, model_dir: Path, out: Path, log) -> dict:
    from nested_reft.evaluate import EvalConfig, run_eval

    fields = {"data_dir": spec.data_dir, **spec.eval}
    summary = run_eval(EvalConfig(model=str(model_dir), output_dir=str(out), **fields))
    log(f"  eval {model_dir}: mean accuracy {summary['mean']:.3f}")
    return summary


TRAIN_STATES = ("new", "restart", "resume")


def prepare_run(job: Job, state: str) -> TrainConfig:
    """Clear a run that must restart, write run.json; returns the config to train with."""
    if state == "restart":
        shutil.rmtree(job.out)
    job.out.mkdir(parents=True, exist_ok=True)
    coords = {"name": job.name, "model": job.model, "dataset": job.dataset, "skip_ratio": job.skip_ratio,
              "mitigation": job.mitigation}
    (job.out / "run.json").write_text(json.dumps(coords, indent=2) + "\n")
    return dataclasses.replace(job.cfg, resume=state == "resume")


def train_lockstep(cfgs: list[TrainConfig]) -> list[dict]:
    """Train several runs in one process, one RL step of each in turn (the order rotates every step), so
    that other load on a shared machine falls on all of them alike. Each run is the trainer's own Loop:
    its runtime counts its own steps and checkpoints, as when it runs alone, and its files are the same."""
    from tqdm import tqdm

    from nested_reft import trainer

    loops = [trainer.Loop(trainer.setup(cfg)) for cfg in cfgs]
    first, last = min(lp.start for lp in loops), max(cfg.steps for cfg in cfgs)
    bar = tqdm(total=last - first, desc=f"RL steps ({len(loops)} runs in lockstep)", unit="step")
    for step in range(first, last):
        k = step % len(loops)
        for lp in loops[k:] + loops[:k]:
            if lp.start <= step < lp.run.cfg.steps:
                lp.step(step)
        bar.update(1)
    bar.close()
    return [lp.finish() for lp in loops]


def train_runs(spec: SweepSpec, todo: list[tuple[Job, str]]) -> None:
    """Train the runs that need it (state new / restart / resume), in lockstep if the spec says so."""
    from nested_reft.trainer import train

    cfgs = [prepare_run(job, state) for job, state in todo]
    if spec.lockstep and len(cfgs) > 1:
        train_lockstep(cfgs)
    else:
        for cfg in cfgs:
            train(cfg)


def describe(spec: SweepSpec, jobs: list[Job]) -> list[dict]:
    """The plan as rows: what each SFT and RL run is and what a rerun would do with it."""
    rows = [{"name": f"sft/{j.out.name}", "kind": "sft", "state": sft_state(j, bool(spec.eval)), "dir": str(j.out)}
            for j in sft_jobs(spec).values()]
    rows += [{"name": j.name, "kind": "baseline" if j.skip_ratio == 0 else "nested", "skip_ratio": j.skip_ratio,
              "border": j.cfg.border, "mitigation": j.mitigation, "state": run_state(j.out, bool(spec.eval)),
              "dir": str(j.out)} for j in jobs]
    return rows


def format_plan(rows: list[dict]) -> str:
    lines = [f"{'state':8} {'kind':8} {'x':>5} {'b':>2} {'mitigation':10} run"]
    for r in rows:
        x = f"{r['skip_ratio']:.2f}" if "skip_ratio" in r else ""
        lines.append(f"{r['state']:8} {r['kind']:8} {x:>5} {r.get('border', ''):>2} {r.get('mitigation', ''):10} {r['name']}")
    todo = sum(r["state"] != "done" for r in rows)
    sft = sum(r["kind"] == "sft" for r in rows)
    lines.append(f"{len(rows)} runs ({sft} SFT, {len(rows) - sft} RL), {todo} to do, {len(rows) - todo} done")
    return "\n".join(lines)


def units(spec: SweepSpec, jobs: list[Job], rows: list[dict]) -> list[list[tuple[object, dict]]]:
    """Work in order: each SFT alone, then the RL runs alone or, with lockstep, per model x dataset."""
    sfts = list(sft_jobs(spec).values())
    out = [[(j, r)] for j, r in zip(sfts, rows)]
    rl = list(zip(jobs, rows[len(sfts):]))
    if not spec.lockstep:
        return out + [[pair] for pair in rl]
    groups: dict[tuple[str, str], list] = {}
    for job, row in rl:
        groups.setdefault((job.model, job.dataset), []).append((job, row))
    return out + list(groups.values())


def do_unit(spec: SweepSpec, unit: list[tuple[object, dict]], log) -> None:
    """Train what needs training, then evaluate; sets each row's result."""
    job, row = unit[0]
    if isinstance(job, SftJob):
        run_sft_job(spec, job, row["state"], log)
        row["result"] = "ran"
        return
    train_runs(spec, [(j, r["state"]) for j, r in unit if r["state"] in TRAIN_STATES])
    for j, r in unit:
        try:
            if spec.eval:
                evaluate_dir(spec, j.out / "final", j.out / EVAL_DIR, log)
            r["result"] = "ran"
        except Exception as exc:  # one failed evaluation must not stop the others
            fail(r, exc, log)


def fail(row: dict, exc: Exception, log) -> None:
    row["result"] = f"failed: {type(exc).__name__}: {exc}"
    log(f"  FAILED {row['name']}:\n{traceback.format_exc()}")


def run_sweep(spec: SweepSpec, dry_run: bool = False, log=None) -> list[dict]:
    """Plan, then (unless dry_run) do every unfinished SFT and RL run; returns one row per run with its
    `state` before and `result` (skipped, ran, failed: message)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    jobs = plan(spec)
    rows = describe(spec, jobs)
    if dry_run:
        return rows
    if spec.threads:
        import torch

        torch.set_num_threads(spec.threads)
    if spec.toy is not None:
        build_toy_once(spec, log)
    for unit in units(spec, jobs, rows):
        for _, row in unit:
            if row["state"] == "done":
                row["result"] = "skipped"
        unit = [(j, r) for j, r in unit if "result" not in r]  # not done, not blocked by a failed SFT
        if not unit:
            continue
        log(f"[{rows.index(unit[0][1]) + 1}/{len(rows)}] " + ", ".join(f"{r['name']} ({r['state']})" for _, r in unit))
        try:
            do_unit(spec, unit, log)
        except Exception as exc:  # a failed run must not stop the grid; it is reported
            for _, row in unit:
                fail(row, exc, log)
            job = unit[0][0]
            if isinstance(job, SftJob):  # its RL runs cannot start
                for r in rows:
                    if r["name"].startswith(f"{slug(job.model)}__{slug(job.dataset)}__") and "result" not in r:
                        r["result"], r["state"] = f"failed: SFT {job.out} failed", "blocked"
    return rows
