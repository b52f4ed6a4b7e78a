"""pass@k evaluation on math benchmarks (SPEC 2 item 12): accuracy per benchmark and their unweighted mean.

Choices:
- Sampling as in the paper: temperature 0.6, top-p 0.95, up to 32768 new tokens, through the project's own
  KV-cached sampler (`rollout.generate`, full model, no skipped layers); temperature 0 is greedy.
- n = `num_samples` completions per problem (default n = k); pass@k per problem is the unbiased estimator
  1 - C(n-c, k) / C(n, k) with c correct samples, and a benchmark's accuracy is its mean over problems.
  With k = 1 this is the mean reward. Its `stderr` is the standard error over problems of the per-problem
  scores (sd / sqrt(problems)): it counts the noise of the samples and of the choice of problems, so more
  samples per problem shrink it only down to what the problem set allows.
- The completion budget is capped per benchmark so that its longest prompt + completion fits the model's
  `max_position_embeddings` (a warning says so); a prompt that does not fit at all is an error.
- Prompts are sorted by length within a benchmark before batching (less padding); every output is put
  back in the data set's order. One sampling generator per benchmark, seeded with `seed`, so a
  benchmark's samples do not depend on which other benchmarks run with it.
- Reward = `rewards.math_reward` (Minerva's `meta.answer_alternatives` count as references too).
- Everything is checked before generation starts (config, data, template, context); outputs
  (`samples.jsonl`, `summary.json`) are written at the end, each to a temporary file then renamed.
"""

import json
import math
import os
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

from nested_reft.config import doc, output_dir_problems
from nested_reft.data import Example, encode_prompt, load_examples, resolve_template
from nested_reft.decode_graphs import graphs_problem
from nested_reft.rewards import extract_answer, math_reward
from nested_reft.models import context_length, eos_ids
from nested_reft.rollout import SamplingConfig, completion_texts, generate

PAPER_BENCHMARKS = ("aime24", "amc", "math500", "minerva", "olympiadbench")


@dataclass
class EvalConfig:
    model: str = doc("", "model directory or hub id (only run_eval loads it; evaluate() takes a model)")
    benchmarks: list[str] = doc(list(PAPER_BENCHMARKS), "benchmark names under data_dir, or .jsonl paths")
    data_dir: str | None = doc(None, "data root in the shared layout (default: $NESTED_REFT_DATA)")
    split: str = doc("test", "split of every benchmark")
    limit: int | None = doc(None, "only the first N problems of each benchmark")
    k: int = doc(1, "pass@k")
    num_samples: int | None = doc(None, "n >= k completions per problem for unbiased pass@k (default: k)")
    temperature: float = doc(0.6, "sampling temperature; 0 = greedy")
    top_p: float = doc(0.95, "nucleus sampling mass")
    max_new_tokens: int = doc(32768, "completion budget (capped to the model's context)")
    batch_size: int = doc(8, "prompts per generation call (each with n completions)")
    seed: int = doc(0, "seeds the sampling generator of every benchmark")
    template: str = doc("auto", "prompt template: auto (chat if the tokenizer has one), chat, plain")
    output_dir: str | None = doc(None, "write samples.jsonl and summary.json here (default: write nothing)")
    device: str = doc("auto", "auto (CUDA when present), cpu or cuda")
    dtype: str = doc("auto", "auto (bf16 on CUDA), float32, bfloat16 or float16")
    progress: bool = doc(True, "show a progress bar over problems (stderr)")
    cuda_graphs: bool = doc(False, "replay the one-token decode steps from CUDA graphs (CUDA, full-attention models)")
    skip_layers: list[int] | None = doc(None, "evaluate the nested model with these layer indices skipped (e.g. a behaviour model); default: the full model")

    @property
    def n(self) -> int:
        return self.num_samples if self.num_samples is not None else self.k


def check_config(cfg: EvalConfig) -> None:
    """Raise ValueError naming the first bad field."""
    if cfg.k < 1:
        raise ValueError(f"eval: `k` must be >= 1, got {cfg.k}")
    if cfg.n < cfg.k:
        raise ValueError(f"eval: `num_samples` must be >= k={cfg.k}, got {cfg.num_samples}")
    for name in ("max_new_tokens", "batch_size"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"eval: `{name}` must be >= 1, got {getattr(cfg, name)}")
    if cfg.limit is not None and cfg.limit < 1:
        raise ValueError(f"eval: `limit` must be >= 1, got {cfg.limit}")
    if not cfg.benchmarks:
        raise ValueError("eval: name at least one benchmark")
    if len(set(cfg.benchmarks)) != len(cfg.benchmarks):
        raise ValueError(f"eval: benchmark named twice in {cfg.benchmarks}")
    if cfg.dtype not in ("auto", "float32", "bfloat16", "float16"):
        raise ValueError(f"eval: `dtype` must be auto, float32, bfloat16 or float16, got {cfg.dtype!r}")
    if cfg.template not in ("auto", "chat", "plain"):
        raise ValueError(f"eval: `template` must be auto, chat or plain, got {cfg.template!r}")
    for name in ("temperature", "top_p"):
        if not math.isfinite(getattr(cfg, name)):
            raise ValueError(f"eval: `{name}` must be a finite number, got {getattr(cfg, name)}")
    sampling_config(cfg, cfg.max_new_tokens).validate()  # temperature, top_p
    if cfg.output_dir is not None and (problems := output_dir_problems(Path(cfg.output_dir))):
        raise ValueError(f"eval: {problems[0]}")


