"""TorchX components that launch torchrec-multihash training locally or on clusters.

    torchx run -s local_cwd launch/components.py:dlrm -j 1x2 --config configs/quickstart.yaml
    torchx run -s slurm launch/components.py:dlrm -j 2x8 --gpu 8 --config configs/criteo_1tb_qr.yaml
    torchx run --workspace "" -s kubernetes -cfg queue=default launch/components.py:dlrm -j 2x8 --gpu 8 \\
        --image ghcr.io/you/torchrec-multihash:latest --data_volume criteo-data --output_volume runs \\
        --config configs/criteo_1tb_qr.yaml

Checked when the component runs, before anything is submitted: the config (read with the app's own
loader, overrides applied), one rank per GPU (``-j NxG`` with ``--gpu G``) and the named resource.
"""

import logging
import os
import shlex
import sys
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torchx.specs as specs
from torchx.components.dist import ddp, parse_nnodes

# Per-GPU share of a typical 8-GPU host (AWS p4d.24xlarge, DGX A100: 96+ CPUs) that leaves room for the
# node's own daemons: a node of G ranks asks for G times this, 88 CPUs for 8 GPUs. Memory: none asked
# (the scheduler's default, as TorchRec's reference job; a fixed share, e.g. 1 TiB for 8 GPUs, is above
# many nodes' schedulable memory); --memMB asks for an amount.
CPU_PER_GPU = 11
MEM_MB_PER_GPU = 0
# CPU-only ranks (local runs, CPU clusters): 2 CPUs and 4 GiB each
CPU_PER_CPU_RANK = 2
MEM_MB_PER_CPU_RANK = 4096
# Where the image (Dockerfile: WORKDIR) holds the repository; --data_volume and --output_volume are
# mounted at its data/ and runs/ folders, where the configs read data and write outputs.
IMAGE_WORKDIR = "/workspace"


def _resources(nproc: int, gpu: int, cpu: Optional[int], memMB: Optional[int], h: Optional[str]) -> Tuple[int, int, int]:
    """(cpu, gpu, memMB) per node; refuses a GPU count that is not one rank per GPU."""
    if h is not None:
        try:
            named = specs.named_resources[h]
        except KeyError:
            raise ValueError(
                f"unknown named resource -h {h!r}; torchx's are listed by `torchx.specs.named_resources`, e.g. aws_p4d.24xlarge"
            ) from None
        if gpu and gpu != named.gpu:
            raise ValueError(f"--gpu {gpu} disagrees with -h {h}, which has {named.gpu} GPUs")
        gpu = named.gpu
    if gpu and nproc != gpu:
        given = f"-h {h}" if h is not None else f"--gpu {gpu}"
        raise ValueError(
            f"-j ...x{nproc} starts {nproc} ranks per node but {given} gives each node {gpu} GPUs: run one rank per GPU (-j NNODESx{gpu})"
        )
    per_cpu, per_mem = (CPU_PER_GPU, MEM_MB_PER_GPU) if gpu else (CPU_PER_CPU_RANK, MEM_MB_PER_CPU_RANK)
    return (cpu if cpu is not None else per_cpu * nproc), gpu, (memMB if memMB is not None else per_mem * nproc)


def _count(option: str, value: Optional[object]) -> Optional[int]:
    """``value`` as an int (None stays None): torchx's CLI hands ``Optional[int]`` arguments over as
    strings, which its Slurm scheduler then compares with ints."""
    if value is None:
        return None
    try:
        n = int(str(value))
    except ValueError:
        raise ValueError(f"--{option} must be a whole number, got {value!r}") from None
    if n < 0:
        raise ValueError(f"--{option} must be >= 0, got {n}")
    return n


