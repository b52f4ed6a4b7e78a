"""The rollout engine with each prompt prefilled once for its G completions (the default) against every row
prefilled, on one model: the same prompts and uniforms, rounds alternated, medians of the rollout time; and
whether the two sample the same tokens (largest log-prob difference).

    python scripts/prefill_cost.py MODEL_DIR --eos 2 [--rows 16 --generations 8 --prompt-len 8 --tokens 64 --rounds 8]

Without --eos the rollouts have the fixed length; with it they end at EOS (random weights: wherever the
model happens to draw it).
"""

import argparse

import torch
from alternate import alternated, load_model

from nested_reft import rollout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("--rows", type=int, default=16, help="prompts")
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--prompt-len", type=int, default=8)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--eos", type=int, default=None)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    model = load_model(args.model, None)
    vocab = model.get_input_embeddings().num_embeddings
    g = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, vocab, (args.rows, args.prompt_len), generator=g).tolist()
    cfg = rollout.SamplingConfig(max_new_tokens=args.tokens, min_new_tokens=0 if args.eos is not None else args.tokens)
    n = args.rows * args.generations
    paths = {"every row": lambda self, ids, mask: (torch.arange(n),) * 2,
             "once per prompt": rollout.EagerDecoder.distinct_rows}

    def run(path):
        rollout.EagerDecoder.distinct_rows = paths[path]
        return rollout.generate(model, prompts, args.generations, cfg, args.eos, 0,
                                generator=torch.Generator().manual_seed(1))

    first, medians = alternated(run, list(paths), args.rounds)
    a, b = first.values()
    print({"same_tokens": torch.equal(a.completion_ids, b.completion_ids),
           "max_logprob_difference": (a.behavior_logprobs - b.behavior_logprobs).abs().max().item(),
           "tokens": a.num_completion_tokens, "rounds": args.rounds,
           **{f"{path} s": round(m, 3) for path, m in medians.items()}})


if __name__ == "__main__":
    main()
