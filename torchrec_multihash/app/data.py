"""The train and test batches of a run, per rank, from the configured source."""

import bisect
import functools
import itertools
import json
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Optional, Tuple

import numpy as np
import torch
from torchrec.datasets.utils import Batch

from torchrec_multihash.app.config import Config, ConfigError
from torchrec_multihash.app.model import feature_names
from torchrec_multihash.app.provenance import Record
from torchrec_multihash.app.vocabulary import run_vocabulary
from torchrec_multihash.datasets.batching import check_finite, check_labels
from torchrec_multihash.datasets.criteo_loader import CriteoBatchDataset, criteo_batches
from torchrec_multihash.datasets.criteo_npy import NpyTrainBatches, npy_train_batches
from torchrec_multihash.datasets.criteo_tsv import DEFAULT_SPARSE_NAMES, NUM_DENSE, NUM_SPARSE, BadLines, CriteoFormatError
from torchrec_multihash.datasets.id_mapping import HashingIds, IdMapping, Vocabulary
from torchrec_multihash.datasets.synthetic import SyntheticCriteo

FORMATS = ("synthetic", "criteo_tsv", "criteo_npy")


@dataclass
class RunData:
    """Factories of this rank's batches; ``num_embeddings_per_feature`` may come from the data."""

    train: Callable[[int, int], Iterator[Batch]]  # (epoch, batches of this rank to skip) -> batches
    test: Callable[[], Iterator[Batch]]
    num_embeddings_per_feature: List[int]
    num_dense: int
    keys: List[str]  # the sparse features' names, as the batches' KJTs key them
    # bad lines this rank skipped: in training (all epochs), in the latest test pass
    skipped_lines: Callable[[], Tuple[int, int]] = lambda: (0, 0)
    vocabulary: Optional[Record] = None  # what the ids' vocabulary was made from (data.ids vocabulary)


def _paths(paths: Optional[List[str]], what: str) -> List[str]:
    if not paths:
        raise ConfigError(f"data.{what} is empty: give the Criteo file(s) to read")
    folders = [p for p in paths if Path(p).is_dir()]
    if folders:
        raise ConfigError(f"data.{what}: {folders} is a folder: list the files in it (a YAML list of paths)")
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"data.{what}: no such file(s) {missing} (relative paths are from the working directory, {Path.cwd()})")
    empty = [p for p in paths if Path(p).stat().st_size == 0]
    if empty:
        raise ConfigError(f"data.{what}: empty file(s) {empty}")
    return list(paths)


def _npy_triplet(dense: str, what: str) -> List[str]:
    if not dense.endswith("_dense.npy"):
        raise ConfigError(f"data.{what}: {dense} is not a *_dense.npy file of TorchRec's preprocessed Criteo layout")
    paths = [dense, dense[: -len("_dense.npy")] + "_sparse.npy", dense[: -len("_dense.npy")] + "_labels.npy"]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ConfigError(f"data.{what}: missing {missing} next to {dense}")
    rows = [len(_npy_array(p, kind, columns)) for p, (kind, columns) in zip(paths, _NPY_LAYOUT)]
    if len(set(rows)) > 1:
        raise CriteoFormatError(f"data.{what}: {', '.join(f'{Path(p).name} has {n} rows' for p, n in zip(paths, rows))}: they must be equal")
    return paths


# dense, sparse, labels: the dtype kinds (numpy's: f float, i/u integer) and columns of TorchRec's layout
_NPY_LAYOUT = (("f", NUM_DENSE), ("iu", NUM_SPARSE), ("iu", 1))


