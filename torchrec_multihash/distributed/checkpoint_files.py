"""The files of a checkpoint folder: a manifest written at save (each file's size and SHA-256, and
what the saver records about the run) and the checks loading makes before DCP reads anything: the
index points only at files inside the folder, they exist and are long enough, and their checksums
match (DCP itself has none: flipped bits would load silently)."""

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Dict, List, Optional

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata

from torchrec_multihash.errors import MultiHashError

MANIFEST = "manifest.json"


class CheckpointError(MultiHashError, ValueError):
    """A checkpoint that this model cannot load: written for another config, damaged, or not a safe checkpoint."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def _share(names: List[str]) -> List[str]:
    """This rank's share of ``names`` (all of them without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return names
    return names[dist.get_rank() :: dist.get_world_size()]


def _gather(part: Dict[str, Any]) -> Dict[str, Any]:
    """Every rank's ``part`` merged, on every rank."""
    if not (dist.is_available() and dist.is_initialized()):
        return part
    parts: List[Dict[str, Any]] = [{} for _ in range(dist.get_world_size())]
    dist.all_gather_object(parts, part)
    return {k: v for p in parts for k, v in p.items()}


def _data_files(folder: Path) -> List[str]:
    return sorted(p.name for p in folder.iterdir() if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, meta: Optional[Dict[str, Any]]) -> None:
    """Hashes the folder's files (each rank a share) and has rank 0 write the manifest; every rank
    calls it once all have written their files."""
    names = _data_files(folder)
    files = _gather({n: {"size": (folder / n).stat().st_size, "sha256": _sha256(folder / n)} for n in _share(names)})
    if not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0:
        (folder / MANIFEST).write_text(json.dumps({"files": files, "meta": meta or {}}, indent=1, sort_keys=True))


def read_manifest(folder: Path) -> Optional[Dict[str, Any]]:
    """The manifest of the checkpoint in ``folder``; None where there is none (``verify_checksums``
    refuses such a checkpoint)."""
    path = Path(folder) / MANIFEST
    if not path.is_file():
        return None
    try:
        manifest = json.loads(path.read_text())
        if isinstance(manifest.get("files"), dict) and isinstance(manifest.get("meta"), dict):
            return manifest
    except (ValueError, AttributeError):
        pass
    raise CheckpointError(f"{path}: not a checkpoint manifest (damaged?)")


def check_storage(folder: Path, md: Metadata) -> None:
    """Refuses an index that points outside ``folder``, at a missing file, or past a file's end."""
    ends: Dict[str, int] = {}
    for info in (md.storage_data or {}).values():
        name = str(getattr(info, "relative_path", ""))
        if not name or os.path.isabs(name) or Path(name).name != name:
            raise CheckpointError(f"{folder}/.metadata points at {name!r}, outside the checkpoint folder: refusing to read it")
        ends[name] = max(ends.get(name, 0), int(info.offset) + int(info.length))
    for name, end in sorted(ends.items()):
        path = folder / name
        if not path.is_file():
            raise CheckpointError(f"checkpoint {folder}: file {name} is missing (the index refers to it)")
        if path.stat().st_size < end:
            raise CheckpointError(f"checkpoint {folder}: file {name} is truncated ({path.stat().st_size:,} bytes, the index needs {end:,})")


def verify_checksums(folder: Path) -> None:
    """Checks every file listed in the manifest against its size and SHA-256 (each rank a share,
    the same error on every rank). Every checkpoint ``save_checkpoint`` writes has a manifest: one
    without is refused (a deleted manifest would otherwise turn every check off)."""
    manifest = read_manifest(folder)
    if manifest is None:
        raise CheckpointError(
            f"checkpoint {folder} has no {MANIFEST} (the checksums of its files): it is damaged, or was not written by "
            "torchrec-multihash's save_checkpoint; refusing to load it"
        )
    problems: Dict[str, str] = {}
    for name in _share(sorted(manifest["files"])):
        expected, path = manifest["files"][name], folder / name
        if not path.is_file():
            problems[name] = "is missing"
        elif path.stat().st_size != expected.get("size") or _sha256(path) != expected.get("sha256"):
            problems[name] = "does not match its checksum (damaged or changed since it was saved)"
    problems = _gather(problems)
    if problems:
        name = sorted(problems)[0]
        raise CheckpointError(f"checkpoint {folder}: file {name} {problems[name]}")
