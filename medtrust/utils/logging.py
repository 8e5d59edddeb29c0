"""Rank-zero aware logging (only rank 0 prints under DDP)."""
from __future__ import annotations

import logging

from lightning.pytorch.utilities import rank_zero_only


class RankedLogger(logging.LoggerAdapter):
    """A logger that emits on global rank 0 only unless ``rank_zero_only=False``.

    Args:
        name: logger name, usually ``__name__``.
        rank_zero_only: drop messages from ranks other than 0.
    """

    def __init__(self, name: str = __name__, rank_zero_only: bool = True) -> None:
        super().__init__(logging.getLogger(name), extra={})
        self.rank_zero_only = rank_zero_only

    def log(self, level: int, msg: object, *args, **kwargs) -> None:  # type: ignore[override]
        if not self.isEnabledFor(level):
            return
        rank = getattr(rank_zero_only, "rank", 0)
        if self.rank_zero_only and rank != 0:
            return
        msg, kwargs = self.process(msg, kwargs)
        self.logger.log(level, msg, *args, **kwargs)


def get_logger(name: str) -> RankedLogger:
    """Return a rank-zero logger named ``name``."""
    return RankedLogger(name)
