"""Benchmarks and studies: quality against memory, speed against TorchRec's own tables."""

import sys
from pathlib import Path
from typing import List


def python_command(args: List[str], nproc: int = 1) -> List[str]:
    """``python ARGS`` in this interpreter, or ``torchrun --nproc_per_node N ARGS`` for several ranks."""
    if nproc == 1:
        return [sys.executable, *args]
    # --standalone: a free rendezvous port (not 29500, which another job on the machine may hold)
    return [str(Path(sys.executable).parent / "torchrun"), "--standalone", "--nproc_per_node", str(nproc), *args]
