"""``python -m torchrec_multihash.bench.npy_loader``: the npy training reader against TorchRec's
``InMemoryBinaryCriteoIterDataPipe`` on the same files (one process, ``OMP_NUM_THREADS=1``),
DataLoader workers, and the time to the first batch of a resume; a markdown table on stdout.

Without ``--days`` it writes ``--rows`` random rows as three days of TorchRec's npy layout into
``--out`` first (the reading cost does not depend on the values).
"""

import argparse
import itertools
import time
from pathlib import Path
from typing import Callable, Iterator, List, Optional

import numpy as np
from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe
from torchrec.datasets.utils import Batch

from torchrec_multihash.datasets.criteo_npy import NpyTrainBatches, npy_train_batches

KEYS = [f"C{i + 1}" for i in range(26)]
HASHES = [10_000_000] * 26  # the Criteo-1TB configs' largest tables


def write_days(out: Path, rows: int, days: int = 3) -> List[List[str]]:
    """``rows`` random rows as ``days`` days of TorchRec's npy layout in ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    g = np.random.default_rng(0)
    triplets = []
    for d in range(days):
        n = rows // days
        p = out / f"day_{d}"
        np.save(f"{p}_dense.npy", g.random((n, 13), dtype=np.float32))
        np.save(f"{p}_sparse.npy", g.integers(0, 2**31 - 1, (n, 26), dtype=np.int32))
        np.save(f"{p}_labels.npy", g.integers(0, 2, (n, 1), dtype=np.int32))
        triplets.append([f"{p}_dense.npy", f"{p}_sparse.npy", f"{p}_labels.npy"])
    return triplets


def _rate(batches: Callable[[], Iterator[Batch]], batch_size: int) -> float:
    """Samples per second of reading every batch."""
    start, n = time.perf_counter(), 0
    for _ in batches():
        n += batch_size
    return n / (time.perf_counter() - start)


def _first(batches: Callable[[], Iterator[Batch]]) -> float:
    start = time.perf_counter()
    next(batches())
    return time.perf_counter() - start


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m torchrec_multihash.bench.npy_loader", description=__doc__)
    p.add_argument("--days", nargs="*", help="*_dense.npy files (default: write --rows random rows into --out)")
    p.add_argument("--rows", type=int, default=3_000_000)
    p.add_argument("--out", type=Path, default=Path("runs/npy_loader"))
    p.add_argument("--batch-size", type=int, default=8192)
    args = p.parse_args(argv)
    if args.days:
        triplets = [[d, d.replace("_dense.npy", "_sparse.npy"), d.replace("_dense.npy", "_labels.npy")] for d in args.days]
    else:
        triplets = write_days(args.out, args.rows)
    bs = args.batch_size

    def theirs() -> Iterator[Batch]:
        paths = [[t[i] for t in triplets] for i in range(3)]
        return iter(
            InMemoryBinaryCriteoIterDataPipe("train", *paths, batch_size=bs, rank=0, world_size=1, drop_last=True, mmap_mode=True, hashes=HASHES)
        )

    def ours(workers: int = 0, skip: int = 0) -> Callable[[], Iterator[Batch]]:
        return lambda: npy_train_batches(NpyTrainBatches(triplets, bs, 0, 1, KEYS, HASHES, skip=skip), workers)

    n = len(NpyTrainBatches(triplets, bs, 0, 1, KEYS, HASHES))
    rows = [
        ("TorchRec's InMemoryBinaryCriteoIterDataPipe (mmap)", _rate(theirs, bs)),
        ("ours, in the training process", _rate(ours(), bs)),
        ("ours, 1 DataLoader worker", _rate(ours(1), bs)),
        ("ours, 2 DataLoader workers", _rate(ours(2), bs)),
    ]
    print(f"| reader ({n} batches of {bs}) | samples/s |\n| --- | --- |")
    for name, rate in rows:
        print(f"| {name} | {rate:,.0f} |")
    last = n - 1
    print(f"\n| time to the first batch | at batch 0 | at batch {last} |\n| --- | --- | --- |")
    print(f"| ours | {_first(ours()) * 1e3:.1f} ms | {_first(ours(skip=last)) * 1e3:.1f} ms |")
    # what resuming cost before: reading every batch before the position (TorchRec's pipe, islice)
    skipped = _first(lambda: itertools.islice(theirs(), last, None))
    print(f"| TorchRec's pipe, skipping (islice) | {_first(theirs) * 1e3:.1f} ms | {skipped * 1e3:.1f} ms |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
