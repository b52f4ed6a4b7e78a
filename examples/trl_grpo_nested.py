"""Nested-ReFT with TRL: GRPO on math problems, rollouts from the nested model (docs/trl.md).

    pip install -e ".[trl]"
    # a model directory or hub id; a data set our loader knows (gsm8k, svamp, math12k, toy, a .jsonl, a hub id),
    # or none for a tiny built-in one
    python examples/trl_grpo_nested.py --model Qwen/Qwen2.5-Math-1.5B-Instruct --dataset gsm8k --skip-ratio 0.15

    # offline, on CPU, in a minute: the embedded toy task (a random-weight 28-layer Qwen2 and its data)
    nested-reft toy --output-dir /tmp/toy --num-train 64 --num-test 8
    python examples/trl_grpo_nested.py --model /tmp/toy/model --dataset toy --data-dir /tmp/toy/data --max-steps 2

Everything except the three Nested-ReFT fields (skip_ratio, mitigation, and the border/seed defaults) is a plain
TRL GRPO setup: a dataset with a "prompt" column (conversational when the tokenizer has a chat template), a reward
function taking `completions` and the dataset's other columns, and a GRPOConfig's fields.
"""

import argparse
import json

import torch
from datasets import Dataset

from nested_reft.data import SYSTEM_PROMPT, format_prompt, has_chat_template, load_examples
from nested_reft.integrations.trl import NestedGRPOConfig, NestedGRPOTrainer
from nested_reft.models import load_model_and_tokenizer
from nested_reft.rewards import math_reward

TINY_PROBLEMS = [(f"What is {a} + {b}?", str(a + b)) for a, b in
                 [(3, 4), (12, 9), (7, 8), (25, 17), (6, 6), (40, 2), (11, 19), (9, 5)]]


def build_dataset(tokenizer, name: str | None, data_dir: str | None, split: str, limit: int | None) -> Dataset:
    """Rows {"prompt", "answer", "alternatives"}: chat messages when the tokenizer has a chat template (TRL applies
    it), else our plain template as text."""
    if name:
        rows = [(ex.problem, ex.answer, list((ex.meta or {}).get("answer_alternatives") or []))
                for ex in load_examples(name, split, data_dir, limit)]
    else:
        rows = [(p, a, []) for p, a in TINY_PROBLEMS]
    chat = has_chat_template(tokenizer)

    def prompt(problem: str):
        if chat:
            return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem}]
        return format_prompt(tokenizer, problem, "plain")

    return Dataset.from_list([{"prompt": prompt(p), "answer": a, "alternatives": alts} for p, a, alts in rows])


def math_accuracy(completions, answer, alternatives=None, **kwargs) -> list[float]:
    """1.0 where the completion's boxed (or final) answer is equivalent to the reference, else 0.0."""
    texts = [c if isinstance(c, str) else c[-1]["content"] for c in completions]  # conversational: messages
    return math_reward(texts, list(answer), [list(a or []) for a in alternatives] if alternatives else None)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="model directory or hub id")
    p.add_argument("--dataset", default=None, help="gsm8k, svamp, math12k, toy, a .jsonl path or a hub id "
                                                   "(default: 8 built-in addition problems)")
    p.add_argument("--data-dir", default=None, help="data directory in the shared layout ($NESTED_REFT_DATA)")
    p.add_argument("--split", default="train")
    p.add_argument("--limit", type=int, default=None, help="use only the first N examples")
    p.add_argument("--output-dir", default="runs/trl-nested")
    p.add_argument("--skip-ratio", type=float, default=0.15, help="x: fraction of layers the rollout model skips")
    p.add_argument("--mitigation", default="retrace", help="base, practical, retrace, tis or mis")
    p.add_argument("--max-steps", type=int, default=4)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--per-device-train-batch-size", type=int, default=8, help="completions per micro-batch")
    p.add_argument("--gradient-accumulation-steps", type=int, default=1)
    p.add_argument("--max-completion-length", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=1e-6)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    bf16 = cuda and torch.cuda.is_bf16_supported()
    model, tokenizer = load_model_and_tokenizer(args.model, dtype=torch.bfloat16 if bf16 else torch.float32)
    dataset = build_dataset(tokenizer, args.dataset, args.data_dir, args.split, args.limit)
    config = NestedGRPOConfig(
        output_dir=args.output_dir,
        # Nested-ReFT
        skip_ratio=args.skip_ratio,
        mitigation=args.mitigation,
        # plain TRL
        num_generations=args.num_generations,
        per_device_train_batch_size=args.per_device_train_batch_size,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_completion_length=args.max_completion_length,
        learning_rate=args.learning_rate,
        max_steps=args.max_steps,
        seed=args.seed,
        temperature=1.0,
        beta=0.0,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        use_cpu=not cuda,
        bf16=bf16,
        disable_dropout=True,
    )
    trainer = NestedGRPOTrainer(model=model, reward_funcs=math_accuracy, args=config, train_dataset=dataset,
                                processing_class=tokenizer)
    trainer.train()
    trainer.save_model(args.output_dir)
    keys = ("loss", "reward", "completions/mean_length", "nested/num_skipped", "nested/h_mean", "nested/h_min",
            "rollout_corr/kl", "nested/rollout_s", "step_time")
    for log in trainer.state.log_history:
        if "loss" in log:
            print(json.dumps({"step": log["step"], "skip_set": list(trainer.skip_history.get(log["step"] - 1, ())),
                              **{k: log[k] for k in keys if k in log}}))
    print(f"saved the trained model to {args.output_dir}")


if __name__ == "__main__":
    main()
