"""A run's vocabulary, decided once on rank 0: reused from the run folder when it was made from the
same data and settings, else counted by all ranks, each its own share of the training files
(``tsv_ranges``), merged on rank 0 and saved there; every rank gets rank 0's. Under a checkpoint
(the run folder's, or the one being exported) only the vocabulary of the data it was trained on
is used: for other data it is an error, and the saved one is left as it is."""

from pathlib import Path
from typing import Any, List, Optional, Union

import numpy as np
import torch.distributed as dist

from torchrec_multihash.app.config import Config, ConfigError
from torchrec_multihash.app.provenance import Record, data_record, differences
from torchrec_multihash.app.run_folder import run_checkpoint
from torchrec_multihash.datasets.criteo_tsv import BadLines, CriteoFormatError
from torchrec_multihash.datasets.id_mapping import Vocabulary
from torchrec_multihash.datasets.tsv_ranges import rank_share
from torchrec_multihash.datasets.value_counts import ValueCounts, count_values
from torchrec_multihash.distributed.checkpoint import find_checkpoint
from torchrec_multihash.distributed.checkpoint_files import read_manifest
from torchrec_multihash.errors import MultiHashError


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


def _trained_with(path: Path, checkpoint: Path) -> Optional[Record]:
    """What made the vocabulary ``checkpoint`` was trained with: its manifest's record, else (a
    checkpoint of an older version) the record of the vocabulary ``path`` beside it."""
    manifest = read_manifest(checkpoint)
    recorded = manifest["meta"].get("vocabulary") if manifest is not None else None
    if recorded is None and path.is_file():
        recorded = _load(path).source
    return recorded


# what decides a vocabulary's ids, of what ``data_record`` holds (not e.g. train.batch_size)
_DECIDING = ("data.train", "data.format", "data.ids", "data.min_count", "data.max_vocab_size")


def _conflict(path: Path, source: Record, checkpoint: Optional[Path]) -> Optional[str]:
    """Why ``checkpoint`` cannot use a vocabulary made from ``source`` (it was trained with one of
    other data: its rows would go to other values), or None."""
    trained = _trained_with(path, checkpoint) if checkpoint is not None else None
    changed = differences(trained, {k: v for k, v in source.items() if k in _DECIDING}) if trained is not None else []
    if not changed:
        return None
    return (
        f"the checkpoint in {checkpoint} was trained with a vocabulary of other data ({'; '.join(changed[:3])}): "
        f"its rows would go to other values, so {path} is not rebuilt; start a new run on this data "
        "(--overwrite, or another train.output_dir), or use the data it was trained on"
    )


def _saved(path: Path, source: Record, checkpoint: Optional[Path], output_dir: Path) -> Union[None, List[np.ndarray], str]:
    """Rank 0: the saved vocabulary's values per feature if it may be used, None to count again, or
    the error that stops every rank (sent like the values: no rank is left waiting)."""
    try:
        bound = find_checkpoint(checkpoint) if checkpoint is not None else run_checkpoint(output_dir)
        conflict = _conflict(path, source, bound)
        if conflict is not None:
            return conflict
        reused = _reusable(path, source)
    except MultiHashError as e:
        return str(e)
    return None if reused is None else [np.array(sorted(m, key=m.__getitem__), dtype=np.int64) for m in reused.ids]


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


def run_vocabulary(cfg: Config, num_features: int, rank: int, world_size: int, output_dir: Path, checkpoint: Optional[Path] = None) -> Vocabulary:
    """The vocabulary of this run (see the module docstring), in ``output_dir/vocabulary.json``;
    ``checkpoint``: the checkpoint it must be that of (default: the run folder's own, if any)."""
    path, source = output_dir / "vocabulary.json", data_record(cfg)
    box: List[Any] = [None]
    if rank == 0:
        box = [_saved(path, source, checkpoint, output_dir)]
    if world_size > 1:
        dist.broadcast_object_list(box, src=0)  # rank 0 says whether to count
    if isinstance(box[0], str):
        raise ConfigError(box[0])
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
