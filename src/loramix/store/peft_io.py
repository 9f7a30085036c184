"""Read, validate and write PEFT LoRA folders (``adapter_config.json`` + ``adapter_model.safetensors``).

Weights are only ever read with safetensors: a folder holding any pickle-format weight file
(``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.ckpt``, ...) is rejected without opening it.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save, save_file

from loramix.errors import InvalidAdapter, LibraryError
from loramix.lora import PEFT_PREFIX, LoraWeights

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_META_KEY = "adapter_config"  # safetensors metadata key holding the adapter's config JSON
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
MAX_CONFIG_BYTES = 1 << 20

# <optional base_model.model.><module path>.lora_A|lora_B<optional .adapter_name>.weight
_KEY_RE = re.compile(r"^(?:base_model\.model\.)?(?P<path>.+?)\.(?P<part>lora_A|lora_B)(?:\.(?P<adapter>[^.]+))?\.weight$")

# config fields that change what the tensors mean; loramix supports only their "off" values
_UNSUPPORTED = {
    "use_dora": "DoRA adapters",
    "rank_pattern": "per-layer ranks (rank_pattern)",
    "alpha_pattern": "per-layer alphas (alpha_pattern)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "lora_bias": "LoRA bias terms (lora_bias)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "target_parameters": "parameter targets (target_parameters)",
    "layer_replication": "layer replication",
}

# config fields dropped on export: the exported target_modules list names every adapted layer exactly
_EXPORT_RESET: dict[str, Any] = {"layers_to_transform": None, "layers_pattern": None, "exclude_modules": None,
                                 "rank_pattern": {}, "alpha_pattern": {}}


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


# --- reading -------------------------------------------------------------------------------------
def read_peft_dir(path: str | Path, base_shapes: Mapping[str, tuple[int, int]] | None = None,
                  max_bytes: int = 2**30) -> LoraWeights:
    """Read and validate a PEFT LoRA folder; raise :class:`InvalidAdapter` naming the problem."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InvalidAdapter(f"{folder} is not a folder; expected a PEFT LoRA folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    check_no_pickles(folder)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            raise InvalidAdapter(f"{folder} has no {p.name}; expected a PEFT LoRA folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    _check_size(cfg_path, min(max_bytes, MAX_CONFIG_BYTES))
    _check_size(w_path, max_bytes)
    try:
        config = json.loads(cfg_path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise InvalidAdapter(f"{cfg_path} is not valid JSON ({e}); expected a PEFT adapter config object") from e
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{cfg_path} holds a JSON {type(config).__name__}; expected an object")
    check_config(config, base_shapes)
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InvalidAdapter(f"{w_path} is not a readable safetensors file: {e}") from e
    weights = LoraWeights.from_peft_state_dict(canonical_state(state), config)
    validate_weights(weights, base_shapes)
    return weights


def check_no_pickles(folder: Path) -> None:
    """Reject a folder holding any pickle-format weight file, even beside a safetensors file."""
    for root, _dirs, files in os.walk(folder):
        for f in sorted(files):
            if Path(f).suffix.lower() in PICKLE_SUFFIXES:
                rel = Path(root, f).relative_to(folder)
                raise InvalidAdapter(
                    f"{folder} contains {rel}, a pickle-format file; loramix never unpickles files. "
                    f"Expected only {CONFIG_NAME} and {WEIGHTS_NAME} (re-save with safe_serialization=True and "
                    "remove the pickle file)"
                )


def _check_size(path: Path, limit: int) -> None:
    size = path.stat().st_size
    if size > limit:
        raise InvalidAdapter(f"{path.name} is {human_bytes(size)}, over the size limit of {human_bytes(limit)} "
                             f"({limit} bytes, the library's max_bytes)")


def check_config(config: dict[str, Any], base_shapes: Mapping[str, tuple[int, int]] | None = None) -> None:
    """Check an adapter_config.json dict: a plain LoRA whose targets exist in the base (when known)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(f"adapter_config.json has peft_type {peft_type!r}; expected 'LORA'")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise InvalidAdapter(f"adapter_config.json has r={r!r}; expected a positive integer rank")
    alpha = config.get("lora_alpha", r)
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise InvalidAdapter(f"adapter_config.json has lora_alpha={alpha!r}; expected a finite number")
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise InvalidAdapter(f"adapter_config.json sets {key}={config[key]!r}: {what} are not supported; "
                                 "expected a plain LoRA adapter")
    targets = config.get("target_modules")
    if base_shapes is not None and isinstance(targets, list):
        for t in targets:
            if not isinstance(t, str) or not any(p == t or p.endswith("." + t) for p in base_shapes):
                short = sorted({p.rsplit(".", 1)[-1] for p in base_shapes})
                raise InvalidAdapter(f"target module {t!r} matches no linear layer of the base model; "
                                     f"expected one of {short}")


def canonical_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename PEFT keys to ``base_model.model.<path>.lora_A.weight`` (drops an adapter name like ``default``)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = _KEY_RE.fullmatch(key)
        if m is None:
            raise InvalidAdapter(
                f"tensor {key!r} is not a LoRA tensor; expected names like "
                "'base_model.model.<module>.lora_A.weight' (DoRA, bias and embedding adapters are not supported)"
            )
        canon = f"{PEFT_PREFIX}{m['path']}.{m['part']}.weight"
        if canon in out:
            raise InvalidAdapter(f"tensor {key!r} duplicates {canon!r}; expected one adapter per file")
        out[canon] = t
    if not out:
        raise InvalidAdapter(f"{WEIGHTS_NAME} has no tensors; expected lora_A / lora_B pairs")
    return out


def validate_weights(w: LoraWeights, base_shapes: Mapping[str, tuple[int, int]] | None = None) -> None:
    """Check ranks, shapes (against the base when known), dtypes and finiteness of every layer."""
    if isinstance(w.rank, bool) or not isinstance(w.rank, int) or w.rank < 1:
        raise InvalidAdapter(f"rank is {w.rank!r}; expected a positive integer")
    if not math.isfinite(float(w.alpha)):
        raise InvalidAdapter(f"alpha is {w.alpha!r}; expected a finite number")
    if not w.layers:
        raise InvalidAdapter("adapter has no LoRA layers; expected at least one (A, B) pair")
    r = w.rank
    for path, pair in w.layers.items():
        if len(pair) != 2 or not all(isinstance(t, torch.Tensor) for t in pair):
            raise InvalidAdapter(f"layer {path}: expected a pair of tensors (A, B)")
        a, b = pair
        for nm, t in (("lora_A", a), ("lora_B", b)):
            if not t.is_floating_point():
                raise InvalidAdapter(f"layer {path}: {nm} has dtype {t.dtype}; expected a floating-point dtype")
            if t.dim() != 2:
                raise InvalidAdapter(f"layer {path}: {nm} has shape {tuple(t.shape)}; expected a 2-D matrix")
        if base_shapes is not None:
            if path not in base_shapes:
                raise InvalidAdapter(f"layer {path} does not exist in the base model; expected a linear layer path "
                                     "such as " + (next(iter(base_shapes), "<none>")))
            n_in, n_out = base_shapes[path]
        else:
            n_in, n_out = a.shape[1], b.shape[0]
        if tuple(a.shape) != (r, n_in):
            raise InvalidAdapter(f"layer {path}: lora_A has shape {tuple(a.shape)}, expected {(r, n_in)}")
        if tuple(b.shape) != (n_out, r):
            raise InvalidAdapter(f"layer {path}: lora_B has shape {tuple(b.shape)}, expected {(n_out, r)}")
        for nm, t in (("lora_A", a), ("lora_B", b)):
            if not bool(torch.isfinite(t).all()):
                raise InvalidAdapter(f"layer {path}: {nm} holds NaN or infinite values; expected finite numbers")


# --- writing -------------------------------------------------------------------------------------
def export_config(w: LoraWeights) -> dict[str, Any]:
    """The adapter_config.json for ``w``; target_modules lists the exact module paths adapted."""
    cfg = w.peft_config(base_model_name_or_path=w.extra_config.get("base_model_name_or_path"))
    cfg.update(_EXPORT_RESET)
    cfg["target_modules"] = sorted(w.layers)
    return cfg


def config_json(w: LoraWeights) -> str:
    try:
        return json.dumps(export_config(w), sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as e:
        raise InvalidAdapter(f"adapter config is not JSON-serialisable ({e}); expected plain JSON values") from e


def blob_bytes(w: LoraWeights) -> bytes:
    """The canonical safetensors bytes of ``w`` (deterministic: same adapter, same bytes)."""
    tensors = {k: t.detach().cpu().contiguous() for k, t in w.to_peft_state_dict().items()}
    return save(tensors, metadata={CONFIG_META_KEY: config_json(w)})  # one metadata key keeps bytes deterministic


def read_blob(path: str | Path) -> LoraWeights:
    """Read a loramix blob: tensors plus the config kept in its safetensors metadata."""
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        state = load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise LibraryError(f"blob {path} is unreadable: {e}") from e
    if CONFIG_META_KEY not in meta:
        raise LibraryError(f"blob {path} has no {CONFIG_META_KEY!r} metadata; expected a file written by loramix")
    return LoraWeights.from_peft_state_dict(state, json.loads(meta[CONFIG_META_KEY]))


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def write_peft_dir(w: LoraWeights, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write ``w`` as a PEFT folder, atomically: a temp folder beside ``out_dir`` renamed into place."""
    out = Path(out_dir).expanduser()
    if out.exists():
        if not out.is_dir():
            raise LibraryError(f"{out} exists and is not a folder; expected a new or empty folder to export to")
        if any(out.iterdir()) and not overwrite:
            raise LibraryError(f"{out} exists and is not empty; pass overwrite=True to replace it")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=f".{out.name}.tmp-"))
    try:
        (tmp / CONFIG_NAME).write_text(json.dumps(export_config(w), indent=2, sort_keys=True) + "\n", encoding="utf-8")
        tensors = {k: t.detach().cpu().contiguous() for k, t in w.to_peft_state_dict().items()}
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            _fsync_file(tmp / name)
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out
