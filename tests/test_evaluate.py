"""evaluate.py: the pass@k estimator, scoring and order under length sorting, outputs, context cap, CLI errors."""

import json
from types import SimpleNamespace

import pytest
import torch

from nested_reft import cli, evaluate as ev
from nested_reft.data import load_examples
from nested_reft.evaluate import EvalConfig, pass_at_k, standard_error
from nested_reft.synthetic import build_model, build_tokenizer

# Problems of deliberately unsorted lengths; answers all distinct. Minerva's reference is not what the
# fake model answers: only its alternative ("7") makes the answer count.
BENCH = {
    "math500": [("What is 20 + 22 when you add them together carefully?", "42", {}),
                ("What is 1 + 1?", "2", {}),
                ("Compute 3 + 4, then add 5 to the result and report the final number.", "12", {}),
                ("What is 9 - 3?", "6", {}),
                ("What is 10 + 10 + 10?", "30", {})],
    "minerva": [("How many meters is it to the wall, to the nearest meter?", "x+1", {"answer_alternatives": ["7"]}),
                ("What is 2 * 4?", "8", {})],
}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    for name, rows in BENCH.items():
        (root / name).mkdir()
        with open(root / name / "test.jsonl", "w") as f:
            for i, (problem, answer, meta) in enumerate(rows):
                f.write(json.dumps({"id": f"{name}-{i}", "problem": problem, "answer": answer,
                                    "solution": None, "meta": meta}) + "\n")
    return root


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """A 2-layer random Qwen2 with a BPE tokenizer and chat template, saved for the CLI too."""
    texts = [p for rows in BENCH.values() for p, _, _ in rows] + ["The answer is \\boxed{42}."] * 5
    tokenizer = build_tokenizer(texts, vocab_size=300)
    model = build_model(tokenizer, seed=0, hidden_size=32, num_layers=2).eval()
    path = tmp_path_factory.mktemp("model")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


def benchmarks(data_dir):
    return {name: load_examples(name, "test", data_dir) for name in BENCH}


def fake_generate(tokenizer, num_correct, calls):
    """Stands in for rollout.generate: sample s of a prompt answers correctly iff s < num_correct."""
    answers = {p: (meta.get("answer_alternatives") or [a])[0] for rows in BENCH.values() for p, a, meta in rows}

    def generate(model, prompts, num_generations, cfg, eos_token_id, pad_token_id, skip=(), generator=None,
                 cuda_graphs=False):
        calls.append(([len(p) for p in prompts], cfg))
        rows = []
        for prompt in prompts:
            answer = next(a for p, a in answers.items() if p in tokenizer.decode(prompt))
            for s in range(num_generations):
                text = f"The answer is \\boxed{{{answer if s < num_correct else 'wrong'}}}."
                rows.append(tokenizer(text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id])
        width = max(map(len, rows))
        ids = torch.tensor([r + [pad_token_id] * (width - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])
        return SimpleNamespace(completion_ids=ids, completion_mask=mask)

    return generate


def run(monkeypatch, tiny, data_dir, num_correct, **kw):
    kw.setdefault("max_new_tokens", 16)
    model, tokenizer, _ = tiny
    calls = []
    monkeypatch.setattr(ev, "generate", fake_generate(tokenizer, num_correct, calls))
    cfg = EvalConfig(benchmarks=list(BENCH), progress=False, **kw)
    return ev.evaluate(model, tokenizer, benchmarks(data_dir), cfg), calls


def read_samples(out):
    return [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]


def test_pass_at_k_hand_values():
    assert pass_at_k(5, 2, 1) == pytest.approx(0.4)
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)  # 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(3, 0, 1) == 0.0 and pass_at_k(3, 3, 2) == 1.0 and pass_at_k(4, 2, 3) == 1.0
    for n, c, k in [(2, 1, 3), (2, 1, 0), (2, 3, 1)]:
        with pytest.raises(ValueError):
            pass_at_k(n, c, k)


def test_standard_error_is_the_sd_over_problems_over_root_count():
    import statistics

    scores = [1.0, 0.5, 0.25, 0.0, 1.0]
    assert standard_error(scores) == pytest.approx(statistics.stdev(scores) / len(scores) ** 0.5)
    assert standard_error([0.7]) == 0.0 and standard_error([0.5, 0.5, 0.5]) == 0.0


