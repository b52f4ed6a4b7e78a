import pytest
import torch
from safetensors.torch import load_file

from conftest import tiny_model
from nested_reft import trainer
from nested_reft.compiled import check_compiler, compile_layers, using_layers
from nested_reft.config import ConfigError
from nested_reft.nested import find_layers
from test_trainer import alternating_rewards, params, read_metrics, small_cfg  # noqa: F401 (fixture)

# inductor compiles C++ on the CPU: without a compiler torch.compile cannot run at all
needs_compiler = pytest.mark.skipif(check_compiler("cpu") is not None,
                                    reason="torch.compile on CPU needs a C++ compiler (torch finds none)")


def test_using_layers_swaps_the_decoder_list_and_restores_it_also_on_error():
    model = tiny_model()
    own = find_layers(model).layers
    other = torch.nn.ModuleList([torch.nn.Identity() for _ in own])
    with using_layers(model, other):
        assert find_layers(model).layers is other
    assert find_layers(model).layers is own
    with pytest.raises(RuntimeError, match="boom"), using_layers(model, other):
        raise RuntimeError("boom")
    assert find_layers(model).layers is own
    with using_layers(model, None):
        assert find_layers(model).layers is own
    with pytest.raises(ValueError, match="2 compiled layers for a decoder of 6"), using_layers(model, other[:2]):
        pass


def test_compiled_layers_share_the_parameters_and_stay_out_of_the_state_dict():
    model = tiny_model()
    keys = set(model.state_dict())
    compiled = compile_layers(model)
    assert set(model.state_dict()) == keys
    assert [p.data_ptr() for p in compiled.parameters()] == [p.data_ptr() for p in find_layers(model).layers.parameters()]


def test_compile_without_a_cpp_compiler_is_refused_before_loading_the_model(toy_dir, tmp_path, monkeypatch):
    import torch._inductor.config as inductor

    monkeypatch.setattr(trainer, "load_model_and_tokenizer", lambda *a: pytest.fail("loaded the model"))
    with inductor.patch({"cpp.cxx": ("no-such-cxx",)}):  # the config's own patch: restored exactly after
        with pytest.raises(ConfigError, match=r"compile=true on CPU needs a C\+\+ compiler .*no-such-cxx"):
            trainer.setup(small_cfg(toy_dir, tmp_path / "r", compile=True, device="cpu"))
    assert not (tmp_path / "r").exists()
    assert trainer.check_compiler("cpu") is None or needs_compiler.args[0]  # with g++ present, it is found again


@pytest.mark.slow
@needs_compiler
def test_a_compiled_run_trains_like_the_eager_one_and_saves_plain_keys(toy_dir, tmp_path, alternating_rewards):
    """Two RL steps with --compile against the same steps eager: same skip sets and tokens, weights equal
    to float rounding (fused kernels sum in another order), the checkpoint's keys the model's own."""
    runs = {}
    for flag in (False, True):
        cfg = small_cfg(toy_dir, tmp_path / str(flag), skip_ratio=0.15, mitigation="retrace", compile=flag)
        run = trainer.setup(cfg)
        assert (run.compiled is not None) == flag
        before = params(run.model)
        summary = trainer.train(cfg, run)
        runs[flag] = (before, params(run.model), summary, run)
    (b0, eager, s0, _), (b1, comp, s1, run) = runs[False], runs[True]
    assert all(torch.equal(b0[k], b1[k]) for k in b0)
    assert s0["steps"] == s1["steps"] == 2
    diffs = torch.cat([(eager[k] - comp[k]).abs().flatten() for k in eager])
    assert diffs.max() <= 1e-3 / 2 and diffs.mean() <= 5e-8  # Adam's step is lr where a gradient is ~0: rounding
    m0, m1 = read_metrics(tmp_path / "False"), read_metrics(tmp_path / "True")
    assert [m["skip_set"] for m in m0] == [m["skip_set"] for m in m1]
    for key in ("loss", "reward_mean", "h_mean"):
        assert [m[key] for m in m0] == pytest.approx([m[key] for m in m1], abs=1e-5), key
    assert sum(not torch.equal(b1[k], comp[k]) for k in comp) > len(comp) // 2  # it trained
    saved = load_file(str(tmp_path / "True" / "final" / "model.safetensors"))
    assert not any("_orig_mod" in k for k in saved)
    assert find_layers(run.accelerator.unwrap_model(run.model)).layers is not run.compiled


def test_compile_under_fsdp_is_refused_before_loading_the_model(toy_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(trainer, "use_fsdp", lambda: True)
    monkeypatch.setattr(trainer, "load_model_and_tokenizer", lambda *a: pytest.fail("loaded the model"))
    with pytest.raises(ConfigError, match="compile=true is not supported under FSDP"):
        trainer.setup(small_cfg(toy_dir, tmp_path / "r", compile=True))
    assert not (tmp_path / "r").exists()


@pytest.mark.slow
@needs_compiler
@pytest.mark.parametrize("extra", [dict(skip_policy="importance", profile_every=1), dict(gradient_checkpointing=True),
                                   dict(lora_r=4)])
def test_compile_with_the_importance_meter_activation_checkpointing_and_lora(toy_dir, tmp_path, alternating_rewards,
                                                                             extra):
    """The Block Influence hooks sit on the compiled wrappers (outside the graph) and measure the same profile;
    activation checkpointing recomputes through the compiled layers, and LoRA's adapters (inside the layers)
    train through them: the same losses as eager."""
    for flag in (False, True):
        cfg = small_cfg(toy_dir, tmp_path / str(flag), skip_ratio=0.15, compile=flag, **extra)
        trainer.train(cfg)
    m0, m1 = read_metrics(tmp_path / "False"), read_metrics(tmp_path / "True")
    assert [m["skip_set"] for m in m0] == [m["skip_set"] for m in m1]
    assert [m["loss"] for m in m0] == pytest.approx([m["loss"] for m in m1], abs=1e-5)
    if "skip_policy" in extra:
        assert m0[1]["layer_profile"] == pytest.approx(m1[1]["layer_profile"], abs=1e-5)


@pytest.mark.slow
@needs_compiler
def test_a_resumed_compiled_run_repeats_the_uninterrupted_one(toy_dir, tmp_path, alternating_rewards, monkeypatch):
    from test_trainer import kill_at_step_3

    kw = dict(steps=4, save_steps=2, skip_ratio=0.15, mitigation="retrace", compile=True)
    trainer.train(small_cfg(toy_dir, tmp_path / "full", **kw))
    real = trainer.rl_step
    kill_at_step_3(toy_dir, tmp_path / "cut", kw, monkeypatch)
    monkeypatch.setattr(trainer, "rl_step", real)
    trainer.train(small_cfg(toy_dir, tmp_path / "cut", resume=True, **kw))
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [m["skip_set"] for m in a] == [m["skip_set"] for m in b]
    assert [m["loss"] for m in a] == [m["loss"] for m in b]
    wa = load_file(str(tmp_path / "full/final/model.safetensors"))
    wb = load_file(str(tmp_path / "cut/final/model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)  # bit for bit
