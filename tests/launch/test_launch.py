"""TorchX: real local runs (1 node x 2 processes, 2 emulated nodes x 1) and cluster dry runs."""

import json
import os
import sys

import pytest
import yaml

from tests.helpers import ROOT
from tests.helpers.cli import BIN, run
from tests.helpers.distributed import free_port


def data_here(tmp_path):
    """Overrides pointing the 1TB configs' data at files that exist (the job reads this filesystem
    on local_cwd and Slurm, so the component checks them)."""
    day = tmp_path / "day_0_dense.npy"
    day.write_bytes(b"")
    return [f"data.train=[{day}]", f"data.test={day}"]


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
        "--rdzv_port",
        str(free_port()),  # tests run in parallel: not the default 29500
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
    continue from the step-10 checkpoint (tests/app/test_train.py shows the result equals an
    uninterrupted run)."""
    fault = "MULTIHASH_FAULT_AT_STEP=15,MULTIHASH_FAULT_RANK=1"
    m, log = local_run(tmp_path, "1x2", "--max_restarts", "1", "--env", fault, overrides=["train.checkpoint_every=10"])
    assert "rank 1 exits after step 15" in log and "Resumed from" in log and "step 10 (restart 1)" in log
    assert m["world_size"] == 2 and m["steps"] == 29


def load_components():
    import importlib.util

    spec = importlib.util.spec_from_file_location("components", ROOT / "launch" / "components.py")
    components = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(components)
    return components


def test_component_restarts_and_retries_resume_automatically(tmp_path):
    dlrm = load_components().dlrm
    torchrun = str(BIN / "torchrun")  # this venv's own (the job runs on this filesystem)
    role = dlrm("train.epochs=2", "train.checkpoint_every=100", max_restarts=2).roles[0]
    assert role.args[-1].startswith(f"{torchrun} --max_restarts 2 --rdzv_backend c10d ")
    assert "train --config configs/quickstart.yaml --resume auto --set train.epochs=2" in role.args[-1]
    assert role.env["TORCH_DISABLE_SHARE_RDZV_TCP_STORE"] == "1"
    role = dlrm("train.checkpoint_every_minutes=30", max_retries=3).roles[0]
    assert role.max_retries == 3 and "--resume auto" in role.args[-1] and "--max_restarts" not in role.args[-1]
    # a restart without any checkpoint would begin at step 0: refused before submitting
    with pytest.raises(ValueError, match=r"--max_retries 3 restarts the job from its last checkpoint, but configs/quickstart.yaml saves none"):
        dlrm(max_retries=3)
    with pytest.raises(ValueError, match=r"--max_restarts 1 restarts the job .*add e.g. train.checkpoint_every_minutes=30"):
        dlrm(max_restarts=1)
    role = dlrm(*data_here(tmp_path), j="1x8", gpu=8, config="configs/criteo_1tb_qr.yaml", max_retries=1).roles[0]  # they checkpoint every 30 minutes
    assert role.max_retries == 1
    role = dlrm().roles[0]
    assert role.max_retries == 0 and "--resume" not in role.args[-1] and "TORCH_DISABLE_SHARE_RDZV_TCP_STORE" not in role.env


def test_component_resources_follow_the_job(tmp_path):
    c = load_components()
    # torchx's CLI hands Optional[int] arguments over as strings: they reach the scheduler as ints
    r = c.dlrm(j="1x2", cpu="3", memMB="3000").roles[0].resource
    assert (r.cpu, r.memMB) == (3, 3000) and isinstance(r.cpu, int) and isinstance(r.memMB, int)
    with pytest.raises(ValueError, match=r"--cpu must be a whole number, got 'two'"):
        c.dlrm(j="1x2", cpu="two")
    r = c.dlrm(*data_here(tmp_path), j="2x8", gpu=8, config="configs/criteo_1tb_qr.yaml").roles[0].resource
    assert (r.cpu, r.gpu, r.memMB) == (88, 8, 0)  # 11 CPUs per GPU rank; memory: the scheduler's default
    r = c.dlrm(j="1x2").roles[0].resource
    assert (r.cpu, r.gpu, r.memMB) == (4, 0, 8192)  # 2 CPUs, 4 GiB per CPU rank
    r = c.dlrm(j="1x4", gpu=4, cpu=40, memMB=300000).roles[0].resource
    assert (r.cpu, r.gpu, r.memMB) == (40, 4, 300000)
    r = c.dlrm(j="2x8", h="aws_p4d.24xlarge").roles[0].resource  # a named resource: the whole host
    assert (r.cpu, r.gpu, r.capabilities["node.kubernetes.io/instance-type"]) == (96, 8, "p4d.24xlarge")
    with pytest.raises(ValueError, match=r"8 ranks per node but --gpu 4 gives each node 4 GPUs"):
        c.dlrm(j="2x8", gpu=4)
    with pytest.raises(ValueError, match=r"8 ranks per node but -h aws_p3.8xlarge gives each node 4 GPUs"):
        c.dlrm(j="2x8", h="aws_p3.8xlarge")
    with pytest.raises(ValueError, match=r"--gpu 4 disagrees with -h aws_p4d.24xlarge, which has 8 GPUs"):
        c.dlrm(j="2x8", gpu=4, h="aws_p4d.24xlarge")
    with pytest.raises(ValueError, match="unknown named resource -h 'nope'"):
        c.dlrm(j="2x8", h="nope")


def test_component_checks_the_config_before_submitting(tmp_path):
    from torchrec_multihash.app.config import ConfigError

    c = load_components()
    with pytest.raises(ConfigError, match="cannot read config configs/missing.yaml: No such file"):
        c.dlrm(config="configs/missing.yaml")
    with pytest.raises(ConfigError, match="train.batch_size"):
        c.dlrm("train.batch_size=0")
    with pytest.raises(ValueError, match="is not key=value"):
        c.dlrm("train.epochs")


def test_component_refusals_at_submit_time():
    """`torchx run` refuses before submitting: nothing is queued for a job that would fail on the cluster."""
    for options, message in [
        (["-j", "2x8", "--gpu", "4"], "8 ranks per node but --gpu 4 gives each node 4 GPUs"),
        (["-j", "2x8", "--gpu", "8", "--config", "configs/missing.yaml"], "cannot read config configs/missing.yaml: No such file or directory"),
        # Slurm shares this filesystem: data that is not here is not on the nodes either
        (
            ["-j", "2x8", "--gpu", "8", "--config", "configs/criteo_1tb_qr.yaml"],
            "configs/criteo_1tb_qr.yaml: data file(s) ['data/criteo_1tb_npy/day_0",
        ),
        (["--data_volume", "criteo"], "--data_volume mount Kubernetes PersistentVolumeClaims; on -s slurm the job reads this filesystem"),
        # the 1TB configs train on CUDA: a job without GPUs would have run on CPU
        (["-j", "4x8", "--config", "configs/criteo_1tb_qr.yaml"], "trains on CUDA (train.device: cuda) but the job asks for no GPU"),
        # torchx's own argument checks: a process count of 0, mounts it cannot parse, an --env entry
        # without a value (refused by torchx's parser, before dlrm runs)
        (["-j", "1x0"], "-j 1x0: nodes and processes per node must be at least 1"),
        (["--mounts", "type=bind,dst=/data"], "--mounts type=bind,dst=/data: no src= given"),
        (["--mounts", "foo"], "unknown mount option foo"),
        (["--env", "FOO"], "`FOO` does not have at least one `key=value` pair"),
    ]:
        r = torchx("run", "-s", "slurm", "--dryrun", "launch/components.py:dlrm", *options)
        assert r.returncode != 0 and message in r.stderr, r.stderr[-3000:]
        assert "#SBATCH" not in r.stdout and "Traceback" not in r.stderr  # one line, not torchx's traceback


def test_slurm_dryrun_script(tmp_path):
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
        "--env",
        "NCCL_DEBUG=WARN",
        "--config",
        "configs/criteo_1tb_qr.yaml",
        "train.epochs=2",
        *data_here(tmp_path),
    )
    assert r.returncode == 0, r.stderr[-3000:]
    s = r.stdout
    assert s.count("#SBATCH --job-name=trainer-") == 2 and "hetjob" in s
    sbatch = [line for line in s.splitlines() if line.startswith("#SBATCH --job-name=")]
    for line in sbatch:  # per node: 8 GPUs, 8 x 11 CPUs, no memory asked (the partition's default)
        assert "--ntasks-per-node=1 --cpus-per-task=88 --gpus-per-task=8" in line and "--mem" not in line
        assert "--time=12:00:00" in line  # from .torchxconfig
    assert s.count("--export=ALL,OMP_NUM_THREADS=1,NCCL_DEBUG=WARN,") == 2
    # this virtualenv's own torchrun, not the first on the nodes' PATH
    assert s.count(f"bash -c '{BIN / 'torchrun'} --rdzv_backend c10d") == 2
    assert "--nnodes 2 --nproc_per_node 8" in s
    assert "-m torchrec_multihash.cli train --config configs/criteo_1tb_qr.yaml --set train.epochs=2" in s


def k8s_dryrun(*options):
    r = torchx("run", "--workspace", "", "-s", "kubernetes", "--dryrun", "launch/components.py:dlrm", *options)
    assert r.returncode == 0, r.stderr[-3000:]
    return yaml.safe_load(r.stdout[r.stdout.index("apiVersion") :])


def test_kubernetes_dryrun_resources_mounts_env_command():
    spec = k8s_dryrun(
        *("-j", "2x8", "--gpu", "8", "--image", "ghcr.io/example/tmh:1", "--env", "NCCL_DEBUG=WARN"),
        *("--data_volume", "criteo-data", "--output_volume", "tmh-runs", "--mounts", "type=bind,src=/mnt/nvme,dst=/scratch"),
        *("--config", "configs/criteo_1tb_qr.yaml", "train.epochs=2"),
    )
    assert spec["kind"] == "Job" and spec["spec"]["queue"] == "default"
    tasks = spec["spec"]["tasks"]
    assert len(tasks) == 2 and all(t["replicas"] == 1 for t in tasks)  # one pod per node
    for task in tasks:
        pod = task["template"]["spec"]
        (container,) = pod["containers"]
        assert container["image"] == "ghcr.io/example/tmh:1"
        assert container["resources"]["limits"] == {"cpu": "88000m", "nvidia.com/gpu": "8"}  # memory: the cluster's default
        assert container["resources"]["requests"]["nvidia.com/gpu"] == "8"
        env = {e["name"]: e["value"] for e in container["env"]}
        assert env["OMP_NUM_THREADS"] == "1" and env["NCCL_DEBUG"] == "WARN"
        cmd = " ".join(container["command"])
        # the image's torchrun (its venv is first on PATH), not this machine's path
        assert cmd.startswith("bash -c torchrun --rdzv_backend c10d --rdzv_endpoint ${") and ":=localhost}:29500 " in cmd
        assert "--nnodes 2 --nproc_per_node 8" in cmd
        assert "-m torchrec_multihash.cli train --config configs/criteo_1tb_qr.yaml --set train.epochs=2" in cmd
        mounts = {m["mountPath"]: (m["name"], m.get("readOnly")) for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in pod["volumes"]}
        name, ro = mounts["/workspace/data"]  # data, read-only, where the configs read data/...
        assert ro is True and volumes[name]["persistentVolumeClaim"]["claimName"] == "criteo-data"
        name, ro = mounts["/workspace/runs"]  # outputs and checkpoints (runs/...) outlive the pod
        assert ro is False and volumes[name]["persistentVolumeClaim"]["claimName"] == "tmh-runs"
        name, _ = mounts["/scratch"]
        assert volumes[name]["hostPath"]["path"] == "/mnt/nvme"


def test_kubernetes_refuses_a_job_its_pods_cannot_run():
    for options, message in [
        ([], "-s kubernetes needs --image: an image of this repository"),
        (["--image", "ghcr.io/example/tmh:1", "--config", "/tmp/mine.yaml"], "--config /tmp/mine.yaml is read inside the pod"),
    ]:
        r = torchx("run", "--workspace", "", "-s", "kubernetes", "--dryrun", "launch/components.py:dlrm", *options)
        assert r.returncode != 0 and message in r.stderr, r.stderr[-3000:]


def test_kubernetes_dryrun_named_resource():
    spec = k8s_dryrun("-j", "2x8", "-h", "aws_p4d.24xlarge", "--image", "ghcr.io/example/tmh:1", "--config", "configs/criteo_1tb_qr.yaml")
    for task in spec["spec"]["tasks"]:
        pod = task["template"]["spec"]
        (container,) = pod["containers"]
        assert container["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert container["resources"]["limits"]["cpu"] == "96000m"
        assert pod["nodeSelector"] == {"node.kubernetes.io/instance-type": "p4d.24xlarge"}


def test_dockerfile_pins_agree_with_bootstrap():
    """The image installs the stack scripts/bootstrap.sh installs with MULTIHASH_TORCH_VARIANT=cuda."""
    import re

    boot = (ROOT / "scripts" / "bootstrap.sh").read_text()
    docker = (ROOT / "Dockerfile").read_text()
    for key in ("TORCH_VERSION", "FBGEMM_VERSION", "TORCHREC_VERSION"):
        (want,) = re.findall(rf"^{key}=(\S+)$", boot, re.M)
        assert re.findall(rf"^ARG {key}=(\S+)$", docker, re.M) == [want], key
    assert '"torch==${TORCH_VERSION}" "fbgemm-gpu==${FBGEMM_VERSION}"' in docker  # the CUDA fbgemm
    assert 'pip install -r requirements/base.txt "torch==${TORCH_VERSION}"' in docker
    assert 'pip install --no-deps "torchrec==${TORCHREC_VERSION}"' in docker
    assert "pip install --no-deps ." in docker
    assert re.search(r"^WORKDIR (\S+)$", docker, re.M).group(1) == load_components().IMAGE_WORKDIR
    assert "python3.11 -m venv" in docker and "ENV PATH=/opt/venv/bin:$PATH" in docker
    # a Python base (the torch wheel brings CUDA 13's libraries), the training stack only, not root
    assert re.findall(r"^ARG PYTHON_IMAGE=(\S+)$", docker, re.M) == ["python:3.11-slim-bookworm"] and "nvidia/cuda" not in docker
    assert "COPY requirements/base.txt" in docker and "tools.txt" not in docker.split("# CUDA:")[1]
    assert re.findall(r"^USER (\S+)$", docker, re.M) == ["trainer"]
    # requirements/base.txt is what training imports; torchx, kubernetes and matplotlib are the tools'
    base = (ROOT / "requirements" / "base.txt").read_text()
    assert not re.search(r"^(torchx|kubernetes|matplotlib)", base, re.M)
    assert re.search(r"^torchx==", (ROOT / "requirements" / "tools.txt").read_text(), re.M)


def test_make_image_and_readme_cluster_section():
    # --no-print-directory: under `make test` (CI) a nested make would print "Entering directory"
    r = run(["make", "--no-print-directory", "-n", "image", "image-push", "IMAGE=ghcr.io/example/tmh:1"])
    assert r.returncode == 0 and r.stdout.split("\n")[:2] == ["docker build -t ghcr.io/example/tmh:1 .", "docker push ghcr.io/example/tmh:1"], (
        r.stdout + r.stderr
    )
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Launching with TorchX") : readme.index("## How it works")]
    steps = ["make image IMAGE=", "make image-push IMAGE=", 'torchx run --workspace "" -s kubernetes', "--data_volume", "--output_volume"]
    assert all(s in section for s in steps) and [section.index(s) for s in steps[:3]] == sorted(section.index(s) for s in steps[:3])
    assert "torchx run -s slurm launch/components.py:dlrm -j 2x8 --gpu 8" in section


@pytest.mark.slow
def test_training_needs_nothing_the_image_leaves_out(tmp_path):
    # the image installs requirements/base.txt only: train and export without torchx, kubernetes, matplotlib
    code = (
        "import sys\n"
        "for m in ('matplotlib', 'torchx', 'kubernetes'):\n"
        "    sys.modules[m] = None  # importing it now raises ImportError\n"
        "from torchrec_multihash.cli import main\n"
        "sys.exit(main(sys.argv[1:]))\n"
    )
    common = ["--config", "configs/quickstart.yaml", "--set", f"train.output_dir={tmp_path}", "--set", "train.checkpoint_every=3"]
    small = ["--set", "train.max_steps=3", "--set", "data.train_samples=4096", "--set", "data.test_samples=1024"]
    r = run([sys.executable, "-c", code, "train", *common, *small])
    assert r.returncode == 0, r.stderr[-3000:]
    r = run([sys.executable, "-c", code, "export", *common, *small, "--out", str(tmp_path / "m.pt")])
    assert r.returncode == 0, r.stderr[-3000:]


def test_torchx_errors_are_one_line_only_until_the_component_runs(monkeypatch, capsys):
    # under `torchx run`, torchx's own argument errors (raised before dlrm runs) are one line; once
    # dlrm runs, the scheduler's errors keep their traceback
    import sys

    monkeypatch.setattr(sys, "argv", ["/venv/bin/torchx", "run", "-s", "local_cwd", "launch/components.py:dlrm"])
    monkeypatch.setattr(sys, "excepthook", sys.__excepthook__)
    c = load_components()
    assert sys.excepthook is c._one_line_errors
    sys.excepthook(ValueError, ValueError("`FOO` does not have at least one `key=value` pair"), None)
    assert capsys.readouterr().err == "torchx run launch/components.py:dlrm: `FOO` does not have at least one `key=value` pair\n"
    c.dlrm(j="1x2")
    assert sys.excepthook is sys.__excepthook__