def test_forced_correct_scores_one_in_data_order(monkeypatch, tiny, data_dir, tmp_path):
    summary, calls = run(monkeypatch, tiny, data_dir, num_correct=2, k=1, num_samples=2, batch_size=2,
                         output_dir=str(tmp_path))
    assert summary["benchmarks"]["math500"]["accuracy"] == 1.0 and summary["mean"] == 1.0
    assert summary["benchmarks"]["minerva"]["accuracy"] == 1.0  # via the alternative
    assert summary["benchmarks"]["math500"]["stderr"] == 0.0  # every problem scored the same
    math_calls = [n for lens, _ in calls[:3] for n in lens]  # math500: 5 prompts in batches of 2
    assert math_calls == sorted(math_calls) and len(calls) == 4
    records = read_samples(tmp_path)
    exs = benchmarks(data_dir)
    expected = [(b, ex.id, i, s) for b in BENCH for i, ex in enumerate(exs[b]) for s in range(2)]
    assert [(r["benchmark"], r["id"], r["problem_index"], r["sample_index"]) for r in records] == expected
    assert all(r["reference"] == exs[r["benchmark"]][r["problem_index"]].answer for r in records)


def test_forced_wrong_scores_zero(monkeypatch, tiny, data_dir):
    summary, _ = run(monkeypatch, tiny, data_dir, num_correct=0, k=1)
    assert summary["mean"] == 0.0


@pytest.mark.parametrize("k, expected", [(1, 1 / 3), (2, 2 / 3), (3, 1.0)])
def test_unbiased_estimator_from_samples(monkeypatch, tiny, data_dir, tmp_path, k, expected):
    summary, _ = run(monkeypatch, tiny, data_dir, num_correct=1, k=k, num_samples=3, output_dir=str(tmp_path))
    assert summary["benchmarks"]["math500"]["accuracy"] == pytest.approx(expected)
    assert summary["mean"] == pytest.approx(expected)
    if k == 1:  # pass@1 is the mean reward
        rewards = [r["reward"] for r in read_samples(tmp_path)]
        assert summary["mean"] == pytest.approx(sum(rewards) / len(rewards))


def test_real_generation_writes_outputs(tiny, data_dir, tmp_path):
    model, tokenizer, _ = tiny
    cfg = EvalConfig(benchmarks=list(BENCH), k=1, num_samples=2, max_new_tokens=4, batch_size=3,
                     output_dir=str(tmp_path), progress=False)
    summary = ev.evaluate(model, tokenizer, benchmarks(data_dir), cfg)
    records = read_samples(tmp_path)
    assert len(records) == 2 * sum(map(len, BENCH.values()))
    fields = {"benchmark", "id", "problem_index", "sample_index", "completion", "extracted", "reference", "reward"}
    assert all(fields <= set(r) and 1 <= r["num_tokens"] <= 4 for r in records)
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    for name in BENCH:
        rewards = [r["reward"] for r in records if r["benchmark"] == name]
        assert on_disk["benchmarks"][name]["accuracy"] == pytest.approx(sum(rewards) / len(rewards))
        assert on_disk["benchmarks"][name]["num_problems"] == len(BENCH[name])
    assert on_disk["mean"] == pytest.approx(summary["mean"])
    assert not list(tmp_path.glob(".*tmp*"))
    table = ev.format_table(summary)
    assert "| math500 | 5 |" in table and "**mean**" in table


def test_budget_capped_to_context(monkeypatch, tiny, data_dir):
    model = tiny[0]
    monkeypatch.setattr(model.config, "max_position_embeddings", 10_000)
    _, calls = run(monkeypatch, tiny, data_dir, num_correct=1, max_new_tokens=50)  # no cap: logs prompt lengths
    all_longest = max(n for lens, _ in calls for n in lens)
    monkeypatch.setattr(model.config, "max_position_embeddings", all_longest + 5)
    with pytest.warns(UserWarning) as caught:
        _, calls = run(monkeypatch, tiny, data_dir, num_correct=1, max_new_tokens=50)
    assert any("capped from 50 to 5 " in str(w.message) for w in caught)
    assert min(cfg.max_new_tokens for _, cfg in calls) == 5
    monkeypatch.setattr(model.config, "max_position_embeddings", all_longest)
    with pytest.raises(ValueError, match="does not fit"):
        run(monkeypatch, tiny, data_dir, num_correct=1)


