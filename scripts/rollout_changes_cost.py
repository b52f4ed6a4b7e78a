"""Two of the rollout engine's choices against what they replaced, on one model: the same prompts and uniforms,
rounds alternated, medians of the rollout time; and whether the two sample the same tokens (largest log-prob
difference).

- `--change prefill`: each prompt prefilled once for its G completions (the default) against every row
  prefilled (before 2026-12-06's third session);
- `--change compaction`: finished rows dropped by copying the kept rows' filled positions with
  `index_select` (the default) against indexing the whole cache buffer (before);
- `--change recurrent` (a hybrid model: Mamba or gated-delta-rule layers): the rows of their conv and
  recurrent states selected, so that prompts are prefilled once and finished rows leave the batch (the
  default since 2026-12-07) against every row prefilled and kept to the end (before).

    python scripts/rollout_changes_cost.py MODEL_DIR --change prefill --eos 2 --prompt-len 8 --rounds 8

Without --eos the rollouts have the fixed length; with it they end at EOS (random weights: wherever the
model happens to draw it).
"""

import torch
from alternate import compare_engine_paths

from nested_reft import kv_cache, rollout


def paths(args) -> dict:
    if args.change == "prefill":
        n, shared = args.rows * args.generations, rollout.EagerDecoder.distinct_rows
        every_row = lambda self, ids, mask: (torch.arange(n),) * 2  # noqa: E731
        return {"every row": lambda: setattr(rollout.EagerDecoder, "distinct_rows", every_row),
                "once per prompt": lambda: setattr(rollout.EagerDecoder, "distinct_rows", shared)}
    if args.change == "recurrent":
        states = kv_cache.STATE_LAYERS
        return {"every row kept": lambda: setattr(kv_cache, "STATE_LAYERS", ()),
                "states' rows selected": lambda: setattr(kv_cache, "STATE_LAYERS", states)}
    filled = kv_cache.select_rows
    whole = lambda buffer, indices, length: buffer[indices]  # noqa: E731
    return {"whole buffer indexed": lambda: setattr(kv_cache, "select_rows", whole),
            "filled part, index_select": lambda: setattr(kv_cache, "select_rows", filled)}


if __name__ == "__main__":
    compare_engine_paths(__doc__.splitlines()[0], paths, changes=("prefill", "compaction", "recurrent"))
