"""TorchX components that launch torchrec-multihash training locally or on clusters.

    torchx run -s local_cwd launch/components.py:dlrm -j 1x2 --config configs/quickstart.yaml
    torchx run -s slurm launch/components.py:dlrm -j 2x8 --gpu 8 --config configs/criteo_1tb_qr.yaml
    torchx run -s kubernetes -cfg queue=default launch/components.py:dlrm -j 2x8 --gpu 8 \\
        --image ghcr.io/you/torchrec-multihash:latest --config configs/criteo_1tb_qr.yaml
"""

from typing import Dict, List, Optional

import torchx.specs as specs
from torchx.components.dist import ddp


def dlrm(
    *overrides: str,
    config: str = "configs/quickstart.yaml",
    metrics_out: Optional[str] = None,
    j: str = "1x2",
    cpu: int = 2,
    gpu: int = 0,
    memMB: int = 8192,
    h: Optional[str] = None,
    image: str = "",
    name: str = "torchrec-multihash",
    max_retries: int = 0,
    max_restarts: int = 0,
    env: Optional[Dict[str, str]] = None,
    mounts: Optional[List[str]] = None,
    rdzv_port: int = 29500,
) -> specs.AppDef:
    """Trains a sharded DLRM with multi-hash embedding tables (torchrec-multihash train).

    Args:
        overrides: config overrides as key=value (each becomes --set key=value), e.g. train.epochs=2
        config: YAML config, relative to the job's working directory
        metrics_out: write the final metrics (AUC, log loss, NE, memory, speed) as JSON here
        j: nnodes x nproc_per_node, e.g. 1x2 (one node, two processes) or 2x8
        cpu: CPUs per node
        gpu: GPUs per node (one rank per GPU)
        memMB: memory per node in MB
        h: a named resource (e.g. a cloud instance type) instead of cpu/gpu/memMB
        image: the image (a folder for local_cwd; a container image on kubernetes)
        name: job name
        max_retries: scheduler retries of the whole job after a failure (Slurm, Kubernetes; the
            local schedulers do not retry)
        max_restarts: torchrun restarts of all ranks after one fails, on any scheduler (local too)
        env: extra environment variables
        mounts: mounts (kubernetes: type=bind,src=...,dst=...)
        rdzv_port: rendezvous port on the first node
    """
    args = ["train", "--config", config]
    if max_retries or max_restarts:
        args += ["--resume", "auto"]  # a retried or restarted job continues from its last checkpoint
    for o in overrides:
        if "=" not in o:
            raise ValueError(f"override {o!r} is not key=value (e.g. train.batch_size=512)")
        args += ["--set", o]
    if metrics_out:
        args += ["--metrics-out", metrics_out]
    env = {"OMP_NUM_THREADS": "1", **(env or {})}
    if max_restarts:
        # torch 2.13 keeps torchrun's rendezvous store across restarts: restarted ranks could read
        # the dead ranks' addresses (pytorch#135712); this gives every restart a fresh store
        env.setdefault("TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "1")
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
        mounts=mounts,
        **kwargs,
    )
    app.roles[0].name = "trainer"
    if max_restarts:
        cmd = app.roles[0].args[-1]
        if not cmd.startswith("torchrun "):
            raise RuntimeError(f"unexpected ddp command, cannot add --max_restarts: {cmd[:80]}")
        app.roles[0].args[-1] = f"torchrun --max_restarts {max_restarts} " + cmd[len("torchrun ") :]
    return app
