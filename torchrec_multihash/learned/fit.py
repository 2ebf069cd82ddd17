"""Fits the id -> row mapping of every learned table, and saves / loads fitted mappings.

Per table (the paper's best variant: access frequency plus a learned embedding of each id):
1. count every id's accesses in one streaming pass (one counter per id of the table);
2. learn a low-dimensional vector per id with a short run of a small model (``id_vectors``);
3. the hottest ids keep rows of their own: an id does while it carries at least the traffic of an
   average shared row (at most half the rows go to them);
4. the other seen ids are clustered on (vector, log frequency) into the remaining rows, cells of
   equal traffic (``clustering``), so ids that behave alike share a row;
5. ids never seen (or past ``mapping_ids``) go through the fallback hash into reserved rows, or,
   when the mapping shares its rows with the hash (``fallback_rows == mapping_rows``), over every
   row as the hashing trick does: the hot ids then take the rows that hash traffic loads least.
"""

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch
from torch import nn
from torchrec.datasets.utils import Batch

from torchrec_multihash.errors import MultiHashError
from torchrec_multihash.learned.clustering import balanced_clusters
from torchrec_multihash.learned.counting import count_ids
from torchrec_multihash.learned.id_vectors import VectorOptions, learn_id_vectors
from torchrec_multihash.modules.config import MultiHashConfigError, MultiHashEmbeddingBagConfig
from torchrec_multihash.modules.mapping_shape import MappingShape
from torchrec_multihash.modules.multihash_embedding_bag import MultiHashEmbeddingBagCollection

MAPPING_FILE = "mapping.pt"
REPORT_FILE = "mapping.json"

BatchSource = Union[Iterable[Batch], Callable[[], Iterable[Batch]]]


class FitInputError(MultiHashError, TypeError):
    """Batches the fit cannot use: read only once (a generator), or none at all."""


@dataclass
class FitOptions:
    """How mappings are fitted: the id vectors' dim, learning rate and seed; the weight of log
    frequency against the vector's dimensions when clustering; whether to learn vectors at all
    (False: cluster on frequency alone); the accesses an id needs before its vector is used.

    ``vector_min_count`` guards against label leakage: the vector of an id seen a few times mostly
    encodes the labels of those few samples, so clustering on it would group ids by their training
    labels and the model would memorise them (measured: test log loss 1.30 vs 0.67 on the
    synthetic set). Rarer ids are clustered on frequency alone, and vectors are shrunk by
    ``n / (n + vector_min_count)``."""

    dim: int = 4
    lr: float = 0.05
    seed: int = 0
    frequency_weight: float = 1.0
    learn_vectors: bool = True
    vector_min_count: int = 20

    def __post_init__(self) -> None:
        for key in ("dim", "seed", "vector_min_count"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int) or value < (1 if key == "dim" else 0):
                raise MultiHashConfigError(f"FitOptions.{key} must be an int >= {1 if key == 'dim' else 0}, got {value!r}")


@dataclass
class FittedMapping:
    """The fitted rows of one table's known ids, and what the fit found."""

    ids: torch.Tensor
    rows: torch.Tensor
    shape: MappingShape
    stats: Dict[str, float]