def _npy_array(path: str, kinds: str, columns: int) -> np.ndarray:
    """``path`` memory-mapped, if it is an npy array of ``columns`` columns of a dtype of ``kinds``;
    CriteoFormatError naming the file and what it holds otherwise."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError, EOFError) as e:
        raise CriteoFormatError(f"{path} is not an npy array of TorchRec's Criteo layout ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in kinds or arr.ndim != 2 or arr.shape[1] != columns:
        what = "floats" if kinds == "f" else "integers"
        shape = getattr(arr, "shape", "?")
        raise CriteoFormatError(f"{path}: expected {columns} column(s) of {what} (rows x {columns}), got {getattr(arr, 'dtype', '?')} {shape}")
    return arr


def _check_preprocessed_sizes(folder: Path, sizes: List[int]) -> None:
    """Ids that ``preprocess`` made for other table sizes (hashed, or a vocabulary's) would be taken
    modulo these, silently: refused."""
    record = folder / "preprocess.json"
    if not record.is_file():
        return
    try:
        mapping = json.loads(record.read_text())
        made = list(mapping["sizes"])
    except (ValueError, KeyError, TypeError):
        return  # not one of ours
    if made != list(sizes):
        raise ConfigError(
            f"{folder} was preprocessed for table sizes {mapping.get('sizes')} (its preprocess.json), but "
            f"embeddings.num_embeddings_per_feature is {list(sizes)}: use the sizes it was made for, or preprocess again"
        )


def _npy_batches(triplets: List[List[str]], cfg: Config, rank: int, world_size: int, keys: List[str], drop_last: bool) -> Iterator[Batch]:
    """TorchRec's preprocessed Criteo (.npy per day: dense, sparse, labels; what
    torchrec.datasets.criteo reads), memory-mapped, this rank's rows, ids hashed mod the sizes,
    read by TorchRec's own pipe (the test data: every sample; training reads ``NpyTrainBatches``);
    NaN or inf dense features are an error naming the file and row."""
    from torchrec.datasets.criteo import InMemoryBinaryCriteoIterDataPipe
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    bs = cfg.train.batch_size
    pipe = InMemoryBinaryCriteoIterDataPipe(
        "train",
        [t[0] for t in triplets],
        [t[1] for t in triplets],
        [t[2] for t in triplets],
        batch_size=bs,
        rank=rank,
        world_size=world_size,
        drop_last=drop_last,
        mmap_mode=True,
        hashes=None,  # the modulo below, after the check for negative ids (it would hide them)
    )
    sizes = torch.tensor(cfg.embeddings.num_embeddings_per_feature).unsqueeze(1)
    file_starts = np.cumsum([0] + pipe.num_rows_per_file).tolist()
    full = pipe.num_full_batches

    def where(batch_index: int, row: int) -> str:
        """File and row of the batch's row: global batch b starts at b * bs (the last, smaller
        batches after the full ones), as the pipe cuts them."""
        b = rank + batch_index * world_size
        start = b * bs if b < full else full * bs + int(sum(pipe.last_batch_sizes[: b - full]))
        f = bisect.bisect_right(file_starts, start + row) - 1
        return f"{triplets[f][0]} row {start + row - file_starts[f]}"

    batches = iter(pipe)
    for i in itertools.count():
        with warnings.catch_warnings():  # TorchRec wraps the read-only memory map in tensors; nothing writes to them
            warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
            b = next(batches, None)
        if b is None:
            return
        check_labels(check_finite(b, functools.partial(where, i)), functools.partial(where, i))
        kjt = b.sparse_features  # keyed cat_0..cat_25, one id each, feature-major: rename to the model's features
        ids = kjt.values().long().view(len(keys), kjt.stride())
        if int(ids.min()) < 0:  # the modulo would turn it into some other id, silently
            row = int(torch.nonzero(ids < 0)[:, 1].min())
            raise CriteoFormatError(f"{where(i, row)}: negative sparse id(s) {ids[:, row][ids[:, row] < 0].tolist()}")
        yield Batch(
            dense_features=b.dense_features.float(),
            sparse_features=KeyedJaggedTensor(keys=keys, values=(ids % sizes).flatten(), lengths=kjt.lengths(), stride=kjt.stride()),
            labels=b.labels.float(),
        )


def _synthetic_data(cfg: Config, rank: int, world_size: int) -> RunData:
    """Batches of ``SyntheticCriteo``: epochs see the same samples (as a file would); the test set
    lives far away in index space."""
    d, bs = cfg.data, cfg.train.batch_size
    syn = SyntheticCriteo(
        cfg.embeddings.num_embeddings_per_feature,
        num_dense=cfg.model.dense_in_features,
        num_clusters=d.num_clusters,
        seed=cfg.train.seed,
        feature_names=feature_names(cfg.embeddings),
        multi_hot_features=[feature_names(cfg.embeddings).index(f) for f in d.multi_hot_features],
        max_bag=d.max_bag,
    )
    per_rank_train = d.train_samples // (bs * world_size)
    if per_rank_train == 0:
        raise ConfigError(f"data.train_samples={d.train_samples} is less than one batch per rank (train.batch_size={bs} x {world_size} rank(s))")

    def test() -> Iterator[Batch]:
        """``data.test_samples`` samples at any world size: batch i (the last one smaller) on rank i % W."""
        for i in range(rank, -(-d.test_samples // bs), world_size):
            yield syn.batch(min(bs, d.test_samples - i * bs), 10**9 + i)

    return RunData(
        train=lambda epoch, skip: syn.batches(bs, per_rank_train - skip, start=rank + skip * world_size, step=world_size),
        test=test,
        num_embeddings_per_feature=cfg.embeddings.num_embeddings_per_feature,
        num_dense=cfg.model.dense_in_features,
        keys=feature_names(cfg.embeddings),
    )


def _criteo_keys(cfg: Config) -> List[str]:
    if cfg.model.dense_in_features != NUM_DENSE:
        raise ConfigError(f"model.dense_in_features must be {NUM_DENSE} for Criteo data")
    keys = cfg.embeddings.feature_names or list(DEFAULT_SPARSE_NAMES)
    if len(keys) != NUM_SPARSE:
        raise ConfigError(f"Criteo data has {NUM_SPARSE} categorical features; embeddings.feature_names has {len(keys)}")
    return keys


def _npy_data(cfg: Config, rank: int, world_size: int, output_dir: Path) -> RunData:
    keys, sizes = _criteo_keys(cfg), list(cfg.embeddings.num_embeddings_per_feature)
    train_paths, test_paths = _paths(cfg.data.train, "train"), _paths(cfg.data.test, "test")
    # before any work: all there, of TorchRec's layout, with equal row counts
    triplets = [_npy_triplet(p, "train") for p in train_paths]
    test_triplets = [_npy_triplet(p, "test") for p in test_paths]
    for folder in sorted({Path(p).parent for p in [*train_paths, *test_paths]}):
        _check_preprocessed_sizes(folder, sizes)
    if len(sizes) != NUM_SPARSE:
        raise ConfigError("criteo_npy: embeddings.num_embeddings_per_feature needs 26 sizes (ids are hashed mod them)")
    shuffle_seed = cfg.train.seed if cfg.data.shuffle else None

    def check(batch: Batch, where: Callable[[int], str]) -> Batch:
        return check_labels(check_finite(batch, where), where)

    def train(epoch: int, skip: int) -> Iterator[Batch]:
        bs = cfg.train.batch_size
        batches = NpyTrainBatches(triplets, bs, rank, world_size, keys, sizes, epoch, skip, shuffle_seed, check)
        return npy_train_batches(batches, cfg.data.num_workers)

    return RunData(
        train=train,
        test=lambda: _npy_batches(test_triplets, cfg, rank, world_size, keys, False),  # every sample: evaluate pads
        num_embeddings_per_feature=sizes,
        num_dense=NUM_DENSE,
        keys=keys,
    )


def _id_mapping(cfg: Config, keys: List[str], rank: int, world_size: int, output_dir: Path, checkpoint: Optional[Path]) -> IdMapping:
    """How raw Criteo values become ids: hashing mod the configured sizes, or a vocabulary of the
    training files (``vocabulary.run_vocabulary``: saved in ``output_dir``, reused when it is there,
    that of ``checkpoint``'s data)."""
    d, sizes = cfg.data, list(cfg.embeddings.num_embeddings_per_feature)
    if d.ids == "hashing":
        if len(sizes) != len(keys) or not sizes:
            raise ConfigError(
                f"embeddings.num_embeddings_per_feature needs one size per categorical feature for hashing: "
                f"{len(sizes)} size(s) for {len(keys)} features"
            )
        return HashingIds(sizes)
    if d.ids != "vocabulary":
        raise ConfigError(f"data.ids must be hashing or vocabulary, got {d.ids!r}")
    return run_vocabulary(cfg, len(keys), rank, world_size, output_dir, checkpoint)


@dataclass
class _TsvSource:
    """This rank's Criteo TSV batches, with the bad lines skipped in training and in the latest
    test pass."""

    cfg: Config
    keys: List[str]
    to_id: IdMapping
    rank: int
    world_size: int
    train_bad: BadLines
    test_bad: BadLines

    def batches(self, paths: Optional[List[str]], skip: int, drop_last: bool, bad: BadLines) -> Iterator[Batch]:
        dataset = CriteoBatchDataset(
            list(paths or []),
            self.cfg.train.batch_size,
            self.keys,
            self.to_id,
            self.rank,
            self.world_size,
            skip,
            drop_last,
            tolerate_corrupt=bad.limit > 0,
        )
        return criteo_batches(dataset, bad, self.cfg.data.num_workers)

    def train(self, epoch: int, skip: int) -> Iterator[Batch]:
        return self.batches(self.cfg.data.train, skip, True, self.train_bad)

    def test(self) -> Iterator[Batch]:
        self.test_bad = BadLines(self.cfg.data.skip_bad_lines)
        return self.batches(self.cfg.data.test, 0, False, self.test_bad)  # every sample: evaluate pads

    def skipped_lines(self) -> Tuple[int, int]:
        return self.train_bad.count, self.test_bad.count


def _tsv_data(cfg: Config, rank: int, world_size: int, output_dir: Path, checkpoint: Optional[Path]) -> RunData:
    d, keys = cfg.data, _criteo_keys(cfg)
    _paths(d.train, "train")
    _paths(d.test, "test")
    to_id = _id_mapping(cfg, keys, rank, world_size, output_dir, checkpoint)
    source = _TsvSource(cfg, keys, to_id, rank, world_size, BadLines(d.skip_bad_lines), BadLines(d.skip_bad_lines))
    vocabulary = to_id.source if isinstance(to_id, Vocabulary) else None
    return RunData(source.train, source.test, to_id.sizes(), NUM_DENSE, keys, source.skipped_lines, vocabulary)


_BUILDERS: Dict[str, Callable[[Config, int, int, Path, Optional[Path]], RunData]] = {
    "synthetic": lambda cfg, rank, world, *_: _synthetic_data(cfg, rank, world),
    "criteo_tsv": _tsv_data,
    "criteo_npy": lambda cfg, rank, world, out, _: _npy_data(cfg, rank, world, out),
}


def make_data(cfg: Config, rank: int, world_size: int, output_dir: Path, checkpoint: Optional[Path] = None) -> RunData:
    """This rank's train and test batches of ``data.format`` (``output_dir``: where a vocabulary
    is kept; ``checkpoint``: the checkpoint whose data the vocabulary must be made from, default the
    run folder's own)."""
    build = _BUILDERS.get(cfg.data.format)
    if build is None:
        raise ConfigError(f"data.format must be one of {FORMATS}, got {cfg.data.format!r}")
    return build(cfg, rank, world_size, output_dir, checkpoint)
