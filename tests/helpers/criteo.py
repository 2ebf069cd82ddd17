"""Criteo rows grouped into batches line by line: the reference the block parser is checked against."""

from typing import Callable, Iterable, Iterator, List, Optional

from torchrec.datasets.utils import Batch

from torchrec_multihash.datasets.batching import rows_to_batch
from torchrec_multihash.datasets.criteo_tsv import CriteoRow


def batches(
    rows: Iterable[CriteoRow], batch_size: int, keys: List[str], to_id: Callable[[int, Optional[int]], int], drop_last: bool = False
) -> Iterator[Batch]:
    buf: List[CriteoRow] = []
    for row in rows:
        buf.append(row)
        if len(buf) == batch_size:
            yield rows_to_batch(buf, keys, to_id)
            buf = []
    if buf and not drop_last:
        yield rows_to_batch(buf, keys, to_id)
