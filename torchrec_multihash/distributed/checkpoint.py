"""Distributed checkpoints of models holding multi-hash tables, with torch.distributed.checkpoint.

Each rank writes only its own shards; loading reshards to whatever plan (or no plan) the loading
model has: save from 2 ranks table-wise, load on 1 rank unsharded or on 8 ranks row-wise.

Loading unpickles nothing but DCP's own index classes: stock DCP reads the ``.metadata`` index with
``pickle.load`` and non-tensor entries with ``torch.load(weights_only=False)``, so a crafted checkpoint
could run code. Here the index goes through an allow-list unpickler and non-tensor entries through
``torch.load(weights_only=True)``; tensors are read by DCP with ``weights_only=True`` already.
"""

import io
import os
import pickle
import re
import shutil
import uuid
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Set, Tuple, Union

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta, TensorStorageMetadata

from torchrec_multihash.distributed.checkpoint_files import CheckpointError, check_storage, verify_checksums, write_manifest
from torchrec_multihash.modules.strategies import STACKED_SUFFIX

__all__ = ["CheckpointError", "find_checkpoint", "load_checkpoint", "load_entries", "read_index", "save_checkpoint"]


# everything a DCP ``.metadata`` index refers to (torch 2.13); anything else is refused unexecuted
_INDEX_GLOBALS = {
    *(
        ("torch.distributed.checkpoint.metadata", n)
        for n in (
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    ),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),  # _get_layout: a lookup by name
    ("pathlib", "PosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PurePosixPath"),
    *(("torch", n) for n, v in vars(torch).items() if isinstance(v, torch.dtype)),
}


class _IndexUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _INDEX_GLOBALS:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}")
        return super().find_class(module, name)


def read_index(path: Union[str, os.PathLike]) -> Metadata:
    """The ``.metadata`` index of the DCP checkpoint in folder ``path``, unpickled with only DCP's
    metadata classes allowed (``CheckpointError`` for anything else)."""
    try:
        with open(Path(path) / ".metadata", "rb") as f:
            md = _IndexUnpickler(f).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as e:
        raise CheckpointError(f"{path}/.metadata is not a safe DCP checkpoint index: {e}") from None
    if not isinstance(md, Metadata):
        raise CheckpointError(f"{path}/.metadata is not a DCP checkpoint index (holds a {type(md).__name__})")
    return md


class _SafeReader(FileSystemReader):
    """DCP's file reader, with the index read by ``read_index``."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        md = read_index(self.path)
        check_storage(Path(self.path), md)
        md.storage_meta = md.storage_meta or StorageMeta()
        md.storage_meta.load_id = self.load_id
        return md


class _WeightsOnlyPlanner(DefaultLoadPlanner):
    """DCP's load planner, reading non-tensor entries (an optimizer's ``lr``, ...) with
    ``torch.load(weights_only=True)``: plain data and tensors only."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, weights_only=True)
        except pickle.UnpicklingError as e:
            msg = str(e).strip().splitlines()[0]
            raise CheckpointError(f"checkpoint entry {read_item.dest_index.fqn} is not plain data: {msg}") from None
        safe = io.BytesIO()  # DCP's own load_bytes unpickles what we hand it: hand it our re-save
        torch.save(obj, safe)
        safe.seek(0)
        super().load_bytes(read_item, safe)


def _tensors(state: Dict[str, Any], prefix: str = "") -> Iterator[Tuple[str, torch.Tensor]]:
    """(DCP key, tensor) for the tensors of nested dicts (ShardedTensor/DTensor: global size)."""
    for k, v in state.items():
        if isinstance(v, dict):
            yield from _tensors(v, f"{prefix}{k}.")
        elif isinstance(v, torch.Tensor):
            yield f"{prefix}{k}", v


def _table(key: str) -> Optional[str]:
    m = re.search(r"\.(?:embeddings|embedding_bags)\.([^.]+)\.weight", key)
    return m.group(1) if m else None


def _describe(key: str) -> str:
    """``table t_C1__r``, ``momentum1 of table t_C1__r`` (optimizer state), or the key itself."""
    table = _table(key)
    if table is None:
        return key
    return f"table {table}" if key.endswith(".weight") else f"{key.rsplit('.', 1)[-1]} of table {table}"


