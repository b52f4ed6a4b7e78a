"""Speed of the full model against nested models: rollouts alone (`run_bench`, `--mode rollout`) or whole
RL steps (`run_step_bench`, `--mode step`), measured against the ideal speedup.

Choices:
- Fixed-length rollouts (min_new_tokens = max_new_tokens, EOS suppressed), as in the paper, so tokens/s
  does not depend on the weights: random-weight models of the real architectures (`--preset`) measure
  the same speed as trained checkpoints.
- One warm-up round, then `repeats` rounds; each round runs every variant (full model, then each ratio
  with a freshly drawn skip set, border b) in an order that rotates between rounds, so drift in machine
  load hits all variants alike. The median time per variant is reported.
- ideal_speedup = N / (N - U); measured_speedup = median full time / median nested time;
  efficiency = measured / ideal.
- `compare_generate` also times HF `model.generate()` (the path TRL uses without vLLM) on the full model
  with the same sampling settings, interleaved with the engine, and reports the engine/generate ratio.
- `cuda_graphs` runs the engine's variants with their one-token steps replayed from CUDA graphs
  (decode_graphs.py) and adds the full model decoded eagerly to the rotation, for the graphs' speedup.
- `floor` adds each variant's share of the machine's floor (floor.py: the arithmetic at the rate this
  device multiplies the model's matrices, and the weight and KV-cache reads at its copy bandwidth): how
  far the decode loop is from what the hardware allows, for the engine and for generate().
- Whole steps (`--mode step`) run `nested-reft train`'s own step (trainer.setup + trainer.rl_step: rollout,
  reward, update) for the full model (x = 0) and each ratio, one training run per variant on its own copy
  of the model, alternated round by round; a preset gets the toy task's tokenizer and prompts of random
  digits, saved with the model to a temporary directory. Only the rollout gets faster, so the
  ideal step speedup for the rollout share f (median rollout_s / step_s of the full model) is Amdahl's
  1 / ((1 - f) + f (N - U) / N); the measured speedup is the median over rounds of the round's full step
  time / its nested step time (a round's variants run back to back, so slow drift of the machine cancels
  in each ratio); efficiency = measured / ideal. The gain (measured speedup - 1, in %) is fitted by least
  squares against x over the ratios and the baseline's (0, 0), with R^2.
"""

import statistics
import time
from dataclasses import dataclass, field

import torch

from nested_reft.decode_graphs import graphs_problem
from nested_reft.floor import Floor, Machine, ModelShape, measure_machine, model_shape, rollout_floor, sync
from nested_reft.layer_skip import check_skip_config, num_skipped, sample_skip_set
from nested_reft.nested import nesting_problem, num_layers
from nested_reft.rollout import SamplingConfig, generate

# Random-weight presets. tiny-28 keeps Qwen2.5-1.5B's depth at a width a 2-core CPU runs in seconds.
PRESETS = {
    "tiny-28": dict(hidden_size=256, intermediate_size=768, num_attention_heads=4, num_key_value_heads=2,
                    vocab_size=2048, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12, num_key_value_heads=2,
                         vocab_size=151936, tie_word_embeddings=True, rope_theta=10000.0),
    "qwen2.5-7b": dict(hidden_size=3584, intermediate_size=18944, num_attention_heads=28, num_key_value_heads=4,
                       vocab_size=152064, tie_word_embeddings=False, rope_theta=10000.0),
}


