"""The rollout engine with each prompt prefilled once for its G completions (the default) against every row
prefilled, on one model: the same prompts and uniforms, rounds alternated, medians of the rollout time; and
whether the two sample the same tokens (largest log-prob difference).

    python scripts/prefill_cost.py MODEL_DIR --eos 2 --prompt-len 8 --rounds 8 [--rows 16 --generations 8 --tokens 64]

Without --eos the rollouts have the fixed length; with it they end at EOS (random weights: wherever the
model happens to draw it).
"""

import torch
from alternate import compare_engine_paths

from nested_reft import rollout


def paths(args) -> dict:
    n, shared = args.rows * args.generations, rollout.EagerDecoder.distinct_rows

    def use(distinct_rows):
        return lambda: setattr(rollout.EagerDecoder, "distinct_rows", distinct_rows)

    return {"every row": use(lambda self, ids, mask: (torch.arange(n),) * 2), "once per prompt": use(shared)}


if __name__ == "__main__":
    compare_engine_paths(__doc__.splitlines()[0], paths)
