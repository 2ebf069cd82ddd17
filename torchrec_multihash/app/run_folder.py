"""A run folder belongs to one run: rank 0 creates it, locks it, and refuses a checkpoint of
another run unless told to continue it (``--resume``, only with the same data-shaping config) or
to replace it (``--overwrite``, the old one kept until the new one is complete). ``run.json``
names the run the folder belongs to, and each checkpoint the run that wrote it, so the checkpoint
of a replaced run is never taken for its successor's."""

import json
import shutil
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Optional, TypeVar, Union

import torch.distributed as dist

from torchrec_multihash.app.config import Config, ConfigError
from torchrec_multihash.app.provenance import Record, differences
from torchrec_multihash.app.run_lock import RunLock
from torchrec_multihash.distributed.checkpoint import find_checkpoint
from torchrec_multihash.distributed.checkpoint_files import CheckpointError, read_manifest
from torchrec_multihash.errors import MultiHashError

T = TypeVar("T")

RUN_FILE = "run.json"
REPLACED = "checkpoint.replaced"  # where the checkpoint of a replaced run goes when its successor saved none


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


def read_run(out: Path) -> Optional[Dict[str, Any]]:
    """``out/run.json``: the run the folder belongs to (None in a folder no run of this version used)."""
    path = out / RUN_FILE
    if not path.is_file():
        return None
    try:
        run = json.loads(path.read_text())
    except ValueError:
        run = None
    if not isinstance(run, dict) or "run_id" not in run:
        raise ConfigError(f"{path}: not a run record (damaged?): start over with --overwrite")
    return run


def checkpoint_run_id(path: Path) -> Optional[str]:
    """The id of the run that wrote the checkpoint in ``path`` (None for one written before checkpoints recorded it)."""
    manifest = read_manifest(path)
    return None if manifest is None else manifest["meta"].get("run_id")


def _is_runs(found: Path, run: Optional[Dict[str, Any]]) -> bool:
    """Whether the checkpoint ``found`` is that of ``run`` (``run.json``; any, without one): written
    by it, or recording no writer (an older version's) while the run replaced none."""
    if run is None:
        return True
    written_by = checkpoint_run_id(found)
    return written_by == run["run_id"] or (written_by is None and not run.get("replaced"))


def check_checkpoint_run(out: Path, found: Path, what: str = "") -> None:
    """Refuses ``found``, the checkpoint in run folder ``out``, once another run owns the folder: one
    started there with --overwrite that has saved no checkpoint yet (running, or stopped)."""
    run = read_run(out)
    if run is None or _is_runs(found, run):
        return
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(run["started"])) if isinstance(run.get("started"), (int, float)) else "?"
    raise ConfigError(
        f"{what}{found} holds the checkpoint of an earlier run, not of the run {out} belongs to now (started at {started}"
        f"{' with --overwrite' if run.get('replaced') else ''}), which has saved none of its own (still running, or stopped?); "
        "wait for that run to end, or train again with --overwrite (and train.checkpoint_every to keep a checkpoint)"
    )


def run_checkpoint(out: Path) -> Optional[Path]:
    """The checkpoint in run folder ``out`` if it is that of the run the folder belongs to, else None
    (also for a damaged one, which nothing can load)."""
    try:
        found = find_checkpoint(out / "checkpoint")
        return found if found is not None and _is_runs(found, read_run(out)) else None
    except CheckpointError:
        return None


def check_resumable(path: Path, record: Record) -> None:
    """Refuses to continue a checkpoint whose data-shaping config differs (its data position
    would mean other samples), naming the key."""
    manifest = read_manifest(path)
    if manifest is None or not manifest["meta"].get("run"):
        raise ConfigError(
            f"--resume: the checkpoint in {path} records no run settings ({'no manifest.json' if manifest is None else 'none in its manifest'}): "
            "it is damaged or was not written by torchrec-multihash train; start over with --overwrite or another train.output_dir"
        )
    changed = differences(manifest["meta"]["run"], record)
    if changed:
        raise ConfigError(
            f"--resume: the checkpoint in {path} was written by a run with other settings ({'; '.join(changed[:3])}); "
            "resume with the same ones, or start over with --overwrite or another train.output_dir"
        )


def check_owner(cfg: Config, record: Record, resume: Union[bool, str], overwrite: bool) -> Optional[Path]:
    """What the folder's checkpoint allows: continuing it (``resume``: returns it), replacing it, or nothing."""
    out = Path(cfg.train.output_dir)
    path = out / "checkpoint"
    if overwrite:
        return None
    found = find_checkpoint(path)
    if found is None:
        if resume is True:
            raise ConfigError(f"--resume: no checkpoint in {path} (set train.checkpoint_every to write one)")
        return None
    if resume:
        check_checkpoint_run(out, found, "--resume: ")
        check_resumable(found, record)
        return found
    raise ConfigError(
        f"train.output_dir {cfg.train.output_dir} holds the checkpoint of another run: continue it with --resume, "
        "replace it with --overwrite (kept until the new run saves), or use another train.output_dir"
    )


