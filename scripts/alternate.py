"""Shared by the decode-cost scripts (decode_attention_cost, rollout_changes_cost, autocast_decode_cost,
graphs_cost): their shape options and random prompts, the model of
--model or a random-weight --preset, and variants of one rollout timed in alternating rounds."""

import argparse
import statistics

import torch


def load_model(model_dir: str | None, preset: str):
    """The model saved in `model_dir`, or `preset` (bench.PRESETS) with random weights; in eval mode."""
    if model_dir:
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(model_dir).eval()
    from nested_reft.bench import build_preset

    return build_preset(preset, None, seed=0).eval()


def alternated(run, variants: list, rounds: int, before=None) -> tuple[dict, dict]:
    """Run each variant once (the warm-up, whose Rollouts are returned for comparing samples), then `rounds`
    rounds of all of them, in reverse order every other round; `before()` runs ahead of each timed call.
    Returns (the warm-up Rollout per variant, the median rollout_s per variant)."""
    first = {v: run(v) for v in variants}
    times = {v: [] for v in variants}
    for r in range(rounds):
        for v in (variants if r % 2 == 0 else variants[::-1]):
            if before is not None:
                before()
            times[v].append(run(v).rollout_s)
    return first, {v: statistics.median(t) for v, t in times.items()}


def model_arguments(p: argparse.ArgumentParser, preset: str) -> None:
    """--model DIR or a random-weight --preset (default `preset`), for `load_model`."""
    p.add_argument("--model", help="model directory (default: a random-weight --preset)")
    p.add_argument("--preset", default=preset)


def shape_arguments(p: argparse.ArgumentParser, rows: int, generations: int, prompt_len: int, tokens: int,
                    rounds: int) -> None:
    """The rollout-shape options every decode-cost script takes, with its own defaults."""
    p.add_argument("--rows", type=int, default=rows, help="prompts")
    p.add_argument("--generations", type=int, default=generations)
    p.add_argument("--prompt-len", type=int, default=prompt_len)
    p.add_argument("--tokens", type=int, default=tokens)
    p.add_argument("--rounds", type=int, default=rounds)


def random_prompts(model, rows: int, prompt_len: int, low: int = 4) -> list[list[int]]:
    """`rows` prompts of `prompt_len` token ids drawn from [low, vocabulary) with seed 0."""
    vocab = model.get_input_embeddings().num_embeddings
    return torch.randint(low, vocab, (rows, prompt_len), generator=torch.Generator().manual_seed(0)).tolist()


def compare_engine_paths(description: str, install, changes: tuple[str, ...] = ()) -> None:
    """The command line of the two-path CPU scripts (decode_attention_cost, rollout_changes_cost): one model,
    random prompts, the engine's rollouts under each path alternated; prints whether they sample the same
    tokens and the median rollout seconds. `install(args)` returns {path name: callable that switches to it};
    `changes`, when given, are the choices of a required --change option."""
    from nested_reft import rollout

    p = argparse.ArgumentParser(description=description)
    p.add_argument("model")
    if changes:
        p.add_argument("--change", choices=changes, required=True)
    shape_arguments(p, rows=16, generations=8, prompt_len=16, tokens=64, rounds=6)
    p.add_argument("--eos", type=int, default=None)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, None)
    prompts = random_prompts(model, args.rows, args.prompt_len)
    cfg = rollout.SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=0 if args.eos is not None else args.tokens)
    paths = install(args)

    def run(path):
        paths[path]()
        return rollout.generate(model, prompts, args.generations, cfg, args.eos, 0,
                                generator=torch.Generator().manual_seed(1))

    first, medians = alternated(run, list(paths), args.rounds)
    a, b = first.values()
    print({"same_tokens": torch.equal(a.completion_ids, b.completion_ids),
           "max_logprob_difference": (a.behavior_logprobs - b.behavior_logprobs).abs().max().item(),
           "tokens": a.num_completion_tokens, "rounds": args.rounds,
           **{f"{path} s": round(m, 3) for path, m in medians.items()}})
