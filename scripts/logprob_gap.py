"""Measure the gap between behaviour log-probs recorded while sampling and a teacher-forced recompute.

Usage: python scripts/logprob_gap.py [--preset tiny-28] [--dtype float32]
Prints, per (top_p, skip ratio), the max and mean |sampled - recomputed| over generated tokens.
"""

import argparse

import torch

from nested_reft.bench import build_preset, resolve_device, resolve_dtype
from nested_reft.layer_skip import sample_skip_set
from nested_reft.nested import skip_layers
from nested_reft.rollout import SamplingConfig, generate, sequence_logprobs


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--preset", default="tiny-28")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    args = ap.parse_args()
    device = resolve_device(args.device)
    model = build_preset(args.preset).to(device=device, dtype=resolve_dtype(args.dtype, device)).eval()
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, 2000, (8, 24), generator=g).tolist()
    print("| top_p | skip ratio | max abs gap | mean abs gap |\n|---|---|---|---|")
    for top_p in (1.0, 0.95):
        for ratio in (0.0, 0.15):
            skip = sample_skip_set(28, ratio, 1, g)
            cfg = SamplingConfig(temperature=1.0, top_p=top_p, max_new_tokens=args.max_new_tokens,
                                 min_new_tokens=args.max_new_tokens)
            r = generate(model, prompts, 2, cfg, None, 0, skip=skip, generator=torch.Generator(device).manual_seed(1))
            with torch.no_grad(), skip_layers(model, skip):
                tf = sequence_logprobs(model, r.prompt_ids, r.prompt_mask, r.completion_ids, r.completion_mask, 1.0)
            gap = (tf - r.behavior_logprobs).abs()[r.completion_mask.bool()]
            print(f"| {top_p} | {ratio} | {gap.max():.3g} | {gap.mean():.3g} |")


if __name__ == "__main__":
    main()
