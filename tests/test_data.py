"""data.py: loaders on the fixtures, every error message, prompts, SFT targets."""

import json
import sys
from pathlib import Path

import pytest

from nested_reft import data
from nested_reft.data import DataError, Example, load_examples, sft_target

FIXTURES = Path(__file__).parent / "fixtures" / "data"


class FakeTokenizer:
    """Just enough tokenizer for the prompt functions: a chat template that shows its messages."""

    def __init__(self, chat_template=None):
        self.chat_template = chat_template

    def apply_chat_template(self, messages, tokenize, add_generation_prompt):
        assert tokenize is False
        text = "".join(f"<{m['role']}>{m['content']}</{m['role']}>" for m in messages)
        return text + ("<assistant>" if add_generation_prompt else "")


def write_lines(path: Path, lines: list[str]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(line + "\n" for line in lines))
    return path


def record(**overrides) -> str:
    rec = {"id": "x-0", "problem": "1 + 1?", "answer": "2", "solution": None, "meta": {}}
    rec.update(overrides)
    return json.dumps(rec)


# ---- loading ----------------------------------------------------------------------------------


def test_load_every_fixture_set():
    for name, split, count in [("gsm8k", "train", 2), ("svamp", "test", 3), ("math12k", "train", 2), ("minerva", "test", 1)]:
        examples = load_examples(name, split, data_dir=FIXTURES)
        assert len(examples) == count
        assert all(isinstance(ex, Example) and ex.problem and ex.answer for ex in examples)
    ex = load_examples("svamp", "test", data_dir=FIXTURES)[0]
    assert (ex.id, ex.answer, ex.solution) == ("chal-1", "51", "( 76.0 - 25.0 )")
    assert ex.meta["Type"] == "Subtraction"


def test_limit_and_env_var(monkeypatch):
    monkeypatch.setenv(data.DATA_ENV, str(FIXTURES))
    assert len(load_examples("svamp", "test", limit=2)) == 2
    assert data.resolve_data_dir() == FIXTURES
    assert data.resolve_data_dir(FIXTURES / "gsm8k") == FIXTURES / "gsm8k"  # the argument wins


def test_local_jsonl_path():
    examples = load_examples(str(FIXTURES / "math12k" / "train.jsonl"), "ignored")
    assert [ex.answer for ex in examples] == ["5", "\\frac{5}{6}"]


