"""One rank's training batches of TorchRec's preprocessed Criteo (``day_N_{dense,sparse,labels}.npy``),
memory-mapped, reached in O(1) from any data position, optionally in a seeded shuffled order.

The files are read as one sequence of rows cut into whole batches of ``batch_size`` rows, as
TorchRec's ``InMemoryBinaryCriteoIterDataPipe`` cuts them for training (``drop_last``): global batch
``b`` holds rows ``b * batch_size ...``, and rank ``r`` of ``world_size`` takes every
``world_size``-th batch of the epoch's order from ``r`` on. The order is the files' (the same
batches as TorchRec's pipe, tested), or with ``shuffle_seed`` a permutation of all whole batches
drawn from ``(shuffle_seed, epoch)``: every epoch another order, the same on every rank and in every
process, so a resume at this rank's batch ``skip`` reads the batches an uninterrupted run would.
Batch ``skip`` is found by arithmetic (no batch before it is read), so a resume deep into a
Criteo-1TB epoch starts as fast as one at its beginning. DataLoader workers take this rank's batches
round-robin, the order in which the DataLoader returns them.
"""

import bisect
import warnings
from typing import Callable, Iterator, List, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError


class NpyTrainBatches(IterableDataset):
    """This rank's whole training batches of the npy ``triplets`` (dense, sparse, labels paths per
    day) for ``epoch``, from its batch ``skip`` on; sparse ids taken modulo ``hashes``;
    ``check(batch, where)`` sees every batch (``where(row)`` names the file and row)."""

    def __init__(
        self,
        triplets: Sequence[Sequence[str]],
        batch_size: int,
        rank: int,
        world_size: int,
        keys: List[str],
        hashes: Sequence[int],
        epoch: int = 0,
        skip: int = 0,
        shuffle_seed: Optional[int] = None,
        check: Optional[Callable[[Batch, Callable[[int], str]], Batch]] = None,
    ) -> None:
        super().__init__()
        self.triplets = [list(t) for t in triplets]
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.keys, self.hashes = keys, np.asarray(hashes, dtype=np.int64).reshape(1, -1)
        self.epoch, self.skip, self.shuffle_seed, self.check = epoch, skip, shuffle_seed, check
        rows = [len(np.load(t[0], mmap_mode="r")) for t in self.triplets]
        self.file_starts = np.cumsum([0] + rows).tolist()
        self.num_batches = self.file_starts[-1] // batch_size // world_size * world_size  # of all ranks

    def __len__(self) -> int:
        """This rank's batches in an epoch."""
        return self.num_batches // self.world_size

    def order(self) -> np.ndarray:
        """The global batches of this rank, in the epoch's order."""
        order = np.arange(self.num_batches, dtype=np.int64)
        if self.shuffle_seed is not None:
            order = np.random.default_rng([self.shuffle_seed, self.epoch]).permutation(self.num_batches)
        return order[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[Batch]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        arrays = [[np.load(p, mmap_mode="r") for p in t] for t in self.triplets]  # opened in each worker
        mine = self.order()[self.skip :]
        for b in mine[worker::workers].tolist():
            yield self._batch(arrays, b)

    def where(self, b: int, row: int) -> str:
        """File and row of global batch ``b``'s ``row``."""
        start = b * self.batch_size + row
        f = bisect.bisect_right(self.file_starts, start) - 1
        return f"{self.triplets[f][0]} row {start - self.file_starts[f]}"

    def _rows(self, arrays: List[List[np.ndarray]], b: int) -> List[np.ndarray]:
        """Dense, sparse and labels of global batch ``b`` (across files where it spans them)."""
        start, end = b * self.batch_size, (b + 1) * self.batch_size
        first = bisect.bisect_right(self.file_starts, start) - 1
        parts: List[List[np.ndarray]] = [[], [], []]
        f = first
        while start < end:
            lo, hi = start - self.file_starts[f], min(end, self.file_starts[f + 1]) - self.file_starts[f]
            for i in range(3):
                parts[i].append(arrays[f][i][lo:hi])
            start += hi - lo
            f += 1
        return [p[0] if len(p) == 1 else np.concatenate(p) for p in parts]

    def _batch(self, arrays: List[List[np.ndarray]], b: int) -> Batch:
        dense, sparse, labels = self._rows(arrays, b)
        n = len(dense)
        if sparse.min() < 0:  # the modulo would turn it into some other id, silently
            row = int(np.flatnonzero((sparse < 0).any(axis=1))[0])
            raise CriteoFormatError(f"{self.where(b, row)}: negative sparse id(s) {sparse[row][sparse[row] < 0].tolist()}")
        values = (sparse % self.hashes).T.reshape(-1)  # feature-major, as a KJT holds them (a copy)
        with warnings.catch_warnings():  # dense: the read-only map itself, as TorchRec's pipe gives it (nothing writes to it)
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            batch = Batch(
                dense_features=torch.from_numpy(dense if dense.dtype == np.float32 else dense.astype(np.float32)),
                sparse_features=KeyedJaggedTensor(
                    keys=self.keys,
                    values=torch.from_numpy(values),
                    lengths=torch.ones(n * len(self.keys), dtype=torch.int32),
                    stride=n,
                ),
                labels=torch.from_numpy(np.array(labels, dtype=np.float32).reshape(-1)),
            )
        return self.check(batch, lambda row: self.where(b, row)) if self.check is not None else batch


def npy_train_batches(dataset: NpyTrainBatches, num_workers: int = 0) -> Iterator[Batch]:
    """The dataset's batches, built in ``num_workers`` DataLoader workers (0: in this process)."""
    if num_workers > 0:
        return iter(DataLoader(dataset, batch_size=None, num_workers=num_workers))
    return iter(dataset)
