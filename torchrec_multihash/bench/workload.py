"""The benchmark's tables and run parameters; its batches come from the synthetic data generator,
the same for every method."""

from dataclasses import asdict, dataclass, field
from typing import Dict, List

from torchrec.modules.embedding_configs import EmbeddingBagConfig
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from torchrec_multihash.datasets.synthetic import SyntheticCriteo

WORKLOADS = ("one_hot", "multi_hot", "mixed")

# Criteo Kaggle's 26 vocabulary sizes (the DLRM reference's), capped by ``BenchSpec.max_rows``
CRITEO_KAGGLE_ROWS = [
    1460,
    583,
    10131227,
    2202608,
    305,
    24,
    12517,
    633,
    3,
    93145,
    5683,
    8351593,
    3194,
    27,
    14992,
    5461306,
    10,
    5652,
    2173,
    4,
    7046547,
    18,
    15,
    286181,
    105,
    142572,
]


@dataclass
class BenchSpec:
    """26 Criteo-like tables (sizes capped at ``max_rows``), ``multi_hot`` of the features with
    bags of 1..``max_bag`` ids, the rest one-hot; ids follow a power law (P(x) ~ 1/x), scattered.

    Three workloads: ``multi_hot`` (Criteo Kaggle's sizes, 3 multi-hot features), ``one_hot``
    (Criteo's shape: 26 one-hot features of 400k rows each, batch 2048), whose one-hot features'
    tables are declared ``max_ids_per_bag=1``, as a user who knows the data would; and ``mixed``
    (``one_hot``'s tables, 3 of the features multi-hot) with nothing declared, as a user who does
    not.
    """

    dim: int = 64
    max_rows: int = 2_000_000
    batch_size: int = 4096
    multi_hot: int = 3
    max_bag: int = 20
    steps: int = 30
    warmup: int = 5
    compression: float = 8.0
    seed: int = 0
    rows: List[int] = field(default_factory=list)
    name: str = "multi_hot"
    declare_one_hot: bool = True  # the one-hot features' tables declared max_ids_per_bag=1

    def __post_init__(self) -> None:
        if not self.rows:
            self.rows = [min(n, self.max_rows) for n in CRITEO_KAGGLE_ROWS]

    @classmethod
    def quick(cls) -> "BenchSpec":
        return cls(dim=16, max_rows=200_000, batch_size=1024, steps=20, warmup=3)

    @classmethod
    def one_hot(cls, quick: bool = False) -> "BenchSpec":
        """26 one-hot features of 400k rows each (50k with ``quick``), Criteo's shape."""
        if quick:
            return cls(name="one_hot", dim=16, rows=[50_000] * 26, batch_size=1024, multi_hot=0, steps=20, warmup=3)
        return cls(name="one_hot", rows=[400_000] * 26, batch_size=2048, multi_hot=0)

    @classmethod
    def mixed(cls, quick: bool = False) -> "BenchSpec":
        """``one_hot``'s tables, the first 3 features multi-hot, no table declared one-hot."""
        spec = cls.one_hot(quick)
        spec.name, spec.multi_hot, spec.declare_one_hot = "mixed", 3, False
        return spec

    @classmethod
    def workload(cls, name: str, quick: bool = False) -> "BenchSpec":
        """The ``one_hot``, ``multi_hot`` or ``mixed`` workload."""
        if name == "one_hot":
            return cls.one_hot(quick)
        if name == "mixed":
            return cls.mixed(quick)
        if name == "multi_hot":
            return cls.quick() if quick else cls()
        raise ValueError(f"unknown workload {name!r}; choose from {list(WORKLOADS)}")

    def to_dict(self) -> Dict[str, object]:
        return asdict(self)

    def features(self) -> List[str]:
        return [f"C{i + 1}" for i in range(len(self.rows))]

    def tables(self) -> List[EmbeddingBagConfig]:
        return [
            EmbeddingBagConfig(name=f"t_{f}", num_embeddings=n, embedding_dim=self.dim, feature_names=[f]) for f, n in zip(self.features(), self.rows)
        ]

    def data(self) -> SyntheticCriteo:
        """Power-law ids (P(x) ~ 1/x) scattered over each table; the first ``multi_hot`` features
        with bags of 1..``max_bag`` ids."""
        return SyntheticCriteo(
            self.rows,
            id_distribution="zipf",
            scatter=True,
            multi_hot_features=range(self.multi_hot),
            max_bag=self.max_bag,
            seed=self.seed,
            feature_names=self.features(),
        )

    def one_hot_tables(self) -> List[str]:
        """The tables declared one-hot: those of the one-hot features (all but the first
        ``multi_hot``), unless the workload declares none."""
        return [t.name for t in self.tables()[self.multi_hot :]] if self.declare_one_hot else []

    def batches(self) -> List[KeyedJaggedTensor]:
        """``warmup + steps`` KJTs, deterministic from ``seed``."""
        data = self.data()
        return [data.batch(self.batch_size, i).sparse_features for i in range(self.warmup + self.steps)]
