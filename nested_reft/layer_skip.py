"""The layer-skipping module f_{x,b}: how many layers to skip, which may be skipped, and which are.

Choices (SPEC section 2, items 1-3):
- U(N, x) = 0 when x == 0, else max(1, floor(N*x + 0.5)). Round half up, never Python's banker's
  `round`; the paper's printed `min(1, ceil(.))` is a typo its own Table 1 contradicts (N=28 gives
  1, 3, 4 layers at x = 0.05, 0.10, 0.15).
- The first b and last b layers are never skipped: V = {b, ..., N-1-b}.
- A skip set is U distinct indices drawn uniformly without replacement from V with a seeded
  torch.Generator, returned sorted. U > |V| is a configuration error.
- Training draws the skip set of step s from a generator seeded by (seed, s) alone (`skip_set_at`), so
  every process draws the same set and a resumed run draws the same sequence.
- Skip policies (beyond the paper, whose draw is `uniform`): `importance` draws the U layers without
  replacement (successive draws, each proportional to the remaining layers' probabilities) with
  p_i proportional to exp(-I_i / (mean_V(I) * T)): the importance profile I (e.g. Block Influence),
  divided by its mean over V so that the temperature T does not depend on the measure's scale. T -> 0
  always skips the least important layers, T -> inf is uniform. A profile of zeros (none measured yet)
  is uniform. `fixed` skips a given set every step. Each draw is a pure function of (seed, step, profile).
"""

import math
from decimal import ROUND_HALF_UP, Decimal

import torch

from nested_reft.config import SKIP_POLICIES  # noqa: F401  (re-exported)


def num_skipped(num_layers: int, ratio: float) -> int:
    """U(N, x): the number of layers a nested model skips."""
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if not 0.0 <= ratio < 1.0 or math.isnan(ratio):
        raise ValueError(f"skip ratio must be in [0, 1), got {ratio}")
    if ratio == 0:
        return 0
    # Decimal avoids float artefacts such as 28 * 0.15 = 4.199999... or 10 * 0.05 = 0.5000000001.
    exact = Decimal(num_layers) * Decimal(repr(ratio))
    return max(1, int(exact.quantize(Decimal(1), rounding=ROUND_HALF_UP)))


def valid_layers(num_layers: int, border: int) -> list[int]:
    """V: the layer indices that may be skipped (the first and last `border` layers are protected)."""
    if border < 0:
        raise ValueError(f"border must be >= 0, got {border}")
    return list(range(border, num_layers - border))


def check_skip_config(num_layers: int, ratio: float, border: int) -> int:
    """Validate (N, x, b) before any work; returns U. Raises ValueError naming the offending value."""
    u = num_skipped(num_layers, ratio)
    v = valid_layers(num_layers, border)
    if u > len(v):
        raise ValueError(
            f"skip_ratio={ratio} asks for U={u} skipped layers but border={border} leaves only "
            f"{len(v)} valid layers of {num_layers}; lower skip_ratio or border"
        )
    return u


def sample_skip_set(
    num_layers: int, ratio: float, border: int, generator: torch.Generator | None = None
) -> tuple[int, ...]:
    """Draw one skip set: U distinct valid layers, uniform without replacement, sorted."""
    u = check_skip_config(num_layers, ratio, border)
    valid = valid_layers(num_layers, border)
    if u == 0:
        return ()
    order = torch.randperm(len(valid), generator=generator)[:u]
    return tuple(sorted(valid[i] for i in order.tolist()))


def skip_probabilities(importance, valid: list[int], temperature: float) -> torch.Tensor:
    """p over V [|V|] (float64): softmax of -I_i / (mean_V(I) * T); uniform when I is all zero on V."""
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"skip temperature must be a finite number > 0, got {temperature}")
    imp = torch.tensor([float(importance[i]) for i in valid], dtype=torch.float64)  # [|V|]
    if not torch.isfinite(imp).all() or (imp < 0).any():
        raise ValueError(f"importance must be finite and >= 0, got {imp.tolist()}")
    scale = imp.mean()
    if scale == 0:
        return torch.full_like(imp, 1.0 / len(valid))
    return torch.softmax(-imp / (scale * temperature), dim=0)


def sample_importance_skip_set(num_layers: int, ratio: float, border: int, importance, temperature: float,
                               generator: torch.Generator | None = None) -> tuple[int, ...]:
    """U distinct valid layers drawn without replacement with `skip_probabilities`, sorted."""
    u = check_skip_config(num_layers, ratio, border)
    valid = valid_layers(num_layers, border)
    if len(importance) != num_layers:
        raise ValueError(f"importance has {len(importance)} values for {num_layers} layers")
    if u == 0:
        return ()
    probs = skip_probabilities(importance, valid, temperature)
    order = torch.multinomial(probs, u, replacement=False, generator=generator)
    return tuple(sorted(valid[i] for i in order.tolist()))


def check_fixed_skip_set(num_layers: int, ratio: float, border: int, layers) -> tuple[int, ...]:
    """A `fixed` policy's set: U distinct valid layers (ValueError naming what is wrong), sorted."""
    u = check_skip_config(num_layers, ratio, border)
    layers = tuple(int(i) for i in layers)
    valid = set(valid_layers(num_layers, border))
    if len(set(layers)) != len(layers):
        raise ValueError(f"skip_layers={list(layers)} repeats a layer")
    if len(layers) != u:
        raise ValueError(f"skip_layers={list(layers)} has {len(layers)} layers but skip_ratio={ratio} gives U={u} "
                         f"of {num_layers}")
    outside = [i for i in layers if i not in valid]
    if outside:
        raise ValueError(f"skip_layers={list(layers)}: layer {outside[0]} is not a valid layer (border={border} "
                         f"protects the first and last {border} of {num_layers}; valid: {min(valid)}..{max(valid)})")
    return tuple(sorted(layers))


def skip_set_at(num_layers: int, ratio: float, border: int, seed: int, step: int, policy: str = "uniform",
                importance=None, temperature: float = 1.0, fixed=None) -> tuple[int, ...]:
    """The skip set of step `step` of a run seeded with `seed`: a pure function of its arguments.
    `uniform` is the paper's draw; `importance` needs the profile `importance` [N]; `fixed` returns `fixed`."""
    gen = torch.Generator().manual_seed(seed * 1_000_003 + step)
    if policy == "uniform":
        return sample_skip_set(num_layers, ratio, border, gen)
    if policy == "importance":
        return sample_importance_skip_set(num_layers, ratio, border, importance, temperature, gen)
    if policy == "fixed":
        return check_fixed_skip_set(num_layers, ratio, border, fixed)
    raise ValueError(f"unknown skip policy {policy!r}; expected one of {', '.join(SKIP_POLICIES)}")
