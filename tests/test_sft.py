"""sft.py: label masking, batching, a short run on a tiny toy, and validation before any write."""

import json
from types import SimpleNamespace

import pytest
import torch
from accelerate import Accelerator
from transformers import AutoModelForCausalLM, AutoTokenizer

from nested_reft import cli, synthetic
from nested_reft.data import DataError, encode_prompt, load_examples, sft_target
from nested_reft.objectives import token_logprobs
from nested_reft.sft import SFTConfig, build_example, collate, epoch_batches, run_sft, train_update


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    out = tmp_path_factory.mktemp("toy")
    synthetic.build_toy(out, seed=0, num_train=8, num_test=2)
    return out


def config(toy, out, **kw) -> SFTConfig:
    base = dict(model=str(toy / "model"), dataset="toy", data_dir=str(toy / "data"), output_dir=str(out))
    base.update(epochs=1, batch_size=4, lr=3e-3, warmup_ratio=0.0, max_length=128)
    base.update(kw)
    return SFTConfig(**base)


def batch_loss(model_dir, toy) -> float:
    """Mean loss of a model over all 8 training examples, as one batch."""
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    items = []
    for ex in load_examples("toy", "train", toy / "data"):
        items.append(build_example(tok, encode_prompt(tok, ex.problem), sft_target(ex, "toy"), 128))
    with torch.no_grad():
        return model(**collate(items, tok.pad_token_id)).loss.item()


def test_prompt_tokens_are_masked(toy):
    tok = AutoTokenizer.from_pretrained(toy / "model")
    prompt = encode_prompt(tok, "Ava has 3 apples. She finds 2 more. How many apples does Ava have now?")
    ids, labels = build_example(tok, prompt, "3 + 2 = 5. The answer is \\boxed{5}.", max_length=128)
    target = tok("3 + 2 = 5. The answer is \\boxed{5}.", add_special_tokens=False)["input_ids"]
    assert ids == prompt + target + [tok.eos_token_id]
    assert labels == [-100] * len(prompt) + target + [tok.eos_token_id]
    cut_ids, cut_labels = build_example(tok, prompt, "3 + 2 = 5.", max_length=len(prompt) + 2)
    assert cut_ids == prompt + target[:2] and cut_labels[-2:] == target[:2]


def test_collate_pads_and_masks():
    batch = collate([([5, 6, 7], [-100, 6, 7]), ([8], [8])], pad_id=0)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 0, 0]]
    assert batch["labels"].tolist() == [[-100, 6, 7], [8, -100, -100]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]


def test_epoch_batches_are_seeded_and_sharded():
    assert epoch_batches(10, 4, epoch=0, seed=1) == epoch_batches(10, 4, epoch=0, seed=1)
    assert epoch_batches(10, 4, epoch=0, seed=1) != epoch_batches(10, 4, epoch=1, seed=1)
    assert sorted(i for b in epoch_batches(10, 4, 0, 1) for i in b) == list(range(10))
    shards = [sum(epoch_batches(11, 2, 0, 1, rank=r, world=3), []) for r in range(3)]
    assert [len(s) for s in shards] == [3, 3, 3] and len(set(sum(shards, []))) == 9


def test_short_run_trains_and_writes_checkpoint(toy, tmp_path):
    out = tmp_path / "sft"
    before = batch_loss(toy / "model", toy)
    summary = run_sft(config(toy, out))
    assert summary["updates"] == 2 and summary["skipped_updates"] == 0 and summary["num_examples"] == 8
    assert summary["tokens"] > 0 and summary["truncated_targets"] == 0
    assert (out / "model.safetensors").is_file() and (out / "tokenizer.json").is_file()
    assert json.loads((out / "sft_summary.json").read_text())["updates"] == 2
    assert batch_loss(out, toy) < before
    old = AutoModelForCausalLM.from_pretrained(toy / "model").state_dict()
    new = AutoModelForCausalLM.from_pretrained(out).state_dict()
    assert old.keys() == new.keys() and any(not torch.equal(old[k], new[k]) for k in old)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]  # no temporary sibling left behind
    run_sft(config(toy, out, lr=1e-4))  # a rerun replaces the checkpoint
    assert sorted(p.name for p in tmp_path.iterdir()) == ["sft"]


