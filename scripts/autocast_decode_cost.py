"""The rollout engine under bf16 autocast over float32 weights (the trainer's mixed precision), decoding under
inference_mode (every weight cast at every token) against no_grad (each weight cast once per call, the
default since 2026-12-06): the same prompts and uniforms, rounds alternated, medians of the rollout time, and
whether the two sample the same tokens.

    python scripts/autocast_decode_cost.py [--model DIR | --preset tiny-28] [--rows 8 --generations 4 --tokens 64]
"""

import argparse

import torch
from alternate import alternated, load_model, model_arguments, random_prompts, shape_arguments

from nested_reft import rollout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(p, "tiny-28")
    shape_arguments(p, rows=8, generations=4, prompt_len=32, tokens=64, rounds=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, args.preset).float().to(args.device)
    prompts = random_prompts(model, args.rows, args.prompt_len)
    cfg = rollout.SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    default = rollout._decode_mode
    modes = {"inference_mode": lambda model, device: torch.inference_mode(), "no_grad (default)": default}

    def run(mode):
        rollout._decode_mode = modes[mode]
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            return rollout.generate(model, prompts, args.generations, cfg, None, 0,
                                    generator=torch.Generator().manual_seed(1))

    first, medians = alternated(run, list(modes), args.rounds)
    rollout._decode_mode = default
    a, b = first.values()
    print({"same_tokens": torch.equal(a.completion_ids, b.completion_ids),
           "same_logprobs": torch.equal(a.behavior_logprobs, b.behavior_logprobs), "rounds": args.rounds,
           **{f"{mode} s": round(m, 3) for mode, m in medians.items()}})

if __name__ == "__main__":
    main()
