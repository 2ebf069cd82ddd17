"""A run folder belongs to one run: rank 0 creates it, locks it, and refuses a checkpoint of
another run unless told to continue it (``--resume``, only with the same data-shaping config) or
to replace it (``--overwrite``, the old one kept until the new one is complete)."""

from pathlib import Path
from typing import Callable, Optional, TypeVar, Union

import torch.distributed as dist

from torchrec_multihash.app.config import Config, ConfigError
from torchrec_multihash.app.provenance import Record, differences
from torchrec_multihash.app.run_lock import RunLock
from torchrec_multihash.distributed.checkpoint import find_checkpoint
from torchrec_multihash.distributed.checkpoint_files import read_manifest
from torchrec_multihash.errors import MultiHashError

T = TypeVar("T")


def on_rank0(fn: Callable[[], T]) -> Optional[T]:
    """``fn()`` on rank 0 (None elsewhere); its MultiHashError is raised on every rank."""
    error, result = None, None
    if dist.get_rank() == 0:
        try:
            result = fn()
        except MultiHashError as e:
            error = e
    box = [str(error) if error is not None else None]
    dist.broadcast_object_list(box, src=0)
    if error is not None:
        raise error
    if box[0] is not None:
        raise ConfigError(box[0])
    return result


def make_folder(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"train.output_dir {out} is a file, not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"train.output_dir {out} cannot be created: {e.strerror}") from None


def check_resumable(path: Path, record: Record) -> None:
    """Refuses to continue a checkpoint whose data-shaping config differs (its data position
    would mean other samples), naming the key."""
    manifest = read_manifest(path)
    if manifest is None or not manifest["meta"].get("run"):
        return  # written before checkpoints recorded their run: the table shapes are still checked
    changed = differences(manifest["meta"]["run"], record)
    if changed:
        raise ConfigError(
            f"--resume: the checkpoint in {path} was written by a run with other settings ({'; '.join(changed[:3])}); "
            "resume with the same ones, or start over with --overwrite or another train.output_dir"
        )


def check_owner(cfg: Config, record: Record, resume: Union[bool, str], overwrite: bool) -> None:
    """What the folder's checkpoint allows: continuing it (``resume``), replacing it, or nothing."""
    path = Path(cfg.train.output_dir) / "checkpoint"
    if overwrite:
        return
    found = find_checkpoint(path)
    if found is None:
        if resume is True:
            raise ConfigError(f"--resume: no checkpoint in {path} (set train.checkpoint_every to write one)")
        return
    if resume:
        return check_resumable(found, record)
    raise ConfigError(
        f"train.output_dir {cfg.train.output_dir} holds the checkpoint of another run: continue it with --resume, "
        "replace it with --overwrite (kept until the new run saves), or use another train.output_dir"
    )


def claim_folder(cfg: Config, record: Record, resume: Union[bool, str], overwrite: bool) -> Optional[RunLock]:
    """Rank 0 creates and locks ``train.output_dir`` and checks its checkpoint (every rank raises
    the error); returns rank 0's lock, None on the other ranks."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: give one")

    def claim() -> RunLock:
        out = Path(cfg.train.output_dir)
        make_folder(out)
        lock = RunLock.acquire(out)
        try:
            check_owner(cfg, record, resume, overwrite)
        except MultiHashError:
            lock.release()
            raise
        return lock

    return on_rank0(claim)
