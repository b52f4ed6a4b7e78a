"""What refreshing the importance profile inside the RL update costs: the update with the Block Influence
hooks on (what `--skip-policy importance --profile-every 1` runs every step) against the same update
without them, alternated on one rollout batch, medians and their ratio. docs/training.md has its output:

    python scripts/profile_cost.py --model runs/demo/toy/model --data-dir runs/demo/toy/data --repeats 7

The weights change with every update, which does not change the work; the hooks' extra cost is a few
reductions per layer and token (a cosine, a sum), against the layer's own matrix products.
"""

import argparse
import json
import statistics
import tempfile
import time

import torch

from nested_reft import trainer
from nested_reft.config import TrainConfig
from nested_reft.importance import measuring
from nested_reft.objectives import group_advantages


def timed_update(run, rollout, advantages, with_meter: bool) -> float:
    start = time.perf_counter()
    with measuring(run.accelerator.unwrap_model(run.model), with_meter) as meter:
        trainer.update(run, rollout, advantages, None, None, meter)
    return time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", default="toy")
    p.add_argument("--data-dir", required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(model=args.model, dataset=args.dataset, data_dir=args.data_dir, output_dir=out,
                          batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                          min_new_tokens=args.max_new_tokens, skip_ratio=0.15, skip_policy="importance",
                          progress=False)
        run = trainer.setup(cfg)
        prompts = trainer.local_prompts(run, 0)
        rollout = trainer.do_rollouts(run, prompts, (), 0)
        advantages = group_advantages(torch.rand(rollout.completion_ids.size(0)), cfg.num_generations)
        run.model.train()
        timed_update(run, rollout, advantages, False)  # warm-up
        times = {False: [], True: []}
        for _ in range(args.repeats):
            for with_meter in (False, True):
                times[with_meter].append(timed_update(run, rollout, advantages, with_meter))
    off, on = statistics.median(times[False]), statistics.median(times[True])
    print(json.dumps({"update_s_without_hooks": off, "update_s_with_hooks": on, "ratio": on / off,
                      "rows": rollout.completion_ids.size(0), "tokens": int(rollout.completion_mask.sum()),
                      "repeats": args.repeats, "threads": args.threads}))


if __name__ == "__main__":
    main()
