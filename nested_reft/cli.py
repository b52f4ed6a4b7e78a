"""The `nested-reft` command line: one subcommand per stage, each a thin shell over library functions.

Every subcommand validates its inputs before any work starts and exits non-zero with a message that
names the bad field, file:line or value. Machine-readable output is printed with `--json`.
"""

import argparse
import json
import os
import sys


class UsageError(Exception):
    """A bad input found before work started: printed as `error: ...`, exit code 2."""


class RunFailure(Exception):
    """A failure during the work (disk full, a dead peer process, diverged weights): `error: ...`, exit 1."""


def _run_failures():
    """The exception types that are failures during a run (exit 1), not bad input (exit 2)."""
    from nested_reft.checkpoint import CheckpointError
    from nested_reft.distributed import CollectiveError
    from nested_reft.trainer import TrainingError

    return CheckpointError, CollectiveError, TrainingError


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2))


# ---- bench ------------------------------------------------------------------------------------


def _add_bench(sub) -> None:
    p = sub.add_parser("bench", help="speed of full vs nested models: rollouts or whole RL steps (measured vs ideal)")
    p.add_argument("--mode", choices=("rollout", "step"), default="rollout",
                   help="rollout: the decode loop alone; step: whole RL steps of `train` (rollout, reward, update) "
                        "with the rollout share and the share-adjusted ideal (default: rollout)")
    p.add_argument("--micro-batch-size", type=int, default=4, help="step mode: prompts per update pass (default 4)")
    p.add_argument("--model", help="model directory or hub id (default: a random-weight --preset)")
    p.add_argument("--preset", default="tiny-28", help="tiny-28 (CPU), qwen2.5-1.5b, qwen2.5-7b (default: tiny-28)")
    p.add_argument("--hidden-size", type=int, help="override the preset's width (e.g. a narrow 1.5B on CPU)")
    p.add_argument("--skip-ratio", type=float, nargs="+", default=[0.05, 0.10, 0.15], help="skip ratios x")
    p.add_argument("--border", type=int, default=1, help="b: layers protected at each end (default 1)")
    p.add_argument("--batch-size", type=int, default=8, help="prompts per rollout (default 8)")
    p.add_argument("--num-generations", type=int, default=4, help="G completions per prompt (default 4)")
    p.add_argument("--prompt-len", type=int, default=32, help="prompt tokens (default 32)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="fixed completion length (default 64)")
    p.add_argument("--repeats", type=int, default=5, help="timed rounds; the median is reported (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (default 1)")
    p.add_argument("--temperature", type=float, default=1.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu or cuda")
    p.add_argument("--dtype", default="auto", help="auto (bf16 on CUDA), float32, bfloat16, float16")
    p.add_argument("--compare-generate", action="store_true", help="also time HF model.generate() (full model)")
    p.add_argument("--floor", action="store_true",
                   help="also measure the device's matmul rate and memory bandwidth and report each variant's "
                        "share of its floor (arithmetic, weight and KV-cache reads; docs/benchmarks.md)")
    p.add_argument("--cuda-graphs", action="store_true",
                   help="decode with CUDA graphs (CUDA, full-attention models); rollout mode also times the full "
                        "model without them")
    p.add_argument("--json", action="store_true", help="print one JSON object per ratio")
    p.add_argument("--profile", action="store_true",
                   help="also print where a full-model rollout's time goes (embedding, layers, LM head, rest)")
    p.set_defaults(func=_run_bench)


def _run_bench(args) -> int:
    from nested_reft.bench import BenchConfig, format_table, run_bench

    cfg = BenchConfig(model=args.model, preset=args.preset, hidden_size=args.hidden_size, ratios=args.skip_ratio,
                      border=args.border, batch_size=args.batch_size, num_generations=args.num_generations,
                      prompt_len=args.prompt_len, max_new_tokens=args.max_new_tokens, repeats=args.repeats,
                      warmup=args.warmup, temperature=args.temperature, top_p=args.top_p, seed=args.seed,
                      device=args.device, dtype=args.dtype, compare_generate=args.compare_generate,
                      mode=args.mode, micro_batch_size=args.micro_batch_size, floor=args.floor,
                      cuda_graphs=args.cuda_graphs)
    try:
        cfg.validate()
    except ValueError as exc:
        raise UsageError(str(exc)) from exc
    progress = None if args.json else (lambda i, n: print(f"round {i}/{n}", file=sys.stderr))
    if args.mode == "step":
        from nested_reft.bench import format_step_table, run_step_bench
        from nested_reft.config import ConfigError

        try:
            result = run_step_bench(cfg, progress)
        except (ConfigError, ValueError, IndexError, TypeError) as exc:
            raise UsageError(str(exc)) from exc
        _print_json(result) if args.json else print(format_step_table(result))
        return 0
    try:
        results = run_bench(cfg, progress)
    except (ValueError, IndexError, TypeError) as exc:
        raise UsageError(str(exc)) from exc
    _print_json(results) if args.json else print(format_table(results))
    if args.profile:
        from nested_reft.bench import load_bench_model, profile_rollout

        model, _ = load_bench_model(cfg)
        shares = profile_rollout(model, cfg)
        print("\nfull-model rollout time: " + ", ".join(
            f"{k} {v:.1%}" for k, v in shares.items() if k != "total_s") + f" (of {shares['total_s']:.2f} s)")
    return 0


# ---- grade ------------------------------------------------------------------------------------


def _add_grade(sub) -> None:
    p = sub.add_parser("grade", help="score a JSONL of completions against reference answers")
    p.add_argument("file", help='JSONL, one {"completion", "answer"} object per line (optional "answer_alternatives")')
    p.add_argument("--output", help='write the records with "extracted" and "reward" added to this JSONL')
    p.add_argument("--json", action="store_true", help='print {"n", "correct", "accuracy"} as JSON')
    p.set_defaults(func=_run_grade)


def _run_grade(args) -> int:
    from nested_reft.rewards import grade_file

    try:
        summary = grade_file(args.file, args.output)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        _print_json(summary)
    else:
        print(f"graded {summary['n']} completions: {summary['correct']} correct, accuracy {summary['accuracy']:.4f}")
    return 0


# ---- toy --------------------------------------------------------------------------------------


def _add_toy(sub) -> None:
    p = sub.add_parser("toy", help="build the embedded toy task: data (train/test JSONL) and a 28-layer Qwen2 model")
    p.add_argument("--output-dir", required=True, help="writes DIR/model/ and DIR/data/toy/{train,test}.jsonl")
    p.add_argument("--seed", type=int, default=0, help="seeds problems, tokenizer and weights (default 0)")
    p.add_argument("--num-train", type=int, default=2000, help="training problems (default 2000)")
    p.add_argument("--num-test", type=int, default=200, help="test problems (default 200)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")
    p.set_defaults(func=_run_toy)


def _run_toy(args) -> int:
    from nested_reft.synthetic import build_toy

    if args.num_train < 1 or args.num_test < 1:
        raise UsageError("--num-train and --num-test must be >= 1")
    try:
        summary = build_toy(args.output_dir, seed=args.seed, num_train=args.num_train, num_test=args.num_test)
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        _print_json(summary)
    else:
        print(f"toy task: {summary['num_train']} train / {summary['num_test']} test problems in {summary['data_dir']}")
        print(f"model: {summary['num_parameters']:,} parameters, vocab {summary['vocab_size']}, in {summary['model']}")
    return 0


# ---- sft --------------------------------------------------------------------------------------


def _add_config_parser(sub, name: str, cls, func, **kwargs):
    """A subcommand whose flags are the fields of the dataclass `cls`, plus `--config` YAML (flags win)."""
    from nested_reft.config import add_arguments

    p = sub.add_parser(name, **kwargs)
    p.add_argument("--config", help=f"YAML file of {cls.__name__} fields (flags win)")
    add_arguments(p, cls)
    p.set_defaults(func=func, config_class=cls)
    return p


def _resolve_config(args):
    """The dataclass of a `_add_config_parser` subcommand: defaults < YAML < typed flags."""
    from nested_reft.config import ConfigError, resolve

    try:
        return resolve(args.config_class, args.config, vars(args))
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc


def _run_config(run, args):
    """`run(config)` for a `_add_config_parser` subcommand; bad input (a file, a value) is a usage error,
    a failure while working (e.g. the disk filled up) a run failure."""
    try:
        return run(_resolve_config(args))
    except _run_failures() as exc:
        raise RunFailure(str(exc)) from exc
    except (OSError, ValueError) as exc:
        raise UsageError(str(exc)) from exc


def _add_sft(sub) -> None:
    from nested_reft.sft import SFTConfig

    p = _add_config_parser(sub, "sft", SFTConfig, _run_sft,
                           help="SFT warm-up on (prompt, chain-of-thought); writes an HF checkpoint")
    p.add_argument("--json", action="store_true", help="print the summary as JSON")


def _run_sft(args) -> int:
    from nested_reft.sft import run_sft

    summary = _run_config(run_sft, args)
    if int(os.environ.get("RANK", "0")) != 0:  # several processes (torchrun / accelerate launch): print once
        return 0
    if args.json:
        _print_json(summary)
    else:
        print(f"sft: {summary['updates']} updates ({summary['skipped_updates']} skipped), loss "
              f"{summary['loss_first']:.4f} -> {summary['loss_last']:.4f}, {summary['runtime_s']:.1f} s; "
              f"checkpoint in {summary['output_dir']}")
    return 0


# ---- train ------------------------------------------------------------------------------------


def _add_train(sub) -> None:
    from nested_reft.config import TrainConfig

    _add_config_parser(sub, "train", TrainConfig, _run_train, help="the Nested-ReFT RL stage (Algorithm 1, step 2)",
                       description="GRPO with rollouts from a freshly drawn nested model every step. "
                                   "Flags override the YAML given with --config.")


def _run_train(args) -> int:
    from nested_reft.config import ConfigError
    from nested_reft.trainer import setup, train

    cfg = _resolve_config(args)
    try:
        run = setup(cfg)
        summary = train(cfg, run)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    except _run_failures() as exc:  # disk, a dead or stalled peer, diverged weights: exit 1 (not a usage error)
        raise RunFailure(str(exc)) from exc
    except KeyboardInterrupt:
        print("interrupted; resume with --resume true", file=sys.stderr)
        return 130
    if run.accelerator.is_main_process:
        _print_json(summary)
    return 0


# ---- eval -------------------------------------------------------------------------------------


def _add_eval(sub) -> None:
    from nested_reft.evaluate import EvalConfig

    p = _add_config_parser(sub, "eval", EvalConfig, _run_eval,
                           help="pass@k on math benchmarks (per benchmark and the unweighted mean)")
    p.add_argument("--json", action="store_true", help="print the summary as JSON instead of a table")


def _run_eval(args) -> int:
    from nested_reft.evaluate import format_table, run_eval

    summary = _run_config(run_eval, args)
    if args.json:
        _print_json(summary)
    else:
        print(format_table(summary))
        if "summary_file" in summary:
            print(f"samples in {summary['samples_file']}, summary in {summary['summary_file']}")
    return 0


# ---- layers -----------------------------------------------------------------------------------


def _add_layers(sub) -> None:
    from nested_reft.importance import LayersConfig

    p = _add_config_parser(sub, "layers", LayersConfig, _run_layers,
                           help="per-layer importance: Block Influence, and the KL of skipping each layer or a set",
                           description="Teacher-forces a data set's problems with their reference solutions and "
                                       "reports each layer's Block Influence (1 - cos of its input and output, one "
                                       "forward pass); --kl adds KL(full || without layer i) per layer, --skip-layers "
                                       "the KL of that whole set. A table on stdout; --output-dir writes layers.json "
                                       "and a bar chart layers.png.")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of a table")


def _run_layers(args) -> int:
    from nested_reft.importance import format_layers, run_layers

    report = _run_config(run_layers, args)
    if args.json:
        _print_json(report)
    else:
        print(format_layers(report))
        if "files" in report:
            print("wrote " + ", ".join(report["files"]))
    return 0


# ---- demo / sweep / report --------------------------------------------------------------------


def _add_demo(sub) -> None:
    from nested_reft.demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser("demo", help="the whole pipeline on the toy task (CPU, about 5 minutes on 2 cores): SFT, baseline vs Nested-ReFT",
                       description="Builds the toy task and model, runs SFT once, then RL: the baseline (x = 0) and "
                                   "Nested-ReFT at --skip-ratio with each mitigation; evaluates all and prints a comparison "
                                   "table. A rerun with the same options continues where it stopped.")
    p.add_argument("--output-dir", default=d.output_dir, help=f"where everything is written (default {d.output_dir})")
    p.add_argument("--steps", type=int, default=d.steps, help=f"RL steps per run (default {d.steps})")
    p.add_argument("--num-train", type=int, default=d.num_train, help=f"toy training problems (default {d.num_train})")
    p.add_argument("--num-test", type=int, default=d.num_test, help=f"held-out toy problems (default {d.num_test})")
    p.add_argument("--eval-limit", type=int, help="evaluate on the first N test problems only (default: all)")
    p.add_argument("--skip-ratio", type=float, default=d.skip_ratio, help=f"x of the nested runs (default {d.skip_ratio})")
    p.add_argument("--mitigations", nargs="+", default=d.mitigations,
                   help=f"nested runs to do (default: {' '.join(d.mitigations)}; base is the paper's third)")
    p.add_argument("--sft-epochs", type=int, help="SFT epochs (default: 5 with layer drop, 3 without)")
    p.add_argument("--layer-drop", type=float, default=d.layer_drop,
                   help=f"SFT layer-drop ratio, so the nested models work; 0 = plain SFT (default {d.layer_drop})")
    p.add_argument("--skip-policy", choices=["uniform", "importance"], default=d.skip_policy,
                   help=f"which layers the nested runs skip (default {d.skip_policy})")
    p.add_argument("--eval-samples", type=int, default=d.eval_samples,
                   help=f"samples per held-out problem (default {d.eval_samples})")
    p.add_argument("--seed", type=int, default=d.seed, help=f"seeds everything (default {d.seed})")
    p.add_argument("--threads", type=int, default=d.threads, help=f"torch CPU threads (default {d.threads})")
    p.add_argument("--quick", action="store_true", help="tiny preset (about a minute) that runs every stage; for tests")
    p.add_argument("--json", action="store_true", help="print results.json instead of the table")
    p.set_defaults(func=_run_demo)


def _run_demo(args) -> int:
    from nested_reft.config import ConfigError
    from nested_reft.demo import DemoConfig, run_demo

    cfg = DemoConfig(output_dir=args.output_dir, seed=args.seed, num_train=args.num_train, num_test=args.num_test,
                     eval_limit=args.eval_limit, steps=args.steps, skip_ratio=args.skip_ratio,
                     mitigations=args.mitigations, sft_epochs=args.sft_epochs, layer_drop=args.layer_drop,
                     skip_policy=args.skip_policy, eval_samples=args.eval_samples, threads=args.threads, quick=args.quick)
    try:
        res = run_demo(cfg)
    except (ConfigError, ValueError) as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        _print_json(res)
    else:
        print(res["table"])
        print("\n".join(res["verdicts"]))
        print(f"results: {args.output_dir}/results.md, results.json, figures: {', '.join(res['figures'])}")
    return 0


def _add_sweep(sub) -> None:
    p = sub.add_parser("sweep", help="the experiment grid: models x datasets x ratios x mitigations + baselines",
                       description="Trains and evaluates every run of the grid described in CONFIG, each in its own "
                                   "directory; a rerun skips finished runs and resumes unfinished ones.")
    p.add_argument("config", help="sweep YAML (see configs/sweep-toy.yaml, configs/sweep-paper.yaml)")
    p.add_argument("--dry-run", action="store_true", help="list the runs and what a run would do with each; do nothing")
    p.add_argument("--json", action="store_true", help="print the plan / results as JSON")
    p.set_defaults(func=_run_sweep)


def _run_sweep(args) -> int:
    from nested_reft.config import ConfigError
    from nested_reft.sweep import format_plan, load_spec, run_sweep

    try:
        rows = run_sweep(load_spec(args.config), dry_run=args.dry_run)
    except ConfigError as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        _print_json(rows)
    else:
        print(format_plan(rows))
        for r in rows:
            print(f"{r['name']}: {r['result']}") if "result" in r and r["result"] != "skipped" else None
    return 1 if any(str(r.get("result", "")).startswith("failed") for r in rows) else 0


def _add_report(sub) -> None:
    p = sub.add_parser("report", help="deltas to the baseline, the paper's Table 2, Figure-1 plots, linear fits, reward curves",
                       description="Matches each nested run to its baseline (same model and dataset, x = 0) and reports "
                                   "accuracy, token speed and runtime deltas; plots every run's training reward per step "
                                   "(reward_curves.png) and its off-policy KL against the reward "
                                   "(offpolicy_kl.png). A directory without config.yaml is "
                                   "searched one level down.")
    p.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="run directories (or directories of runs)")
    p.add_argument("--output-dir", help="write report.md, report.json and the PNG figures here")
    p.add_argument("--json", action="store_true", help="print the report as JSON instead of markdown")
    p.set_defaults(func=_run_report)


def _run_report(args) -> int:
    from nested_reft.report import ReportError, build_report

    try:
        rep = build_report(args.run_dirs, args.output_dir)
    except ReportError as exc:
        raise UsageError(str(exc)) from exc
    if args.json:
        _print_json({k: v for k, v in rep.items() if k != "markdown"})
    else:
        print(rep["markdown"])
    return 0


# ---- parser -----------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nested-reft",
        description="Reinforced fine-tuning with rollouts from layer-skipped nested models (Nested-ReFT).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in (_add_bench, _add_train, _add_grade, _add_toy, _add_sft, _add_eval, _add_layers, _add_demo, _add_sweep, _add_report):
        add(sub)
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except UsageError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RunFailure as exc:
        print(f"error: {exc}", file=sys.stderr)
        if _is_collective(exc.__cause__):
            _exit_now(1)
        return 1


def _is_collective(exc) -> bool:
    from nested_reft.distributed import CollectiveError

    return isinstance(exc, CollectiveError)


def _exit_now(code: int) -> None:
    """Exit without interpreter teardown. After a timed-out collective the process group still holds a
    pending gloo/NCCL operation; destroying it at exit aborts the process (SIGABRT, 'terminate called
    without an active exception') instead of exiting with the error's code."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
