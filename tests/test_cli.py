"""cli.py: every row of the bad-input table in docs/errors.md, run as written there."""

import re
import shlex
import shutil
from pathlib import Path

import pytest

from nested_reft import cli

ERRORS_MD = Path(__file__).resolve().parent.parent / "docs" / "errors.md"


def table_rows() -> list[tuple[str, str, int, str]]:
    """(command, bad input, exit code, message excerpt) of the first table in docs/errors.md."""
    rows = []
    for line in ERRORS_MD.read_text().splitlines():
        m = re.match(r"^\| (train|sft|eval|grade|layers) \| `(.+?)` \| (\d) \| `+(.+?)`+ \|$", line)
        if m:
            rows.append((m.group(1), m.group(2), int(m.group(3)), m.group(4)))
    return rows


def test_the_table_is_long_and_covers_every_command():
    rows = table_rows()
    assert len(rows) >= 25 and {r[0] for r in rows} == {"train", "sft", "eval", "grade", "layers"}


@pytest.fixture(scope="module")
def places(toy_dir, tmp_path_factory):
    """The files the table's placeholders stand for."""
    import json

    from conftest import tiny_hybrid
    from transformers import AutoTokenizer

    from nested_reft import trainer
    from nested_reft.config import TrainConfig

    root = tmp_path_factory.mktemp("errors")
    (root / "A_FILE").write_text("not a directory\n")
    shutil.copytree(toy_dir / "model", root / "NO_TOKENIZER")
    for f in (root / "NO_TOKENIZER").iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            f.unlink()
    shutil.copytree(toy_dir / "model", root / "TRUNCATED")
    weights = root / "TRUNCATED" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    good = json.dumps({"id": "1", "problem": "What is 1 + 1?", "answer": "2", "solution": "2", "meta": {},
                       "completion": "2"})
    (root / "BAD.jsonl").write_text(good + "\n{oops\n")
    (root / "NO_ANSWER.jsonl").write_text(json.dumps({"completion": "2"}) + "\n")
    (root / "TYPO.yaml").write_text("mitigaton: base\n")
    vocab = len(AutoTokenizer.from_pretrained(toy_dir / "model"))
    tiny_hybrid("jamba", num_hidden_layers=8, vocab_size=vocab).save_pretrained(root / "JAMBA")
    for f in (toy_dir / "model").iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, root / "JAMBA" / f.name)
    trainer.train(TrainConfig(model=str(toy_dir / "model"), dataset="toy", data_dir=str(toy_dir / "data"),
                              output_dir=str(root / "RUN_X010"), steps=1, batch_size=2, micro_batch_size=2,
                              rollout_batch_size=2, num_generations=2, max_new_tokens=4, skip_ratio=0.1,
                              progress=False))
    return root


def valid_rest(command: str, toy_dir: Path, out: Path) -> list[str]:
    """A valid rest of the command line, written before the bad input (later flags win)."""
    model, data = str(toy_dir / "model"), str(toy_dir / "data")
    if command == "train":
        return ["--model", model, "--dataset", "toy", "--data-dir", data, "--output-dir", str(out), "--steps", "1",
                "--batch-size", "2", "--micro-batch-size", "2", "--num-generations", "2", "--max-new-tokens", "4",
                "--progress", "false"]
    if command == "sft":
        return ["--model", model, "--dataset", "toy", "--data-dir", data, "--output-dir", str(out), "--epochs", "1",
                "--limit", "4", "--progress", "false"]
    if command == "eval":
        return ["--model", model, "--benchmarks", "toy", "--data-dir", data, "--limit", "1", "--max-new-tokens", "4",
                "--progress", "false", "--output-dir", str(out)]
    if command == "layers":
        return ["--model", model, "--dataset", "toy", "--data-dir", data, "--limit", "2", "--output-dir", str(out)]
    return []


@pytest.mark.parametrize("command, bad, code, excerpt", table_rows(), ids=lambda v: str(v)[:40])
def test_bad_input_gets_its_documented_message(command, bad, code, excerpt, toy_dir, places, tmp_path, capsys,
                                               monkeypatch):
    monkeypatch.chdir(places)  # the placeholders are files there
    out = tmp_path / "out"
    before = (places / "RUN_X010" / "config.yaml").read_text()
    argv = [command] + valid_rest(command, toy_dir, out) + shlex.split(bad)
    assert cli.main(argv) == code
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith("error: ")]
    assert len(lines) == 1 and excerpt in err, err[-2000:]
    assert not out.exists()  # nothing written
    assert (places / "RUN_X010" / "config.yaml").read_text() == before
