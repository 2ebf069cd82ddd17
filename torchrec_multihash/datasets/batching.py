"""Groups parsed rows into TorchRec ``Batch``es (dense, KJT, labels)."""

from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError, CriteoRow, Line, ParsedBlock, parse_block, parse_raw
from torchrec_multihash.datasets.id_mapping import IdMapping


def _batch(dense: torch.Tensor, labels: torch.Tensor, values: torch.Tensor, keys: List[str]) -> Batch:
    """One-hot KJT (one id per feature and sample), key-major as TorchRec expects."""
    n = dense.shape[0]
    kjt = KeyedJaggedTensor(keys=keys, values=values, lengths=torch.ones(n * len(keys), dtype=torch.int32), stride=n)
    return Batch(dense_features=dense, sparse_features=kjt, labels=labels)


def rows_to_batch(rows: Sequence[CriteoRow], keys: List[str], to_id: Callable[[int, Optional[int]], int]) -> Batch:
    dense = torch.tensor([r.dense for r in rows], dtype=torch.float32)
    labels = torch.tensor([r.label if r.label is not None else 0 for r in rows], dtype=torch.float32)
    values = torch.tensor([to_id(f, r.sparse[f]) for f in range(len(keys)) for r in rows], dtype=torch.long)
    return _batch(dense, labels, values, keys)


def parse_lines(lines: Sequence[Tuple[Path, Line, bytes]], labeled: bool = True) -> Tuple[Optional[ParsedBlock], List[str]]:
    """Parses (path, line number, raw line) triples: all at once when they are plain Criteo, else
    line by line. Returns the good lines as one block (None if no line is good) and the errors of
    the bad lines (file:line), which are left out."""
    block = parse_block([raw for _, _, raw in lines], labeled)
    if block is not None:
        return block, []
    rows, bad = [], []
    for path, lineno, raw in lines:
        try:
            rows.append(parse_raw(raw, path, lineno, labeled))
        except CriteoFormatError as e:
            bad.append(str(e))
    if not rows:
        return None, bad
    missing = np.array([[v is None for v in r.sparse] for r in rows], dtype=bool)
    return (
        ParsedBlock(
            labels=np.array([r.label or 0 for r in rows], dtype=np.float32),
            dense=np.array([r.dense for r in rows], dtype=np.float32),
            sparse=np.array([[v or 0 for v in r.sparse] for r in rows], dtype=np.int64),
            missing=missing,
        ),
        bad,
    )


def block_ids(block: ParsedBlock, to_id: IdMapping) -> np.ndarray:
    """The block's table ids, [n, features]."""
    return np.stack([to_id.map_array(f, block.sparse[:, f], block.missing[:, f]) for f in range(block.sparse.shape[1])], axis=1)


def lines_to_batch(
    lines: Sequence[Tuple[Path, Line, bytes]], keys: List[str], to_id: IdMapping, labeled: bool = True
) -> Tuple[Optional[Batch], List[str]]:
    """Parses (path, line number, raw line) triples into one batch (``parse_lines``). Returns the
    batch (None if no line is good) and the errors of the bad lines, which are left out."""
    block, bad = parse_lines(lines, labeled)
    if block is None:
        return None, bad
    ids = block_ids(block, to_id).T  # key-major
    return _batch(torch.from_numpy(block.dense), torch.from_numpy(block.labels), torch.from_numpy(np.ascontiguousarray(ids).reshape(-1)), keys), bad


def check_labels(batch: Batch, where: Callable[[int], str]) -> Batch:
    """Rejects labels other than 0 and 1 (as the TSV reader does), naming the row."""
    bad = (batch.labels != 0) & (batch.labels != 1)
    if bool(bad.any()):
        row = int(bad.nonzero()[0])
        raise CriteoFormatError(f"{where(row)}: label must be 0 or 1, got {batch.labels[row].item()}")
    return batch


def check_finite(batch: Batch, where: Callable[[int], str]) -> Batch:
    """Rejects NaN or inf dense features, on the CPU before the batch goes to the device (no sync
    in the training step); ``where(row)`` names the row's file and index for the error."""
    finite = torch.isfinite(batch.dense_features).all(dim=1)
    if not bool(finite.all()):
        row = int((~finite).nonzero()[0])
        raise CriteoFormatError(f"{where(row)}: dense features are not finite (NaN or inf): {batch.dense_features[row].tolist()}")
    return batch
