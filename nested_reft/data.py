"""Data: math problems from the shared JSONL layout (or the hub), prompts, and SFT targets.

Choices:
- One record format everywhere: `<data_dir>/<name>/<split>.jsonl`, one JSON object per line with
  `id, problem, answer, solution, meta` (see the shared data README). `name` may also be the path of
  a .jsonl file in that format, or a hub id (`owner/name`) loaded through the optional `datasets`.
- The data directory is `--data-dir`, else the environment variable NESTED_REFT_DATA.
- Nothing is skipped silently: a malformed line or a missing field is an error naming file:line.
- Answers are kept exactly as stored ("51", "\\frac{1}{2}"); the reward compares them mathematically.
- Prompts use the tokenizer's chat template with a system instruction to reason step by step and box
  the answer; tokenizers without one get a plain text template.
- SFT targets are a chain of thought that ends with the answer in `\\boxed{}`, built per data set:
  GSM8K without its `<<calc>>` marks; SVAMP from its equation ("76 - 25 = 51."); MATH and the toy task
  as stored (a boxed answer is appended where the solution has no `\\boxed{...}`).
"""

import json
import os
import re
from pathlib import Path
from typing import NamedTuple

TRAIN_SETS = ("gsm8k", "svamp", "math12k", "toy")
BENCHMARKS = ("aime24", "amc", "math500", "minerva", "olympiadbench", "amc23")
FIELDS = ("id", "problem", "answer", "solution", "meta")
DATA_ENV = "NESTED_REFT_DATA"

SYSTEM_PROMPT = "Please reason step by step, and put your final answer within \\boxed{}."
PLAIN_TEMPLATE = "Question: {problem}\n{instruction}\nAnswer: "


class DataError(ValueError):
    """Bad data input (missing directory or file, malformed line, missing field, unknown data set)."""


class Example(NamedTuple):
    id: str
    problem: str
    answer: str
    solution: str | None  # None where the source has no worked solution (most benchmarks)
    meta: dict


# ---- loading ----------------------------------------------------------------------------------


def resolve_data_dir(data_dir=None) -> Path:
    """The data directory: the explicit argument, else $NESTED_REFT_DATA; it must exist."""
    if data_dir is None:
        data_dir = os.environ.get(DATA_ENV)
        if not data_dir:
            raise DataError(f"no data directory given: pass --data-dir DIR or set {DATA_ENV}=DIR")
    path = Path(data_dir).expanduser()
    if not path.is_dir():
        raise DataError(f"data directory {path} does not exist (pass --data-dir DIR or set {DATA_ENV})")
    return path


def parse_record(line: str, where: str) -> Example:
    """One JSONL line as an Example; `where` is `file:line` for error messages."""
    try:
        rec = json.loads(line)
    except json.JSONDecodeError as exc:
        raise DataError(f"{where}: malformed JSON ({exc.msg})") from None
    if not isinstance(rec, dict):
        raise DataError(f"{where}: expected a JSON object, got {type(rec).__name__}")
    for field in FIELDS:
        if field not in rec:
            raise DataError(f"{where}: missing field '{field}'")
    if not isinstance(rec["problem"], str) or not rec["problem"].strip():
        raise DataError(f"{where}: field 'problem' must be a non-empty string")
    if not isinstance(rec["answer"], str) or not rec["answer"].strip():
        raise DataError(f"{where}: field 'answer' must be a non-empty string")
    if rec["solution"] is not None and not isinstance(rec["solution"], str):
        raise DataError(f"{where}: field 'solution' must be a string or null")
    if not isinstance(rec["meta"], dict):
        raise DataError(f"{where}: field 'meta' must be an object")
    return Example(str(rec["id"]), rec["problem"], rec["answer"], rec["solution"], rec["meta"])


