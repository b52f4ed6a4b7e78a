"""The embedded toy task: arithmetic word problems, a tokenizer built for them, and a 28-layer Qwen2 model.

No weights can be downloaded on these machines, so the demo trains its own model end to end. Choices:
- Problems: "Ava has 7 marbles. First she finds 5 more. Then she gives away 3. Finally she buys 4 more.
  How many marbles does Ava have now?" with 2-4 additions/subtractions of small numbers (start 2-12,
  operands 1-5, every running total in [0, 20]); solution "First 7 + 5 = 12. Then 12 - 3 = 9. Finally
  9 + 4 = 13. The answer is \\boxed{13}.". Each step opens with the same cue word in problem and
  solution, so finding a step's operand is a lookup a tiny model learns fast; without the cues it must
  count numbers, and 1.5 CPU-minutes of SFT stayed under 10% accuracy. What is left hard is the
  arithmetic, learnt late and fast: on 2,000 problems, 2 epochs (250 updates) reach 0.18-0.36 test
  accuracy at temperature 0.6 and 3 epochs (375 updates) 0.67-0.78 (seeds 0 and 1, 2026-11-22), which
  is what `TOY_SFT` uses: partial accuracy with a greedy-vs-sampled gap RL can close (seed 0: 0.765 at
  T = 0.6, 0.84 greedy; 12 RL steps took it to 0.82).
- Splits: one seeded stream of distinct problems; the first `num_test` go to test, the next `num_train`
  to train, so no problem text is in both (checked). Written in the shared data layout (`data.py`).
- Tokenizer: byte-level BPE with Qwen2's own pre-tokenizer (one token per digit, so numbers are digit
  sequences) trained on the task's text, ChatML special tokens and a ChatML chat template, wrapped as
  `PreTrainedTokenizerFast`, so the chat prompt path is the one real models take.
- Model: `Qwen2ForCausalLM` with 28 layers (Qwen2.5-Math-1.5B's depth, so skip counts match the paper's
  Table 1) at width 64, tied embeddings, seeded random init. Init std is hidden**-0.5 (HF's default 0.02
  is tiny at this width and attention barely learns) and the output projections of every block are
  scaled down by sqrt(2 * layers) (GPT-2 style), so the deep narrow stack starts near identity; both
  together roughly tripled the accuracy reached in the same SFT budget.
"""

import json
import random
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM

from nested_reft.data import SYSTEM_PROMPT

TASK = "toy"  # the data set name of the toy task (`<data_dir>/toy/{train,test}.jsonl`)
START_RANGE = (2, 12)  # the first amount
OPERAND_RANGE = (1, 5)  # every later amount
TOTAL_RANGE = (0, 20)  # every running total stays inside
STEPS_RANGE = (2, 4)  # number of operations per problem
CUES = ("First", "Then", "Next")  # open the steps in order; the last step opens with "Finally"
HIDDEN = 64  # model width (28 layers, 4 heads, 2 KV heads, MLP 4x)

NAMES = {
    "She": ["Ava", "Mia", "Lily", "Emma", "Zoe", "Nora", "Ella", "Ruby", "Sara", "Anna"],
    "He": ["Ben", "Leo", "Sam", "Max", "Tom", "Jack", "Noah", "Owen", "Eli", "Dan"],
}
ITEMS = ["marbles", "apples", "stickers", "books", "coins", "cards", "pencils", "shells", "stamps", "cookies"]
ADD_VERBS = ["finds {n} more", "buys {n} more", "gets {n} more", "receives {n} more", "picks up {n} more"]
SUB_VERBS = ["gives away {n}", "loses {n}", "sells {n}", "gives {n} to a friend", "uses {n}"]

SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2's own pre-tokenizer split (one token per digit). `AutoTokenizer` loads a `qwen2` model's tokenizer
# as `Qwen2Tokenizer`, which rebuilds this split, so the tokenizer must use exactly it to round-trip.
QWEN2_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)
CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# SFT settings for the toy (measured: about 4 minutes on one CPU thread, 0.67-0.78 test accuracy at T = 0.6).
TOY_SFT = dict(epochs=3, lr=3e-3, batch_size=16, warmup_ratio=0.05, weight_decay=0.0, max_length=192)


# ---- problems ---------------------------------------------------------------------------------


