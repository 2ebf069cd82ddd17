"""Joins the job's process group: torchrun / TorchX set RANK, WORLD_SIZE and the rendezvous; a
process started alone makes a group of one."""

import os
import socket

import torch
import torch.distributed as dist


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def setup_distributed(device: str = "auto") -> torch.device:
    """Joins the job's process group (torchrun / TorchX env), or makes a group of one; ``device``:
    "auto" (CUDA where there is a GPU, else CPU), "cpu" or "cuda" (an error without a GPU)."""
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device is visible to this process")
    if "RANK" not in os.environ:
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", LOCAL_WORLD_SIZE="1", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
    if device != "cpu" and torch.cuda.is_available():
        chosen = torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        torch.cuda.set_device(chosen)
        backend = "nccl"
    else:
        chosen = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return chosen
