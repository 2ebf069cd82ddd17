"""TorchX on a real Slurm: the one-node cluster of ``scripts/local_slurm.sh`` (started here when it is
missing, skipped with its reason where it cannot start), jobs submitted with ``torchx run -s slurm``
as a user submits them, their results compared with the same config run locally."""

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT
from tests.helpers.cli import BIN, run
from tests.helpers.distributed import free_port

pytestmark = [pytest.mark.slurm, pytest.mark.slow, pytest.mark.distributed, pytest.mark.timeout(900)]

# a short 2-rank run with checkpoints, so that a retried job has one to resume from
OVERRIDES = ["data.train_samples=30000", "data.test_samples=4096", "train.batch_size=512", "train.checkpoint_every=10"]


@pytest.fixture(scope="module")
def slurm():
    if os.environ.get("MULTIHASH_NO_SLURM") == "1":
        pytest.skip("MULTIHASH_NO_SLURM=1")
    try:
        r = subprocess.run([str(ROOT / "scripts" / "local_slurm.sh")], capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"scripts/local_slurm.sh could not run: {e}")
    if r.returncode != 0:
        pytest.skip(f"no Slurm here: scripts/local_slurm.sh exited {r.returncode}: {(r.stderr or r.stdout).strip()[-500:]}")


def _torchx(*args, env=None):
    return run([str(BIN / "torchx"), *args], env={"PATH": f"{BIN}:{os.environ['PATH']}", **(env or {})})


def _submit(tmp_path: Path, name: str, *options: str) -> str:
    """Submits the quickstart config (2 ranks on 1 node); the Slurm job id."""
    r = _torchx(
        "run", "-s", "slurm", "launch/components.py:dlrm", "-j", "1x2", "--rdzv_port", str(free_port()), "--name", name, "--metrics_out", str(tmp_path / f"{name}.json"),
        *options, "--config", "configs/quickstart.yaml", *OVERRIDES, f"train.output_dir={tmp_path / name}",
    )  # fmt: skip
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    found = re.search(r"slurm://[^/\s]*/(\d+)", r.stdout + r.stderr)
    assert found, (r.stdout + r.stderr)[-2000:]
    return found.group(1)


def _wait(job: str, timeout: float = 600) -> str:
    """The job's final state, from sacct (as TorchX reads it)."""
    end = time.time() + timeout
    while time.time() < end:
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True, text=True).stdout.split()
        if out and out[0] not in ("PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING"):
            return out[0]
        reason = subprocess.run(["squeue", "-h", "-j", job, "-o", "%r"], capture_output=True, text=True).stdout.strip()
        if reason == "BeginTime":  # Slurm holds a requeued job for 2 minutes: start it now (as an admin can)
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)
        time.sleep(2)
    subprocess.run(["scancel", job])
    raise AssertionError(f"Slurm job {job} still running after {timeout} s")


def _job_field(job: str, field: str) -> str:
    return subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", field], capture_output=True, text=True).stdout.strip()


def _logs(job: str) -> str:
    text = ""
    for f in sorted(ROOT.glob(f"slurm-{job}*")):
        text += f"--- {f.name}\n{f.read_text()[-3000:]}"
        f.unlink()
    return text


def _local(tmp_path: Path) -> dict:
    """The same config on 2 local ranks (torchrun): what the Slurm jobs must end with."""
    out = tmp_path / "local.json"
    r = run([str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "torchrec_multihash.cli", "train", "--config", "configs/quickstart.yaml",
             *[a for o in OVERRIDES for a in ("--set", o)], "--set", f"train.output_dir={tmp_path / 'local'}", "--metrics-out", str(out)])  # fmt: skip
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(out.read_text())


def test_a_slurm_job_ends_as_the_local_run_and_a_retried_one_resumes(slurm, tmp_path):
    local = _local(tmp_path)
    # --cpu, --memMB and --gpu 0 reach Slurm (torchx handed --cpu over as a string, which crashed its scheduler)
    job = _submit(tmp_path, "plain", "--cpu", "3", "--memMB", "3000", "--gpu", "0")
    state, logs = _wait(job), _logs(job)
    assert state == "COMPLETED", logs
    assert _job_field(job, "AllocCPUS") == "3" and _job_field(job, "ReqMem").startswith("3000M")
    assert "gpu" not in _job_field(job, "AllocTRES")
    plain = json.loads((tmp_path / "plain.json").read_text())
    assert (plain["auc"], plain["logloss"], plain["steps"]) == (local["auc"], local["logloss"], local["steps"])
    # rank 0 dies after step 15 (checkpoint at 10) on the first attempt: Slurm requeues the job
    # (--max_retries 1, which adds --resume auto), and it ends with the uninterrupted run's metrics
    job = _submit(tmp_path, "retried", "--max_retries", "1", "--env", "MULTIHASH_FAULT_AT_STEP=15")
    state, logs = _wait(job), _logs(job)
    assert state == "COMPLETED", logs
    attempts = subprocess.run(["sacct", "-n", "-X", "-D", "-P", "-j", job, "-o", "State"], capture_output=True, text=True).stdout.split()
    assert attempts == ["REQUEUED", "COMPLETED"], (attempts, logs)  # the first attempt failed and was requeued
    retried = json.loads((tmp_path / "retried.json").read_text())
    assert (retried["auc"], retried["logloss"], retried["steps"]) == (local["auc"], local["logloss"], local["steps"])