def test_gradient_checkpointing_trains_to_the_same_weights(toy, tmp_path):
    """Recomputing activations in the backward pass saves memory and leaves the update unchanged."""
    run_sft(config(toy, tmp_path / "a"))
    run_sft(config(toy, tmp_path / "b", gradient_checkpointing=True))
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "a").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "b").state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_missing_dataset_fails_before_writing(toy, tmp_path):
    out = tmp_path / "sft"
    with pytest.raises(DataError, match="unknown data set 'nope'"):
        run_sft(config(toy, out, dataset="nope"))
    assert not out.exists() and list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "field, value, match",
    [("epochs", 0, "epochs"), ("lr", -1.0, "lr"), ("template", "fancy", "template"), ("model", "", "model")],
)
def test_bad_config_fails_before_writing(toy, tmp_path, field, value, match):
    with pytest.raises(ValueError, match=match):
        run_sft(config(toy, tmp_path / "sft", **{field: value}))
    assert list(tmp_path.iterdir()) == []


def test_missing_model_is_a_clear_error(toy, tmp_path):
    with pytest.raises(ValueError, match="does not load"):
        run_sft(config(toy, tmp_path / "sft", model=str(tmp_path / "no-model")))


def test_non_finite_loss_skips_the_update(toy):
    model = AutoModelForCausalLM.from_pretrained(toy / "model")
    tok = AutoTokenizer.from_pretrained(toy / "model")
    with torch.no_grad():
        model.model.layers[3].mlp.down_proj.weight[0, 0] = float("nan")  # the loss and its gradient are NaN
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    before = [p.detach().clone() for p in model.parameters()]
    prompt = encode_prompt(tok, "Ava has 3 apples. How many apples does Ava have now?")
    micro = [collate([build_example(tok, prompt, "3", 128)], tok.pad_token_id)]
    loss, tokens, applied = train_update(model, Accelerator(cpu=True), optimizer, micro, 1.0)
    assert not applied and tokens == int(micro[0]["attention_mask"].sum())
    assert all(torch.equal(a, b) or (a.isnan() == b.isnan()).all() for a, b in zip(before, model.parameters()))
    assert all(p.grad is None for p in model.parameters())


