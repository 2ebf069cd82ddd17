"""How often each categorical value of each feature occurs, counted with numpy a block of lines at
a time, in memory bounded by a capacity: what a vocabulary is built from."""

import functools
import multiprocessing
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import List, Optional, Sequence, Tuple, Union

import numpy as np

from torchrec_multihash.datasets.batching import parse_lines
from torchrec_multihash.datasets.criteo_tsv import BadLines, LineStream, ParsedBlock, PathLike, Span
from torchrec_multihash.datasets.tsv_ranges import rank_share


class ValueCounts:
    """Per feature, its distinct values and their counts, with the guarantee of ``HeavyHitters``
    (Misra-Gries with batched decrements): exact while a feature has at most ``2 * capacity``
    distinct values; beyond, a count is too low by at most ``n / (capacity + 1)``.

    Values are gathered raw and merged (sorted, summed) once they outnumber the counted ones, so
    the sort is paid about twice per value; two counts merge (``merge``) with the same guarantee.
    """

    def __init__(self, num_features: int, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.values = [np.empty(0, dtype=np.int64) for _ in range(num_features)]
        self.counts = [np.empty(0, dtype=np.int64) for _ in range(num_features)]
        self.pruned = False  # True once counts may be under the true ones
        self._pending: List[List[np.ndarray]] = [[] for _ in range(num_features)]
        self._pending_len = [0] * num_features

    def add(self, block: ParsedBlock) -> None:
        """Counts the (non-missing) values of a parsed block."""
        for f in range(len(self.values)):
            v = block.sparse[~block.missing[:, f], f]
            self._pending[f].append(v)
            self._pending_len[f] += len(v)
            if self._pending_len[f] > max(len(self.values[f]), 1 << 20):
                self._flush(f)

    def _flush(self, f: int, more: Sequence[Tuple[np.ndarray, np.ndarray]] = ()) -> None:
        """Merges feature ``f``'s pending values (and ``more`` (values, counts) pairs) into its counts."""
        pending = self._pending[f]
        parts = [(self.values[f], self.counts[f]), *more, *((v, np.ones(len(v), dtype=np.int64)) for v in pending)]
        values, inverse = np.unique(np.concatenate([p[0] for p in parts]), return_inverse=True)
        counts = np.bincount(inverse.ravel(), weights=np.concatenate([p[1] for p in parts]), minlength=len(values)).astype(np.int64)
        if len(values) > 2 * self.capacity:
            delta = np.partition(counts, len(counts) - self.capacity - 1)[len(counts) - self.capacity - 1]
            keep = counts > delta
            values, counts = values[keep], counts[keep] - delta
            self.pruned = True
        self.values[f], self.counts[f] = values, counts
        self._pending[f], self._pending_len[f] = [], 0

    def done(self) -> "ValueCounts":
        """Merges what is pending (before ``most_common``, ``merge`` or pickling); returns self."""
        for f in range(len(self.values)):
            if self._pending[f]:
                self._flush(f)
        return self

    def merge(self, other: "ValueCounts") -> "ValueCounts":
        """Adds ``other``'s counts (e.g. another rank's share of the data) to these; returns self."""
        other.done()
        for f in range(len(self.values)):
            self._flush(f, [(other.values[f], other.counts[f])])
        self.pruned = self.pruned or other.pruned
        return self

    def most_common(self, f: int, k: int, min_count: int = 1) -> np.ndarray:
        """Feature ``f``'s up to ``k`` values counted at least ``min_count`` times, by falling count
        then value (``HeavyHitters.most_common``'s order)."""
        self.done()
        kept = self.counts[f] >= min_count
        values, counts = self.values[f][kept], self.counts[f][kept]
        return values[np.lexsort((values, -counts))[:k]]


def count_values(
    spans: Sequence[Union[PathLike, Span]],
    num_features: int,
    capacity: int,
    bad: Optional[BadLines] = None,
    labeled: bool = True,
    block_lines: int = 1 << 16,
    slot: int = 0,
    slots: int = 1,
) -> ValueCounts:
    """The value counts of the files (or byte ranges), blocks of ``block_lines`` lines parsed at
    once; of those blocks, only every ``slots``-th from the ``slot``-th (one process's part when
    several read the same lines). Bad lines are left out and counted by ``bad``, which raises past
    its limit."""
    bad = bad if bad is not None else BadLines()
    counts = ValueCounts(num_features, capacity)
    stream = LineStream(spans, tolerate_corrupt=bad.limit > 0)
    try:
        stream.skip(slot * block_lines)
        while True:
            lines = stream.take(block_lines)
            for position, corrupt in stream.corrupt:
                if (position // block_lines) % slots == slot:  # once over the processes
                    bad.add(str(corrupt))
            stream.corrupt.clear()
            if not lines:
                return counts.done()
            block, errors = parse_lines(lines, labeled)
            for error in errors:
                bad.add(error)
            if block is not None:
                counts.add(block)
            stream.skip((slots - 1) * block_lines)
    finally:
        stream.close()


def _count_share(paths: List[Path], num_features: int, capacity: int, skip_bad_lines: int, labeled: bool, index: int, processes: int) -> ValueCounts:
    share = rank_share(paths, index, processes, warn=False)
    return count_values(share.spans, num_features, capacity, BadLines(skip_bad_lines, warn_first=0), labeled, slot=share.slot, slots=share.slots)


def count_values_in_processes(
    paths: Sequence[PathLike], num_features: int, capacity: int, processes: int, skip_bad_lines: int = 0, labeled: bool = True
) -> ValueCounts:
    """``count_values`` of the files split over ``processes`` processes, each its own share
    (``tsv_ranges``, as ranks share them), merged in order; bad lines are limited per process."""
    files = [Path(p) for p in paths]
    if processes <= 1:
        return count_values(files, num_features, capacity, BadLines(skip_bad_lines, warn_first=0), labeled)
    count = functools.partial(_count_share, files, num_features, capacity, skip_bad_lines, labeled, processes=processes)
    with ProcessPoolExecutor(processes, mp_context=multiprocessing.get_context("spawn")) as pool:
        parts = list(pool.map(count, range(processes)))
    total = parts[0]
    for other in parts[1:]:
        total.merge(other)
    return total