def read_jsonl(path, limit: int | None = None) -> list[Example]:
    """Every record of a JSONL file (the first `limit` if given); blank lines are errors too."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"data file {path} does not exist")
    examples = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            examples.append(parse_record(line, f"{path}:{lineno}"))
    return examples


def dataset_file(name: str, split: str, data_dir=None) -> Path:
    """`<data_dir>/<name>/<split>.jsonl`, with errors that say what exists."""
    root = resolve_data_dir(data_dir)
    known = TRAIN_SETS + BENCHMARKS
    if not (root / name).is_dir():
        present = sorted(p.name for p in root.iterdir() if p.is_dir())
        raise DataError(
            f"unknown data set '{name}': no directory {root / name}; known data sets: {', '.join(known)}"
            f" (present in {root}: {', '.join(present) or 'none'})"
        )
    path = root / name / f"{split}.jsonl"
    if not path.is_file():
        splits = sorted(p.stem for p in (root / name).glob("*.jsonl"))
        raise DataError(f"data set '{name}' has no split '{split}' ({path} missing; splits: {', '.join(splits)})")
    return path


def load_hub(name: str, split: str, limit: int | None = None) -> list[Example]:
    """A hub dataset via `datasets.load_dataset` (`owner/name` or `owner/name:config`, e.g. `openai/gsm8k:main`):
    `question` or `problem`, `answer`, optional `solution`."""
    try:
        import datasets
    except ImportError:
        raise DataError(f"'{name}' looks like a hub dataset, which needs `pip install datasets`") from None
    path, _, config = name.partition(":")
    rows = datasets.load_dataset(path, config or None, split=split)
    examples = []
    for i, row in enumerate(rows):
        if limit is not None and i >= limit:
            break
        problem = row.get("problem", row.get("question"))
        if problem is None or "answer" not in row:
            raise DataError(f"{name}[{split}] row {i}: needs a 'problem' or 'question' field and an 'answer' field")
        answer, solution = str(row["answer"]), row.get("solution")
        if "####" in answer and solution is None:  # GSM8K style: "reasoning #### 72"
            solution, answer = (part.strip() for part in answer.rsplit("####", 1))
        meta = {k: v for k, v in row.items() if k not in FIELDS + ("question",)}
        examples.append(Example(str(row.get("id", f"{name}-{i}")), problem, answer, solution, meta))
    return examples


def load_examples(name: str, split: str = "train", data_dir=None, limit: int | None = None) -> list[Example]:
    """Examples of a data set: a name under the data directory, a local .jsonl path, or a hub id."""
    if limit is not None and limit < 1:
        raise DataError(f"limit must be >= 1, got {limit}")
    if name.endswith(".jsonl") or Path(name).is_file():
        examples = read_jsonl(name, limit)
    elif "/" in name and not Path(name).exists():
        examples = load_hub(name, split, limit)
    else:
        examples = read_jsonl(dataset_file(name, split, data_dir), limit)
    if not examples:
        raise DataError(f"data set '{name}' split '{split}' has no examples")
    return examples


def dataset_kind(name: str) -> str:
    """The family a data set name refers to (picks the SFT target format): "gsm8k" for "gsm8k",
    ".../gsm8k/train.jsonl", "openai/gsm8k" and "openai/gsm8k:main"."""
    path = Path(name.partition(":")[0])
    return (path.parent.name if name.endswith(".jsonl") else path.name).lower()


# ---- prompts ----------------------------------------------------------------------------------


def has_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def resolve_template(tokenizer, template: str) -> str:
    """"auto" -> "chat" when the tokenizer has a chat template, else "plain"; others are checked."""
    if template == "auto":
        return "chat" if has_chat_template(tokenizer) else "plain"
    if template not in ("chat", "plain"):
        raise ValueError(f"template must be auto, chat or plain, got {template!r}")
    if template == "chat" and not has_chat_template(tokenizer):
        raise ValueError("template 'chat' needs a tokenizer with a chat template; use 'plain'")
    return template


def format_prompt(tokenizer, problem: str, template: str = "auto") -> str:
    """The prompt text for `problem`: "chat" (the tokenizer's chat template), "plain", or "auto"."""
    if resolve_template(tokenizer, template) == "plain":
        return PLAIN_TEMPLATE.format(problem=problem, instruction=SYSTEM_PROMPT)
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": problem}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_prompt(tokenizer, problem: str, template: str = "auto") -> list[int]:
    """Prompt token ids. A chat template writes its own special tokens; plain text gets the usual BOS."""
    plain = resolve_template(tokenizer, template) == "plain"
    return tokenizer(format_prompt(tokenizer, problem, template), add_special_tokens=plain)["input_ids"]


# ---- SFT targets ------------------------------------------------------------------------------


def _num(x: float) -> str:
    """A number as a person writes it: 51.0 -> "51", 2.5 -> "2.5"."""
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


def _svamp_steps(tokens: list[str], steps: list[str]) -> float:
    """Evaluate a fully parenthesised SVAMP equation ("( ( 13.0 + 15.0 ) / 28.0 )"), one line per op."""
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b, "/": lambda a, b: a / b}

    def operand() -> float:
        tok = tokens.pop(0)
        if tok == "(":
            value = expr()
            if tokens.pop(0) != ")":
                raise ValueError("unbalanced parentheses")
            return value
        return float(tok)

    def expr() -> float:
        left = operand()
        while tokens and tokens[0] in ops:
            op = tokens.pop(0)
            right = operand()
            value = ops[op](left, right)
            steps.append(f"{_num(left)} {op} {_num(right)} = {_num(value)}.")
            left = value
        return left

    return expr()


def svamp_target(equation: str, answer: str) -> str:
    """'( 76.0 - 25.0 )', '51' -> '76 - 25 = 51. The answer is \\boxed{51}.' Where the equation's value is
    not the stored answer (one upstream SVAMP record), the steps would contradict it and are left out."""
    steps: list[str] = []
    tokens = equation.split()
    try:
        value = _svamp_steps(tokens, steps)
        if tokens:
            raise ValueError(f"unexpected {' '.join(tokens)!r} at the end")
        expected = float(answer)
    except (ValueError, IndexError, ZeroDivisionError) as exc:
        raise DataError(f"cannot read SVAMP equation {equation!r} with answer {answer!r}: {exc}") from None
    if abs(value - expected) > 1e-6:
        steps = []
    return " ".join(steps + [f"The answer is \\boxed{{{answer}}}."])


def gsm8k_target(solution: str, answer: str) -> str:
    """The GSM8K solution without its `<<48/2=24>>` calculator marks, ending with the boxed answer."""
    text = re.sub(r"<<[^>]*>>", "", solution).strip()
    return f"{text}\nThe answer is \\boxed{{{answer}}}."


def sft_target(example: Example, dataset: str) -> str:
    """The chain-of-thought target an SFT step trains on; always ends with the answer in \\boxed{}."""
    if example.solution is None:
        raise DataError(f"example {example.id} of '{dataset}' has no solution, so it cannot be an SFT target")
    kind = dataset_kind(dataset)
    if kind == "gsm8k":
        return gsm8k_target(example.solution, example.answer)
    if kind == "svamp":
        return svamp_target(example.solution, example.answer)
    if "\\boxed{" in example.solution or "\\fbox{" in example.solution:
        return example.solution.strip()  # MATH / math12k, toy
    return f"{example.solution.strip()}\nThe answer is \\boxed{{{example.answer}}}."
