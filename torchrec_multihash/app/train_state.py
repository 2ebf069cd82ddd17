"""Where a training run is (``TrainState``), saved with the model and optimizer in the run's
checkpoint, and where a new or resumed run starts."""

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Dict, Mapping, Union

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.optim.keyed import CombinedOptimizer

from torchrec_multihash.app.config import Config, ConfigError
from torchrec_multihash.distributed.checkpoint import CheckpointError, find_checkpoint, load_checkpoint, load_entries, save_checkpoint


@dataclass
class TrainState:
    """Where a run is: what a checkpoint saves and a resumed run continues from."""

    epoch: int = 0
    step: int = 0
    batches_in_epoch: int = 0  # batches of each rank done in ``epoch`` (the data position is per rank)
    samples: int = 0  # over all ranks
    seed: int = 0  # train.seed of the run that started it
    world_size: int = 1

    def state_dict(self) -> Dict[str, torch.Tensor]:
        """One int64 tensor per field: what DCP saves, and loads (weights-only) in place."""
        return {f.name: torch.tensor(getattr(self, f.name), dtype=torch.int64) for f in fields(self)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, torch.Tensor]) -> "TrainState":
        """The state a ``state_dict()`` (e.g. loaded from a checkpoint) holds."""
        return cls(**{name: int(value) for name, value in state.items()})


def checkpoint_dir(cfg: Config) -> Path:
    """Where a run keeps its checkpoint (the latest only)."""
    return Path(cfg.train.output_dir) / "checkpoint"


def save_train_checkpoint(cfg: Config, dmp: DistributedModelParallel, opt: CombinedOptimizer, state: TrainState, meta: Dict[str, Any]) -> None:
    """The model, the optimizer state and ``state`` into ``output_dir/checkpoint``, with ``meta`` in
    its manifest: ``run`` (what the data position depends on: see ``provenance.run_record``),
    ``run_id`` (the run that wrote it: ``run_folder``) and ``vocabulary`` (what the ids' vocabulary
    was made from, if any); every rank calls it."""
    extra = {"optimizer": opt.state_dict(), "train_state": state.state_dict()}
    save_checkpoint(checkpoint_dir(cfg), dmp, extra, meta=meta)


def load_train_checkpoint(path: Path, dmp: DistributedModelParallel, opt: CombinedOptimizer) -> TrainState:
    """Loads the model and optimizer state saved in ``path`` (in place) and returns its
    ``TrainState``; ``ConfigError`` if this job cannot continue it (another config, world size)."""
    world = dist.get_world_size()
    entries = {"train_state": TrainState().state_dict()}
    opt.init_state()
    extra = {"optimizer": opt.state_dict()}
    try:
        load_entries(path, entries)  # checks every file's checksum
        state = TrainState.from_state_dict(entries["train_state"])
        if state.world_size != world:  # the data position and the plan (so the optimizer state) depend on it
            raise ConfigError(
                f"--resume: the checkpoint in {path} was written by {state.world_size} ranks, this job "
                f"has {world}; resume on {state.world_size} (the data position is per rank)"
            )
        load_checkpoint(path, dmp, extra, verify=False)
    except CheckpointError as e:
        raise ConfigError(f"--resume: {e}") from None
    opt.load_state_dict(extra["optimizer"])
    return state


def start_state(cfg: Config, dmp: DistributedModelParallel, opt: CombinedOptimizer, resume: Union[bool, str]) -> TrainState:
    """Where the run starts: the checkpoint's state when resuming (``resume`` True: there must be
    one; ``"auto"``: if there is one), else the beginning."""
    path = checkpoint_dir(cfg)
    found = find_checkpoint(path) if resume else None  # (run_folder.check_owner refused --resume without one)
    restart = int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
    if found is not None:
        state = load_train_checkpoint(path, dmp, opt)
        note = f"Resumed from {path}: epoch {state.epoch}, step {state.step}{f' (restart {restart})' if restart else ''}"
    else:
        state = TrainState(seed=cfg.train.seed, world_size=dist.get_world_size())
        note = (
            f"--resume auto: no checkpoint in {path} yet, starting from scratch"
            if resume
            else f"Restart {restart}: starting from scratch (--resume auto would continue from the last checkpoint)"
            if restart
            else ""
        )
    if note and dist.get_rank() == 0:
        print(note, flush=True)
    return state