def test_cli_toy_and_sft(tmp_path, capsys):
    assert cli.main(["toy", "--output-dir", str(tmp_path / "toy"), "--num-train", "8", "--num-test", "2", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["num_train"] == 8 and (tmp_path / "toy" / "model" / "config.json").is_file()
    args = ["sft", "--model", built["model"], "--dataset", "toy", "--data-dir", built["data_dir"]]
    args += ["--output-dir", str(tmp_path / "sft"), "--epochs", "1", "--batch-size", "8", "--lr", "1e-3", "--json"]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["updates"] == 1
    assert (tmp_path / "sft" / "model.safetensors").is_file()


def test_cli_sft_bad_input_exits_2(tmp_path, capsys):
    args = ["sft", "--model", str(tmp_path), "--dataset", "nope", "--data-dir", str(tmp_path)]
    assert cli.main(args + ["--output-dir", str(tmp_path / "out")]) == 2
    assert "error:" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_cli_sft_config_yaml_and_flags_compose(tmp_path, capsys):
    assert cli.main(["toy", "--output-dir", str(tmp_path / "toy"), "--num-train", "8", "--num-test", "2", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    yaml_file = tmp_path / "sft.yaml"
    yaml_file.write_text(f"model: {built['model']}\ndataset: toy\ndata_dir: {built['data_dir']}\n"
                         f"epochs: 3\nbatch_size: 4\nlr: 1.0e-3\nprogress: false\n")
    out = tmp_path / "sft"
    assert cli.main(["sft", "--config", str(yaml_file), "--epochs", "1", "--output-dir", str(out), "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["config"]["epochs"] == 1 and summary["config"]["batch_size"] == 4  # flag wins, YAML kept
    assert summary["updates"] == 2


@pytest.mark.parametrize("yaml_text, message", [
    ("epochs: 2\nbatch_sise: 4\n", "unknown field 'batch_sise'"),
    ("epochs: two\n", "epochs"),
])
def test_cli_sft_bad_config_yaml_exits_2(tmp_path, capsys, yaml_text, message):
    (tmp_path / "bad.yaml").write_text(yaml_text)
    assert cli.main(["sft", "--config", str(tmp_path / "bad.yaml"), "--output-dir", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert message in err and "error:" in err
    assert not (tmp_path / "out").exists()


def test_layer_drop_skips_a_fresh_set_on_odd_updates(toy, tmp_path, monkeypatch):
    """layer_drop > 0: updates 1, 3, ... run a nested model (the trainer's sampler, border 1), drawn from
    (seed, update), so the skipped layers get no gradient in that update; even updates run the full model."""
    from nested_reft import sft as sft_module
    from nested_reft.sft import SFTConfig, update_skip_set

    model = AutoModelForCausalLM.from_pretrained(toy / "model")
    cfg = SFTConfig(layer_drop=0.15, seed=3)
    assert update_skip_set(model, cfg, 0) == () and update_skip_set(model, SFTConfig(), 1) == ()
    skip = update_skip_set(model, cfg, 1)
    assert len(skip) == 4 and all(1 <= i <= 26 for i in skip) and skip == update_skip_set(model, cfg, 1)
    assert skip != update_skip_set(model, cfg, 3)
    seen = []
    real = sft_module.train_update
    monkeypatch.setattr(sft_module, "train_update", lambda *a: (seen.append(a[-1]), real(*a))[1])
    summary = run_sft(config(toy, tmp_path / "sft", layer_drop=0.15))
    assert summary["updates"] == 2 and seen[0] == () and len(seen[1]) == 4


def test_layer_drop_out_of_range_is_refused(toy, tmp_path):
    with pytest.raises(ValueError, match="layer_drop"):
        run_sft(config(toy, tmp_path / "sft", layer_drop=1.0))


def test_fsdp_launch_is_refused_before_any_work(toy, tmp_path, monkeypatch):
    """sft does not shard the model: an FSDP launch is an error, not a silent DDP run."""
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(ValueError, match="FSDP is not supported"):
        run_sft(config(toy, tmp_path / "sft"))
    assert not (tmp_path / "sft").exists()


@pytest.mark.parametrize("field", ["lr", "weight_decay", "max_grad_norm", "warmup_ratio", "layer_drop"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_floats_are_refused(toy, tmp_path, field, value):
    from nested_reft.sft import check_config

    with pytest.raises(ValueError, match=field):
        check_config(config(toy, tmp_path / "out", **{field: value}))


def test_gradient_accumulation_weighs_every_target_token_alike(toy):
    """Two examples with very different target lengths: 2 micro-batches of 1 must give the gradient of
    one batch of 2 (the loss normalised by the step's total target tokens, as transformers' Trainer)."""
    model = AutoModelForCausalLM.from_pretrained(toy / "model")
    tok = AutoTokenizer.from_pretrained(toy / "model")
    prompt = encode_prompt(tok, "Ava has 3 apples. How many apples does Ava have now?")
    short = build_example(tok, prompt, "5", 192)
    long = build_example(tok, prompt, "First 3 + 2 = 5. Then 5 + 4 = 9. Finally 9 - 1 = 8. The answer is \\boxed{8}.", 192)
    acc = Accelerator(cpu=True)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)

    def grads(micro):
        model.zero_grad()
        opt.zero_grad = lambda *a, **k: None  # keep the gradient for inspection
        train_update(model, acc, opt, micro, max_grad_norm=1e9)
        return torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None])

    apart = grads([collate([short], tok.pad_token_id), collate([long], tok.pad_token_id)])
    together = grads([collate([short, long], tok.pad_token_id)])
    torch.testing.assert_close(apart, together, rtol=1e-4, atol=1e-6)  # before the fix: 0.37 relative


@pytest.mark.parametrize("scored", [True, False])
def test_target_nll_equals_full_logit_cross_entropy(toy, monkeypatch, scored):
    """The chunked, head-fused NLL (and the full-logits fallback for models that cannot use it) gives the
    loss and gradients of the old full-logits computation (summed cross-entropy, prompt and padding masked)."""
    from nested_reft import sft as sft_module
    from nested_reft.sft import target_nll

    model = AutoModelForCausalLM.from_pretrained(toy / "model")
    tok = AutoTokenizer.from_pretrained(toy / "model")
    prompt = encode_prompt(tok, "Ava has 3 apples. How many apples does Ava have now?")
    batch = collate([build_example(tok, prompt, "5", 128), build_example(tok, prompt, "3 + 2 = 5. So 5.", 128)],
                    tok.pad_token_id)
    if not scored:
        monkeypatch.setattr(sft_module, "supports_scored_head", lambda model: False)
    assert sft_module.supports_scored_head(model) is scored

    def loss_and_grads(fn):
        model.zero_grad()
        loss = fn()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in model.parameters()]

    def old():  # the computation before chunked scoring: full logits [B, L-1, V], then token_logprobs
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
        labels = batch["labels"][:, 1:]
        return -(token_logprobs(logits, labels.clamp(min=0)) * (labels != -100)).sum()

    want, want_grads = loss_and_grads(old)
    got, got_grads = loss_and_grads(lambda: target_nll(model, batch))
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(want, torch.nn.functional.cross_entropy(  # and that is summed cross-entropy
        model(**{k: batch[k] for k in ("input_ids", "attention_mask")}).logits[:, :-1].transpose(1, 2),
        batch["labels"][:, 1:], ignore_index=-100, reduction="sum").detach())
    for g, w in zip(got_grads, want_grads):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-6)


# ---- LoRA -----------------------------------------------------------------------------------------


def test_lora_sft_writes_the_adapter_and_a_merged_model_and_train_takes_either(toy, tmp_path):
    """With --lora-r only the adapters train (layer drop included: the nested view works through the wrapper);
    output_dir holds the adapter, merged/ the plain model, and both load as the same model for `train`."""
    pytest.importorskip("peft")
    from nested_reft import trainer
    from nested_reft.config import TrainConfig
    from nested_reft.models import load_model_and_tokenizer

    out = tmp_path / "sft"
    before = batch_loss(toy / "model", toy)
    summary = run_sft(config(toy, out, lora_r=4, merge_lora=True, layer_drop=0.15, lr=1e-2))
    names = {p.name for p in out.iterdir()}
    assert {"adapter_model.safetensors", "adapter_config.json", "tokenizer.json", "sft_summary.json", "merged"} <= names
    assert "model.safetensors" not in names and summary["trainable_parameters"] == 157_696
    assert json.loads((out / "adapter_config.json").read_text())["r"] == 4
    assert batch_loss(out / "merged", toy) < before
    old = AutoModelForCausalLM.from_pretrained(toy / "model").state_dict()
    new = AutoModelForCausalLM.from_pretrained(out / "merged").state_dict()
    targeted = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    assert old.keys() == new.keys()
    assert all(torch.equal(old[k], new[k]) for k in old if not (k.endswith(".weight") and k.split(".")[-2] in targeted))
    assert any(not torch.equal(old[k], new[k]) for k in old if "q_proj.weight" in k)
    from_adapter, _ = load_model_and_tokenizer(str(out))
    assert all(torch.allclose(from_adapter.state_dict()[k], v, rtol=0, atol=1e-6) for k, v in new.items())
    base = dict(dataset="toy", data_dir=str(toy / "data"), steps=1, batch_size=2, micro_batch_size=2,
                rollout_batch_size=2, num_generations=2, max_new_tokens=4, progress=False)
    for model, lora_r in ((out, 0), (out / "merged", 4)):
        s = trainer.train(TrainConfig(model=str(model), output_dir=str(tmp_path / f"rl-{lora_r}"), lora_r=lora_r, **base))
        assert s["steps"] == 1 and s["lora_r"] == lora_r
    rl_adapter = json.loads((tmp_path / "rl-4" / "final" / "adapter_config.json").read_text())
    assert rl_adapter["base_model_name_or_path"] == str((out / "merged").absolute())


def test_lora_sft_with_an_unknown_target_module_writes_nothing(toy, tmp_path):
    pytest.importorskip("peft")
    with pytest.raises(ValueError, match="'qproj' is not a module of the model"):
        run_sft(config(toy, tmp_path / "sft", lora_r=4, lora_target_modules=["qproj"]))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("kw, match", [
    (dict(lora_r=-1), "lora_r=-1 must be >= 0"),
    (dict(lora_alpha=8.0), "lora_alpha=8.0 is used only with LoRA"),
    (dict(merge_lora=True), "merge_lora=True needs LoRA"),
    (dict(lora_r=4, lora_dropout=-0.1), "lora_dropout=-0.1 must be >= 0.0 and < 1.0"),
])
def test_bad_lora_config_fails_before_writing(toy, tmp_path, kw, match):
    with pytest.raises(ValueError, match=match):
        run_sft(config(toy, tmp_path / "sft", **kw))
    assert list(tmp_path.iterdir()) == []


def test_group_by_length_keeps_the_epoch_and_cuts_the_padding():
    lengths = [int(x) for x in torch.randint(10, 200, (400,), generator=torch.Generator().manual_seed(0))]
    plain, grouped = epoch_batches(400, 8, 0, 1), epoch_batches(400, 8, 0, 1, lengths=lengths)
    assert sorted(i for b in grouped for i in b) == list(range(400)) and len(grouped) == len(plain)

    def padded(batches):
        return sum(len(b) * max(lengths[i] for i in b) for b in batches)

    assert padded(grouped) < 0.8 * padded(plain)
    assert grouped == epoch_batches(400, 8, 0, 1, lengths=lengths) != epoch_batches(400, 8, 1, 1, lengths=lengths)
    longest = [max(lengths[i] for i in b) for b in grouped]
    assert longest != sorted(longest, reverse=True)  # the batches are shuffled, not served longest first


def _compiler_present() -> bool:
    from nested_reft.compiled import check_compiler

    return check_compiler("cpu") is None


@pytest.mark.slow
@pytest.mark.skipif(not _compiler_present(), reason="torch.compile on CPU needs a C++ compiler")
@pytest.mark.parametrize("layer_drop", [0.0, 0.15])
def test_compiled_sft_trains_like_eager_and_saves_plain_keys(toy, tmp_path, layer_drop):
    eager = run_sft(config(toy, tmp_path / "eager", layer_drop=layer_drop, epochs=2))
    compiled = run_sft(config(toy, tmp_path / "compiled", layer_drop=layer_drop, epochs=2, compile=True))
    assert compiled["updates"] == eager["updates"] == 4
    assert compiled["loss_curve"] == pytest.approx(eager["loss_curve"], rel=1e-4)
    from safetensors import safe_open

    keys = [set(safe_open(str(tmp_path / v / "model.safetensors"), "pt").keys()) for v in ("eager", "compiled")]
    assert keys[0] == keys[1] and not any("_orig_mod" in k for k in keys[1])  # the model's own names
    # float rounding differs (fused kernels) and AdamW's first steps magnify it in tiny gradients: compare
    # what the weights do
    assert batch_loss(tmp_path / "compiled", toy) == pytest.approx(batch_loss(tmp_path / "eager", toy), rel=1e-3)


@pytest.mark.skipif(torch.cuda.is_available(), reason="on CUDA, sft compiles with Triton and needs no C++ compiler")
def test_compile_without_a_cpp_compiler_is_refused_before_writing(toy, tmp_path):
    import torch._inductor.config as inductor

    with inductor.patch({"cpp.cxx": ("no-such-cxx",)}), pytest.raises(ValueError, match="needs a C\\+\\+ compiler"):
        run_sft(config(toy, tmp_path / "sft", compile=True))
    assert not (tmp_path / "sft").exists()