def sampling_config(cfg: EvalConfig, max_new_tokens: int) -> SamplingConfig:
    return SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=max_new_tokens)


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k from n samples of which c are correct: 1 - C(n-c, k) / C(n, k)."""
    if not 1 <= k <= n or not 0 <= c <= n:
        raise ValueError(f"pass@k needs 1 <= k <= n and 0 <= c <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)


def load_benchmarks(cfg: EvalConfig) -> dict[str, list[Example]]:
    """Every benchmark's examples (raises DataError naming the bad one)."""
    return {name: load_examples(name, cfg.split, cfg.data_dir, cfg.limit) for name in cfg.benchmarks}


# ---- generation -------------------------------------------------------------------------------


def token_budget(model, name: str, prompts: list[list[int]], examples: list[Example], max_new_tokens: int) -> int:
    """max_new_tokens, capped so the benchmark's longest prompt + completion fits the context (warns)."""
    context = context_length(model)
    longest = max(range(len(prompts)), key=lambda i: len(prompts[i]))
    if context is None or len(prompts[longest]) + max_new_tokens <= context:
        return max_new_tokens
    budget = context - len(prompts[longest])
    if budget < 1:
        raise ValueError(f"{name}: problem {examples[longest].id} has a {len(prompts[longest])}-token prompt, "
                         f"which does not fit the model's context of {context} tokens")
    warnings.warn(f"{name}: max_new_tokens capped from {max_new_tokens} to {budget} so that the longest "
                  f"prompt ({len(prompts[longest])} tokens) + completion fits max_position_embeddings={context}",
                  stacklevel=2)
    return budget


def sample_completions(model, tokenizer, prompts: list[list[int]], cfg: EvalConfig, budget: int,
                       bar=None) -> list[list[tuple[str, int]]]:
    """n (text, num_tokens) completions per prompt, batched over length-sorted prompts, in input order."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    eos = eos_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))  # stable: ties keep data order
    out: list[list[tuple[str, int]]] = [[] for _ in prompts]
    for start in range(0, len(order), cfg.batch_size):
        chunk = order[start:start + cfg.batch_size]
        roll = generate(model, [prompts[i] for i in chunk], cfg.n, sampling_config(cfg, budget),
                        eos, pad, skip=tuple(cfg.skip_layers or ()), generator=generator,
                        cuda_graphs=cfg.cuda_graphs)  # rows [B*n, L], prompt-major
        lengths = roll.completion_mask.sum(-1).tolist()  # tokens up to and including EOS
        for row, text in enumerate(completion_texts(tokenizer, roll)):
            out[chunk[row // cfg.n]].append((text, int(lengths[row])))
        if bar is not None:
            bar.update(len(chunk))
    return out


# ---- scoring ----------------------------------------------------------------------------------


def standard_error(scores: list[float]) -> float:
    """Standard error of the mean of per-problem scores (the sample sd over problems / sqrt(count)): the
    noise of a benchmark's accuracy from both the samples and the choice of problems."""
    n = len(scores)
    if n < 2:
        return 0.0
    mean = sum(scores) / n
    return math.sqrt(sum((x - mean) ** 2 for x in scores) / (n - 1) / n)


def score_benchmark(name: str, examples: list[Example], completions, k: int) -> tuple[list[dict], list[float]]:
    """Per-sample records (data order, then sample order) and each problem's pass@k."""
    records, scores = [], []
    for index, (ex, samples) in enumerate(zip(examples, completions)):
        texts = [text for text, _ in samples]
        alternatives = [str(a) for a in ex.meta.get("answer_alternatives") or []]
        rewards = math_reward(texts, [ex.answer] * len(texts), [alternatives] * len(texts))
        scores.append(pass_at_k(len(texts), int(sum(rewards)), k))
        for s, ((text, num_tokens), reward) in enumerate(zip(samples, rewards)):
            records.append({"benchmark": name, "id": ex.id, "problem_index": index, "sample_index": s,
                            "problem": ex.problem, "completion": text, "extracted": extract_answer(text), "reference": ex.answer,
                            "reward": reward, "num_tokens": num_tokens})
    return records, scores


