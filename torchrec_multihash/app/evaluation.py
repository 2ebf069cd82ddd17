"""Evaluation over every rank's test batches, and the batch stream all ranks stop together."""

import math
from typing import Dict, Iterator, List, Optional, Tuple

import torch
import torch.distributed as dist
from torchmetrics.classification import BinaryAUROC
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError


def _agree(it: Iterator[Batch], device: torch.device) -> Tuple[Optional[Batch], int, int]:
    """This rank's next batch (None at its end), and the smallest and the largest batch size over
    all ranks (0: a rank's end; a collective). Bad data met by any rank stops every rank: that
    rank raises its error, the others one that names it (none waits in a collective)."""
    error: Optional[CriteoFormatError] = None
    try:
        b = next(it, None)
    except CriteoFormatError as e:
        b, error = None, e
    n = 0 if b is None else b.labels.numel()
    # MIN of: -1 - r if rank r met bad data (else 0), the batch size, minus the batch size
    flags = torch.tensor([-1 - dist.get_rank() if error else 0, n, -n], device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    code, smallest, largest = int(flags[0]), int(flags[1]), -int(flags[2])
    if error is not None:
        raise error
    if code < 0:
        raise CriteoFormatError(f"stopped: rank {-1 - code} met bad data (its error says where)")
    return b, smallest, largest


def synchronized(batches: Iterator[Batch], device: torch.device) -> Iterator[Batch]:
    """Stops every rank as soon as one runs out (sharded steps need all ranks), or meets bad data."""
    it = iter(batches)
    while True:
        b, smallest, _ = _agree(it, device)
        if b is None or smallest == 0:
            return
        yield b


def padded(b: Batch, size: int) -> Batch:
    """``b`` with empty samples (no ids, zero dense features, label 0) appended up to ``size``."""
    n = b.labels.numel()
    if n == size:
        return b
    kjt = b.sparse_features
    keys = kjt.keys()
    lengths = kjt.lengths().view(len(keys), n)
    lengths = torch.cat([lengths, lengths.new_zeros(len(keys), size - n)], dim=1).view(-1)
    return Batch(
        dense_features=torch.cat([b.dense_features, b.dense_features.new_zeros(size - n, b.dense_features.size(1))]),
        sparse_features=KeyedJaggedTensor(keys=keys, values=kjt.values(), weights=kjt.weights_or_none(), lengths=lengths, stride=size),
        labels=torch.cat([b.labels, b.labels.new_zeros(size - n)]),
    )


def empty_batch(keys: List[str], num_dense: int, size: int) -> Batch:
    """``size`` empty samples: what a rank that ran out of test batches looks up while others can't."""
    kjt = KeyedJaggedTensor(keys=keys, values=torch.zeros(0, dtype=torch.long), lengths=torch.zeros(len(keys) * size, dtype=torch.int), stride=size)
    return Batch(dense_features=torch.zeros(size, num_dense), sparse_features=kjt, labels=torch.zeros(size))


def _in_step(batches: Iterator[Batch], keys: List[str], num_dense: int, device: torch.device) -> Iterator[Tuple[Batch, int]]:
    """Every rank's test batches in steps all ranks take together, each padded to the step's
    largest batch (the sharded lookups exchange equal batches), with its number of real samples;
    a rank that ran out takes empty batches until all have. Bad data stops every rank at once."""
    it = iter(batches)
    while True:
        b, _, largest = _agree(it, device)
        if largest == 0:
            return
        yield (padded(b, largest), b.labels.numel()) if b is not None else (empty_batch(keys, num_dense, largest), 0)


def evaluate(dmp: torch.nn.Module, batches: Iterator[Batch], device: torch.device, keys: List[str], num_dense: int) -> Dict[str, float]:
    """AUC, log loss and normalized entropy over all ranks' test batches, every sample counted
    once at any world size (``keys``, ``num_dense``: the batches' features, for padding)."""
    dmp.eval()
    auroc = BinaryAUROC().to(device)
    sums = torch.zeros(3, dtype=torch.float64, device=device)  # bce sum, label sum, count
    with torch.no_grad():
        for b, n in _in_step(batches, keys, num_dense, device):
            b = b.to(device)
            _, (_, logits, labels) = dmp(b)
            logits, labels = logits[:n], labels[:n]  # the padding's predictions are not counted
            if n > 0:
                auroc.update(torch.sigmoid(logits), labels.long())
            bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, labels, reduction="sum")
            sums += torch.stack([bce.double(), labels.sum().double(), torch.tensor(float(n), dtype=torch.float64, device=device)])
    dist.all_reduce(sums)
    dmp.train()
    count = sums[2].item()
    if count == 0:
        raise CriteoFormatError("the test data gave no sample to evaluate on")
    logloss = sums[0].item() / count
    p = min(max(sums[1].item() / count, 1e-12), 1 - 1e-12)
    base = -(p * math.log(p) + (1 - p) * math.log(1 - p))
    return {"auc": float(auroc.compute()), "logloss": logloss, "ne": logloss / base, "test_samples": int(count)}
