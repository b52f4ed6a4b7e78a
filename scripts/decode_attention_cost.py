"""The rollout engine with SDPA against decode_attention.py's two batched products for one-token steps, on one
model: the same prompts and uniforms, rounds alternated, medians of the rollout time; and whether the two
sample the same tokens (largest log-prob difference).

    python scripts/decode_attention_cost.py MODEL_DIR [--rows 16 --generations 8 --tokens 64 --eos ID --rounds 6]

Without --eos the rollouts have the fixed length; with it they end at EOS (random weights: wherever the
model happens to draw it).
"""

from contextlib import nullcontext

from alternate import compare_engine_paths

from nested_reft import rollout
from nested_reft.decode_attention import single_query_attention


def paths(args) -> dict:
    def use(attention):
        return lambda: setattr(rollout, "single_query_attention", attention)

    return {"sdpa": use(lambda m: nullcontext()), "two products": use(single_query_attention)}


if __name__ == "__main__":
    compare_engine_paths(__doc__.splitlines()[0], paths)
