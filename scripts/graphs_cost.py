"""The rollout engine with and without CUDA graphs (--cuda-graphs) on rollouts that end at EOS, where finished
rows leave the batch and every batch composition is captured again: the same prompts and uniforms, rounds
alternated, medians of the rollout time, captures per call, and whether the two sample the same tokens.
`bench --cuda-graphs` measures fixed-length rollouts (one capture per call); this measures the other case.

    python scripts/graphs_cost.py [--model DIR | --preset qwen2.5-1.5b] [--eos-fraction 0.01 --tokens 256]

With random weights a real EOS id is almost never drawn, so the lowest `eos-fraction` of the vocabulary's ids
all count as EOS (0.01 of Qwen2.5's vocabulary: completions of about 70 tokens).
"""

import argparse

import torch
from alternate import alternated, load_model, model_arguments, random_prompts, shape_arguments

from nested_reft import decode_graphs, rollout


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    model_arguments(p, "qwen2.5-1.5b")
    shape_arguments(p, rows=16, generations=8, prompt_len=64, tokens=256, rounds=3)
    p.add_argument("--eos-fraction", type=float, default=0.01)
    p.add_argument("--dtype", default="bfloat16")
    args = p.parse_args()
    model = load_model(args.model, args.preset).to("cuda", getattr(torch, args.dtype))
    vocab = model.get_input_embeddings().num_embeddings
    eos = list(range(max(1, int(vocab * args.eos_fraction))))
    prompts = random_prompts(model, args.rows, args.prompt_len, low=len(eos))  # no EOS inside a prompt
    cfg = rollout.SamplingConfig(max_new_tokens=args.tokens)
    captures = []
    real = decode_graphs.capture_cuda_graph
    decode_graphs.capture_cuda_graph = lambda *a: captures.append(1) or real(*a)

    def run(graphs):
        return rollout.generate(model, prompts, args.generations, cfg, eos, 0,
                                generator=torch.Generator().manual_seed(1), cuda_graphs=graphs)

    first, medians = alternated(run, [False, True], args.rounds, before=torch.cuda.synchronize)
    a, b = first[False], first[True]
    print({"device": torch.cuda.get_device_name(), "same_tokens": torch.equal(a.completion_ids, b.completion_ids),
           "tokens": a.num_completion_tokens, "mean_length": a.completion_mask.sum(-1).float().mean().item(),
           "captures_per_call": len(captures) / (args.rounds + 1), "rounds": args.rounds,  # warm-up call included
           "eager s": round(medians[False], 3), "cuda graphs s": round(medians[True], 3),
           "eager / graphs": round(medians[False] / medians[True], 3)})


if __name__ == "__main__":
    main()
