"""A run's vocabulary, decided once on rank 0: reused from the run folder when it was made from the
same data and settings, else counted by all ranks, each its own share of the training files
(``tsv_ranges``), merged on rank 0 and saved there; every rank gets rank 0's."""

from pathlib import Path
from typing import Any, List, Optional, Union

import numpy as np
import torch.distributed as dist

from torchrec_multihash.app.config import Config, ConfigError
from torchrec_multihash.app.provenance import data_record, differences
from torchrec_multihash.datasets.criteo_tsv import BadLines, CriteoFormatError
from torchrec_multihash.datasets.id_mapping import Vocabulary
from torchrec_multihash.datasets.tsv_ranges import rank_share
from torchrec_multihash.datasets.value_counts import ValueCounts, count_values


def _load(path: Path) -> Vocabulary:
    try:
        return Vocabulary.load(path)
    except ValueError as e:
        raise ConfigError(f"{e}: delete it to build it again") from None


def _reusable(path: Path, source: Any) -> Optional[Vocabulary]:
    """The vocabulary saved in ``path`` if it was made from ``source``; None (saying why) if not."""
    if not path.is_file():
        return None
    vocab = _load(path)
    changed = differences(vocab.source, source)
    if not changed:
        return vocab
    print(f"Rebuilding {path}, made from other data: {'; '.join(changed[:3])}", flush=True)
    return None


def _count_share(cfg: Config, num_features: int, rank: int, world_size: int) -> Union[ValueCounts, str]:
    """This rank's counts, or the error that stopped them (sent to rank 0 like counts: no rank is
    left waiting in a collective)."""
    d = cfg.data
    share = rank_share(list(d.train or []), rank, world_size, warn=False)
    try:  # its bad lines are counted (and warned about) in training
        return count_values(share.spans, num_features, d.max_vocab_size, BadLines(d.skip_bad_lines, warn_first=0), slot=share.slot, slots=share.slots)
    except CriteoFormatError as e:
        return str(e)


def _decide(cfg: Config, shares: List[Union[ValueCounts, str]], num_features: int) -> Union[List[np.ndarray], str]:
    """Rank 0: the merged counts' vocabulary, per feature its values in id order (or the first error)."""
    errors = [s for s in shares if isinstance(s, str)]
    if errors:
        return errors[0]
    counts = [s for s in shares if isinstance(s, ValueCounts)]
    total = counts[0]
    for other in counts[1:]:
        total.merge(other)
    return [total.most_common(f, cfg.data.max_vocab_size, cfg.data.min_count) for f in range(num_features)]


def run_vocabulary(cfg: Config, num_features: int, rank: int, world_size: int, output_dir: Path) -> Vocabulary:
    """The vocabulary of this run (see the module docstring), in ``output_dir/vocabulary.json``."""
    path, source = output_dir / "vocabulary.json", data_record(cfg)
    box: List[Any] = [None]
    if rank == 0:
        reused = _reusable(path, source)
        box = [None if reused is None else [np.array(sorted(m, key=m.__getitem__), dtype=np.int64) for m in reused.ids]]
    if world_size > 1:
        dist.broadcast_object_list(box, src=0)  # rank 0 says whether to count
    if box[0] is None:
        share = _count_share(cfg, num_features, rank, world_size)
        shares: List[Any] = [None] * world_size
        if world_size > 1:
            dist.gather_object(share, shares if rank == 0 else None, dst=0)
        else:
            shares = [share]
        box = [_decide(cfg, shares, num_features) if rank == 0 else None]
        if world_size > 1:
            dist.broadcast_object_list(box, src=0)
        if isinstance(box[0], str):
            raise CriteoFormatError(box[0])
        if rank == 0:
            _save(Vocabulary.from_values(box[0], cfg.data.min_count), source, output_dir)
    vocab = Vocabulary.from_values(box[0], cfg.data.min_count)
    vocab.source = source
    return vocab


def _save(vocab: Vocabulary, source: Any, output_dir: Path) -> None:
    vocab.source = source
    output_dir.mkdir(parents=True, exist_ok=True)  # (fit-hash has not made it)
    vocab.save(output_dir / "vocabulary.json")