def test_no_data_dir(monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(DataError, match="--data-dir.*NESTED_REFT_DATA"):
        load_examples("gsm8k", "train")


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        load_examples("gsm8k", "train", data_dir=tmp_path / "nope")


def test_unknown_dataset_lists_known_ones():
    with pytest.raises(DataError, match="unknown data set 'gsm9k'") as info:
        load_examples("gsm9k", "train", data_dir=FIXTURES)
    for name in data.TRAIN_SETS + data.BENCHMARKS:
        assert name in str(info.value)


def test_missing_split_says_where():
    with pytest.raises(DataError, match="no split 'train'.*svamp/train.jsonl missing; splits: test"):
        load_examples("svamp", "train", data_dir=FIXTURES)


def test_malformed_line_names_file_and_line(tmp_path):
    path = write_lines(tmp_path / "d" / "train.jsonl", [record(), "{not json"])
    with pytest.raises(DataError, match=f"{path}:2: malformed JSON"):
        load_examples("d", "train", data_dir=tmp_path)


def test_blank_line_is_an_error(tmp_path):
    path = write_lines(tmp_path / "d" / "train.jsonl", [record(), ""])
    with pytest.raises(DataError, match=f"{path}:2"):
        load_examples("d", "train", data_dir=tmp_path)


def test_missing_field_names_field_and_line(tmp_path):
    bad = json.loads(record())
    del bad["answer"]
    path = write_lines(tmp_path / "d" / "train.jsonl", [record(), record(), json.dumps(bad)])
    with pytest.raises(DataError, match=f"{path}:3: missing field 'answer'"):
        load_examples("d", "train", data_dir=tmp_path)


@pytest.mark.parametrize(
    "override, field",
    [({"answer": ""}, "answer"), ({"problem": 3}, "problem"), ({"solution": 1}, "solution"), ({"meta": []}, "meta")],
)
def test_bad_field_types(tmp_path, override, field):
    path = write_lines(tmp_path / "t.jsonl", [record(**override)])
    with pytest.raises(DataError, match=f"{path}:1: field '{field}'"):
        load_examples(str(path), "train")


def test_not_an_object(tmp_path):
    path = write_lines(tmp_path / "t.jsonl", ["[1, 2]"])
    with pytest.raises(DataError, match=f"{path}:1: expected a JSON object"):
        load_examples(str(path), "train")


def test_missing_local_file(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_examples(str(tmp_path / "missing.jsonl"), "train")


def test_empty_file(tmp_path):
    path = tmp_path / "d" / "train.jsonl"
    path.parent.mkdir()
    path.write_text("")
    with pytest.raises(DataError, match="no examples"):
        load_examples("d", "train", data_dir=tmp_path)


def test_hub_id_without_datasets(monkeypatch):
    monkeypatch.setitem(sys.modules, "datasets", None)  # import datasets -> ImportError
    with pytest.raises(DataError, match="pip install datasets"):
        load_examples("openai/gsm8k", "train")


def test_hub_rows_are_mapped(monkeypatch):
    rows = [{"question": "2 + 3?", "answer": "Add them: 2+3=5.\n#### 5"}, {"problem": "4?", "answer": "4", "level": 1}]
    fake = type(sys)("datasets")
    fake.load_dataset = lambda path, config, split: rows if (path, config, split) == ("someone/gsm8k", "main", "train") else 1 / 0
    monkeypatch.setitem(sys.modules, "datasets", fake)
    first, second = load_examples("someone/gsm8k:main", "train")
    assert (first.problem, first.answer, first.solution) == ("2 + 3?", "5", "Add them: 2+3=5.")
    assert (second.answer, second.solution, second.meta) == ("4", None, {"level": 1})


def test_dataset_kind():
    assert data.dataset_kind("gsm8k") == "gsm8k"
    assert data.dataset_kind("openai/gsm8k:main") == "gsm8k"
    assert data.dataset_kind("/data/svamp/test.jsonl") == "svamp"


# ---- prompts ----------------------------------------------------------------------------------


def test_chat_prompt_has_system_instruction_and_generation_prompt():
    tok = FakeTokenizer(chat_template="{{ messages }}")
    prompt = data.format_prompt(tok, "What is 2 + 2?")  # auto -> chat
    assert prompt == f"<system>{data.SYSTEM_PROMPT}</system><user>What is 2 + 2?</user><assistant>"
    assert "\\boxed{}" in data.SYSTEM_PROMPT and "step by step" in data.SYSTEM_PROMPT


def test_plain_prompt():
    for tok, template in [(FakeTokenizer(), "auto"), (FakeTokenizer("{{ x }}"), "plain")]:
        prompt = data.format_prompt(tok, "What is 2 + 2?", template)
        assert prompt.startswith("Question: What is 2 + 2?\n") and prompt.endswith("Answer: ")


def test_bad_template():
    with pytest.raises(ValueError, match="needs a tokenizer with a chat template"):
        data.format_prompt(FakeTokenizer(), "x", "chat")
    with pytest.raises(ValueError, match="auto, chat or plain"):
        data.format_prompt(FakeTokenizer(), "x", "fancy")


# ---- SFT targets ------------------------------------------------------------------------------


def test_gsm8k_target_strips_calculator_marks():
    ex = load_examples("gsm8k", "train", data_dir=FIXTURES)[0]
    target = sft_target(ex, "gsm8k")
    assert "<<" not in target and ">>" not in target
    assert "Mara sells 12/2 = 6 muffins." in target
    assert target.endswith("The answer is \\boxed{11}.")


def test_svamp_target_from_equation():
    a, b, c = load_examples("svamp", "test", data_dir=FIXTURES)
    assert sft_target(a, "svamp") == "76 - 25 = 51. The answer is \\boxed{51}."
    assert sft_target(b, "svamp") == "13 + 15 = 28. 28 / 28 = 1. The answer is \\boxed{1}."
    assert sft_target(c, "svamp") == "7 * 6 = 42. The answer is \\boxed{42}."
    assert data.svamp_target("( 7.0 / ( 4.0 + 3.0 ) )", "1") == "4 + 3 = 7. 7 / 7 = 1. The answer is \\boxed{1}."
    assert data.svamp_target("8.0", "8") == "The answer is \\boxed{8}."
    with pytest.raises(DataError, match="SVAMP equation"):
        data.svamp_target("( 1.0 + 2.0", "3")
    with pytest.raises(DataError, match="SVAMP equation"):
        data.svamp_target("( 1.0 + 2.0 )", "three")
    # an upstream record whose equation does not give its answer: no contradicting steps
    assert data.svamp_target("( ( 4.0 - 2.0 ) + 3.0 )", "1") == "The answer is \\boxed{1}."


def test_math_target_keeps_boxed_solution():
    ex = load_examples("math12k", "train", data_dir=FIXTURES)[1]
    assert sft_target(ex, "math12k") == ex.solution
    unboxed = ex._replace(solution="Add the fractions.")
    assert sft_target(unboxed, "math12k").endswith("\\boxed{\\frac{5}{6}}.")
    braceless = ex._replace(solution="So the sum is $\\boxed 2$.", answer="2")  # two such math12k records
    assert sft_target(braceless, "math12k") == "So the sum is $\\boxed 2$.\nThe answer is \\boxed{2}."


def test_target_without_solution_is_an_error():
    ex = load_examples("minerva", "test", data_dir=FIXTURES)[0]
    with pytest.raises(DataError, match="minerva-0.*no solution"):
        sft_target(ex, "minerva")
