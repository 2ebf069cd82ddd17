"""Runs a function in N processes with a gloo process group (CPU stand-in for N GPUs): the one
multi-process helper of the tests."""

import os
import socket
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch.distributed as dist
import torch.multiprocessing as mp
from torch.multiprocessing.spawn import ProcessException


def free_port() -> int:
    """A TCP port free now on this machine (tests run in parallel: no fixed port)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _entry(rank: int, world_size: int, port: int, errors: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        try:
            fn(rank, world_size, *args)
        except BaseException:
            # recorded before this rank leaves the group, so before its peers fail on the lost connection
            (Path(errors) / f"{time.time_ns():020d}.rank{rank}").write_text(traceback.format_exc())
            raise
        dist.barrier()
    finally:
        dist.destroy_process_group()


def run_multiprocess(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Calls ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes. A failure is raised
    here with the traceback of the rank where ``fn`` failed first (its peers then fail too, in their
    next collective: the first process to exit is not always the cause). The processes never
    outlive the call: when it ends early (a failure, or pytest-timeout interrupting a hang), those
    still running are killed."""
    with tempfile.TemporaryDirectory() as errors:
        context = mp.start_processes(_entry, args=(world_size, free_port(), errors, fn, args), nprocs=world_size, join=False, start_method="spawn")
        try:
            while not context.join():
                pass
        except ProcessException as e:
            failed = sorted(Path(errors).iterdir())
            if not failed:
                raise
            report = "\n".join(f"-- rank {p.name.split('.rank')[1]}:\n{p.read_text()}" for p in failed)
            raise RuntimeError(f"{len(failed)} of {world_size} ranks failed, first listed first:\n{report}") from e
        finally:
            for p in context.processes:
                if p.is_alive():
                    p.kill()
                    p.join()