def _hot_count(sorted_counts: torch.Tensor, rows: int, hashed: float = 0.0) -> int:
    """How many of the hottest ids get own rows: each must carry at least the traffic of an
    average row among those left for it and the colder ids (``hashed``: traffic hashed over the
    same rows); at most half the rows."""
    n = min(sorted_counts.numel(), rows // 2)
    if n == 0:
        return 0
    suffix = torch.flip(torch.cumsum(torch.flip(sorted_counts, [0]), 0), [0])[:n].double() + hashed
    i = torch.arange(n, dtype=torch.float64)
    own = sorted_counts[:n].double() * (rows - i) >= suffix
    return int(torch.cumprod(own.long(), 0).sum())


def _standardize(x: torch.Tensor) -> torch.Tensor:
    """Centred and scaled by one overall std, so that dimensions with more spread (more signal)
    keep it and get split more often."""
    x = x.float()
    if x.shape[0] < 2:
        return x * 0
    x = x - x.mean(0)
    return x / x.std().clamp(min=1e-12)


def assign_rows(config: MultiHashEmbeddingBagConfig, counts: torch.Tensor, vectors: torch.Tensor, options: FitOptions) -> FittedMapping:
    """The mapping of one table from its id counts and id vectors (steps 3-5 above)."""
    shape = config.mapping_shape()
    assert shape is not None, f"table {config.name} has no learned mapping"
    rows_for_known = shape.known_rows()
    seen = torch.nonzero(counts).squeeze(1)
    seen = seen[torch.argsort(counts[seen], descending=True, stable=True)]
    unstored, seen = seen[shape.mapping_ids :], seen[: shape.mapping_ids]
    c = counts[seen]
    hashed = float(counts[unstored].sum()) if shape.shared else 0.0
    hot = _hot_count(c, rows_for_known, hashed)
    rest = seen[hot:]
    features = []
    if options.learn_vectors and vectors.numel():
        n = counts[rest].float()[:, None]
        shrink = torch.where(n >= options.vector_min_count, n / (n + options.vector_min_count), torch.zeros_like(n))
        features.append(_standardize(vectors[rest].float() * shrink))
    features.append(options.frequency_weight * _standardize(torch.log1p(counts[rest].float()))[:, None])
    cells = balanced_clusters(torch.cat(features, 1), counts[rest], rows_for_known - hot)
    rows = torch.cat([torch.arange(hot), hot + cells])
    if shape.shared:  # the hottest ids, then the shared cells, on the rows hash traffic loads least
        load = torch.zeros(shape.rows, dtype=torch.float64).index_add_(0, unstored % shape.rows, counts[unstored].double())
        rows = torch.argsort(load, stable=True)[rows]
    total = max(int(counts.sum()), 1)
    stats = {
        "seen_ids": int(torch.count_nonzero(counts)),
        "stored_ids": int(seen.numel()),
        "own_rows": hot,
        "shared_rows": int(cells.unique().numel()),
        "fallback_rows": shape.fallback_rows,
        "traffic_on_own_rows": float(c[:hot].sum()) / total,
        "traffic_stored": float(c.sum()) / total,
    }
    return FittedMapping(seen, rows, shape, stats)


def fit_mappings(
    tables: List[MultiHashEmbeddingBagConfig],
    batches: Callable[[], Iterable[Batch]],
    num_dense: int,
    options: Optional[FitOptions] = None,
    show_progress: bool = False,
) -> Dict[str, FittedMapping]:
    """Fits every learned table of ``tables`` on the batches ``batches()`` yields (called twice:
    one pass to count, one to learn the id vectors); ``options`` default to ``FitOptions()``."""
    options = options if options is not None else FitOptions()
    learned = [t for t in tables if t.has_mapping()]
    if not learned:
        return {}
    t0 = time.perf_counter()
    counts = count_ids(learned, batches(), show_progress)
    t1 = time.perf_counter()
    if options.learn_vectors:
        vectors = learn_id_vectors(learned, batches(), num_dense, VectorOptions(options.dim, options.lr, options.seed), show_progress)
    else:
        vectors = {t.name: torch.zeros(0) for t in learned}
    t2 = time.perf_counter()
    fitted = {t.name: assign_rows(t, counts[t.name], vectors[t.name], options) for t in learned}
    t3 = time.perf_counter()
    for f in fitted.values():
        f.stats.update(count_s=t1 - t0, vectors_s=t2 - t1, cluster_s=t3 - t2)
    return fitted


def apply_mappings(module: MultiHashEmbeddingBagCollection, fitted: Dict[str, FittedMapping]) -> None:
    """Loads fitted mappings into a module's learned tables (every learned table needs one)."""
    targets = module.learned_mappings()
    missing = sorted(set(targets) - set(fitted))
    if missing:
        raise MultiHashConfigError(f"no fitted mapping for learned table(s) {missing}; fitted: {sorted(fitted)}")
    for name, target in targets.items():
        f = fitted[name]
        if f.shape != target.expected:
            raise MultiHashConfigError(
                f"table '{name}': the fitted mapping was made for {f.shape.describe()}, but this table "
                f"has {target.expected.describe()}; fit again for this config"
            )
        target.assign(f.ids, f.rows)


class _Passes:
    """A fresh pass over the batches per call, counting the batches of each pass."""

    def __init__(self, batches: BatchSource) -> None:
        if isinstance(batches, Iterator):
            raise FitInputError(
                f"batches is a one-shot iterator ({type(batches).__name__}), but the fit reads the batches twice "
                "(to count ids, then to learn id vectors): pass a list, a DataLoader, or a zero-argument "
                "callable returning a fresh iterator (e.g. lambda: make_batches())"
            )
        if isinstance(batches, Iterable):
            iterable = batches
            self.make: Callable[[], Iterable[Batch]] = lambda: iterable
        elif callable(batches):
            self.make = batches
        else:
            raise FitInputError(f"batches must be an iterable of Batch or a zero-argument callable returning one, got {type(batches).__name__}")
        self.counts: List[int] = []

    def __call__(self) -> Iterator[Batch]:
        self.counts.append(0)
        for batch in self.make():
            self.counts[-1] += 1
            yield batch

    def check(self) -> None:
        """Raises FitInputError if a pass saw no batch, or the passes saw different numbers."""
        if not self.counts or self.counts[0] == 0:
            raise FitInputError("batches yielded no batch: the fit needs data")
        if any(n != self.counts[0] for n in self.counts):
            raise FitInputError(
                f"batches gave {self.counts[0]} batches on the first pass and {self.counts[1]} on the second: "
                "the fit reads them twice, so a callable must return a fresh iterator over the same batches each time"
            )


def _learned_modules(module: nn.Module) -> List[MultiHashEmbeddingBagCollection]:
    """The MultiHashEmbeddingBagCollections in ``module`` that have learned tables, materialised."""
    found = [m for m in module.modules() if isinstance(m, MultiHashEmbeddingBagCollection) and m.learned_mappings()]
    if not found:
        raise MultiHashConfigError(f"{type(module).__name__} holds no learned table (strategy 'learned', or mapping_rows): nothing to fit")
    for ebc in found:
        for mapping in ebc.learned_mappings().values():
            mapping.check_materialised()
    return found


def fit_learned_mappings(
    module: nn.Module,
    batches: BatchSource,
    num_dense: int,
    options: Optional[FitOptions] = None,
    show_progress: bool = False,
) -> Dict[str, FittedMapping]:
    """Fits the mapping of every learned table of ``module`` (a MultiHashEmbeddingBagCollection, or a
    model holding one: DLRM, DistributedModelParallel) on ``batches`` and assigns it: ``fit-hash``
    in one call. ``batches`` (``Batch`` objects, ``num_dense`` dense features) are read twice, so a
    list, a DataLoader or a zero-argument callable returning a fresh iterator; not a generator.
    Returns the fitted mappings (``save_mappings`` writes them for ``embeddings.mapping``)."""
    targets = _learned_modules(module)
    fitted: Dict[str, FittedMapping] = {}
    for ebc in targets:
        source = _Passes(batches)
        found = fit_mappings(ebc.multihash_configs(), source, num_dense, options, show_progress)
        source.check()
        apply_mappings(ebc, found)
        fitted.update(found)
    return fitted


def save_mappings(directory: Path, fitted: Dict[str, FittedMapping], extra: Dict[str, object]) -> None:
    """Writes ``mapping.pt`` (tensors only) and ``mapping.json`` (shapes and fit statistics)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, f in fitted.items():
        tensors[f"{name}.ids"] = f.ids.long()
        tensors[f"{name}.rows"] = f.rows.int()
        tensors[f"{name}.shape"] = torch.tensor(f.shape.as_list())
    tmp = directory / (MAPPING_FILE + ".tmp")
    torch.save(tensors, tmp)
    tmp.replace(directory / MAPPING_FILE)
    report = {"tables": {n: {"shape": asdict(f.shape), **f.stats} for n, f in fitted.items()}, **extra}
    (directory / REPORT_FILE).write_text(json.dumps(report, indent=2))


def read_report(directory: Path) -> Dict[str, Any]:
    """``mapping.json`` of a mapping folder ({} if there is none)."""
    path = Path(directory) / REPORT_FILE
    if not path.is_file():
        return {}
    try:
        report = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise MultiHashConfigError(f"{path}: not a report written by fit-hash ({e}); fit the mapping again") from None
    if not isinstance(report, dict) or not isinstance(report.get("tables", {}), dict):
        raise MultiHashConfigError(f"{path}: not a report written by fit-hash; fit the mapping again")
    return report


def load_mappings(directory: Path) -> Dict[str, FittedMapping]:
    """Reads mappings written by ``save_mappings`` (no unpickling of arbitrary objects)."""
    path = Path(directory) / MAPPING_FILE
    if not path.is_file():
        raise MultiHashConfigError(f"{path}: no fitted mapping there (write one with save_mappings, or the fit-hash command)")
    try:
        tensors = torch.load(path, weights_only=True)
    except Exception as e:  # a damaged or foreign file
        raise MultiHashConfigError(f"{path}: not a mapping written by save_mappings ({e})") from None
    stats = read_report(directory).get("tables", {})
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    out = {}
    for n in names:
        try:
            shape = MappingShape(*tensors[f"{n}.shape"].tolist())
            out[n] = FittedMapping(tensors[f"{n}.ids"], tensors[f"{n}.rows"], shape, stats.get(n, {}))
        except (KeyError, TypeError) as e:
            raise MultiHashConfigError(f"{path}: incomplete mapping of table '{n}' ({e})") from None
    return out


def describe(fitted: Dict[str, FittedMapping]) -> List[Tuple[str, str]]:
    """One line per table, for the command's output."""
    lines = []
    for name, f in fitted.items():
        s = f.stats
        fallback = f"unstored ids hashed over all {f.shape.rows:,} rows" if f.shape.shared else f"{f.shape.fallback_rows:,} fallback rows"
        lines.append(
            (
                name,
                (
                    f"{s['seen_ids']:,} ids seen, {s['own_rows']:,} own rows "
                    f"({100 * s['traffic_on_own_rows']:.0f}% of accesses), {s['stored_ids'] - s['own_rows']:,} ids "
                    f"in {s['shared_rows']:,} shared rows, {fallback}"
                ),
            )
        )
    return lines
