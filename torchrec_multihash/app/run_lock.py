"""The lock file that gives a run folder to one run at a time (rank 0 of a job holds it)."""

import json
import os
import socket
import time
from pathlib import Path
from typing import Any, Dict

from torchrec_multihash.app.config import ConfigError

LOCK_FILE = ".lock"


def _holder(path: Path) -> Dict[str, Any]:
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError):
        return {}  # being written, or not ours: treated as held


def _alive(holder: Dict[str, Any]) -> bool:
    """Whether the process that wrote ``holder`` may still run (one on another host may)."""
    pid = holder.get("pid")
    if holder.get("host") != socket.gethostname() or not isinstance(pid, int):
        return True
    if pid == os.getpid():
        return False  # an earlier run of this process that did not release it
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class RunLock:
    """``folder/.lock``, created exclusively; a lock of a dead process on this host is stale and
    taken over, any other refuses the run."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def acquire(cls, folder: Path) -> "RunLock":
        path = folder / LOCK_FILE
        for _ in range(3):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = _holder(path)
                if _alive(holder):
                    raise ConfigError(
                        f"train.output_dir {folder} is in use by another run (pid {holder.get('pid', '?')} on "
                        f"{holder.get('host', '?')}): wait for it or use another train.output_dir; if no run uses it, delete {path}"
                    ) from None
                print(f"Taking over {path}: its run (pid {holder.get('pid')}) is no longer running", flush=True)
                path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w") as f:
                json.dump({"pid": os.getpid(), "host": socket.gethostname(), "since": time.time()}, f)
            return cls(path)
        raise ConfigError(f"could not take {path}: other runs keep taking it")

    def release(self) -> None:
        """Removes the lock if it is still this process's."""
        if _holder(self.path).get("pid") == os.getpid():
            self.path.unlink(missing_ok=True)
