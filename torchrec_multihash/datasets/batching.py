"""Groups parsed rows into TorchRec ``Batch``es (dense, KJT, labels)."""

from typing import Callable, Iterable, Iterator, List, Optional, Sequence

import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.datasets.criteo_tsv import CriteoRow


def rows_to_batch(rows: Sequence[CriteoRow], keys: List[str], to_id: Callable[[int, Optional[int]], int]) -> Batch:
    """One-hot KJT (one id per feature and sample), key-major as TorchRec expects."""
    n = len(rows)
    dense = torch.tensor([r.dense for r in rows], dtype=torch.float32)
    labels = torch.tensor([r.label if r.label is not None else 0 for r in rows], dtype=torch.float32)
    values = torch.tensor([to_id(f, r.sparse[f]) for f in range(len(keys)) for r in rows], dtype=torch.long)
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=torch.ones(n * len(keys), dtype=torch.int32), stride=n)
    return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


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
