"""The adapter record and the checks on names, tags and JSON values the registry stores."""

from __future__ import annotations

import dataclasses
import json
import re
import sqlite3
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from loramix.errors import InvalidAdapter, LibraryError, short

NAME_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._-]{0,99}$")  # no leading '-': it would read as a CLI option
ID_RE = re.compile(r"^[0-9a-f]{16}$")  # ids are uuid4().hex[:16]


@dataclass(frozen=True)
class AdapterRecord:
    """One adapter's registry row."""

    id: str
    name: str
    description: str
    domain_tags: list[str]
    skill_tags: list[str]
    rank: int
    alpha: float
    target_modules: list[str]
    n_params: int
    created: float  # epoch seconds
    use_count: int
    blob: str  # sha256 hex of the safetensors file
    has_key: bool
    meta: dict[str, Any]
    owner: str | None = None  # tenant name; None = the operator's shared library (visible to all)
    public: bool = False  # an owned adapter visible to every tenant
    kind: str = "lora"  # "lora" or "nano" (loramix.nano)

    @property
    def tags(self) -> list[str]:
        return [*self.domain_tags, *self.skill_tags]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> AdapterRecord:
        return cls(id=row["id"], name=row["name"], description=row["description"],
                   domain_tags=json.loads(row["domain_tags"]), skill_tags=json.loads(row["skill_tags"]),
                   rank=int(row["rank"]), alpha=float(row["alpha"]), target_modules=json.loads(row["target_modules"]),
                   n_params=int(row["n_params"]), created=float(row["created"]), use_count=int(row["use_count"]),
                   blob=row["blob"], has_key=bool(row["has_key"]), meta=json.loads(row["meta"]),
                   owner=row["owner"], public=bool(row["public"]),
                   kind=row["kind"] if "kind" in row.keys() else "lora")  # noqa: SIM118 (Row: in = values)


def check_name(name: object, what: str = "adapter name") -> str:
    """A valid name: 1-100 of ``A-Z a-z 0-9 . _ -``, not starting with ``-``, not only dots, not shaped like an id."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name) or set(name) == {"."}:
        raise InvalidAdapter(f"invalid {what} {short(repr(name))}; expected 1-100 characters from A-Z a-z 0-9 . _ - "
                             "(not starting with '-', and not only dots)")
    if what == "adapter name" and ID_RE.fullmatch(name):
        raise InvalidAdapter(f"invalid adapter name {name!r}: 16 hex digits look like an adapter id; "
                             "expected a name with at least one other character")
    return name


def check_tags(tags: Iterable[str] | str | None, what: str) -> list[str]:
    """Tags as a de-duplicated list of non-empty stripped strings (a lone string is one tag)."""
    if tags is None:
        return []
    if isinstance(tags, str):
        tags = [tags]
    out: list[str] = []
    for t in tags:
        if not isinstance(t, str) or not t.strip():
            raise InvalidAdapter(f"{what} holds {short(repr(t))}; expected non-empty strings")
        t = t.strip()
        if t not in out:
            out.append(t)
    return out


def check_texts(texts: Iterable[str] | str | None) -> list[str]:
    """Example texts as a list of non-blank strings (a lone string is one text)."""
    if texts is None:
        return []
    if isinstance(texts, str):
        texts = [texts]
    out = []
    for t in texts:
        if not isinstance(t, str):
            raise InvalidAdapter(f"example {short(repr(t))} is a {type(t).__name__}; expected a string")
        if t.strip():
            out.append(t)
    return out


def dump_json(value: Any, what: str) -> str:
    """Strict JSON (no NaN); raise LibraryError naming ``what`` when it can't be stored."""
    try:
        return json.dumps(value, allow_nan=False, sort_keys=True)
    except (TypeError, ValueError) as e:
        raise LibraryError(f"{what} is not JSON-serialisable ({e}); expected plain dicts, lists, strings and numbers") from e


def check_meta(meta: dict[str, Any] | None) -> str:
    if meta is None:
        return "{}"
    if not isinstance(meta, dict):
        raise LibraryError(f"meta is a {type(meta).__name__}; expected a dict")
    return dump_json(meta, "meta")


def check_key(vec: object) -> np.ndarray:
    """A routing key as little-endian float32: non-empty, 1-D, finite."""
    v = np.asarray(vec)
    if v.ndim != 1 or v.size == 0 or not (np.issubdtype(v.dtype, np.floating) or np.issubdtype(v.dtype, np.integer)):
        raise LibraryError(f"routing key has shape {v.shape} and dtype {v.dtype}; expected a non-empty 1-D "
                           "float32 vector")
    v = v.astype("<f4")
    if not np.isfinite(v).all():
        raise LibraryError("routing key holds NaN or infinite values; expected finite numbers")
    return v


def stack_keys(rows: Sequence[sqlite3.Row]) -> tuple[list[str], np.ndarray]:
    """(ids, (n, d) float32 matrix) from key rows; all rows must have one size."""
    if not rows:
        return [], np.zeros((0, 0), dtype=np.float32)
    dims = sorted({int(r["dim"]) for r in rows})
    if len(dims) > 1:
        raise LibraryError(f"routing keys have different sizes {dims}; expected one size (recompute the keys "
                           "with one encoder)")
    mat = np.frombuffer(b"".join(r["vec"] for r in rows), dtype="<f4").reshape(len(rows), dims[0])
    return [r["adapter_id"] for r in rows], mat.astype(np.float32)
