"""Read, validate and write PEFT LoRA folders (``adapter_config.json`` + ``adapter_model.safetensors``).

Weights are only ever read with safetensors: a folder holding any pickle-format weight file
(``.bin``, ``.pt``, ``.pth``, ``.pkl``, ``.ckpt``, ...) is rejected without opening it. Only the
folder's own top-level entries are looked at (never its subfolders), and a folder holding any
symlink is refused, so an import reads nothing outside the folder it was given.

torch and safetensors are imported inside the functions that need them: listing and showing
adapters (which import the store) never load torch.
"""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import tempfile
import uuid
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from loramix.errors import InvalidAdapter, LibraryError, one_line, short
from loramix.lora import PEFT_PREFIX, LoraWeights

if TYPE_CHECKING:
    import torch

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CONFIG_META_KEY = "adapter_config"  # safetensors metadata key holding the adapter's config JSON
PICKLE_SUFFIXES = frozenset({".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib"})
MAX_CONFIG_BYTES = 1 << 20  # adapter_config.json size limit
MAX_RANK = 65536  # r above this is refused before any tensor is read
MAX_SCALE = 1000.0  # |lora_alpha / r| (or / sqrt(r) with rslora) above this is refused as absurd
DEFAULT_LAYER_PATTERNS = ("layers", "h", "blocks", "layer")  # PEFT's default layers_pattern

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
# (layers_to_transform / layers_pattern are kept: the import checked the tensors obey them)
_EXPORT_RESET: dict[str, Any] = {"exclude_modules": None, "rank_pattern": {}, "alpha_pattern": {}}


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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    folder = check_folder(path)
    cfg_path, w_path = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    _check_size(cfg_path, MAX_CONFIG_BYTES, "the adapter_config.json limit (MAX_CONFIG_BYTES)")
    _check_size(w_path, max_bytes, "the library's max_bytes")
    config = _read_config(cfg_path)
    check_config(config, base_shapes)
    try:
        state = load_file(str(w_path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise InvalidAdapter(f"{WEIGHTS_NAME} is not a readable safetensors file: {one_line(e)}") from e
    weights = LoraWeights.from_peft_state_dict(canonical_state(state), config)
    validate_weights(weights, base_shapes)
    return weights


def check_folder(path: str | Path) -> Path:
    """The cheap checks, before anything is read: a folder holding the two files, no symlink, no pickle."""
    folder = Path(path).expanduser()
    if not folder.is_dir():
        raise InvalidAdapter(f"{short(str(folder))} is not a folder; expected a PEFT LoRA folder with {CONFIG_NAME} "
                             f"and {WEIGHTS_NAME}")
    for i, name in enumerate((CONFIG_NAME, WEIGHTS_NAME)):  # no config: not an adapter folder (say so first)
        if i == 1:
            check_entries(folder)  # a pickle beside the config says more than "no safetensors file"
        p = folder / name
        if not p.is_file():
            raise InvalidAdapter(f"{short(str(folder))} has no {name}; expected a PEFT LoRA "
                                 f"folder with {CONFIG_NAME} and {WEIGHTS_NAME}")
    return folder


def _read_config(cfg_path: Path) -> dict[str, Any]:
    try:
        config = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except RecursionError:
        raise InvalidAdapter(f"{CONFIG_NAME} is nested too deeply to parse; expected a flat PEFT adapter config "
                             "object") from None
    except (UnicodeDecodeError, ValueError) as e:  # JSONDecodeError, and ints over Python's digit limit
        raise InvalidAdapter(f"{CONFIG_NAME} is not valid JSON ({one_line(e)}); expected a PEFT adapter config "
                             "object") from None
    if not isinstance(config, dict):
        raise InvalidAdapter(f"{CONFIG_NAME} holds a JSON {type(config).__name__}; expected an object")
    return config


def check_entries(folder: Path) -> None:
    """Look at the folder's own entries only: refuse symlinks and pickle-format weight files.

    A pickle file is refused even beside a safetensors file; a symlink is refused wherever it points
    (an import reads only regular files that live in the folder). Subfolders are never entered.
    """
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        raise InvalidAdapter(f"cannot read the folder {short(str(folder))}: {one_line(e)}") from None
    for entry in entries:
        if entry.is_symlink():
            raise InvalidAdapter(
                f"{short(str(folder))} contains {short(entry.name)!r}, a symlink; loramix reads only regular files "
                f"inside the adapter folder. Expected {CONFIG_NAME} and {WEIGHTS_NAME} as plain files (copy them "
                "in instead of linking)")
        if Path(entry.name).suffix.lower() in PICKLE_SUFFIXES:
            raise InvalidAdapter(
                f"{short(str(folder))} contains {short(entry.name)}, a pickle-format file; loramix never unpickles "
                f"files. Expected only {CONFIG_NAME} and {WEIGHTS_NAME} (re-save with safe_serialization=True and "
                "remove the pickle file)"
            )


def _check_size(path: Path, limit: int, what: str) -> None:
    size = path.stat().st_size
    if size > limit:
        raise InvalidAdapter(f"{path.name} is {human_bytes(size)}, over the size limit of {human_bytes(limit)} "
                             f"({limit} bytes, {what})")


def _finite_number(x: object) -> float | None:
    """``x`` as a finite float, or None (bools, non-numbers, NaN, inf and ints too big for a float)."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    try:
        f = float(x)
    except OverflowError:
        return None
    return f if math.isfinite(f) else None


def layer_index(path: str, patterns: Sequence[str]) -> int | None:
    """The block index in a module path (``model.layers.3.mlp.up_proj`` -> 3), as PEFT finds it."""
    for pat in patterns:
        m = re.search(rf"(?:^|\.){re.escape(pat)}\.(\d+)\.", path)
        if m:
            return int(m.group(1))
    return None


def _layer_filter(config: Mapping[str, Any]) -> tuple[set[int], list[str]] | None:
    """(allowed layer indices, layer patterns) from layers_to_transform / layers_pattern, or None when unset."""
    ltt = config.get("layers_to_transform")
    if ltt is None:
        return None
    if isinstance(ltt, bool) or not isinstance(ltt, int | list) or (
            isinstance(ltt, list) and not all(isinstance(i, int) and not isinstance(i, bool) for i in ltt)):
        raise InvalidAdapter(f"adapter_config.json has layers_to_transform={short(repr(ltt))}; expected an integer "
                             "or a list of integers (layer indices)")
    allowed = {ltt} if isinstance(ltt, int) else set(ltt)
    pat = config.get("layers_pattern")
    if pat is None:
        patterns = list(DEFAULT_LAYER_PATTERNS)
    elif isinstance(pat, str) and pat:
        patterns = [pat]
    elif isinstance(pat, list) and pat and all(isinstance(p, str) and p for p in pat):
        patterns = list(pat)
    else:
        raise InvalidAdapter(f"adapter_config.json has layers_pattern={short(repr(pat))}; expected a string or a "
                             "list of strings such as 'layers'")
    return allowed, patterns


def check_config(config: dict[str, Any], base_shapes: Mapping[str, tuple[int, int]] | None = None) -> None:
    """Check an adapter_config.json dict: a plain LoRA whose targets exist in the base (when known)."""
    peft_type = config.get("peft_type")
    if peft_type != "LORA":
        raise InvalidAdapter(f"adapter_config.json has peft_type {peft_type!r}; expected 'LORA'")
    r = config.get("r")
    if isinstance(r, bool) or not isinstance(r, int) or not 1 <= r <= MAX_RANK:
        raise InvalidAdapter(f"adapter_config.json has r={short(repr(r))}; expected a positive integer rank of at "
                             f"most {MAX_RANK}")
    alpha = _finite_number(config.get("lora_alpha", r))
    if alpha is None:
        raise InvalidAdapter(f"adapter_config.json has lora_alpha={short(repr(config.get('lora_alpha')))}; "
                             "expected a finite number")
    rslora = config.get("use_rslora", False)
    if not isinstance(rslora, bool):
        raise InvalidAdapter(f"adapter_config.json has use_rslora={short(repr(rslora))}; expected true or false")
    check_scale(alpha, r, rslora)
    for key, what in _UNSUPPORTED.items():
        if config.get(key):
            raise InvalidAdapter(f"adapter_config.json sets {key}={short(repr(config[key]))}: {what} are not "
                                 "supported; expected a plain LoRA adapter")
    _layer_filter(config)
    targets = config.get("target_modules")
    if base_shapes is not None and isinstance(targets, list):
        for t in targets:
            if not isinstance(t, str) or not any(p == t or p.endswith("." + t) for p in base_shapes):
                names = sorted({p.rsplit(".", 1)[-1] for p in base_shapes})
                raise InvalidAdapter(f"target module {short(repr(t))} matches no linear layer of the base model; "
                                     f"expected one of {names}")


def check_scale(alpha: float, r: int, rslora: bool) -> None:
    """The LoRA scale (alpha / r, or alpha / sqrt(r) with rslora) must be finite and at most MAX_SCALE."""
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    if not math.isfinite(scale) or abs(scale) > MAX_SCALE:
        raise InvalidAdapter(f"lora_alpha={alpha:g} with r={r} gives the scale {scale:g}; expected a finite scale "
                             f"of magnitude at most {MAX_SCALE:g} (typical adapters use 0.5 to 4)")


def canonical_state(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename PEFT keys to ``base_model.model.<path>.lora_A.weight`` (drops an adapter name like ``default``)."""
    out: dict[str, torch.Tensor] = {}
    for key, t in state.items():
        m = _KEY_RE.fullmatch(key)
        if m is None:
            raise InvalidAdapter(
                f"tensor {short(repr(key))} is not a LoRA tensor; expected names like "
                "'base_model.model.<module>.lora_A.weight' (DoRA, bias and embedding adapters are not supported)"
            )
        canon = f"{PEFT_PREFIX}{m['path']}.{m['part']}.weight"
        if canon in out:
            raise InvalidAdapter(f"tensor {short(repr(key))} duplicates {short(repr(canon))}; expected one adapter "
                                 "per file")
        out[canon] = t
    if not out:
        raise InvalidAdapter(f"{WEIGHTS_NAME} has no tensors; expected lora_A / lora_B pairs")
    return out


def validate_weights(w: LoraWeights, base_shapes: Mapping[str, tuple[int, int]] | None = None) -> None:
    """Check ranks, scale, shapes (against the base when known), dtypes, finiteness and layer filter of every layer."""
    import torch

    if isinstance(w.rank, bool) or not isinstance(w.rank, int) or not 1 <= w.rank <= MAX_RANK:
        raise InvalidAdapter(f"rank is {short(repr(w.rank))}; expected a positive integer of at most {MAX_RANK}")
    alpha = _finite_number(w.alpha)
    if alpha is None:
        raise InvalidAdapter(f"alpha is {short(repr(w.alpha))}; expected a finite number")
    check_scale(alpha, w.rank, bool(w.use_rslora))
    if not w.layers:
        raise InvalidAdapter("adapter has no LoRA layers; expected at least one (A, B) pair")
    layer_filter = _layer_filter(w.extra_config)
    r = w.rank
    for path, pair in w.layers.items():
        if layer_filter is not None:
            idx = layer_index(path, layer_filter[1])
            if idx is None or idx not in layer_filter[0]:
                raise InvalidAdapter(
                    f"layer {short(path)} is outside layers_to_transform={sorted(layer_filter[0])} (layer "
                    f"{idx if idx is not None else 'unknown'}); expected tensors only for the layers the config names")
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
    from safetensors.torch import save

    tensors = {k: t.detach().cpu().contiguous() for k, t in w.to_peft_state_dict().items()}
    return save(tensors, metadata={CONFIG_META_KEY: config_json(w)})  # one metadata key keeps bytes deterministic


def read_blob(path: str | Path) -> LoraWeights:
    """Read a loramix blob: tensors plus the config kept in its safetensors metadata."""
    from safetensors import SafetensorError, safe_open
    from safetensors.torch import load_file

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
    from safetensors.torch import save_file

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
