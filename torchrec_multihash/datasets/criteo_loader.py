"""One rank's batches of Criteo TSV files, parsed only by that rank, optionally in DataLoader workers.

Each rank reads only its own share of the files (``tsv_ranges``: a byte range of the plain files,
or whole .gz files), and its batch ``i`` is the non-blank lines ``i * batch_size ... (i + 1) *
batch_size - 1`` of that share, taken in order. (With fewer .gz files than ranks, every rank reads
all lines and global batch ``b`` belongs to rank ``b % world_size``.) A DataLoader's workers take
this rank's batches round-robin, the order in which it returns them: each worker reads the rank's
share but parses only its own batches (the others are counted, not decoded), so the batches and
their order do not depend on the number of workers, and a data position (``skip``) is the count of
this rank's batches done.
"""

from dataclasses import dataclass, field
from typing import Iterator, List, Optional, Sequence

from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchrec.datasets.utils import Batch

from torchrec_multihash.datasets.batching import lines_to_batch
from torchrec_multihash.datasets.criteo_tsv import BadLines, CriteoFormatError, LineStream, PathLike
from torchrec_multihash.datasets.id_mapping import IdMapping
from torchrec_multihash.datasets.tsv_ranges import rank_share


@dataclass
class _Item:
    """What a worker sends: a batch (None when all its lines were bad, or at the end), the bad
    lines met since the previous item, or the error that stopped it."""

    batch: Optional[Batch]
    bad_lines: List[str] = field(default_factory=list)
    error: Optional[CriteoFormatError] = None


class CriteoBatchDataset(IterableDataset):
    """This rank's batches (see the module docstring), from its ``skip``-th on. Bad lines are
    dropped from their batch and reported (the batch is that much smaller); with
    ``tolerate_corrupt`` a truncated ``.gz`` ends its file and is reported like a bad line."""

    def __init__(
        self,
        paths: Sequence[PathLike],
        batch_size: int,
        keys: List[str],
        to_id: IdMapping,
        rank: int = 0,
        world_size: int = 1,
        skip: int = 0,
        drop_last: bool = False,
        labeled: bool = True,
        tolerate_corrupt: bool = False,
    ) -> None:
        super().__init__()
        self.paths, self.batch_size, self.keys, self.to_id = list(paths), batch_size, keys, to_id
        self.rank, self.world_size, self.skip = rank, world_size, skip
        self.drop_last, self.labeled, self.tolerate_corrupt = drop_last, labeled, tolerate_corrupt
        self.share = rank_share(self.paths, rank, world_size)

    def __iter__(self) -> Iterator[_Item]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        bs, slot, world = self.batch_size, self.share.slot, self.share.slots
        # this worker's batches: the rank's (skip + worker)-th, then every `workers`-th after it
        first, step = slot + (self.skip + worker) * world, workers * world
        lines = LineStream(self.share.spans, tolerate_corrupt=self.tolerate_corrupt)

        def mine(position: int) -> bool:
            b = position // bs
            return b % world == slot and b // world >= self.skip and (b // world - self.skip) % workers == worker

        try:
            b = first
            while True:
                lines.skip(b * bs - lines.position)
                raw = lines.take(bs) if lines.position == b * bs else []  # [] : the files end before
                bad = [str(e) for pos, e in lines.corrupt if mine(pos)]
                lines.corrupt.clear()
                if len(raw) < bs and (self.drop_last or not raw):
                    dropped = lines_to_batch(raw, self.keys, self.to_id, self.labeled)[1] if raw else []  # checked all the same
                    yield _Item(None, bad + dropped)
                    return
                batch, errors = lines_to_batch(raw, self.keys, self.to_id, self.labeled)
                yield _Item(batch, bad + errors)
                if len(raw) < bs:
                    return
                b += step
        except CriteoFormatError as e:
            yield _Item(None, error=e)
        finally:
            lines.close()


def criteo_batches(dataset: CriteoBatchDataset, bad_lines: BadLines, num_workers: int = 0) -> Iterator[Batch]:
    """The dataset's batches, read in ``num_workers`` DataLoader workers (0: in this process);
    bad lines are counted by ``bad_lines``, which raises past its limit."""
    items = DataLoader(dataset, batch_size=None, num_workers=num_workers) if num_workers > 0 else dataset
    for item in items:
        for message in item.bad_lines:
            bad_lines.add(message)
        if item.error is not None:
            raise item.error
        if item.batch is not None:
            yield item.batch
