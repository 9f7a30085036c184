"""Where the serving layer gets the scheduler from (the real one once it is on main)."""

from __future__ import annotations

try:  # pragma: no cover - which branch depends on what is merged
    from loramix.errors import Overloaded  # type: ignore[attr-defined]
    from loramix.serve.scheduler import (  # type: ignore[import-not-found]
        FinishEvent,
        GenRequest,
        SamplingParams,
        Scheduler,
        SchedulerConfig,
        TokenEvent,
    )
except ImportError:  # pragma: no cover
    from loramix.serve._standin import (  # type: ignore[assignment]
        FinishEvent,
        GenRequest,
        Overloaded,
        SamplingParams,
        Scheduler,
        SchedulerConfig,
        TokenEvent,
    )

__all__ = ["FinishEvent", "GenRequest", "Overloaded", "SamplingParams", "Scheduler", "SchedulerConfig", "TokenEvent"]
