"""Criteo TSV reading per rank, W ranks simulated in one process: samples/s of rank 0 reading its own
byte range against every rank reading every line (and decoding its own batches); and the
vocabulary count's lines/s, vectorised against row by row.

    python -m torchrec_multihash.bench.tsv_reader FILE.tsv [--world-sizes 1,2,4,8] [--batch-size 2048]
"""

import argparse
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from torchrec_multihash.datasets.criteo_loader import CriteoBatchDataset
from torchrec_multihash.datasets.criteo_tsv import DEFAULT_SPARSE_NAMES, NUM_SPARSE, Span, read_rows
from torchrec_multihash.datasets.id_mapping import HashingIds, Vocabulary
from torchrec_multihash.datasets.tsv_ranges import RankShare
from torchrec_multihash.datasets.value_counts import count_values


def read_rank(paths: List[Path], batch_size: int, rank: int, world_size: int, own_range: bool) -> Dict[str, float]:
    """Reads all of rank ``rank``'s batches: of its own range, or of every line (the old scheme)."""
    ds = CriteoBatchDataset(paths, batch_size, list(DEFAULT_SPARSE_NAMES), HashingIds([1 << 20] * NUM_SPARSE), rank, world_size)
    if not own_range:
        ds.share = RankShare([Span(p) for p in paths], rank, world_size)
    samples, t0 = 0, time.perf_counter()
    for item in ds:
        samples += item.batch.labels.numel() if item.batch is not None else 0
    seconds = time.perf_counter() - t0
    return {"world_size": world_size, "own_range": own_range, "samples": samples, "seconds": seconds, "samples_per_s": samples / seconds}


def count_vocabulary(paths: List[Path], row_by_row: bool, max_size: int = 1_000_000) -> Dict[str, float]:
    """Lines/s of counting the files' categorical values for a vocabulary."""
    t0 = time.perf_counter()
    if row_by_row:
        vocab = Vocabulary.build(read_rows(paths), NUM_SPARSE, max_size=max_size)
    else:
        counts = count_values(paths, NUM_SPARSE, max_size)
        vocab = Vocabulary.from_values([counts.most_common(f, max_size) for f in range(NUM_SPARSE)], 1)
    seconds = time.perf_counter() - t0
    lines = sum(1 for p in paths for _ in open(p, "rb"))
    return {"row_by_row": row_by_row, "lines": lines, "seconds": seconds, "lines_per_s": lines / seconds, "ids": sum(vocab.sizes())}


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("files", nargs="+", type=Path, help="plain Criteo TSV files")
    p.add_argument("--world-sizes", default="1,2,4,8")
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--no-vocabulary", action="store_true")
    args = p.parse_args(argv)
    print("| ranks | rank 0 reads | samples | seconds | samples/s of rank 0 | own range vs all lines |\n| --- | --- | --- | --- | --- | --- |")
    for w in (int(x) for x in args.world_sizes.split(",")):
        runs = [read_rank(args.files, args.batch_size, 0, w, own) for own in ((True,) if w == 1 else (False, True))]
        for r in runs:
            what = "its own range" if r["own_range"] else "every line"
            ratio = r["samples_per_s"] / runs[0]["samples_per_s"]
            print(f"| {w} | {what} | {r['samples']:,} | {r['seconds']:.1f} | {r['samples_per_s']:,.0f} | {ratio:.2f}x |")
    if not args.no_vocabulary:
        print("\n| vocabulary count | lines | seconds | lines/s | vs row by row |\n| --- | --- | --- | --- | --- |")
        runs = [count_vocabulary(args.files, row_by_row) for row_by_row in (True, False)]
        assert runs[0]["ids"] == runs[1]["ids"]
        for r in runs:
            what = "row by row (before)" if r["row_by_row"] else "numpy blocks"
            print(f"| {what} | {r['lines']:,} | {r['seconds']:.1f} | {r['lines_per_s']:,.0f} | {r['lines_per_s'] / runs[0]['lines_per_s']:.2f}x |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
