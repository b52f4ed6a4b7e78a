import argparse
import re
from pathlib import Path

import pytest

from nested_reft.config import ConfigError, TrainConfig, add_arguments, resolve

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def parse(argv):
    p = argparse.ArgumentParser()
    add_arguments(p, TrainConfig)
    return vars(p.parse_args(argv))


def test_flags_override_yaml_override_defaults(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: m\nlr: 3.0e-5\nnum_generations: 4\nmitigation: practical\n")
    cfg = resolve(TrainConfig, y, parse(["--num-generations", "6", "--skip-ratio", "0.1"]))
    assert (cfg.model, cfg.lr, cfg.num_generations, cfg.mitigation) == ("m", 3e-5, 6, "practical")
    assert cfg.skip_ratio == 0.1 and cfg.border == 1  # nested runs protect layer 0 and N-1 by default
    assert resolve(TrainConfig, None, {"model": "m"}).border == 0  # the baseline has b = 0
    assert cfg.steps == 99 and cfg.batch_size == 16  # untouched defaults follow the paper


def test_unknown_and_mistyped_yaml_fields_are_all_named(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("model: m\nmitigaton: base\nsteps: ten\nresume: maybe\n")
    with pytest.raises(ConfigError) as err:
        resolve(TrainConfig, y)
    msg = str(err.value)
    assert "unknown field 'mitigaton'" in msg and "did you mean 'mitigation'" in msg
    assert "steps:" in msg and "resume:" in msg


def test_validate_lists_every_bad_value():
    cfg = TrainConfig(model="m", num_generations=1, mitigation="clip", lam=-1.0, is_level="word", top_p=0.0)
    with pytest.raises(ConfigError) as err:
        cfg.validate()
    for field in ("num_generations", "mitigation='clip'", "lam", "is_level='word'", "top_p"):
        assert field in str(err.value)


def test_missing_config_file_and_bool_flags(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(TrainConfig, tmp_path / "nope.yaml")
    assert parse(["--resume", "true"])["resume"] is True
    with pytest.raises(SystemExit):
        parse(["--resume", "maybe"])


@pytest.mark.parametrize("path", sorted(CONFIGS.glob("paper-*.yaml")))
def test_shipped_paper_configs_validate(path):
    cfg = resolve(TrainConfig, path, {"skip_ratio": 0.15, "mitigation": "retrace"})
    cfg.validate()
    assert cfg.num_generations == 8 and cfg.max_new_tokens == cfg.min_new_tokens == 256 and cfg.lr == 1e-6


@pytest.mark.parametrize("field", ["lr", "warmup_ratio", "temperature", "top_p", "epsilon", "beta", "lam",
                                   "skip_ratio", "weight_decay", "max_grad_norm", "adam_beta1", "adam_beta2"])
@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_floats_are_named(field, value):
    """nan passes `nan <= 0` checks; every float field must be finite and in range."""
    with pytest.raises(ConfigError, match=f"{field}={value}"):
        TrainConfig(model="m", **{field: value}).validate()


@pytest.mark.parametrize("kw, message", [
    (dict(is_cap=0.0), "is_cap=0.0 must be > 0.0"),
    (dict(is_cap=-1.0), "is_cap=-1.0 must be > 0.0"),
    (dict(is_cap=float("nan")), "is_cap=nan must be a finite number > 0.0"),
    (dict(is_cap=float("inf")), "is_cap=inf must be a finite number > 0.0"),
    (dict(is_cap_low=0.0), "is_cap_low=0.0 must be > 0.0"),
    (dict(is_cap_low=float("nan")), "is_cap_low=nan must be a finite number > 0.0"),
    (dict(is_cap=2.0, is_cap_low=3.0), "is_cap_low=3.0 must be <= is_cap=2.0"),
    (dict(mitigation="mis", is_cap=0.5), "is_cap=0.5 < 1 with is_cap_low unset"),
    (dict(mitigation="bogus"), "mitigation='bogus' is not one of base, practical, retrace, tis, mis"),
])
def test_importance_caps_are_validated(kw, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        TrainConfig(model="m", **kw).validate()


def test_tis_and_mis_configs_validate_and_parse():
    for kw in (dict(mitigation="tis"), dict(mitigation="mis"), dict(mitigation="mis", is_cap=3.0, is_cap_low=0.2),
               dict(mitigation="tis", is_cap=0.5), dict(is_cap=2.0, is_cap_low=2.0)):
        TrainConfig(model="m", **kw).validate()
    args = parse(["--is-cap", "4", "--is-cap-low", "0.3"])
    assert (args["is_cap"], args["is_cap_low"]) == (4.0, 0.3)
    cfg = resolve(TrainConfig, None, {"model": "m", **args})
    assert (cfg.is_cap, cfg.is_cap_low) == (4.0, 0.3) and TrainConfig(model="m").is_cap_low is None
