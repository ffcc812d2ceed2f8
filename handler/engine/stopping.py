"""Why a generation ends, and the one place that decides it (after TGI's `StoppingCriteria`).

The device decides what it can see without the host: an end-of-text token and
`max_new_tokens` (`handler.engine.step.commit`). The host decides the rest each
time it looks at the tokens (`StoppingCriteria.reason_to_stop`): a stop string in the
text, the request's deadline. The scheduler adds the outcomes that come from
outside the request: cancelled (the client went away) and error.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass

from handler.engine.text import IncrementalText


class FinishReason(str, enum.Enum):
    """How a generation ended; the value is what responses carry."""

    EOS = "eos"  # an end-of-text token (kept in the tokens, not in the text)
    LENGTH = "length"  # max_new_tokens
    STOP = "stop"  # a stop string (cut off with what follows)
    TIMEOUT = "timeout"  # the request's deadline passed; what was generated is kept
    CANCELLED = "cancelled"  # the client went away
    ERROR = "error"  # generation failed; the error says why

    def __str__(self) -> str:
        return self.value


@dataclass
class StoppingCriteria:
    """The host-side checks of one request: its stop strings (through its text) and its deadline."""

    text: IncrementalText
    deadline: float | None = None  # time.monotonic() after which the request ends as TIMEOUT

    def reason_to_stop(self, new_tokens: list[int], device_reason: FinishReason | None,
              now: float | None = None) -> tuple[FinishReason | None, int | None]:
        """Add the tokens the device produced since the last look.

        Returns (reason, keep): the reason the request ends now (None: it goes
        on), and for STOP how many tokens it keeps. A stop string takes
        precedence over the device's reason: the text ends where the stop
        string begins, even if an end-of-text token followed it in the same look.
        """
        keep = self.text.add(new_tokens)
        if keep is not None:
            return FinishReason.STOP, keep
        if device_reason is not None:
            return device_reason, None
        if self.deadline is not None and (time.monotonic() if now is None else now) > self.deadline:
            return FinishReason.TIMEOUT, None
        return None, None