def _remove_if_empty(out: Path) -> None:
    """A run that failed in a folder it made, having written nothing but ``run.json``, leaves no folder."""
    try:
        if all(p.name == RUN_FILE for p in out.iterdir()):
            (out / RUN_FILE).unlink(missing_ok=True)
            out.rmdir()
    except OSError:
        pass  # something else appeared meanwhile: kept


@dataclass
class Claim:
    """A run's hold on its folder: the run's id (kept by a resumed run), and on rank 0 the lock,
    whether the run replaced a checkpoint (``--overwrite``) and the ``run.json`` it replaced."""

    out: Path
    run_id: Optional[str]
    lock: Optional[RunLock] = None
    replaced: bool = False
    previous: Optional[bytes] = None  # run.json before this run (None: there was none)
    created: bool = False  # rank 0 made the folder for this run

    def end(self, finished: bool) -> None:
        """Rank 0, after the run: the checkpoint of the run it replaced, still there (none of its
        own saved), is moved aside if it ``finished``, else the folder is given back to that run
        (a failed overwrite loses nothing); the lock is released."""
        if self.lock is None:
            return
        try:
            left = self._left_by_replaced() if self.replaced else None
            if left is not None and finished:
                self._set_aside(left)
            elif left is not None:
                self._give_back(left)
        finally:
            self.lock.release()
            if not finished and self.created:
                _remove_if_empty(self.out)

    def _left_by_replaced(self) -> Optional[Path]:
        """The checkpoint the replaced run left, if this run saved none of its own."""
        path = self.out / "checkpoint"
        try:
            found = find_checkpoint(path)
            return found if found is not None and checkpoint_run_id(found) != self.run_id else None
        except CheckpointError:
            return path  # damaged: not this run's either

    def _set_aside(self, found: Path) -> None:
        replaced = self.out / REPLACED
        shutil.rmtree(replaced, ignore_errors=True)
        found.rename(replaced)
        print(
            f"Moved the checkpoint of the run this one replaced (--overwrite) to {replaced}: this run saved none "
            "(set train.checkpoint_every to keep one); delete it when no longer needed",
            flush=True,
        )

    def _give_back(self, found: Path) -> None:
        path = self.out / RUN_FILE
        if self.previous is None:
            path.unlink(missing_ok=True)
        else:
            path.write_bytes(self.previous)
        print(f"The checkpoint of the previous run stays in {found}: this run stopped before saving one", flush=True)


def _holds_checkpoint(path: Path) -> bool:
    try:
        return find_checkpoint(path) is not None
    except CheckpointError:
        return True  # damaged, but there


def _start(out: Path, found: Optional[Path], overwrite: bool) -> Claim:
    """Rank 0: ``run.json`` names this run: the checkpoint's when continuing ``found``, a new one
    otherwise (recording whether it replaced a checkpoint)."""
    path = out / RUN_FILE
    previous = path.read_bytes() if path.is_file() else None
    run_id = checkpoint_run_id(found) if found is not None else uuid.uuid4().hex
    replaced = overwrite and _holds_checkpoint(out / "checkpoint")
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"run_id": run_id, "started": time.time(), "resumed": found is not None, "replaced": replaced}))
    tmp.replace(path)
    return Claim(out, run_id, replaced=replaced, previous=previous)


def claim_folder(cfg: Config, record: Record, resume: Union[bool, str], overwrite: bool) -> Claim:
    """Rank 0 creates and locks ``train.output_dir``, checks its checkpoint (every rank raises
    the error) and names this run in ``run.json``; every rank gets the run's id, rank 0 the lock."""
    if resume and overwrite:
        raise ConfigError("--resume and --overwrite contradict each other: give one")
    out = Path(cfg.train.output_dir)

    def claim() -> Claim:
        created = not out.exists()
        make_folder(out)
        lock = RunLock.acquire(out)
        try:
            started = _start(out, check_owner(cfg, record, resume, overwrite), overwrite)
        except MultiHashError:
            lock.release()
            if created:
                _remove_if_empty(out)
            raise
        started.lock, started.created = lock, created
        return started

    held = on_rank0(claim)
    box = [held.run_id if held is not None else None]
    dist.broadcast_object_list(box, src=0)
    return held if held is not None else Claim(out, box[0])
