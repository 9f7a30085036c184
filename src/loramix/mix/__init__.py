"""Per-row mixing of slotted LoRA adapters, and merging adapters into new ones."""

from loramix.mix.layers import MixBatch
from loramix.mix.merge import MERGE_METHODS, merge
from loramix.mix.model import MixedModel, Mixture
from loramix.mix.ops import mixed_lora, reference_mix

__all__ = ["MERGE_METHODS", "MixBatch", "MixedModel", "Mixture", "merge", "mixed_lora", "reference_mix"]
