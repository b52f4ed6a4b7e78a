"""synthetic.py: the toy task is seeded, its splits are disjoint, and the saved directory loads as HF."""

import json
import random
import re

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from nested_reft import synthetic
from nested_reft.data import format_prompt, load_examples


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    summary = synthetic.build_toy(out, seed=3, num_train=60, num_test=20)
    return out, summary


def check_solution(rec: dict) -> None:
    """Every CoT line is correct arithmetic, chained, and the box holds the answer."""
    steps = re.findall(r"(\d+) ([+-]) (\d+) = (\d+)\.", rec["solution"])
    assert synthetic.STEPS_RANGE[0] <= len(steps) <= synthetic.STEPS_RANGE[1]
    prev = None
    for a, op, b, c in steps:
        a, b, c = int(a), int(b), int(c)
        assert c == (a + b if op == "+" else a - b) and synthetic.TOTAL_RANGE[0] <= c <= synthetic.TOTAL_RANGE[1]
        assert prev is None or a == prev
        prev = c
    assert rec["solution"].endswith(f"The answer is \\boxed{{{rec['answer']}}}.") and int(rec["answer"]) == prev


def test_problems_are_correct():
    rng = random.Random(0)
    for _ in range(300):
        rec = synthetic.make_problem(rng)
        check_solution(rec)
        assert rec["problem"].endswith("have now?")
        cues = re.findall(r"(First|Then|Next|Finally) [a-z]+ ", rec["problem"])  # one sentence per step
        assert cues == re.findall(r"(First|Then|Next|Finally) \d", rec["solution"]) and cues[-1] == "Finally"


def test_splits_are_seeded_and_disjoint():
    a = synthetic.make_splits(seed=1, num_train=200, num_test=50)
    assert a == synthetic.make_splits(seed=1, num_train=200, num_test=50)
    assert a != synthetic.make_splits(seed=2, num_train=200, num_test=50)
    assert (len(a["train"]), len(a["test"])) == (200, 50)
    train, test = {r["problem"] for r in a["train"]}, {r["problem"] for r in a["test"]}
    assert len(train) == 200 and len(test) == 50 and not train & test
    assert a["test"][0]["id"] == "toy-test-00000"


def test_build_toy_is_deterministic(toy, tmp_path):
    out, summary = toy
    again = synthetic.build_toy(tmp_path, seed=3, num_train=60, num_test=20)
    for rel in ["data/toy/train.jsonl", "data/toy/test.jsonl", "model/tokenizer.json", "model/model.safetensors"]:
        assert (out / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
    assert {k: v for k, v in again.items() if k not in ("model", "data_dir")} == {
        k: v for k, v in summary.items() if k not in ("model", "data_dir")
    }


def test_data_in_shared_layout(toy):
    out, _ = toy
    test = load_examples("toy", "test", data_dir=out / "data")
    assert len(test) == 20 and test[0].id == "toy-test-00000"
    for line in (out / "data" / "toy" / "train.jsonl").read_text().splitlines():
        check_solution(json.loads(line))


def test_saved_model_loads_with_auto_classes(toy):
    out, summary = toy
    model = AutoModelForCausalLM.from_pretrained(out / "model")
    tok = AutoTokenizer.from_pretrained(out / "model")
    assert model.config.model_type == "qwen2" and model.config.num_hidden_layers == 28
    assert len(model.model.layers) == 28 and model.config.tie_word_embeddings
    assert model.config.vocab_size == len(tok) == summary["vocab_size"]
    assert (out / "model" / "model.safetensors").is_file()
    assert model.generation_config.eos_token_id == tok.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    assert model.generation_config.pad_token_id == tok.pad_token_id != tok.eos_token_id
    ids = tok(format_prompt(tok, "Ava has 3 apples."), return_tensors="pt")["input_ids"]  # [1, L]
    with torch.no_grad():
        logits = model(ids).logits  # [1, L, V]
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()


def test_tokenizer_round_trips_and_splits_digits(toy):
    out, _ = toy
    tok = AutoTokenizer.from_pretrained(out / "model")
    rec = json.loads((out / "data" / "toy" / "test.jsonl").read_text().splitlines()[0])
    for text in (rec["problem"], rec["solution"], "Zoe has 40 coins. \\boxed{123}"):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
        assert tok.unk_token_id not in ids
    pieces = tok.convert_ids_to_tokens(tok("123", add_special_tokens=False)["input_ids"])
    assert pieces == ["1", "2", "3"]


def test_chat_prompt_uses_the_template(toy):
    out, _ = toy
    tok = AutoTokenizer.from_pretrained(out / "model")
    prompt = format_prompt(tok, "Ava has 3 apples.")
    assert prompt.startswith("<|im_start|>system\nPlease reason step by step")
    assert prompt.endswith("<|im_start|>user\nAva has 3 apples.<|im_end|>\n<|im_start|>assistant\n")
