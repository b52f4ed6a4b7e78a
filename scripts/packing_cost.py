"""What the update's micro-batch packing costs: the same policy updates on the TRL peer job's rollouts with the
rows packed greedily (each micro-batch filled in length order while it fits the token budget: the packing
before 2026-12-06) and by `batching.packed_groups` at several per-pass costs, alternated in one process;
median update seconds and positions processed per variant. docs/benchmarks.md has its output:

    REPO=$PWD; cd WORKDIR && python $REPO/scripts/packing_cost.py --repeats 3

WORKDIR: where ../shared/bench/trl_peer/side_by_side.sh left its `tiny` model and `arith.jsonl`.
"""

import argparse
import json
import statistics
import tempfile
import time

import torch

from nested_reft import batching, trainer
from nested_reft.config import TrainConfig
from nested_reft.objectives import group_advantages


def greedy_groups(order, lengths, prompt_lengths, budget, logits_budget):
    """The earlier packing: take rows in order while the trimmed micro-batch stays within the budgets."""
    groups, group, width = [], [], (0, 0)
    for row in order:
        wider = (max(width[0], prompt_lengths[row], 1), max(width[1], lengths[row], 1))
        if group and ((len(group) + 1) * sum(wider) > budget or (len(group) + 1) * wider[1] > logits_budget):
            groups.append(group)
            group, wider = [], (max(prompt_lengths[row], 1), max(lengths[row], 1))
        group, width = group + [row], wider
    return groups + [group]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pass-costs", type=float, nargs="+", default=[1 / 32, 1 / 16, 1 / 8, 1 / 4])
    p.add_argument("--rollouts", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    packed = batching.packed_groups
    variants = {"greedy": greedy_groups, **{f"pass_cost={c:g}": c for c in args.pass_costs}}
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model="tiny", dataset="arith.jsonl", template="plain", output_dir=out, batch_size=16,
                          num_generations=8, max_new_tokens=64, min_new_tokens=0, lr=1e-5, progress=False)
        run = trainer.setup(cfg)
        rollouts = [trainer.do_rollouts(run, trainer.local_prompts(run, s), (), s) for s in range(args.rollouts)]
        advantages = group_advantages(torch.randn(rollouts[0].completion_ids.size(0)), cfg.num_generations)
        run.model.train()
        times, positions = {v: [] for v in variants}, {}
        for repeat in range(args.repeats + 1):  # the first round warms up
            for name, how in variants.items():
                if callable(how):
                    batching.packed_groups = how
                else:
                    batching.packed_groups, batching.PASS_COST = packed, how
                rows = cfg.micro_batch_size * cfg.num_generations
                positions[name] = [sum(mb.prompt_ids.numel() + mb.completion_ids.numel()
                                       for mb in batching.micro_batches(r, rows)) for r in rollouts]
                for r in rollouts:
                    start = time.perf_counter()
                    trainer.update(run, r, advantages, None, None, None)
                    if repeat:
                        times[name].append(time.perf_counter() - start)
    print(json.dumps({name: {"update_s": round(statistics.median(t), 3), "positions": positions[name]}
                      for name, t in times.items()}))


if __name__ == "__main__":
    main()
