"""Callbacks the training loop calls after every step: the progress report, the restart tests' fault."""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Callable, Optional, Protocol

import torch
import torch.distributed as dist
from tqdm import tqdm

from torchrec_multihash.app.train_state import TrainState

REPORT_EVERY = 50  # steps between progress reports (bar postfix, or a log line off a terminal)


class TrainRun(Protocol):
    """What a step callback sees of the training run (``app.train.TrainRun``)."""

    state: TrainState

    def samples_per_s(self) -> float: ...


StepCallback = Callable[[TrainRun, torch.Tensor], None]  # (the run, the step's loss)


class ProgressReport:
    """A step callback: rank 0's progress bar (on a terminal) and, every ``REPORT_EVERY`` steps,
    the loss and speed (in the bar, or as a log line off a terminal)."""

    def __init__(self) -> None:
        self.shown = dist.get_rank() == 0
        self.bar = tqdm(desc="train", unit="step", disable=not self.shown or not sys.stderr.isatty(), dynamic_ncols=True)

    def __call__(self, run: TrainRun, loss: torch.Tensor) -> None:
        if not self.shown:
            return
        self.bar.update(1)
        state = run.state
        if state.step % REPORT_EVERY:
            return
        # reading the loss syncs with the device: only when it is shown
        rate = run.samples_per_s()
        self.bar.set_postfix(epoch=state.epoch, loss=f"{loss.item():.4f}", samples_per_s=f"{rate:,.0f}")
        if not sys.stderr.isatty():
            print(f"step {state.step} epoch {state.epoch} loss {loss.item():.4f} samples/s {rate:,.0f}", flush=True)

    def close(self) -> None:
        self.bar.close()


@dataclass
class FaultAtStep:
    """A step callback for restart tests: rank ``rank`` dies right after step ``step``, on the
    job's first attempt only (torchrun's TORCHELASTIC_RESTART_COUNT and Slurm's SLURM_RESTART_COUNT,
    which a requeued job has, both 0)."""

    step: int
    rank: int = 0

    @classmethod
    def from_env(cls) -> Optional["FaultAtStep"]:
        """``MULTIHASH_FAULT_AT_STEP=M`` (and ``MULTIHASH_FAULT_RANK``, default 0); None without."""
        at = os.environ.get("MULTIHASH_FAULT_AT_STEP")
        return cls(int(at), int(os.environ.get("MULTIHASH_FAULT_RANK", "0"))) if at else None

    def __call__(self, run: TrainRun, loss: torch.Tensor) -> None:
        rank = dist.get_rank()
        first = all(os.environ.get(k, "0") == "0" for k in ("TORCHELASTIC_RESTART_COUNT", "SLURM_RESTART_COUNT"))
        if run.state.step == self.step and rank == self.rank and first:
            print(f"MULTIHASH_FAULT_AT_STEP: rank {rank} exits after step {self.step}", file=sys.stderr, flush=True)
            os._exit(1)