def test_cli_eval_json(tiny, data_dir, tmp_path, capsys):
    argv = ["eval", "--model", str(tiny[2]), "--benchmarks", "math500", "--data-dir", str(data_dir), "--limit", "2",
            "--max-new-tokens", "3", "--output-dir", str(tmp_path / "out"), "--json"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["benchmarks"]["math500"]["num_problems"] == 2 and summary["config"]["temperature"] == 0.6
    assert (tmp_path / "out" / "summary.json").is_file()


@pytest.mark.parametrize("extra, message", [
    (["--benchmarks", "nope"], "unknown data set 'nope'"),
    (["--data-dir", "/no/such/dir"], "/no/such/dir does not exist"),
    (["--k", "0"], "`k` must be >= 1"),
    (["--k", "3", "--num-samples", "2"], "`num_samples` must be >= k=3"),
    (["--batch-size", "0"], "`batch_size`"),
    (["--cuda-graphs", "true", "--device", "cpu"], "cuda_graphs=true needs a CUDA device"),
])
def test_cli_errors_exit_2(tiny, data_dir, capsys, extra, message):
    argv = ["eval", "--model", str(tiny[2]), "--benchmarks", "math500", "--data-dir", str(data_dir)] + extra
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err
    if "nope" in extra:
        assert "aime24" in err  # lists the known benchmarks


def test_cli_model_that_does_not_load(data_dir, tmp_path, capsys):
    argv = ["eval", "--model", str(tmp_path / "missing-model"), "--benchmarks", "math500", "--data-dir", str(data_dir)]
    assert cli.main(argv) == 2
    assert "missing-model" in capsys.readouterr().err


def test_cli_eval_config_yaml(tiny, data_dir, tmp_path, capsys):
    yaml_file = tmp_path / "eval.yaml"
    yaml_file.write_text(f"model: {tiny[2]}\nbenchmarks: [math500]\ndata_dir: {data_dir}\nlimit: 1\n"
                         "max_new_tokens: 3\ntemperature: 0.0\nprogress: false\n")
    assert cli.main(["eval", "--config", str(yaml_file), "--limit", "2", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["benchmarks"]["math500"]["num_problems"] == 2  # the flag wins over the YAML
    assert summary["config"]["temperature"] == 0.0


def test_cli_eval_without_model_exits_2(data_dir, capsys):
    assert cli.main(["eval", "--benchmarks", "math500", "--data-dir", str(data_dir)]) == 2
    assert "`model` is required" in capsys.readouterr().err


def test_skip_layers_evaluates_the_nested_model(tiny, data_dir, tmp_path):
    """Evaluating with skip_layers gives exactly the completions of the smaller model built from the kept layers."""
    from nested_reft.nested import build_truncated_model

    model, tokenizer, _ = tiny
    skip = [0]  # of 2 layers
    base = dict(benchmarks=["math500"], max_new_tokens=6, batch_size=2, temperature=0.0, progress=False)
    ev.evaluate(model, tokenizer, benchmarks(data_dir), EvalConfig(skip_layers=skip, output_dir=str(tmp_path / "a"), **base))
    small = build_truncated_model(model, skip)
    ev.evaluate(small, tokenizer, benchmarks(data_dir), EvalConfig(output_dir=str(tmp_path / "b"), **base))
    full = ev.evaluate(model, tokenizer, benchmarks(data_dir), EvalConfig(output_dir=str(tmp_path / "c"), **base))
    nested = [r["completion"] for r in read_samples(tmp_path / "a")]
    assert nested == [r["completion"] for r in read_samples(tmp_path / "b")]
    assert nested != [r["completion"] for r in read_samples(tmp_path / "c")] and full["mean"] is not None
    with pytest.raises(ValueError, match="skip index 99"):
        ev.evaluate(model, tokenizer, benchmarks(data_dir), EvalConfig(skip_layers=[99], **base))


@pytest.mark.parametrize("field", ["temperature", "top_p"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_sampling_values_are_refused(field, value):
    from nested_reft.evaluate import EvalConfig, check_config

    with pytest.raises(ValueError, match=field):
        check_config(EvalConfig(model="m", **{field: value}))
