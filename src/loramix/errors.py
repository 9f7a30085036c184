"""The exception tree of loramix.

Every error loramix raises on purpose derives from :class:`LoramixError`, so callers can catch
one type. The tree::

    LoramixError
    ├── ConfigError            bad option or environment value (unknown strategy, bad temperature, ...)
    ├── BaseModelError         the base model can't be found, loaded or converted
    ├── LibraryError           the adapter library (registry + blobs)
    │   ├── AdapterNotFound    no adapter with that name or id
    │   ├── AdapterExists      the name is already taken
    │   └── InvalidAdapter     an import was rejected (pickle weights, shape mismatch, NaN, too big, ...)
    ├── RoutingError           the router can't answer (empty library, no key, bad filter)
    ├── MixError               the mixer can't apply a mixture (too many adapters for the slots, ...)
    ├── TrainingError          training data or a training run is unusable
    ├── DocumentError          document collections (bad source, bad name, ...)
    │   └── CollectionNotFound no collection with that name
    ├── MergeError             adapters can't be merged (different targets for a method that needs equal ones, ...)
    ├── Overloaded             the server's queue is full or it is stopping; a retry later makes sense
    ├── Unauthorized           no API key, or an unknown one (HTTP 401)
    └── AccessDenied           the caller may not do this (admin-only action, another's adapter) (HTTP 403)

Messages name the problem and what was expected, e.g.
``InvalidAdapter: layer model.layers.0.self_attn.q_proj: lora_A has shape (8, 512), expected (8, 576)``.
"""

from __future__ import annotations


def short(s: str, n: int = 80) -> str:
    """``s`` cut to about ``n`` characters (saying how many were cut): for echoing user input in messages."""
    return s if len(s) <= n else f"{s[:n - 20]}...({len(s) - n + 20} more characters)"


def one_line(e: BaseException | str, n: int = 200) -> str:
    """A message on one line (whitespace runs collapsed), cut to about ``n`` characters."""
    return short(" ".join(str(e).split()), n)


class LoramixError(Exception):
    """Base class of every error loramix raises on purpose."""


class ConfigError(LoramixError, ValueError):
    """An option or environment value is invalid."""


class BaseModelError(LoramixError):
    """The base model can't be found, loaded or converted."""


class LibraryError(LoramixError):
    """A problem with the adapter library."""


class AdapterNotFound(LibraryError, KeyError):
    """No adapter has that name or id."""

    def __str__(self) -> str:  # KeyError quotes its message; we don't want that
        return str(self.args[0]) if self.args else "adapter not found"


class AdapterExists(LibraryError):
    """The adapter name is already taken."""


class InvalidAdapter(LibraryError, ValueError):
    """An adapter was rejected on import."""


class RoutingError(LoramixError):
    """The router can't answer the query."""


class MixError(LoramixError):
    """The mixer can't apply the requested mixture."""


class TrainingError(LoramixError):
    """Training data or a training run is unusable."""


class DocumentError(LoramixError):
    """A problem with document collections."""


class CollectionNotFound(DocumentError, KeyError):
    """No collection has that name."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "collection not found"


class MergeError(LoramixError):
    """Adapters can't be merged with the requested method."""


class Overloaded(LoramixError):
    """The server is at capacity (its queue is full, or it is shutting down); retrying later makes sense."""


class Unauthorized(LoramixError):
    """The request carries no API key, or one the server does not know (HTTP 401)."""


class AccessDenied(LoramixError, PermissionError):
    """The caller is known but may not do this: an admin-only action, deleting a shared adapter (HTTP 403)."""