def make_problem(rng: random.Random) -> dict:
    """One problem as a record (id left empty): each step is a sentence opened by its cue word."""
    pronoun = rng.choice(sorted(NAMES))
    name, item = rng.choice(NAMES[pronoun]), rng.choice(ITEMS)
    start = total = rng.randint(*START_RANGE)
    steps = rng.randint(*STEPS_RANGE)
    sentences, lines, ops = [], [], []
    for cue in CUES[: steps - 1] + ("Finally",):
        n = rng.randint(*OPERAND_RANGE)
        op = rng.choice("+-")
        if not TOTAL_RANGE[0] <= (total + n if op == "+" else total - n) <= TOTAL_RANGE[1]:
            op = "-" if op == "+" else "+"  # flip to stay inside the range (operands < range width)
        new = total + n if op == "+" else total - n
        verb = rng.choice(ADD_VERBS if op == "+" else SUB_VERBS).format(n=n)
        sentences.append(f"{cue} {pronoun.lower()} {verb}.")
        lines.append(f"{cue} {total} {op} {n} = {new}.")
        ops.append(op)
        total = new
    problem = f"{name} has {start} {item}. {' '.join(sentences)} How many {item} does {name} have now?"
    solution = " ".join(lines) + f" The answer is \\boxed{{{total}}}."
    return {"id": "", "problem": problem, "answer": str(total), "solution": solution, "meta": {"ops": "".join(ops)}}


def make_splits(seed: int, num_train: int, num_test: int) -> dict[str, list[dict]]:
    """Distinct problems from one seeded stream: the first `num_test` are test, the next `num_train` train."""
    rng, seen, records = random.Random(seed), set(), []
    for _ in range(100 * (num_train + num_test) + 1000):
        if len(records) == num_train + num_test:
            break
        rec = make_problem(rng)
        if rec["problem"] not in seen:
            seen.add(rec["problem"])
            records.append(rec)
    if len(records) < num_train + num_test:
        raise ValueError(f"the toy task has too few distinct problems for {num_train + num_test} records")
    splits = {"test": records[:num_test], "train": records[num_test:]}
    for split, recs in splits.items():
        for i, rec in enumerate(recs):
            rec["id"] = f"{TASK}-{split}-{i:05d}"
    assert not {r["problem"] for r in splits["test"]} & {r["problem"] for r in splits["train"]}
    return splits


def write_splits(data_dir: Path, splits: dict[str, list[dict]]) -> None:
    """`<data_dir>/toy/<split>.jsonl` in the shared record format."""
    (data_dir / TASK).mkdir(parents=True, exist_ok=True)
    for split, recs in splits.items():
        with open(data_dir / TASK / f"{split}.jsonl", "w") as f:
            f.writelines(json.dumps(r, ensure_ascii=True) + "\n" for r in recs)


# ---- tokenizer --------------------------------------------------------------------------------


def corpus(records: list[dict]) -> list[str]:
    """The text the BPE merges are learned from: problems, solutions and the chat frame."""
    chat = f"system\n{SYSTEM_PROMPT}\nuser\nassistant\n"
    return [chat] * 100 + [r["problem"] for r in records] + [r["solution"] for r in records]


def build_tokenizer(texts: list[str], vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """Byte-level BPE over `texts`, one token per digit, ChatML specials and chat template."""
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    split = pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated")
    tok.pre_tokenizer = pre_tokenizers.Sequence([split, pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        bos_token=None,
        chat_template=CHAT_TEMPLATE,
        model_max_length=512,
    )


# ---- model ------------------------------------------------------------------------------------


def build_model(tokenizer, seed: int = 0, hidden_size: int = HIDDEN, num_layers: int = 28) -> Qwen2ForCausalLM:
    """A randomly initialised Qwen2 causal LM of the paper's depth at toy width."""
    config = Qwen2Config(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        initializer_range=hidden_size**-0.5,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    model = Qwen2ForCausalLM(config)
    with torch.no_grad():  # GPT-2 style: blocks start near identity, the deep stack keeps its input
        for layer in model.model.layers:
            for proj in (layer.self_attn.o_proj, layer.mlp.down_proj):
                proj.weight.normal_(0.0, config.initializer_range / (2 * num_layers) ** 0.5)
    model.generation_config = GenerationConfig(
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, do_sample=False
    )
    return model


# ---- everything -------------------------------------------------------------------------------


def build_toy(output_dir, seed: int = 0, num_train: int = 2000, num_test: int = 200, hidden_size: int = HIDDEN) -> dict:
    """Write `output_dir/model/` (model + tokenizer) and `output_dir/data/toy/{train,test}.jsonl`."""
    output_dir = Path(output_dir)
    splits = make_splits(seed, num_train, num_test)
    write_splits(output_dir / "data", splits)
    tokenizer = build_tokenizer(corpus(splits["train"]))
    model = build_model(tokenizer, seed=seed, hidden_size=hidden_size)
    model.save_pretrained(output_dir / "model")
    tokenizer.save_pretrained(output_dir / "model")
    return {
        "model": str(output_dir / "model"),
        "data_dir": str(output_dir / "data"),
        "dataset": TASK,
        "num_train": len(splits["train"]),
        "num_test": len(splits["test"]),
        "vocab_size": len(tokenizer),
        "num_parameters": sum(p.numel() for p in model.parameters()),
    }
