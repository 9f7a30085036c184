"""Where the serving layer gets the scheduler from (the real one once it is on main)."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from loramix.serve._standin import (
        FinishEvent,
        GenRequest,
        Overloaded,
        SamplingParams,
        Scheduler,
        SchedulerConfig,
        TokenEvent,
    )
else:
    try:  # the continuous-batching scheduler, once merged
        from loramix.errors import Overloaded
        from loramix.serve.scheduler import (
            FinishEvent,
            GenRequest,
            SamplingParams,
            Scheduler,
            SchedulerConfig,
            TokenEvent,
        )
    except ImportError:  # the serial stand-in until then
        from loramix.serve._standin import (
            FinishEvent,
            GenRequest,
            Overloaded,
            SamplingParams,
            Scheduler,
            SchedulerConfig,
            TokenEvent,
        )

__all__ = ["FinishEvent", "GenRequest", "Overloaded", "SamplingParams", "Scheduler", "SchedulerConfig", "TokenEvent"]
