"""Which bytes of the Criteo TSV files a rank reads: its own share of the plain files, or whole .gz files.

Plain files are taken as one run of bytes (file after file) cut into ``world_size`` equal shares;
a line belongs to the share its first byte lies in, so every line is read by exactly one rank and
no rank reads another's bytes. A .gz file cannot be entered in the middle: when any file is
gzipped, whole files go to the ranks, balanced by size, provided there are at least as many files
as ranks; with fewer, every rank reads every file and keeps every ``world_size``-th batch (what a
single .gz file needs to be trained on at all), with a ``SharedReadWarning``.
"""

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import List, Sequence

from torchrec_multihash.datasets.criteo_tsv import PathLike, Span


class SharedReadWarning(UserWarning):
    """The files cannot be split over the ranks: every rank reads all of them."""


def _file_spans(paths: List[Path], sizes: List[int], rank: int, world_size: int) -> List[Span]:
    """Rank ``rank``'s share of the bytes of the (plain) files, as one span per file it touches."""
    total = sum(sizes)
    lo, hi = rank * total // world_size, (rank + 1) * total // world_size
    spans, offset = [], 0
    for path, size in zip(paths, sizes):
        start, end = max(lo, offset) - offset, min(hi, offset + size) - offset
        if start < end:
            spans.append(Span(path, start, end if end < size else None))
        offset += size
    return spans


def _whole_files(paths: List[Path], sizes: List[int], rank: int, world_size: int) -> List[Span]:
    """Rank ``rank``'s whole files: largest first to the rank with the fewest bytes so far (the
    lowest on ties); each rank reads its files in the given order."""
    load, owner = [0] * world_size, [0] * len(paths)
    for i in sorted(range(len(paths)), key=lambda i: (-sizes[i], i)):
        owner[i] = min(range(world_size), key=lambda r: (load[r], r))
        load[owner[i]] += sizes[i]
    return [Span(p) for p, r in zip(paths, owner) if r == rank]


@dataclass
class RankShare:
    """What one rank reads: ``spans``; of their non-blank lines, the batches ``b`` with
    ``b % slots == slot`` (slot 0 of 1 when the spans are the rank's own)."""

    spans: List[Span]
    slot: int = 0
    slots: int = 1


def rank_share(paths: Sequence[PathLike], rank: int = 0, world_size: int = 1, warn: bool = True) -> RankShare:
    """The files' lines that rank ``rank`` of ``world_size`` reads (see the module docstring)."""
    files = [Path(p) for p in paths]
    if world_size == 1:
        return RankShare([Span(p) for p in files])
    sizes = [p.stat().st_size if p.is_file() else 0 for p in files]  # (a missing file is named when read)
    if not any(p.suffix == ".gz" for p in files):
        return RankShare(_file_spans(files, sizes, rank, world_size))
    if len(files) >= world_size:
        return RankShare(_whole_files(files, sizes, rank, world_size))
    if warn:
        warnings.warn(
            f"{len(files)} file(s), some gzipped, for {world_size} ranks: a .gz file cannot be split, so every rank reads every "
            f"file and keeps every {world_size}-th batch; give at least {world_size} files (e.g. split -n l/{world_size}, then gzip) "
            "or plain TSV, which is split by bytes, for each rank to read only its share",
            SharedReadWarning,
            stacklevel=2,
        )
    return RankShare([Span(p) for p in files], rank, world_size)