def evaluate(model, tokenizer, benchmarks: dict[str, list[Example]], cfg: EvalConfig) -> dict:
    """pass@k of an already loaded model on each benchmark; writes outputs when cfg.output_dir is set.
    Returns the summary: per benchmark accuracy and num_problems, and `mean` over benchmarks."""
    check_config(cfg)
    if not benchmarks or not all(benchmarks.values()):
        raise ValueError(f"eval: every benchmark needs problems, got {({n: len(e) for n, e in benchmarks.items()})}")
    template = resolve_template(tokenizer, cfg.template)
    if cfg.skip_layers:
        from nested_reft.nested import check_skip, nesting_problem, num_layers

        try:
            check_skip(cfg.skip_layers, num_layers(model), type(model).__name__)
        except (IndexError, ValueError) as exc:
            raise ValueError(f"eval: skip_layers: {exc}") from exc
        if problem := nesting_problem(model):
            raise ValueError(f"eval: skip_layers: {problem}")
    if cfg.cuda_graphs and (problem := graphs_problem(model, next(model.parameters()).device)):
        raise ValueError(f"eval: {problem}")
    prompts = {name: [encode_prompt(tokenizer, ex.problem, template) for ex in exs] for name, exs in benchmarks.items()}
    budgets = {name: token_budget(model, name, prompts[name], exs, cfg.max_new_tokens)
               for name, exs in benchmarks.items()}
    if cfg.temperature == 0 and cfg.n > 1:
        warnings.warn(f"temperature 0 is greedy: the {cfg.n} samples of a problem are identical", stacklevel=2)
    bar = tqdm(total=sum(map(len, benchmarks.values())), desc="eval", unit="problem", disable=not cfg.progress)
    start, records, results = time.perf_counter(), [], {}
    for name, exs in benchmarks.items():
        t0 = time.perf_counter()
        completions = sample_completions(model, tokenizer, prompts[name], cfg, budgets[name], bar)
        recs, scores = score_benchmark(name, exs, completions, cfg.k)
        records += recs
        results[name] = {"accuracy": sum(scores) / len(scores), "stderr": standard_error(scores),
                         "num_problems": len(exs), "max_new_tokens": budgets[name],
                         "mean_completion_tokens": sum(r["num_tokens"] for r in recs) / len(recs),
                         "runtime_s": time.perf_counter() - t0}
    bar.close()
    summary = {"k": cfg.k, "num_samples": cfg.n, "benchmarks": results,
               "mean": sum(r["accuracy"] for r in results.values()) / len(results),
               "runtime_s": time.perf_counter() - start, "config": asdict(cfg)}
    if cfg.output_dir is not None:
        summary.update(write_outputs(Path(cfg.output_dir), records, summary))
    return summary


# ---- outputs ----------------------------------------------------------------------------------


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_outputs(output_dir: Path, records: list[dict], summary: dict) -> dict:
    """samples.jsonl (one line per sample) and summary.json; returns their paths. A file system failure
    (disk full) removes the partial file and raises CheckpointError (exit 1)."""
    from nested_reft.checkpoint import written_or_removed

    paths = {"samples_file": str(output_dir / "samples.jsonl"), "summary_file": str(output_dir / "summary.json")}
    with written_or_removed(None, f"writing the evaluation outputs to {output_dir}"):
        output_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(output_dir / "samples.jsonl", "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
        write_atomic(output_dir / "summary.json", json.dumps({**summary, **paths}, indent=2) + "\n")
    return paths


def format_table(summary: dict) -> str:
    """A markdown table: one row per benchmark, then the unweighted mean."""
    k = summary["k"]
    lines = [f"| benchmark | problems | pass@{k} (%) |", "| --- | ---: | ---: |"]
    for name, r in summary["benchmarks"].items():
        lines.append(f"| {name} | {r['num_problems']} | {100 * r['accuracy']:.1f} |")
    lines.append(f"| **mean** | {sum(r['num_problems'] for r in summary['benchmarks'].values())} "
                 f"| {100 * summary['mean']:.1f} |")
    return "\n".join(lines)


def run_eval(cfg: EvalConfig) -> dict:
    """The CLI path: check the config, load the benchmarks, then the model, then evaluate."""
    from nested_reft.bench import resolve_device, resolve_dtype
    from nested_reft.models import load_model_and_tokenizer

    check_config(cfg)
    if not cfg.model:
        raise ValueError("eval: `model` is required")
    benchmarks = load_benchmarks(cfg)
    device = resolve_device(cfg.device)
    dtype = resolve_dtype(cfg.dtype, device)
    model, tokenizer = load_model_and_tokenizer(cfg.model, dtype)
    model.to(device).eval()
    return evaluate(model, tokenizer, benchmarks, cfg)
