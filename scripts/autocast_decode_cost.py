"""The rollout engine under bf16 autocast over float32 weights (the trainer's mixed precision), decoding under
inference_mode (every weight cast at every token) against no_grad (each weight cast once per call, the
default since 2026-12-06): the same prompts and uniforms, rounds alternated, medians of the rollout time, and
whether the two sample the same tokens.

    python scripts/autocast_decode_cost.py [--model DIR | --preset tiny-28] [--rows 8 --generations 4 --tokens 64]
"""

import argparse
import statistics

import torch

from nested_reft import rollout
from nested_reft.bench import build_preset


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="model directory (default: a random-weight --preset)")
    p.add_argument("--preset", default="tiny-28")
    p.add_argument("--rows", type=int, default=8, help="prompts")
    p.add_argument("--generations", type=int, default=4)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    if args.model:
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(args.model)
    else:
        model = build_preset(args.preset, None, seed=0)
    model = model.float().to(args.device).eval()
    vocab = model.get_input_embeddings().num_embeddings
    prompts = torch.randint(4, vocab, (args.rows, args.prompt_len), generator=torch.Generator().manual_seed(0)).tolist()
    cfg = rollout.SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=args.tokens)
    default = rollout._decode_mode
    modes = {"inference_mode": lambda model, device: torch.inference_mode(), "no_grad (default)": default}

    def run(mode):
        rollout._decode_mode = modes[mode]
        with torch.autocast(torch.device(args.device).type, dtype=torch.bfloat16):
            return rollout.generate(model, prompts, args.generations, cfg, None, 0,
                                    generator=torch.Generator().manual_seed(1))

    first = {mode: run(mode) for mode in modes}  # warm-up, and the comparison of samples
    a, b = first.values()
    times = {mode: [] for mode in modes}
    for r in range(args.rounds):
        for mode in (list(modes) if r % 2 == 0 else list(modes)[::-1]):
            times[mode].append(run(mode).rollout_s)
    rollout._decode_mode = default
    print({"same_tokens": torch.equal(a.completion_ids, b.completion_ids),
           "same_logprobs": torch.equal(a.behavior_logprobs, b.behavior_logprobs), "rounds": args.rounds,
           **{f"{mode} s": round(statistics.median(t), 3) for mode, t in times.items()}})


if __name__ == "__main__":
    main()
