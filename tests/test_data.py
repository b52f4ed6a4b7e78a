"""data.py: loaders on the fixtures, every error message, prompts, SFT targets."""

import json
import sys
from pathlib import Path

import pytest

from nested_reft import data
from nested_reft.data import DataError, Example, load_examples, sft_target

# Hand-written records in the shared data layout (`<dataset>/<split>.jsonl`, fields id, problem, answer,
# solution, meta), a few per set, written to a temporary directory by the `fixtures` fixture so the tests
# run without ../shared/data. The problems are made up; only their shape follows the real sets (GSM8K
# <<calc>> marks, SVAMP equations, MATH \boxed{} solutions, a benchmark record without a solution).
FIXTURE_SETS = {
    "gsm8k/test.jsonl": r"""
{"id": "gsm8k-test-00000", "problem": "Theo saves $15 a week for 8 weeks and then spends $35. How much money does he have left?", "answer": "85", "solution": "Theo saves 15*8 = $<<15*8=120>>120.\nHe has 120-35 = $<<120-35=85>>85 left.", "meta": {"question": "Theo saves $15 a week for 8 weeks and then spends $35. How much money does he have left?", "answer": "Theo saves 15*8 = $<<15*8=120>>120.\nHe has 120-35 = $<<120-35=85>>85 left.\n#### 85"}}""",
    "gsm8k/train.jsonl": r"""
{"id": "gsm8k-train-00000", "problem": "Mara bakes 12 muffins and sells half of them. She then bakes 5 more. How many muffins does she have?", "answer": "11", "solution": "Mara sells 12/2 = <<12/2=6>>6 muffins.\nShe keeps 12-6 = <<12-6=6>>6 muffins.\nAfter baking she has 6+5 = <<6+5=11>>11 muffins.", "meta": {"question": "Mara bakes 12 muffins and sells half of them. She then bakes 5 more. How many muffins does she have?", "answer": "Mara sells 12/2 = <<12/2=6>>6 muffins.\nShe keeps 12-6 = <<12-6=6>>6 muffins.\nAfter baking she has 6+5 = <<6+5=11>>11 muffins.\n#### 11"}}
{"id": "gsm8k-train-00001", "problem": "A box holds 4 rows of 6 pencils. How many pencils are in 3 boxes?", "answer": "72", "solution": "One box holds 4*6 = <<4*6=24>>24 pencils.\nThree boxes hold 24*3 = <<24*3=72>>72 pencils.", "meta": {"question": "A box holds 4 rows of 6 pencils. How many pencils are in 3 boxes?", "answer": "One box holds 4*6 = <<4*6=24>>24 pencils.\nThree boxes hold 24*3 = <<24*3=72>>72 pencils.\n#### 72"}}""",
    "math12k/train.jsonl": r"""
{"id": "train/algebra/1.json", "problem": "Solve for $x$: $3x + 4 = 19$.", "answer": "5", "solution": "Subtracting 4 from both sides gives $3x = 15$, so $x = \\boxed{5}$.", "meta": {"subject": "Algebra", "level": 1, "unique_id": "train/algebra/1.json"}}
{"id": "train/prealgebra/2.json", "problem": "Add $\\frac{1}{2}$ and $\\frac{1}{3}$.", "answer": "\\frac{5}{6}", "solution": "With the common denominator 6 the sum is $\\frac{3}{6} + \\frac{2}{6} = \\boxed{\\frac{5}{6}}$.", "meta": {"subject": "Prealgebra", "level": 2, "unique_id": "train/prealgebra/2.json"}}""",
    "math500/test.jsonl": r"""
{"id": "test/algebra/1.json", "problem": "What is the value of $2^5 - 5^2$?", "answer": "7", "solution": "We have $2^5 = 32$ and $5^2 = 25$, so the difference is $\\boxed{7}$.", "meta": {"subject": "Algebra", "level": 1, "unique_id": "test/algebra/1.json"}}
{"id": "test/geometry/2.json", "problem": "A square has area $49$. What is its perimeter?", "answer": "28", "solution": "The side is $\\sqrt{49} = 7$, so the perimeter is $4 \\cdot 7 = \\boxed{28}$.", "meta": {"subject": "Geometry", "level": 1, "unique_id": "test/geometry/2.json"}}""",
    "minerva/test.jsonl": r"""
{"id": "minerva-0", "problem": "A car travels 150 km in 2 hours. What is its average speed in km/h?", "answer": "75", "solution": null, "meta": {"source_row": 0, "answer_raw": ["75", "75.0"], "answer_alternatives": ["75", "75.0"]}}""",
    "svamp/test.jsonl": r"""
{"id": "chal-1", "problem": "There are 76 birds on a tree. 25 of them fly away. How many birds are left on the tree?", "answer": "51", "solution": "( 76.0 - 25.0 )", "meta": {"ID": "chal-1", "Body": "There are 76 birds on a tree. 25 of them fly away.", "Question": "How many birds are left on the tree?", "Equation": "( 76.0 - 25.0 )", "Answer": 51.0, "Type": "Subtraction"}}
{"id": "chal-2", "problem": "Lena has 13 red beads and 15 blue beads. She puts them equally into 28 bags. How many beads are in each bag?", "answer": "1", "solution": "( ( 13.0 + 15.0 ) / 28.0 )", "meta": {"ID": "chal-2", "Body": "Lena has 13 red beads and 15 blue beads. She puts them equally into 28 bags.", "Question": "How many beads are in each bag?", "Equation": "( ( 13.0 + 15.0 ) / 28.0 )", "Answer": 1.0, "Type": "Common-Division"}}
{"id": "chal-3", "problem": "A farmer packs 7 eggs into each carton. He fills 6 cartons. How many eggs did he pack?", "answer": "42", "solution": "( 7.0 * 6.0 )", "meta": {"ID": "chal-3", "Body": "A farmer packs 7 eggs into each carton. He fills 6 cartons.", "Question": "How many eggs did he pack?", "Equation": "( 7.0 * 6.0 )", "Answer": 42.0, "Type": "Multiplication"}}""",
}


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory) -> Path:
    """A data directory holding FIXTURE_SETS."""
    root = tmp_path_factory.mktemp("data")
    for rel, text in FIXTURE_SETS.items():
        write_lines(root / rel, text.strip().splitlines())
    return root


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