def _check_config(config: str, overrides: Tuple[str, ...], restarts: str, shared_fs: bool, gpu: int) -> None:
    """Loads the config as ``train`` will (the app's own loader), so a missing file or a bad key
    is refused before the job waits in a queue; ``restarts`` (the --max_retries / --max_restarts
    asked, or "") needs a config that saves checkpoints, else a restart would begin at step 0.
    Where the job runs on this filesystem (``shared_fs``: local_cwd, Slurm) its data files must be here;
    a config that trains on CUDA (``train.device: cuda``) needs ``gpu`` GPUs per node."""
    root = logging.getLogger()  # torchx logs INFO: FBGEMM's import would add a line per library it loads
    level = root.level
    root.setLevel(max(level, logging.WARNING))
    try:
        from torchrec_multihash.app.config import load_config
    finally:
        root.setLevel(level)
    cfg = load_config(config, overrides)
    if cfg.train.device == "cuda" and not gpu:
        raise ValueError(
            f"{config} trains on CUDA (train.device: cuda) but the job asks for no GPU: add --gpu G with -j NNODESxG "
            "(one rank per GPU), or train.device=cpu to train on CPU"
        )
    if shared_fs and cfg.data.format != "synthetic":
        missing = [p for p in [*(cfg.data.train or []), *(cfg.data.test or [])] if not os.path.exists(p)]
        if missing:
            shown = missing[:3] + ([f"... {len(missing) - 3} more"] if len(missing) > 3 else [])
            raise ValueError(
                f"{config}: data file(s) {shown} do not exist here, and the job reads this filesystem (relative paths from "
                f"{os.getcwd()}, where it starts): give the data's paths, e.g. data.train=[/shared/criteo/day_0_dense.npy, ...]"
            )
    t = cfg.train
    if restarts and not (t.checkpoint_every or t.checkpoint_every_minutes):
        raise ValueError(
            f"{restarts} restarts the job from its last checkpoint, but {config} saves none (train.checkpoint_every and "
            "train.checkpoint_every_minutes are 0): every restart would begin again at step 0; "
            "add e.g. train.checkpoint_every_minutes=30"
        )


def _runs_on_this_filesystem(image: str) -> bool:
    """local_cwd and Slurm run in a folder of this machine's (shared) filesystem; Kubernetes in an image."""
    return not image or os.path.isdir(image)


def _scheduler() -> Optional[str]:
    """The scheduler ``torchx run -s NAME`` names on its command line, where this runs under it (None
    when called otherwise, e.g. from Python: the checks that need it are then left out)."""
    argv = sys.argv
    if not argv or Path(argv[0]).name != "torchx":
        return None
    for i, a in enumerate(argv[:-1]):
        if a in ("-s", "--scheduler"):
            return argv[i + 1]
    return next((a.split("=", 1)[1] for a in argv if a.startswith("--scheduler=")), None)


def _one_line_errors(kind: type, error: BaseException, tb: object) -> None:
    """Under `torchx run`, until ``dlrm`` runs: torchx's own refusals of its arguments (e.g. ``--env
    FOO`` without ``=value``, raised while it parses them) as one line, not a traceback. ``dlrm``
    puts Python's hook back; other errors, and these with TORCHX_TRACEBACK=1, keep the traceback."""
    if issubclass(kind, (ValueError, KeyError)) and not os.environ.get("TORCHX_TRACEBACK"):
        message = error.args[0] if isinstance(error, KeyError) and error.args else error
        print(f"torchx run launch/components.py:dlrm: {message}", file=sys.stderr)
        return
    sys.__excepthook__(kind, error, tb)  # type: ignore[arg-type]


if _scheduler() is not None:
    sys.excepthook = _one_line_errors


def _check_scheduler(scheduler: Optional[str], image: str, config: str, volumes: List[str]) -> None:
    """What only the scheduler tells apart: Kubernetes pods need an image holding this package and the
    config; local_cwd and Slurm read this filesystem, where Kubernetes volumes mean nothing."""
    if scheduler == "kubernetes":
        if not image:
            raise ValueError(
                "-s kubernetes needs --image: an image of this repository (make image IMAGE=...; the Dockerfile); "
                "torchx's default image does not hold torchrec-multihash"
            )
        if Path(config).is_absolute() or ".." in Path(config).parts:
            raise ValueError(
                f"--config {config} is read inside the pod, from the image's {IMAGE_WORKDIR}: give a config of the "
                "repository the image was built from, by its relative path (e.g. configs/criteo_1tb_qr.yaml)"
            )
    elif scheduler is not None and volumes:
        raise ValueError(
            f"{' and '.join(volumes)} mount Kubernetes PersistentVolumeClaims; on -s {scheduler} the job reads this "
            "filesystem: give the data's and outputs' paths in the config instead (data.train=..., train.output_dir=...)"
        )