@dataclass
class BenchConfig:
    model: str | None = None  # model directory or hub id; None uses `preset`
    preset: str = "tiny-28"  # random-weight architecture: tiny-28, qwen2.5-1.5b, qwen2.5-7b
    hidden_size: int | None = None  # override the preset's width (e.g. a narrower 1.5B on CPU)
    ratios: list[float] = field(default_factory=lambda: [0.05, 0.10, 0.15])  # skip ratios x to compare
    border: int = 1  # b: protected layers at each end
    batch_size: int = 8  # prompts per rollout
    num_generations: int = 4  # G completions per prompt
    prompt_len: int = 32  # prompt tokens (random ids)
    max_new_tokens: int = 64  # fixed completion length
    repeats: int = 5  # timed rounds (median reported)
    warmup: int = 1  # untimed rounds first
    temperature: float = 1.0  # sampling temperature
    top_p: float = 1.0  # nucleus mass
    seed: int = 0  # seeds weights, prompts, skip sets and sampling
    device: str = "auto"  # auto, cpu, cuda
    dtype: str = "auto"  # auto (bf16 on CUDA, fp32 on CPU), float32, bfloat16, float16
    compare_generate: bool = False  # also time HF model.generate() on the full model
    mode: str = "rollout"  # rollout: the decode loop alone; step: whole RL steps (rollout, reward, update)
    micro_batch_size: int = 4  # step mode: prompts per forward/backward pass of the update
    floor: bool = False  # rollout mode: also report each variant's share of the machine's floor (floor.py)
    cuda_graphs: bool = False  # decode steps replayed from CUDA graphs (rollout mode: the full model also eager)

    def validate(self) -> None:
        if self.model is None and self.preset not in PRESETS:
            raise ValueError(f"preset={self.preset!r} is unknown; choose one of {', '.join(PRESETS)}")
        for name in ("batch_size", "num_generations", "prompt_len", "max_new_tokens", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")
        if not self.ratios:
            raise ValueError("ratios must name at least one skip ratio")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype={self.dtype!r}; choose auto, float32, bfloat16 or float16")
        if self.mode not in ("rollout", "step"):
            raise ValueError(f"mode={self.mode!r}; choose rollout or step")
        if self.mode == "step":
            if any(x <= 0 for x in self.ratios) or len(set(self.ratios)) != len(self.ratios):
                raise ValueError(f"--mode step compares the full model (x = 0, always run) with distinct ratios "
                                 f"> 0; got {self.ratios}")
            if self.dtype == "float16":
                raise ValueError("--mode step trains in float32 or bfloat16 (train --bf16); float16 is not offered")
            if self.compare_generate or self.floor:
                raise ValueError("--compare-generate and --floor are rollout-mode measurements; drop them with "
                                 "--mode step (scripts/step_floor.py measures a training run's floor)")
            if self.micro_batch_size < 1 or self.batch_size % self.micro_batch_size:
                raise ValueError(f"batch_size={self.batch_size} must be a multiple of micro_batch_size="
                                 f"{self.micro_batch_size} >= 1")


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, name)