def test_load_every_fixture_set(fixtures):
    for name, split, count in [("gsm8k", "train", 2), ("svamp", "test", 3), ("math12k", "train", 2), ("minerva", "test", 1)]:
        examples = load_examples(name, split, data_dir=fixtures)
        assert len(examples) == count
        assert all(isinstance(ex, Example) and ex.problem and ex.answer for ex in examples)
    ex = load_examples("svamp", "test", data_dir=fixtures)[0]
    assert (ex.id, ex.answer, ex.solution) == ("chal-1", "51", "( 76.0 - 25.0 )")
    assert ex.meta["Type"] == "Subtraction"


def test_limit_and_env_var(monkeypatch, fixtures):
    monkeypatch.setenv(data.DATA_ENV, str(fixtures))
    assert len(load_examples("svamp", "test", limit=2)) == 2
    assert data.resolve_data_dir() == fixtures
    assert data.resolve_data_dir(fixtures / "gsm8k") == fixtures / "gsm8k"  # the argument wins


def test_local_jsonl_path(fixtures):
    examples = load_examples(str(fixtures / "math12k" / "train.jsonl"), "ignored")
    assert [ex.answer for ex in examples] == ["5", "\\frac{5}{6}"]


def test_no_data_dir(monkeypatch):
    monkeypatch.delenv(data.DATA_ENV, raising=False)
    with pytest.raises(DataError, match="--data-dir.*NESTED_REFT_DATA"):
        load_examples("gsm8k", "train")


def test_missing_data_dir(tmp_path):
    with pytest.raises(DataError, match=f"{tmp_path / 'nope'} does not exist"):
        load_examples("gsm8k", "train", data_dir=tmp_path / "nope")


def test_unknown_dataset_lists_known_ones(fixtures):
    with pytest.raises(DataError, match="unknown data set 'gsm9k'") as info:
        load_examples("gsm9k", "train", data_dir=fixtures)
    for name in data.TRAIN_SETS + data.BENCHMARKS:
        assert name in str(info.value)


def test_missing_split_says_where(fixtures):
    with pytest.raises(DataError, match="no split 'train'.*svamp/train.jsonl missing; splits: test"):
        load_examples("svamp", "train", data_dir=fixtures)


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


def test_gsm8k_target_strips_calculator_marks(fixtures):
    ex = load_examples("gsm8k", "train", data_dir=fixtures)[0]
    target = sft_target(ex, "gsm8k")
    assert "<<" not in target and ">>" not in target
    assert "Mara sells 12/2 = 6 muffins." in target
    assert target.endswith("The answer is \\boxed{11}.")


def test_svamp_target_from_equation(fixtures):
    a, b, c = load_examples("svamp", "test", data_dir=fixtures)
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


def test_math_target_keeps_boxed_solution(fixtures):
    ex = load_examples("math12k", "train", data_dir=fixtures)[1]
    assert sft_target(ex, "math12k") == ex.solution
    unboxed = ex._replace(solution="Add the fractions.")
    assert sft_target(unboxed, "math12k").endswith("\\boxed{\\frac{5}{6}}.")
    braceless = ex._replace(solution="So the sum is $\\boxed 2$.", answer="2")  # two such math12k records
    assert sft_target(braceless, "math12k") == "So the sum is $\\boxed 2$.\nThe answer is \\boxed{2}."


def test_target_without_solution_is_an_error(fixtures):
    ex = load_examples("minerva", "test", data_dir=fixtures)[0]
    with pytest.raises(DataError, match="minerva-0.*no solution"):
        sft_target(ex, "minerva")
