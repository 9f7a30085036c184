"""Per-row mixing of slotted LoRA adapters, and merging adapters into new ones."""

from loramix.mix.model import MixedModel, Mixture
from loramix.mix.ops import mixed_lora, reference_mix

__all__ = ["MixedModel", "Mixture", "mixed_lora", "reference_mix"]
