"""The in-memory form of one LoRA adapter, shared by every stage.

An adapter is a set of low-rank pairs keyed by the *module path* of the base-model linear layer
they adapt, e.g. ``model.layers.3.self_attn.q_proj`` (the path in the plain transformers model,
without PEFT's ``base_model.model.`` prefix). For one layer with input size ``n_in`` and output
size ``n_out``::

    A: (r, n_in)     B: (n_out, r)     delta_W = scale * B @ A     scale = alpha / r  (alpha / sqrt(r) with rslora)

This is exactly PEFT's ``lora_A.weight`` / ``lora_B.weight`` layout, so conversion is a renaming.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loramix.errors import InvalidAdapter

if TYPE_CHECKING:  # the store imports this module and must not load torch
    import torch

PEFT_PREFIX = "base_model.model."


@dataclass
class LoraWeights:
    """One adapter's tensors and hyper-parameters."""

    rank: int
    alpha: float
    layers: dict[str, tuple[torch.Tensor, torch.Tensor]]  # module path -> (A (r, n_in), B (n_out, r))
    use_rslora: bool = False
    extra_config: dict = field(default_factory=dict)  # other adapter_config.json fields, kept on export

    @property
    def scale(self) -> float:
        return self.alpha / math.sqrt(self.rank) if self.use_rslora else self.alpha / self.rank

    @property
    def target_modules(self) -> list[str]:
        """Sorted short names of the adapted modules (``q_proj``, ``v_proj``, ...)."""
        return sorted({path.rsplit(".", 1)[-1] for path in self.layers})

    @property
    def n_params(self) -> int:
        return sum(a.numel() + b.numel() for a, b in self.layers.values())

    def delta(self, path: str) -> torch.Tensor:
        """The dense weight update of one layer, ``scale * B @ A``: (n_out, n_in)."""
        a, b = self.layers[path]
        return self.scale * (b.float() @ a.float())  # (n_out, n_in)

    # --- PEFT naming -------------------------------------------------------------------------
    def to_peft_state_dict(self) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for path, (a, b) in self.layers.items():
            out[f"{PEFT_PREFIX}{path}.lora_A.weight"] = a.contiguous()
            out[f"{PEFT_PREFIX}{path}.lora_B.weight"] = b.contiguous()
        return out

    def peft_config(self, base_model_name_or_path: str | None = None) -> dict:
        cfg = {
            "peft_type": "LORA",
            "task_type": "CAUSAL_LM",
            "r": self.rank,
            "lora_alpha": self.alpha,
            "use_rslora": self.use_rslora,
            "target_modules": self.target_modules,
            "lora_dropout": 0.0,
            "bias": "none",
            "fan_in_fan_out": False,
            "inference_mode": True,
            "base_model_name_or_path": base_model_name_or_path,
        }
        return {**self.extra_config, **cfg}

    @classmethod
    def from_peft_state_dict(cls, state: dict[str, torch.Tensor], config: dict) -> LoraWeights:
        """Build from PEFT tensors (``...q_proj.lora_A.weight``, adapter name optional) and config."""
        pairs: dict[str, dict[str, torch.Tensor]] = {}
        for key, t in state.items():
            k = key[len(PEFT_PREFIX):] if key.startswith(PEFT_PREFIX) else key
            for part in ("lora_A", "lora_B"):
                marker = f".{part}."
                if marker in k:
                    path = k.split(marker)[0]
                    pairs.setdefault(path, {})[part] = t
                    break
            else:
                raise InvalidAdapter(
                    f"tensor {key!r} is not a LoRA tensor; expected names like "
                    "'base_model.model.<module>.lora_A.weight' (DoRA, bias and embedding adapters are not supported)"
                )
        layers: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        for path, pr in sorted(pairs.items()):
            if set(pr) != {"lora_A", "lora_B"}:
                raise InvalidAdapter(f"layer {path}: has {sorted(pr)} but needs both lora_A and lora_B")
            layers[path] = (pr["lora_A"], pr["lora_B"])
        if not layers:
            raise InvalidAdapter("adapter has no LoRA tensors")
        rank = int(config.get("r", 8))
        alpha = float(config.get("lora_alpha", rank))
        known = {"peft_type", "task_type", "r", "lora_alpha", "use_rslora", "target_modules"}
        extra = {k: v for k, v in config.items() if k not in known}
        return cls(rank=rank, alpha=alpha, layers=layers, use_rslora=bool(config.get("use_rslora", False)),
                   extra_config=extra)