def build_preset(name: str, hidden_size: int | None = None, num_hidden_layers: int = 28, seed: int = 0):
    """A random-weight Qwen2 causal LM with the preset's architecture (28 layers unless told)."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    kwargs = dict(PRESETS[name], num_hidden_layers=num_hidden_layers, max_position_embeddings=4096)
    if hidden_size:
        heads = kwargs["num_attention_heads"]
        if hidden_size % heads:
            raise ValueError(f"hidden_size={hidden_size} must be divisible by the {heads} attention heads")
        scale = hidden_size / kwargs["hidden_size"]
        kwargs.update(hidden_size=hidden_size, intermediate_size=int(kwargs["intermediate_size"] * scale) // 8 * 8)
    torch.manual_seed(seed)
    return Qwen2ForCausalLM(Qwen2Config(**kwargs))


def load_bench_model(cfg: BenchConfig):
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    if cfg.model is None:
        model = build_preset(cfg.preset, cfg.hidden_size, seed=cfg.seed)
    else:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(cfg.model, dtype=dtype)
    return model.to(device=device, dtype=dtype).eval(), device


def _time_engine(model, prompts, cfg: BenchConfig, skip, generator, device, graphs: bool = False) -> float:
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens)
    sync(device)
    start = time.perf_counter()
    generate(model, prompts, cfg.num_generations, sampling, None, 0, skip=skip, generator=generator,
             cuda_graphs=graphs)
    sync(device)
    return time.perf_counter() - start


def _time_hf_generate(model, prompts, cfg: BenchConfig, device) -> float:
    ids = torch.tensor(prompts, device=device).repeat_interleave(cfg.num_generations, dim=0)
    sync(device)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=cfg.temperature,
                   top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
                   min_new_tokens=cfg.max_new_tokens, pad_token_id=0, eos_token_id=None)
    sync(device)
    return time.perf_counter() - start


def run_bench(cfg: BenchConfig, progress=None) -> list[dict]:
    """Measure every variant; returns one result dict per ratio (see module docstring)."""
    cfg.validate()
    model, device = load_bench_model(cfg)
    if cfg.cuda_graphs and (problem := graphs_problem(model, device)):
        raise ValueError(problem)
    n = num_layers(model)
    for x in cfg.ratios:
        check_skip_config(n, x, cfg.border)
    if any(x > 0 for x in cfg.ratios) and (problem := nesting_problem(model)):
        raise ValueError(problem)
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = model.get_input_embeddings().num_embeddings
    prompts = torch.randint(1, vocab, (cfg.batch_size, cfg.prompt_len), generator=g).tolist()
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    variants = (["full", *cfg.ratios] + (["eager"] if cfg.cuda_graphs else [])
                + (["generate"] if cfg.compare_generate else []))
    times = {v: [] for v in variants}
    for rnd in range(cfg.warmup + cfg.repeats):
        shift = rnd % len(variants)
        for v in variants[shift:] + variants[:shift]:
            if v == "generate":
                t = _time_hf_generate(model, prompts, cfg, device)
            else:
                skip = () if v in ("full", "eager") else sample_skip_set(n, v, cfg.border, g)
                t = _time_engine(model, prompts, cfg, skip, sample_gen, device, cfg.cuda_graphs and v != "eager")
            if rnd >= cfg.warmup:
                times[v].append(t)
        if progress:
            progress(rnd + 1, cfg.warmup + cfg.repeats)
    results = summarise(times, cfg, n, device_name(device))
    if cfg.floor:
        add_floor(results, times, cfg, model_shape(model), measure_machine(model))
    return results


def summarise(times: dict, cfg: BenchConfig, n: int, device: str) -> list[dict]:
    tokens = cfg.batch_size * cfg.num_generations * cfg.max_new_tokens
    full = statistics.median(times["full"])
    results = []
    for x in cfg.ratios:
        nested = statistics.median(times[x])
        u = num_skipped(n, x)
        ideal, measured = n / (n - u), full / nested
        row = dict(ratio=x, num_layers=n, skipped=u, ideal_speedup=ideal, measured_speedup=measured,
                   efficiency=measured / ideal, full_tokens_per_s=tokens / full,
                   nested_tokens_per_s=tokens / nested, device=device)
        if "generate" in times:
            gen = statistics.median(times["generate"])
            row.update(generate_tokens_per_s=tokens / gen, engine_vs_generate=gen / full)
        if "eager" in times:  # the variants ran with CUDA graphs; the full model also without
            eager = statistics.median(times["eager"])
            row.update(eager_tokens_per_s=tokens / eager, graphs_vs_eager=eager / full)
        results.append(row)
    return results


def add_floor(results: list[dict], times: dict, cfg: BenchConfig, shape: ModelShape, machine: Machine) -> None:
    """Add to each row the machine's rates, the full model's and its nested model's floors (floor.py) and
    the share of its floor each variant reached (floor time / median measured time); the full model's
    floor also for generate() when it was timed."""
    rows = cfg.batch_size * cfg.num_generations

    def floor(skipped: int) -> Floor:
        return rollout_floor(shape, machine, rows, cfg.prompt_len, cfg.max_new_tokens, skipped, cfg.batch_size)

    full = floor(0)
    for row in results:
        nested = floor(row["skipped"])
        row.update(gflops_per_s=machine.flops_per_s / 1e9, gbytes_per_s=machine.bytes_per_s / 1e9,
                   full_floor=full._asdict(), nested_floor_s=nested.floor_s,
                   full_floor_share=full.floor_s / statistics.median(times["full"]),
                   nested_floor_share=nested.floor_s / statistics.median(times[row["ratio"]]))
        for name in ("generate", "eager"):
            if name in times:
                row[f"{name}_floor_share"] = full.floor_s / statistics.median(times[name])


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} threads)"


def format_table(results: list[dict]) -> str:
    head = "| ratio | skipped/N | ideal | measured | efficiency | full tok/s | nested tok/s |"
    lines = [head, "|" + "---|" * 7]
    for r in results:
        lines.append(f"| {r['ratio']:.2f} | {r['skipped']}/{r['num_layers']} | {r['ideal_speedup']:.3f} | "
                     f"{r['measured_speedup']:.3f} | {r['efficiency']:.3f} | {r['full_tokens_per_s']:.1f} | "
                     f"{r['nested_tokens_per_s']:.1f} |")
    if results and "engine_vs_generate" in results[0]:
        r = results[0]
        lines.append(f"\nengine vs HF generate() on the full model: {r['engine_vs_generate']:.3f}x "
                     f"({r['full_tokens_per_s']:.1f} vs {r['generate_tokens_per_s']:.1f} tok/s)")
    if results and "graphs_vs_eager" in results[0]:
        r = results[0]
        lines.append(f"\nCUDA graphs vs the eager decode loop on the full model: {r['graphs_vs_eager']:.3f}x "
                     f"({r['full_tokens_per_s']:.1f} vs {r['eager_tokens_per_s']:.1f} tok/s)")
    if results and "full_floor" in results[0]:
        lines.append(format_floor(results))
    lines.append(f"\ndevice: {results[0]['device']}")
    return "\n".join(lines)


def format_floor(results: list[dict]) -> str:
    r = results[0]
    f = r["full_floor"]
    out = [f"\nfloor (floor.py; measured {r['gflops_per_s']:.0f} GFLOP/s on the model's products, "
           f"{r['gbytes_per_s']:.1f} GB/s copy bandwidth): full model {f['floor_s']:.3f} s per rollout "
           f"(arithmetic {f['compute_s']:.3f} s, weight reads {f['weights_s']:.3f} s, KV-cache reads "
           f"{f['kv_s']:.3f} s)",
           f"share of the floor reached: full model {r['full_floor_share']:.1%}"]
    out[-1] += "".join(f", x = {x['ratio']:.2f} {x['nested_floor_share']:.1%}" for x in results)
    if "eager_floor_share" in r:
        out[-1] += f", full model without CUDA graphs {r['eager_floor_share']:.1%}"
    if "generate_floor_share" in r:
        out[-1] += f", HF generate() {r['generate_floor_share']:.1%}"
    return "\n".join(out)


# ---- whole RL steps ---------------------------------------------------------------------------


def step_bench_files(cfg: BenchConfig, root) -> tuple[str, str]:
    """(model directory, prompts JSONL) for the step bench: the given model, or the preset saved with the toy
    task's byte-level tokenizer (ids beyond it decode to nothing); `batch_size` prompts of about
    `prompt_len` tokens of random digits."""
    import json
    from pathlib import Path

    root = Path(root)
    if cfg.model is None:
        from nested_reft.synthetic import build_tokenizer

        model, _ = load_bench_model(cfg)
        tokenizer = build_tokenizer([" ".join("0123456789")] * 10, vocab_size=300)
        model.config.pad_token_id, model.config.eos_token_id = tokenizer.pad_token_id, tokenizer.eos_token_id
        model.save_pretrained(root / "model")
        tokenizer.save_pretrained(root / "model")
        model_dir = str(root / "model")
    else:
        model_dir = cfg.model
    g = torch.Generator().manual_seed(cfg.seed)
    with open(root / "prompts.jsonl", "w") as f:
        for i in range(cfg.batch_size):
            words = " ".join(str(int(d)) for d in torch.randint(0, 10, (max(1, cfg.prompt_len // 2),), generator=g))
            f.write(json.dumps({"id": str(i), "problem": words, "answer": "0", "solution": None, "meta": {}}) + "\n")
    return model_dir, str(root / "prompts.jsonl")


def _step_config(cfg: BenchConfig, model_dir: str, prompts: str, ratio: float, out: str):
    from nested_reft.config import TrainConfig

    return TrainConfig(model=model_dir, dataset=prompts, template="plain", output_dir=out, seed=cfg.seed,
                       batch_size=cfg.batch_size, micro_batch_size=cfg.micro_batch_size,
                       rollout_batch_size=cfg.batch_size, num_generations=cfg.num_generations,
                       max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens,
                       temperature=cfg.temperature, top_p=cfg.top_p, skip_ratio=ratio, cuda_graphs=cfg.cuda_graphs,
                       border=cfg.border if ratio > 0 else 0, steps=cfg.warmup + cfg.repeats, lr=1e-6,
                       device=cfg.device, bf16="true" if resolve_dtype(cfg.dtype, resolve_device(cfg.device))
                       == torch.bfloat16 else "false", progress=False)


def run_step_bench(cfg: BenchConfig, progress=None) -> dict:
    """Whole RL steps of the full model and of each ratio (see the module doc); returns {"rows": one dict per
    ratio, "fit": the gain against x}."""
    import tempfile

    from nested_reft import trainer

    cfg.validate()
    with tempfile.TemporaryDirectory(prefix="nested-reft-bench-") as root:
        model_dir, prompts = step_bench_files(cfg, root)
        variants = [0.0, *cfg.ratios]
        runs = {x: trainer.setup(_step_config(cfg, model_dir, prompts, x, f"{root}/run-{x}")) for x in variants}
        times = {x: [] for x in variants}
        for rnd in range(cfg.warmup + cfg.repeats):
            shift = rnd % len(variants)
            for x in variants[shift:] + variants[:shift]:
                m = trainer.rl_step(runs[x], rnd)
                if rnd >= cfg.warmup:
                    times[x].append(m)
            if progress:
                progress(rnd + 1, cfg.warmup + cfg.repeats)
        n, device = runs[0.0].num_layers, device_name(runs[0.0].accelerator.device)
    return summarise_steps(times, cfg.ratios, n, device)


def summarise_steps(times: dict, ratios: list[float], n: int, device: str) -> dict:
    """Medians of each variant's step, rollout and update seconds; speedup against the share-adjusted ideal;
    the least-squares fit of the gain (%) against x."""
    from nested_reft.report import linear_fit

    def med(x, key):
        return statistics.median(m[key] for m in times[x])

    def paired(x, key):  # median over rounds of full / nested, each round's pair run back to back
        return statistics.median(f[key] / m[key] for f, m in zip(times[0.0], times[x]))

    full_step, full_rollout = med(0.0, "step_s"), med(0.0, "rollout_s")
    share = statistics.median(m["rollout_s"] / m["step_s"] for m in times[0.0])
    rows = []
    for x in ratios:
        u = num_skipped(n, x)
        ideal = 1.0 / ((1.0 - share) + share * (n - u) / n)
        measured = paired(x, "step_s")
        rows.append(dict(ratio=x, num_layers=n, skipped=u, rollout_share=share, full_step_s=full_step,
                         nested_step_s=med(x, "step_s"), full_rollout_s=full_rollout, nested_rollout_s=med(x, "rollout_s"),
                         full_update_s=med(0.0, "update_s"), nested_update_s=med(x, "update_s"),
                         rollout_speedup=paired(x, "rollout_s"), rollout_ideal=n / (n - u),
                         ideal_speedup=ideal, measured_speedup=measured, efficiency=measured / ideal,
                         gain_pct=100.0 * (measured - 1.0), device=device))
    slope, intercept, r2 = linear_fit([0.0] + [r["ratio"] for r in rows], [0.0] + [r["gain_pct"] for r in rows])
    return {"rows": rows, "fit": dict(slope_pct_per_x=slope, intercept_pct=intercept, r2=r2, points=len(rows) + 1)}


def format_step_table(result: dict) -> str:
    rows, fit = result["rows"], result["fit"]
    lines = ["| ratio | skipped/N | rollout share f | full step s | nested step s | ideal | measured | efficiency "
             "| rollout speedup (ideal) |", "|" + "---|" * 9]
    for r in rows:
        lines.append(f"| {r['ratio']:.2f} | {r['skipped']}/{r['num_layers']} | {r['rollout_share']:.3f} | "
                     f"{r['full_step_s']:.3f} | {r['nested_step_s']:.3f} | {r['ideal_speedup']:.3f} | "
                     f"{r['measured_speedup']:.3f} | {r['efficiency']:.3f} | {r['rollout_speedup']:.3f} "
                     f"({r['rollout_ideal']:.3f}) |")
    r2 = "n/a" if fit["r2"] is None else f"{fit['r2']:.3f}"
    lines.append(f"\nstep-time gain against x (least squares over {fit['points']} points, the baseline's (0, 0) "
                 f"included): {fit['slope_pct_per_x'] / 10:+.2f}% per +0.10 of x, intercept "
                 f"{fit['intercept_pct']:+.2f}%, R^2 = {r2}")
    lines.append(f"\ndevice: {rows[0]['device']}")
    return "\n".join(lines)


def profile_rollout(model, cfg: BenchConfig, skip=()) -> dict:
    """Where a rollout's time goes: seconds in the embedding, the decoder layers, the final norm + LM
    head (forward hooks around each), and the rest (sampling, masks, cache, Python). CPU timings; on CUDA
    the hooks synchronise, which slows the run but keeps the split honest."""
    from nested_reft.nested import find_layers

    device = next(model.parameters()).device
    parts = {"embedding": [model.get_input_embeddings()], "layers": list(find_layers(model).layers),
             "lm_head": [model.get_output_embeddings(), getattr(model.model, "norm", None)]}
    spent = {name: 0.0 for name in parts}
    starts, handles = {}, []
    for name, modules in parts.items():
        for m in filter(None, modules):
            handles.append(m.register_forward_pre_hook(lambda mod, a: starts.__setitem__(mod, _now(device))))
            handles.append(m.register_forward_hook(
                lambda mod, a, o, n=name: spent.__setitem__(n, spent[n] + _now(device) - starts[mod])))
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = model.get_input_embeddings().num_embeddings
    prompts = torch.randint(1, vocab, (cfg.batch_size, cfg.prompt_len), generator=g).tolist()
    try:
        total = _time_engine(model, prompts, cfg, skip, g, device)
    finally:
        for h in handles:
            h.remove()
    spent["other (sampling, masks, cache, Python)"] = total - sum(spent.values())
    return {k: v / total for k, v in spent.items()} | {"total_s": total}


def _now(device: torch.device) -> float:
    sync(device)
    return time.perf_counter()
