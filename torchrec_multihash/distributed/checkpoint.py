"""Distributed checkpoints of models holding multi-hash tables, with torch.distributed.checkpoint.

Each rank writes only its own shards; loading reshards to whatever plan (or no plan) the loading
model has: save from 2 ranks table-wise, load on 1 rank unsharded or on 8 ranks row-wise.
"""

import os
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, Optional, Union

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast_str(value: str) -> str:
    if not _is_dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def save_checkpoint(
    path: Union[str, os.PathLike], model: nn.Module, extra: Optional[Dict[str, Any]] = None
) -> Path:
    """Saves ``model.state_dict()`` (plus ``extra`` tensors/state dicts, e.g. an optimizer's) to the
    folder ``path``, atomically: all ranks write into a temporary folder that rank 0 renames into
    place once every rank has finished, so a crash mid-save leaves the previous checkpoint intact.
    Call it on every rank."""
    path = Path(path)
    tmp = Path(_broadcast_str(str(path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")))
    state: Dict[str, Any] = {"model": model.state_dict()}
    if extra:
        state.update(extra)
    dcp.save(state, checkpoint_id=str(tmp))
    if _is_dist():
        dist.barrier()
    if not _is_dist() or dist.get_rank() == 0:
        old = path.parent / f".{path.name}.old"
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)
            path.rename(old)
        tmp.rename(path)
        shutil.rmtree(old, ignore_errors=True)
    if _is_dist():
        dist.barrier()
    return path


def load_checkpoint(
    path: Union[str, os.PathLike], model: nn.Module, extra: Optional[Dict[str, Any]] = None
) -> None:
    """Loads a checkpoint written by ``save_checkpoint`` into ``model`` (sharded by any plan, or
    not sharded) and into the state dicts in ``extra`` (in place). Call it on every rank."""
    path = Path(path)
    if not (path / ".metadata").is_file():
        raise FileNotFoundError(f"{path} is not a checkpoint written by save_checkpoint (no .metadata)")
    state: Dict[str, Any] = {"model": model.state_dict()}
    if extra:
        state.update(extra)
    dcp.load(state, checkpoint_id=str(path))
    model.load_state_dict(state["model"])
