"""nested-reft: reinforced fine-tuning of LLMs with rollouts from layer-skipped nested models."""

from nested_reft.layer_skip import num_skipped, sample_skip_set, valid_layers
from nested_reft.nested import skip_layers

__all__ = ["num_skipped", "valid_layers", "sample_skip_set", "skip_layers"]
__version__ = "0.1.0"
