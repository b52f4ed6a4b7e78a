"""Shared by the decode-cost scripts (decode_attention_cost, autocast_decode_cost, graphs_cost): the model of
--model or a random-weight --preset, and variants of one rollout timed in alternating rounds."""

import statistics


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
