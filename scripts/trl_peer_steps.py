"""One arm of the three-way TRL comparison (scripts/trl_three_way.sh): the TRL peer job of
../shared/bench/trl_peer under TRL's GRPOTrainer or NestedGRPOTrainer; prints per-step wall and rollout times.

Usage: trl_peer_steps.py {trl|nested} MODEL_DIR PROMPTS_JSONL STEPS [SKIP_RATIO]

The job and its settings are those of ../shared/bench/trl_peer/trl_steps.py (16 prompts x 8 completions, <= 64
tokens, 4 micro-batches of 32, lr 1e-5, beta 0, no gradient checkpointing); both arms run this same file, so the
only difference is the trainer class (and NestedGRPOTrainer's skip_ratio / mitigation). Rollout time = wall time
in `_generate_single_turn` (TRL's `generate()` or the nested engine), summed per optimizer step.
"""

import json
import os
import sys
import time

import torch
from datasets import Dataset
from transformers import TrainerCallback

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
mode, model, prompts, steps = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
skip_ratio = float(sys.argv[5]) if len(sys.argv) > 5 else 0.15
rows = [json.loads(line) for line in open(prompts)]
ds = Dataset.from_list([{"prompt": r["problem"], "answer": r["answer"]} for r in rows])


def reward(completions, answer, **kw):
    return [1.0 if c.strip().endswith(a) else 0.0 for c, a in zip(completions, answer)]


class Timer(TrainerCallback):
    def __init__(self):
        self.t, self.times, self.rollout, self.current = None, [], [], 0.0

    def on_step_begin(self, *a, **k):
        self.t, self.current = time.perf_counter(), 0.0

    def on_step_end(self, *a, **k):
        self.times.append(time.perf_counter() - self.t)
        self.rollout.append(self.current)


common = dict(output_dir=f"/tmp/trl-3way-{mode}-{os.getpid()}", per_device_train_batch_size=32, num_generations=8,
              gradient_accumulation_steps=4, max_completion_length=64, max_steps=steps, logging_steps=1, report_to=[],
              use_cpu=not torch.cuda.is_available(), bf16=False, learning_rate=1e-5, temperature=1.0,
              save_strategy="no", gradient_checkpointing=False, beta=0.0)
if mode == "trl":
    from trl import GRPOConfig, GRPOTrainer

    cls, cfg = GRPOTrainer, GRPOConfig(**common)
elif mode == "nested":
    from nested_reft.integrations.trl import NestedGRPOConfig, NestedGRPOTrainer

    cls, cfg = NestedGRPOTrainer, NestedGRPOConfig(**common, skip_ratio=skip_ratio, mitigation="retrace")
else:
    raise SystemExit(f"mode must be trl or nested, got {mode!r}")
timer = Timer()
trainer = cls(model=model, reward_funcs=reward, args=cfg, train_dataset=ds, callbacks=[timer])
generate_once = trainer._generate_single_turn


def timed(*args, **kwargs):
    start = time.perf_counter()
    try:
        return generate_once(*args, **kwargs)
    finally:
        timer.current += time.perf_counter() - start


trainer._generate_single_turn = timed
trainer.train()
lens = [h["completions/mean_length"] for h in trainer.state.log_history if "completions/mean_length" in h]
out = {"system": mode, "step_s": timer.times, "rollout_s": timer.rollout, "completion_len": lens}
if mode == "nested":
    out["skip_sets"] = {str(k): list(v) for k, v in trainer.skip_history.items()}
    out["h_mean"] = [h["nested/h_mean"] for h in trainer.state.log_history if "nested/h_mean" in h]
print(json.dumps(out))
