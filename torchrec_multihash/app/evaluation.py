"""Evaluation over every rank's test batches, and the batch stream all ranks stop together."""

import math
from typing import Dict, Iterator, Optional

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch

from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError


def synchronized(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """Stops every rank as soon as one runs out (sharded steps need all ranks), or meets bad data:
    that rank raises its error, the others one that names it (none waits in a collective)."""
    it = iter(batches)
    while True:
        error: Optional[CriteoFormatError] = None
        try:
            b = next(it, None)
        except CriteoFormatError as e:
            b, error = None, e
        # 1: a batch, 0: the end, -1 - r: rank r met bad data
        flag = torch.tensor([-1 - dist.get_rank() if error else 0 if b is None else 1], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        code = int(flag.item())
        if error is not None:
            raise error
        if code < 0:
            raise CriteoFormatError(f"stopped: rank {-1 - code} met bad data (its error says where)")
        if code == 0:
            return
        yield b


def evaluate(dmp: torch.nn.Module, batches: Iterator[Batch], device: torch.device) -> Dict[str, float]:
    """AUC, log loss and normalized entropy over all ranks' test batches."""
    dmp.eval()
    auroc = BinaryAUROC().to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # bce sum, label sum, count
    with torch.no_grad():
        for b in synchronized(batches, device):
            b = b.to(device)
            _, (_, logits, labels) = dmp(b)
            auroc.update(torch.sigmoid(logits), labels.long())
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
            sums += torch.stack([bce.double(), labels.sum().double(), torch.tensor(float(labels.numel()), dtype=torch.float64, device=device)])
    dist.all_reduce(sums)
    dmp.train()
    n = sums[2].item()
    if n == 0:
        raise CriteoFormatError("the test data gave no sample to evaluate on (with several ranks, only full batches count)")
    logloss = sums[0].item() / n
    p = min(max(sums[1].item() / n, 1e-12), 1 - 1e-12)
    base = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    return {"auc": float(auroc.compute()), "logloss": logloss, "ne": logloss / base, "test_samples": int(n)}
