"""Named fault points for crash tests: ``fault("remove.after_row_delete")`` does nothing unless armed.

Every multi-step write in the store (and the engine's add / merge / key steps) calls :func:`fault`
between its steps. A test arms a point to raise :class:`InjectedFault` in-process with :func:`arm`,
or, in a subprocess, sets ``LORAMIX_FAULT=<point>`` (``<point>:exit`` kills the process with
``os._exit(137)``, as close to ``kill -9`` as Python gets) and then checks what the library holds.
The environment is read when a point is reached, never at import.
"""

from __future__ import annotations

import os

__all__ = ["POINTS", "InjectedFault", "arm", "disarm", "fault"]

ENV = "LORAMIX_FAULT"

# every point the code calls, in the order the steps run
POINTS = (
    "add.after_temp_write",  # blob bytes fsynced in blobs/tmp, nothing placed
    "add.after_place",  # blob in place, adapter rows not inserted (inside the write transaction)
    "add.before_commit",  # rows inserted, not committed
    "add.after_commit",  # adapter committed (the engine then computes its routing key)
    "key.before_commit",  # routing keys written, not committed
    "merge.before_add",  # merged weights computed, nothing written
    "remove.after_row_delete",  # row deleted, not committed
    "remove.after_commit",  # row deletion committed, blob still on disk
    "remove.after_blob_delete",  # unreferenced blob deleted (inside the second transaction)
    "gc.after_blob_delete",  # one orphan blob deleted
)

_armed: dict[str, str] = {}


class InjectedFault(RuntimeError):
    """Raised by an armed fault point (action ``raise``)."""


def arm(point: str, action: str = "raise") -> None:
    """Arm ``point`` in this process: ``raise`` (InjectedFault) or ``exit`` (os._exit(137))."""
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; expected one of {', '.join(POINTS)}")
    if action not in ("raise", "exit"):
        raise ValueError(f"unknown fault action {action!r}; expected 'raise' or 'exit'")
    _armed[point] = action


def disarm(point: str | None = None) -> None:
    """Disarm one point, or all of them."""
    if point is None:
        _armed.clear()
    else:
        _armed.pop(point, None)


def fault(point: str) -> None:
    """Fire ``point`` if it is armed here or named in ``$LORAMIX_FAULT``; otherwise do nothing."""
    action = _armed.get(point)
    if action is None:
        spec = os.environ.get(ENV)
        if not spec:
            return
        name, _, how = spec.partition(":")
        if name != point:
            return
        action = how or "raise"
    if action == "exit":
        os._exit(137)
    raise InjectedFault(f"injected fault at {point}")
