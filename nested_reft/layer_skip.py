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
"""

import math
from decimal import ROUND_HALF_UP, Decimal

import torch


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


def skip_set_at(num_layers: int, ratio: float, border: int, seed: int, step: int) -> tuple[int, ...]:
    """The skip set of step `step` of a run seeded with `seed`: a pure function of its arguments."""
    return sample_skip_set(num_layers, ratio, border, torch.Generator().manual_seed(seed * 1_000_003 + step))
