"""What stops a training loop between steps: a NaN or inf loss (an error naming the first such
step, before anything of it is checkpointed), SIGTERM or Ctrl-C (SIGINT): a checkpoint, then a
clean exit (a second Ctrl-C stops at once, without one), and a time-based checkpoint falling due.

The loss is checked on the device with no host sync per step; the ranks agree on all three every
``CHECK_EVERY`` steps and at the end of each segment (one small all-reduce), so they stop together and checkpoint together.
"""

import signal
import threading
import time
from typing import Any, Optional

import torch
import torch.distributed as dist

from torchrec_multihash.errors import MultiHashError

CHECK_EVERY = 10
_NONE = 2**62


class NonFiniteLoss(MultiHashError, ArithmeticError):
    """The training loss became NaN or inf: the run stops, nothing after its last checkpoint is saved."""


class Preempted(Exception):
    """SIGTERM or Ctrl-C stopped the run after saving a checkpoint (``--resume auto`` continues it);
    ``exit_code``: 128 + the signal's number, what a shell or scheduler expects."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code


class StepGuard:
    def __init__(self, checkpoint_every_s: float = 0.0) -> None:
        self.first_bad: Optional[torch.Tensor] = None  # on the device: the first step with a non-finite loss
        self.terminated = False  # SIGTERM or SIGINT received (by this rank)
        self.signal: signal.Signals = signal.SIGTERM  # which
        self.stop = False  # all ranks agreed to stop for it
        self.checkpoint_every_s = checkpoint_every_s  # a checkpoint at least this often (0: no time-based ones)
        self.last_checkpoint = time.monotonic()
        self.checkpoint_due = False  # all ranks agreed that a time-based checkpoint is due

    def note(self, loss: torch.Tensor, step: int) -> None:
        """Records ``step`` if its loss is not finite and none before was (no host sync)."""
        bad = ~torch.isfinite(loss.detach()).all()
        if self.first_bad is None:
            self.first_bad = torch.full((), _NONE, dtype=torch.int64, device=loss.device)
        self.first_bad = torch.where(bad & (self.first_bad == _NONE), step, self.first_bad)

    def due(self, step: int) -> bool:
        """Whether to agree now: every CHECK_EVERY steps, every step on one rank after a stop signal."""
        return step % CHECK_EVERY == 0 or (self.terminated and dist.get_world_size() == 1)

    def check(self, device: torch.device) -> bool:
        """All ranks agree (a collective): raises NonFiniteLoss, or returns True to stop for a signal;
        sets ``checkpoint_due`` when a time-based checkpoint is due (saved where the segment ends)."""
        bad = self.first_bad if self.first_bad is not None else torch.full((), _NONE, dtype=torch.int64, device=device)
        late = bool(self.checkpoint_every_s) and time.monotonic() - self.last_checkpoint >= self.checkpoint_every_s
        flags = torch.stack([bad.to(device), torch.tensor(-int(self.terminated), device=device), torch.tensor(-int(late), device=device)])
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
        step, terminated, due = flags.tolist()
        if step != _NONE:
            raise NonFiniteLoss(
                f"the training loss is NaN or inf at step {step}: the run stops, and nothing after its last checkpoint is saved; "
                "lower train.embedding_lr or train.dense_lr, or check the data"
            )
        self.stop = terminated < 0
        self.checkpoint_due = due < 0
        return self.stop

    def checkpointed(self) -> None:
        """A checkpoint was just saved: the time-based interval starts again."""
        self.last_checkpoint = time.monotonic()
        self.checkpoint_due = False

    def on_signal(self, signum: int, *_: Any) -> None:
        if signum == signal.SIGINT and self.terminated and self.signal == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: the user won't wait for the checkpoint
        self.terminated = True
        self.signal = signal.Signals(signum)

    def install(self) -> Any:
        """Catches SIGTERM and SIGINT (main thread only); returns the previous handlers for ``uninstall``."""
        if threading.current_thread() is not threading.main_thread():
            return None
        return signal.signal(signal.SIGTERM, self.on_signal), signal.signal(signal.SIGINT, self.on_signal)

    @staticmethod
    def uninstall(previous: Any) -> None:
        if previous is not None:
            signal.signal(signal.SIGTERM, previous[0])
            signal.signal(signal.SIGINT, previous[1])