def _group_of(key: str) -> str:
    return "looked up per id (mult)" if ".per_id." in key else "looked up pooled"


def _check_fits(path: Path, md: Metadata, state: Dict[str, Any]) -> None:
    """Refuses a checkpoint of another config: tables missing, or of other shapes."""
    saved = md.state_dict_metadata
    saved_at = {(_table(k), k.rsplit(".", 1)[-1]): k for k in saved if _table(k)}
    missing: List[str] = []
    missing_state = 0  # of them, optimizer state
    wrong: List[str] = []
    for key, t in _tensors(state):
        what = _describe(key)
        entry = saved.get(key)
        moved = saved_at.get((_table(key), key.rsplit(".", 1)[-1])) if entry is None else None
        if moved is not None:  # the same table, looked up another way (pooled vs per id: another operation, strategy or max_ids_per_bag)
            wrong.append(f"{what} is {_group_of(moved)} in the checkpoint, {_group_of(key)} in this model")
        elif entry is None:
            missing.append(what)
            missing_state += key.startswith("optimizer.")
        elif not isinstance(entry, TensorStorageMetadata):
            wrong.append(f"{what} is not a tensor in the checkpoint")
        elif tuple(entry.size) != tuple(t.size()):
            wrong.append(f"{what} has shape {list(entry.size)} in the checkpoint, {list(t.size())} in this model")
    if not (missing or wrong):
        return
    saved_tables = {n for n in map(_table, saved) if n}
    for key, _ in _tensors(state):
        hint = _stacking_hint(_table(key), saved_tables) if key not in saved else None
        if hint is not None:
            raise CheckpointError(f"checkpoint {path} was written for another configuration: {hint}")
    problems = wrong[:3] + ([f"{len(wrong) - 3} more of other shapes"] if len(wrong) > 3 else [])
    if missing:
        have = sorted({n for n in map(_table, saved) if n})
        problems.append(
            f"not in the checkpoint: {', '.join(missing[:4])}{' ...' if len(missing) > 4 else ''} "
            f"(its tables: {', '.join(have[:8])}{' ...' if len(have) > 8 else ''})"
        )
        if not wrong and missing_state == len(missing):  # the tables are there, their optimizer state is not
            problems.append("the optimizer differs (its state has other names): was train.dense_optimizer, or a table's sharding, changed?")
    raise CheckpointError(f"checkpoint {path} was written for another configuration: " + "; ".join(problems))


def _stacking_hint(table: Optional[str], saved_tables: Set[str]) -> Optional[str]:
    """What to say when ``table`` (of the model) is missing from a checkpoint that holds the same
    logical table stacked (``stack_parts``) where the model's is not, or the other way round."""
    if table is None:
        return None
    if table.endswith(STACKED_SUFFIX):
        logical = table[: -len(STACKED_SUFFIX)]
        if logical in saved_tables:
            return (
                f"table {logical} is stacked in this model ({table}: stack_parts unset or True; an add's parts are stacked by "
                "default) and its parts are separate tables in the checkpoint: stack_parts differs; set stack_parts: false "
                "(embeddings.stack_parts) to load it"
            )
        return None
    logicals = [n[: -len(STACKED_SUFFIX)] for n in saved_tables if n.endswith(STACKED_SUFFIX)]
    # a part's name is its table's, or that and a suffix "__..." (strategies' sub_tables)
    stacked = sorted(n + STACKED_SUFFIX for n in logicals if table == n or table.startswith(n + "__"))
    if stacked:
        return (
            f"table {table} is a part of a table stacked in the checkpoint ({stacked[-1]}) and a separate table in this "
            "model (stack_parts=False): stack_parts differs; build the model with the checkpoint's"
        )
    return None


def _old(path: Path) -> Path:
    return path.parent / f".{path.name}.old"


def find_checkpoint(path: Union[str, os.PathLike]) -> Optional[Path]:
    """The complete checkpoint at ``path``; the previous one if a crash cut ``save_checkpoint``'s
    final swap short; None if there is none. ``CheckpointError`` for a folder of checkpoint files
    without its ``.metadata`` index (deleted or lost: not something to start over silently)."""
    path = Path(path)
    for p in (path, _old(path)):
        if (p / ".metadata").is_file():
            return p
    if path.is_dir() and any(path.iterdir()):
        raise CheckpointError(f"{path} holds checkpoint files but no .metadata index: damaged or incomplete; move it away to start over")
    return None


