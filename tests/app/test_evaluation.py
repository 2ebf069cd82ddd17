"""Evaluation counts every test sample once at any world size: ranks with fewer or smaller test
batches pad them (the sharded lookups exchange equal batches), and the padding is not counted."""

import math
from typing import List

import pytest
import torch
import torch.distributed as dist
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.app.evaluation import evaluate

from tests.helpers.distributed import run_multiprocess

KEYS = ["a", "b"]
NUM_DENSE = 3


def _batch(start: int, size: int) -> Batch:
    """Samples ``start .. start + size - 1``: a dense row and labels that depend on the sample only."""
    g = torch.Generator().manual_seed(start)
    lengths = torch.randint(0, 3, (len(KEYS) * size,), generator=g)
    dense = torch.stack([torch.arange(start, start + size, dtype=torch.float32).sin(), torch.rand(size, generator=g), torch.ones(size)], dim=1)
    return Batch(
        dense_features=dense,
        sparse_features=KeyedJaggedTensor(keys=KEYS, values=torch.randint(0, 10, (int(lengths.sum()),), generator=g), lengths=lengths, stride=size),
        labels=(torch.arange(start, start + size) % 3 == 0).float(),
    )


class _Model(torch.nn.Module):
    """DLRMTrain's outputs from the dense features and the bags' sizes; checks, as a sharded
    lookup needs, that every rank's batch has the same size and all keys."""

    def forward(self, b: Batch):
        sizes = [torch.zeros(1, dtype=torch.long) for _ in range(dist.get_world_size())]
        dist.all_gather(sizes, torch.tensor([b.labels.numel()]))
        assert len({int(s) for s in sizes}) == 1, sizes
        assert b.sparse_features.keys() == KEYS
        bag_sizes = b.sparse_features.lengths().view(len(KEYS), -1).sum(0).float()
        logits = b.dense_features @ torch.tensor([2.0, -1.0, 0.1]) + 0.3 * bag_sizes
        return None, (None, logits, b.labels)


SPLITS = {0: [(0, 4), (4, 4), (8, 3)], 1: [(11, 4)]}  # rank 1: one batch; rank 0: three, the last partial


def _reference(batches: List[Batch]) -> dict:
    """The metrics of all samples at once, without the evaluation's collectives or padding."""
    from torchmetrics.functional.classification import binary_auroc

    dense = torch.cat([b.dense_features for b in batches])
    bag_sizes = torch.cat([b.sparse_features.lengths().view(len(KEYS), -1).sum(0).float() for b in batches])
    logits, labels = dense @ torch.tensor([2.0, -1.0, 0.1]) + 0.3 * bag_sizes, torch.cat([b.labels for b in batches])
    logloss = float(torch.nn.functional.binary_cross_entropy_with_logits(logits, labels))
    p = float(labels.mean())
    return {
        "auc": float(binary_auroc(torch.sigmoid(logits), labels.long())),
        "logloss": logloss,
        "ne": logloss / -(p * math.log(p) + (1 - p) * math.log(1 - p)),
    }


def _worker(rank: int, world_size: int) -> None:
    got = evaluate(_Model(), iter([_batch(s, n) for s, n in SPLITS[rank]]), torch.device("cpu"), KEYS, NUM_DENSE)
    want = _reference([_batch(s, n) for r in (0, 1) for s, n in SPLITS[r]])
    assert got["test_samples"] == 15
    for key in ("auc", "logloss", "ne"):
        assert got[key] == pytest.approx(want[key], rel=1e-6), key


@pytest.mark.distributed
def test_two_ranks_of_unequal_test_sets_evaluate_every_sample_once():
    run_multiprocess(_worker, 2)