def _torchrun(image: str) -> str:
    """This virtualenv's own torchrun where the job runs on this filesystem (Slurm nodes share it, and
    their PATH need not hold the venv); the image's (on its PATH) in a container."""
    exe = Path(sys.executable).parent / "torchrun"
    return str(exe) if _runs_on_this_filesystem(image) and exe.exists() else "torchrun"


def dlrm(
    *overrides: str,
    config: str = "configs/quickstart.yaml",
    metrics_out: Optional[str] = None,
    j: str = "1x2",
    cpu: Optional[int] = None,
    gpu: int = 0,
    memMB: Optional[int] = None,
    h: Optional[str] = None,
    image: str = "",
    name: str = "torchrec-multihash",
    max_retries: int = 0,
    max_restarts: int = 0,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    data_volume: Optional[str] = None,
    output_volume: Optional[str] = None,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Trains a sharded DLRM with multi-hash embedding tables (torchrec-multihash train).

    Args:
        overrides: config overrides as key=value (each becomes --set key=value), e.g. train.epochs=2
        config: YAML config, relative to the job's working directory; loaded here first (with the
            overrides), so a missing or invalid config is refused before submitting
        metrics_out: write the final metrics (AUC, log loss, NE, memory, speed) as JSON here
        j: nnodes x nproc_per_node, e.g. 1x2 (one node, two processes) or 2x8
        cpu: CPUs per node (default: 11 per GPU rank, a share of an 8-GPU host; 2 per CPU rank)
        gpu: GPUs per node; one rank per GPU: nproc_per_node must equal it
        memMB: memory per node in MB (default: none asked for GPU ranks, the scheduler's default;
            4 GiB per CPU rank)
        h: a torchx named resource (e.g. aws_p4d.24xlarge) for each node, instead of cpu/gpu/memMB;
            its GPU count must equal nproc_per_node
        image: the image (a folder for local_cwd and slurm; a container image on kubernetes)
        name: job name
        max_retries: scheduler retries of the whole job after a failure (Slurm, Kubernetes; the
            local schedulers do not retry)
        max_restarts: torchrun restarts of all ranks after one fails, on any scheduler (local too)
        env: extra environment variables
        mounts: more mounts, in torchx's syntax (type=volume,src=PVC,dst=/path[,readonly] or
            type=bind,src=/host/path,dst=/path); kubernetes
        data_volume: kubernetes: a PersistentVolumeClaim mounted read-only at /workspace/data (the
            image's data/, where the configs read)
        output_volume: kubernetes: a PersistentVolumeClaim mounted at /workspace/runs (the image's
            runs/, where the configs write outputs and checkpoints), so they outlive the pod
        rdzv_port: rendezvous port on the first node
    """
    # torchx has parsed its arguments: errors from here on (ours, caught below, or the scheduler's)
    # keep Python's traceback
    sys.excepthook = sys.__excepthook__
    try:
        return _dlrm_app(overrides, config, metrics_out, j, cpu, gpu, memMB, h, image, name, max_retries, max_restarts, env, mounts,
                         data_volume, output_volume, rdzv_port)  # fmt: skip
    except ValueError as e:  # the app's ConfigError is one
        if _scheduler() is None:  # called from Python: the exception
            raise
        # under `torchx run`: one line, not torchx's traceback above it
        print(f"torchx run launch/components.py:dlrm: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def _mounts(mounts: Optional[List[str]], data_volume: Optional[str], output_volume: Optional[str]) -> List[str]:
    """``--mounts`` and the volumes' mounts, in torchx's syntax; ValueError for one it cannot parse."""
    all_mounts = list(mounts or [])
    if data_volume:
        all_mounts += ["type=volume", f"src={data_volume}", f"dst={IMAGE_WORKDIR}/data", "readonly"]
    if output_volume:
        all_mounts += ["type=volume", f"src={output_volume}", f"dst={IMAGE_WORKDIR}/runs"]
    if all_mounts:
        try:
            specs.parse_mounts(all_mounts)
        except KeyError as e:  # torchx's messages for a mount it cannot parse
            what = e.args[0] if " " in str(e.args[0]) else f"no {e.args[0]}= given"  # torchx's KeyError: the bare key
            raise ValueError(f"--mounts {','.join(all_mounts)}: {what} (e.g. type=bind,src=/host/path,dst=/path)") from None
    return all_mounts


def _dlrm_app(
    overrides: Tuple[str, ...],
    config: str,
    metrics_out: Optional[str],
    j: str,
    cpu: Optional[int],
    gpu: int,
    memMB: Optional[int],
    h: Optional[str],
    image: str,
    name: str,
    max_retries: int,
    max_restarts: int,
    env: Optional[Dict[str, str]],
    mounts: Optional[List[str]],
    data_volume: Optional[str],
    output_volume: Optional[str],
    rdzv_port: int,
) -> specs.AppDef:
    """``dlrm``'s AppDef; ValueError for what cannot run."""
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} is not key=value (e.g. train.batch_size=512)")
    min_nodes, max_nodes, nproc, _ = parse_nnodes(j)
    if min(min_nodes, max_nodes, nproc) < 1 or min_nodes > max_nodes:
        raise ValueError(f"-j {j}: nodes and processes per node must be at least 1, min nodes at most max (e.g. 1x2, 2x8 or 1:4x8)")
    cpu, memMB = _count("cpu", cpu), _count("memMB", memMB)
    cpu, gpu, memMB = _resources(nproc, gpu, cpu, memMB, h)
    restarts = " and ".join(f"--{k} {v}" for k, v in (("max_retries", max_retries), ("max_restarts", max_restarts)) if v)
    volumes = [f"--{k}" for k, v in (("data_volume", data_volume), ("output_volume", output_volume)) if v]
    _check_scheduler(_scheduler(), image, config, volumes)
    _check_config(config, overrides, restarts, _runs_on_this_filesystem(image), gpu)
    args = ["train", "--config", config]
    if max_retries or max_restarts:
        args += ["--resume", "auto"]  # a retried or restarted job continues from its last checkpoint
    for o in overrides:
        args += ["--set", o]
    if metrics_out:
        args += ["--metrics-out", metrics_out]
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    if max_restarts:
        # torch 2.13 keeps torchrun's rendezvous store across restarts: restarted ranks could read
        # the dead ranks' addresses (pytorch#135712); this gives every restart a fresh store
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
    all_mounts = _mounts(mounts, data_volume, output_volume)
    kwargs = {"image": image} if image else {}
    app = ddp(
        *args,
        m="torchrec_multihash.cli",
        name=name,
        h=h,
        cpu=cpu,
        gpu=gpu,
        memMB=memMB,
        j=j,
        env=env,
        max_retries=max_retries,
        rdzv_port=rdzv_port,
        mounts=all_mounts or None,
        **kwargs,
    )
    role = app.roles[0]
    role.name = "trainer"
    if h is None and not memMB:  # torchx's ddp turns 0 into 1 GiB: ask for none (the schedulers then omit it)
        role.resource.memMB = 0
    cmd = role.args[-1]
    if not cmd.startswith("torchrun "):
        raise RuntimeError(f"unexpected ddp command, cannot set its torchrun: {cmd[:80]}")
    restarts = f"--max_restarts {max_restarts} " if max_restarts else ""
    role.args[-1] = f"{shlex.quote(_torchrun(image))} {restarts}" + cmd[len("torchrun ") :]
    return app
