"""The ``torchrec-multihash`` command run as a user runs it: in a subprocess, from the repository
root, alone or under torchrun."""

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Dict, Optional, Sequence, Tuple

from tests.helpers import ROOT

BIN = Path(sys.executable).parent
CLI = ("-m", "torchrec_multihash.cli")
# a quick synthetic run of configs/quickstart.yaml: 117 steps on 1 process, 58 per rank on 2
SMALL = ["--set", "data.train_samples=60000", "--set", "data.test_samples=8192", "--set", "train.batch_size=512"]


def run(cmd: Sequence[str], env: Optional[Dict[str, str]] = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """``cmd`` from the repository root, one thread per process, output captured."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
    return subprocess.run(list(cmd), cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)


def run_cli(*args: str, python: Sequence[str] = CLI, **kw) -> subprocess.CompletedProcess:
    """``python -m torchrec_multihash.cli ARGS`` (or ``python PYTHON ARGS``)."""
    return run([sys.executable, *python, *args], **kw)


def train(
    tmp_path: Path,
    *args: str,
    nproc: int = 1,
    config: str = "configs/quickstart.yaml",
    torchrun: Sequence[str] = (),
    env: Optional[Dict[str, str]] = None,
    python: Sequence[str] = CLI,
) -> Tuple[subprocess.CompletedProcess, Optional[dict]]:
    """``train --config CONFIG ARGS`` on ``nproc`` processes (torchrun when more than one), its outputs
    in ``tmp_path``; returns the finished process and the metrics it wrote (None if none)."""
    out = tmp_path / "metrics.json"
    common = ["--config", config, "--metrics-out", str(out), "--set", f"train.output_dir={tmp_path / 'run'}", *args]
    tmp_path.mkdir(parents=True, exist_ok=True)
    if nproc == 1:
        r = run_cli("train", *common, python=python, env=env)
    else:
        # a rendezvous port of its own (--standalone picks a free one): tests run in parallel
        own_port = [] if any(a.startswith(("--standalone", "--rdzv", "--master")) for a in torchrun) else ["--standalone"]
        r = run([str(BIN / "torchrun"), *own_port, *torchrun, "--nproc_per_node", str(nproc), *CLI, "train", *common], env=env)
    return r, (json.loads(out.read_text()) if out.exists() else None)