def _is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def _broadcast_str(value: str) -> str:
    if not _is_dist():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def _remove(path: Path) -> None:
    """Removes a leftover folder, file or symbolic link (rmtree refuses links, which were left behind)."""
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    elif path.is_dir():
        shutil.rmtree(path, ignore_errors=True)


def save_checkpoint(
    path: Union[str, os.PathLike], model: nn.Module, extra: Optional[Dict[str, Any]] = None, meta: Optional[Dict[str, Any]] = None
) -> Path:
    """Saves ``model.state_dict()`` (plus ``extra`` tensors/state dicts, e.g. an optimizer's) to the
    folder ``path``, atomically: all ranks write into a temporary folder that rank 0 renames into
    place once every rank has finished, so a crash mid-save leaves the previous checkpoint intact;
    the next save removes what the crash left. A ``manifest.json`` records each file's SHA-256
    (checked by ``load_checkpoint``) and ``meta`` (JSON data about the run). Call it on every rank."""
    # a symlinked checkpoint folder (e.g. to a bigger disk) stays a link: the save goes where it points
    path = Path(path).resolve() if Path(path).is_symlink() else Path(path)
    if not _is_dist() or dist.get_rank() == 0:  # before the broadcast, so before any rank writes
        if not path.exists() and find_checkpoint(path):
            _old(path).rename(path)  # a crash between the two renames below
        for left in path.parent.glob(f".{path.name}.tmp-*"):  # a crash mid-save
            _remove(left)
    tmp = Path(_broadcast_str(str(path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")))
    state: Dict[str, Any] = {"model": model.state_dict()}
    if extra:
        state.update(extra)
    dcp.save(state, checkpoint_id=str(tmp))
    if _is_dist():
        dist.barrier()
    write_manifest(tmp, meta)
    if not _is_dist() or dist.get_rank() == 0:
        old = path.parent / f".{path.name}.old"
        if path.exists():
            _remove(old)
            path.rename(old)
        tmp.rename(path)
        _remove(old)
    if _is_dist():
        dist.barrier()
    return path


def load_checkpoint(path: Union[str, os.PathLike], model: nn.Module, extra: Optional[Dict[str, Any]] = None, verify: bool = True) -> None:
    """Loads a checkpoint written by ``save_checkpoint`` into ``model`` (sharded by any plan, or
    not sharded) and into the state dicts in ``extra`` (in place), unpickling no arbitrary objects.
    ``CheckpointError`` naming the file if it was written for another config (tables missing or of
    other shapes), or is damaged (a file missing, truncated or not matching its checksum: ``verify``
    reads every file once to check them). Call it on every rank."""
    state: Dict[str, Any] = {"model": model.state_dict()}
    if extra:
        state.update(extra)
    load_entries(path, state, verify)
    model.load_state_dict(state["model"])


def load_entries(path: Union[str, os.PathLike], state: Dict[str, Any], verify: bool = True) -> None:
    """Loads the entries named in ``state`` (tensors, state dicts; in place) from the checkpoint at
    ``path``, e.g. ``{"train_state": {...}}`` alone; ``load_checkpoint`` without the model."""
    found = find_checkpoint(path)
    if found is None:
        raise FileNotFoundError(f"{path} is not a checkpoint written by save_checkpoint (no .metadata)")
    reader = _SafeReader(found)
    _check_fits(Path(path), reader.read_metadata(), state)
    if verify:
        verify_checksums(found)
    try:
        dcp.load(state, storage_reader=reader, planner=_WeightsOnlyPlanner())
    except CheckpointException as e:  # DCP gathers every rank's failure: show ours plainly
        errors = [err for err, _ in e.failures.values()] or [e]
        ours = next((err for err in errors if isinstance(err, CheckpointError)), None)
        raise ours or CheckpointError(f"checkpoint {found} could not be read: {type(errors[0]).__name__}: {errors[0]}") from None
