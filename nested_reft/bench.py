"""Rollout throughput of the full model against nested models: measured vs ideal speedup.

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
"""

import statistics
import time
from dataclasses import dataclass, field

import torch

from nested_reft.layer_skip import check_skip_config, num_skipped, sample_skip_set
from nested_reft.nested import num_layers
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


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time_engine(model, prompts, cfg: BenchConfig, skip, generator, device) -> float:
    sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p,
                              max_new_tokens=cfg.max_new_tokens, min_new_tokens=cfg.max_new_tokens)
    _sync(device)
    start = time.perf_counter()
    generate(model, prompts, cfg.num_generations, sampling, None, 0, skip=skip, generator=generator)
    _sync(device)
    return time.perf_counter() - start


def _time_hf_generate(model, prompts, cfg: BenchConfig, device) -> float:
    ids = torch.tensor(prompts, device=device).repeat_interleave(cfg.num_generations, dim=0)
    _sync(device)
    start = time.perf_counter()
    model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=True, temperature=cfg.temperature,
                   top_p=cfg.top_p, top_k=0, max_new_tokens=cfg.max_new_tokens,
                   min_new_tokens=cfg.max_new_tokens, pad_token_id=0, eos_token_id=None)
    _sync(device)
    return time.perf_counter() - start


def run_bench(cfg: BenchConfig, progress=None) -> list[dict]:
    """Measure every variant; returns one result dict per ratio (see module docstring)."""
    cfg.validate()
    model, device = load_bench_model(cfg)
    n = num_layers(model)
    for x in cfg.ratios:
        check_skip_config(n, x, cfg.border)
    g = torch.Generator().manual_seed(cfg.seed)
    vocab = model.get_input_embeddings().num_embeddings
    prompts = torch.randint(1, vocab, (cfg.batch_size, cfg.prompt_len), generator=g).tolist()
    sample_gen = torch.Generator(device=device).manual_seed(cfg.seed)
    variants = ["full", *cfg.ratios] + (["generate"] if cfg.compare_generate else [])
    times = {v: [] for v in variants}
    for rnd in range(cfg.warmup + cfg.repeats):
        shift = rnd % len(variants)
        for v in variants[shift:] + variants[:shift]:
            if v == "generate":
                t = _time_hf_generate(model, prompts, cfg, device)
            else:
                skip = () if v == "full" else sample_skip_set(n, v, cfg.border, g)
                t = _time_engine(model, prompts, cfg, skip, sample_gen, device)
            if rnd >= cfg.warmup:
                times[v].append(t)
        if progress:
            progress(rnd + 1, cfg.warmup + cfg.repeats)
    return summarise(times, cfg, n, device_name(device))


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
        results.append(row)
    return results


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
    lines.append(f"\ndevice: {results[0]['device']}")
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
    _sync(device)
    return time.perf_counter()
