"""Scoped quiet for the commands: what torch, TorchRec and fbgemm say that means nothing to their
user (and every rank of a job would print) is filtered for the command's work only, and the
warning filters and logger levels are as they were once it ends."""

import contextlib
import logging
import warnings
from typing import Iterator, Sequence

# torch logs once per process, on the first is_fx_tracing() (TorchRec's modules call it), that it
# covers torch.export too
FX_TRACING_LOGGER = "torch.fx._symbolic_trace"


@contextlib.contextmanager
def loggers_at(level: int, names: Sequence[str]) -> Iterator[None]:
    """The loggers ``names`` (``""``: the root) at ``level`` in the scope, at their own after."""
    loggers = [logging.getLogger(name) for name in names]
    before = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(level)
    try:
        yield
    finally:
        for logger, old in zip(loggers, before):
            logger.setLevel(old)


@contextlib.contextmanager
def quiet_warnings(everything: bool = False) -> Iterator[None]:
    """The libraries' FutureWarnings and fbgemm's per-step CPU kernel warning (``everything``:
    all warnings) ignored in the scope."""
    with warnings.catch_warnings():
        if everything:
            warnings.simplefilter("ignore")
        else:
            warnings.filterwarnings("ignore", category=FutureWarning)
            # fbgemm's CPU dense kernel (data-parallel tables) warns on every backward; its
            # gradients are checked against the unsharded module in tests/distributed/test_sharded.py
            warnings.filterwarnings("ignore", message=".*autograd kernel was not registered.*")
        yield


@contextlib.contextmanager
def quiet(all_warnings: bool = False) -> Iterator[None]:
    """``quiet_warnings`` and log records below ERROR (TorchRec's planner notes meant for live
    jobs: estimates, replicated tables) dropped in the scope."""
    with quiet_warnings(all_warnings), loggers_at(logging.ERROR, ["", FX_TRACING_LOGGER]):
        yield
