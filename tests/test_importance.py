"""Layer importance: Block Influence against the model's own hidden states, the KL of a skip set against an
explicitly built smaller model, and the `layers` command end to end."""

import json

import pytest
import torch
import torch.nn.functional as F

from conftest import tiny_model
from nested_reft.cli import main
from nested_reft.importance import InfluenceMeter, block_influence, skip_kl
from nested_reft.nested import build_truncated_model


def _batch(seed=0, b=3, length=10):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, 97, (b, length), generator=g)
    att = torch.ones_like(ids)
    att[0, -3:] = 0  # right padding in one row
    mask = att.clone()
    mask[:, :4] = 0  # the "prompt" does not count
    return ids, att, mask


def _manual_bi(model, ids, att, mask):
    """BI from hooks written independently of importance.py: the input and output of every layer."""
    ins, outs = {}, {}
    layers = model.model.layers

    def record(i):
        def hook(module, args, kwargs, output):
            ins[i] = (args[0] if args else kwargs["hidden_states"]).clone()
            outs[i] = (output[0] if isinstance(output, tuple) else output).clone()
        return hook

    hs = [layer.register_forward_hook(record(i), with_kwargs=True) for i, layer in enumerate(layers)]
    with torch.no_grad():
        out = model(input_ids=ids, attention_mask=att, output_hidden_states=True)
    for h in hs:
        h.remove()
    keep = mask.bool()
    return [float((1 - F.cosine_similarity(ins[i], outs[i], dim=-1))[keep].mean()) for i in range(len(layers))], out


def test_block_influence_equals_hidden_state_computation():
    model = tiny_model("qwen2")
    ids, att, mask = _batch()
    bi = block_influence(model, ids, att, mask, batch_size=2)  # two mini-batches
    manual, out = _manual_bi(model, ids, att, mask)
    assert bi == pytest.approx(manual, abs=1e-5)
    # the model's own hidden states: entry i is layer i's input (checks the hooks see the residual stream)
    keep = mask.bool()
    for i in range(len(bi) - 1):
        ref = 1 - F.cosine_similarity(out.hidden_states[i], out.hidden_states[i + 1], dim=-1)[keep].mean()
        assert bi[i] == pytest.approx(float(ref), abs=1e-5)
    assert all(0 <= v <= 2 for v in bi)


def test_meter_counts_only_masked_tokens_and_closes_its_hooks():
    model = tiny_model("llama")
    ids, att, mask = _batch(1)
    with InfluenceMeter(model) as meter:
        meter.set_mask(mask)
        with torch.no_grad():
            model(input_ids=ids, attention_mask=att)
    assert meter.counts.tolist() == [float(mask.sum())] * 6
    assert all(not layer._forward_hooks for layer in model.model.layers)


@pytest.mark.parametrize("skip", [(2,), (1, 4)])
def test_skip_kl_equals_explicit_smaller_model(skip):
    model = tiny_model("qwen2")
    ids, att, mask = _batch(2)
    kl = skip_kl(model, ids, att, mask, [skip, ()])
    small = build_truncated_model(model, skip)
    with torch.no_grad():
        p = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits, -1)
        q = torch.log_softmax(small(input_ids=ids, attention_mask=att).logits, -1)
    pred = torch.zeros_like(mask, dtype=torch.bool)
    pred[:, :-1] = mask[:, 1:].bool()
    ref = (p.exp() * (p - q)).sum(-1)[pred].mean()
    assert kl[0] == pytest.approx(float(ref), rel=1e-4, abs=1e-6)
    assert kl[0] > 0 and kl[1] == pytest.approx(0.0, abs=1e-6)


def test_layers_command_table_json_and_chart(toy_dir, tmp_path, capsys):
    base = ["layers", "--model", str(toy_dir / "model"), "--dataset", "toy", "--data-dir", str(toy_dir / "data"),
            "--limit", "4"]
    assert main(base + ["--kl", "true", "--skip-layers", "3", "9", "--output-dir", str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out
    assert "skip candidate" in table and "no (border)" in table and "KL(full || without [3, 9])" in table
    report = json.loads((tmp_path / "out" / "layers.json").read_text())
    n = report["num_layers"]
    assert len(report["block_influence"]) == n == len(report["kl"]) and report["valid_layers"] == list(range(1, n - 1))
    assert report["skip_set_kl"] > 0 and (tmp_path / "out" / "layers.png").stat().st_size > 1000
    assert main(base + ["--json"]) == 0
    assert "kl" not in json.loads(capsys.readouterr().out)
    assert main(base + ["--json", "--kl"]) == 0  # a bare --kl means true
    assert len(json.loads(capsys.readouterr().out)["kl"]) == n


def test_layers_calibrates_on_given_completions(toy_dir, tmp_path, capsys):
    """--completions: the completions' tokens after their prompts are the calibration targets; a record with
    `problem` gets the prompt template, one with `prompt` is used as written."""
    from transformers import AutoTokenizer

    from nested_reft.data import encode_prompt, resolve_template
    from nested_reft.models import load_model_and_tokenizer
    from nested_reft.sft import build_example, collate

    records = [{"problem": "Ava has 3 apples. She finds 4 more. How many now?", "completion": "3 + 4 = 7. \\boxed{7}"},
               {"prompt": "2 + 2 =", "completion": " 4"}]
    path = tmp_path / "samples.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert main(["layers", "--model", str(toy_dir / "model"), "--completions", str(path), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    model, tok = load_model_and_tokenizer(str(toy_dir / "model"))
    prompts = [encode_prompt(tok, records[0]["problem"], resolve_template(tok, "auto")),
               tok("2 + 2 =", add_special_tokens=False)["input_ids"]]
    batch = collate([build_example(tok, p, r["completion"], 512) for p, r in zip(prompts, records)], tok.pad_token_id)
    expected = block_influence(model.eval(), batch["input_ids"], batch["attention_mask"], batch["labels"] != -100)
    assert report["examples"] == 2 and report["block_influence"] == pytest.approx(expected, rel=1e-5)
    assert report["target_tokens"] == int((batch["labels"] != -100).sum())


def test_layers_names_the_bad_line_of_a_completions_file(toy_dir, tmp_path, capsys):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"problem": "x", "completion": "y"}) + "\n" + json.dumps({"completion": 3}) + "\n")
    assert main(["layers", "--model", str(toy_dir / "model"), "--completions", str(path)]) == 2
    assert f"{path}:2: expected an object" in capsys.readouterr().err


@pytest.mark.parametrize("extra, message", [
    (["--limit", "0"], "limit=0"),
    (["--skip-layers", "3", "3"], "repeats a layer"),
    (["--skip-layers", "99"], "out of range"),
    (["--dataset", "nosuch"], "dataset='nosuch'"),
])
def test_layers_bad_input_exits_2(toy_dir, tmp_path, capsys, extra, message):
    args = ["layers", "--model", str(toy_dir / "model"), "--dataset", "toy", "--data-dir", str(toy_dir / "data"),
            "--limit", "2", "--output-dir", str(tmp_path / "out")] + extra
    assert main(args) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
