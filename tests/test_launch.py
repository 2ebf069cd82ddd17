"""TorchX: real local runs (1 node x 2 processes, 2 emulated nodes x 1) and cluster dry runs."""

import json
import os

import pytest
import yaml

from tests.helpers import ROOT
from tests.helpers.cli import BIN, run


def torchx(*args):
    return run([str(BIN / "torchx"), *args], env={"PATH": f"{BIN}:{os.environ['PATH']}"})


def local_run(tmp_path, j, *options, overrides=()):
    out = tmp_path / "metrics.json"
    r = torchx(
        "run",
        "-s",
        "local_cwd",
        "launch/components.py:dlrm",
        "-j",
        j,
        *options,
        "--config",
        "configs/quickstart.yaml",
        "--metrics_out",
        str(out),
        "data.train_samples=30000",
        "data.test_samples=4096",
        "train.batch_size=512",
        f"train.output_dir={tmp_path / 'run'}",
        *overrides,
    )
    assert r.returncode == 0, (r.stdout + r.stderr)[-3000:]
    assert "SUCCEEDED" in r.stderr + r.stdout
    return json.loads(out.read_text()), r.stdout + r.stderr


@pytest.mark.slow
@pytest.mark.distributed
def test_local_one_node_two_processes(tmp_path):
    m, _ = local_run(tmp_path, "1x2")
    assert m["world_size"] == 2 and m["steps"] == 29 and 0 < m["auc"] < 1


@pytest.mark.slow
@pytest.mark.distributed
def test_local_two_emulated_nodes(tmp_path):
    m, _ = local_run(tmp_path, "2x1")
    assert m["world_size"] == 2 and m["steps"] == 29


@pytest.mark.slow
@pytest.mark.distributed
def test_local_rank_killed_mid_epoch_restarts_and_finishes(tmp_path):
    """--max_restarts 1: rank 1 dies after step 15 of 29; torchrun restarts both ranks, which
    continue from the step-10 checkpoint (tests/test_train.py shows the result equals an
    uninterrupted run)."""
    fault = "MULTIHASH_FAULT_AT_STEP=15,MULTIHASH_FAULT_RANK=1"
    m, log = local_run(tmp_path, "1x2", "--max_restarts", "1", "--env", fault, overrides=["train.checkpoint_every=10"])
    assert "rank 1 exits after step 15" in log and "Resumed from" in log and "step 10 (restart 1)" in log
    assert m["world_size"] == 2 and m["steps"] == 29


def test_component_restarts_and_retries_resume_automatically():
    import importlib.util

    spec = importlib.util.spec_from_file_location("components", ROOT / "launch" / "components.py")
    components = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(components)
    dlrm = components.dlrm
    role = dlrm("train.epochs=2", max_restarts=2).roles[0]
    assert role.args[-1].startswith("torchrun --max_restarts 2 --rdzv_backend c10d ")
    assert "train --config configs/quickstart.yaml --resume auto --set train.epochs=2" in role.args[-1]
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    role = dlrm(max_retries=3).roles[0]
    assert role.max_retries == 3 and "--resume auto" in role.args[-1] and "--max_restarts" not in role.args[-1]
    role = dlrm().roles[0]
    assert role.max_retries == 0 and "--resume" not in role.args[-1] and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in role.env


def test_slurm_dryrun_script():
    r = torchx(
        "run",
        "-s",
        "slurm",
        "--dryrun",
        "launch/components.py:dlrm",
        "-j",
        "2x8",
        "--gpu",
        "8",
        "--config",
        "configs/criteo_1tb_qr.yaml",
        "train.epochs=2",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = r.stdout
    assert s.count("#SBATCH --job-name=trainer-") == 2 and "--gpus-per-task=8" in s and "hetjob" in s
    assert "--nnodes 2 --nproc_per_node 8" in s
    assert "-m torchrec_multihash.cli train --config configs/criteo_1tb_qr.yaml --set train.epochs=2" in s
    assert "--time=12:00:00" in s  # from .torchxconfig


def test_kubernetes_dryrun_resource():
    r = torchx(
        "run",
        "--workspace",
        "",
        "-s",
        "kubernetes",
        "--dryrun",
        "launch/components.py:dlrm",
        "-j",
        "2x8",
        "--gpu",
        "8",
        "--memMB",
        "65536",
        "--image",
        "ghcr.io/example/tmh:1",
        "--config",
        "configs/criteo_1tb_qr.yaml",
    )
    assert r.returncode == 0, r.stderr[-3000:]
    spec = yaml.safe_load(r.stdout[r.stdout.index("apiVersion") :])
    assert spec["kind"] == "Job" and spec["spec"]["queue"] == "default"
    tasks = spec["spec"]["tasks"]
    assert len(tasks) == 2 and all(t["replicas"] == 1 for t in tasks)  # one pod per node
    (container,) = tasks[0]["template"]["spec"]["containers"]
    assert container["image"] == "ghcr.io/example/tmh:1"
    assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
    assert container["resources"]["limits"]["memory"] == "65536M"
    cmd = " ".join(container["command"])
    assert "--nnodes 2 --nproc_per_node 8" in cmd and "torchrec_multihash.cli train --config configs/criteo_1tb_qr.yaml" in cmd
