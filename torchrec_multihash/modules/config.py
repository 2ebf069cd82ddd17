"""Configuration of one logical multi-hash embedding table."""

import math
from dataclasses import dataclass
from typing import List, Optional

from torchrec.modules.embedding_configs import EmbeddingBagConfig, PoolingType

from torchrec_multihash.errors import MultiHashError

STRATEGIES = ("full", "hash", "qr", "generalized_qr", "crt", "learned")
PARTITIONS_AFTER_MAPPING = ("qr", "generalized_qr", "crt")  # may follow a learned mapping
OPERATIONS = ("add", "mult", "concat")
POOLINGS = (PoolingType.SUM, PoolingType.MEAN)
DEFAULT_NUM_COLLISIONS = 4  # as the original DLRM code's --qr-collisions


class MultiHashConfigError(MultiHashError, ValueError):
    """A multi-hash table configuration that cannot work; the message names the table."""


@dataclass
class MultiHashEmbeddingBagConfig(EmbeddingBagConfig):
    """A logical embedding table of ``num_embeddings`` rows stored as several small sub-tables.

    Fields of TorchRec's ``EmbeddingBagConfig`` keep their meaning for the *logical* table
    (``num_embeddings`` ids, ``embedding_dim`` output width, ``feature_names``, ``pooling``,
    ``data_type``; ``weight_init_min/max`` give the init range of the logical table, which the
    sub-tables are scaled to reproduce; an ``init_fn``, if given, is applied to every sub-table).

    Args:
        strategy: "full" (one table of N rows), "hash" (hashing trick, ``ceil(N / num_collisions)``
            rows, any int64 id accepted), "qr" (quotient ``x // m`` and remainder ``x % m``),
            "generalized_qr" (mixed-radix digits with radices ``moduli``) or "crt" (``x mod m_j`` for
            pairwise coprime ``moduli``), or "learned" (a mapping learned from data, see
            ``torchrec-multihash fit-hash``, sends each id to one of ``ceil(N / num_collisions)``
            rows; ids it does not know go through a hash into ``fallback_rows`` reserved rows).
        operation: how the per-partition rows of one id are combined: "add", "mult" (element-wise)
            or "concat". Ignored by single-table strategies (full, hash).
        num_collisions: qr: m, the rows of the remainder table (default 4); hash: N / rows (default 4).
        moduli: generalized_qr: radices m1..mk with prod >= N; crt: pairwise coprime moduli, prod >= N.
        dims: concat only: one dim per partition, summing to ``embedding_dim`` (DeepRec's ``dims``);
            default: ``embedding_dim`` split as evenly as possible.
        mapping_rows: rows of the learned mapping's output. With strategy "learned" it defaults to
            ``ceil(N / num_collisions)``; set on qr, generalized_qr or crt, ids first go through a
            learned mapping into ``mapping_rows`` rows, which the partitions then split.
        mapping_ids: how many ids the learned mapping stores; default N, every id: a row index
            per id (2 bytes when the rows fit int16, else 4). Fewer (the hottest known ids) are kept
            sorted with their rows, 8 bytes per id (12 when N > 2^31 - 1). Counted in
            ``memory_bytes()``.
        fallback_rows: rows reserved for ids the mapping does not store (or did not see when
            fitted); default 1 when it stores every id, else ``max(1, mapping_rows // 8)``.
    """

    strategy: str = "qr"
    operation: str = "mult"
    num_collisions: Optional[int] = None
    moduli: Optional[List[int]] = None
    dims: Optional[List[int]] = None
    mapping_rows: Optional[int] = None
    mapping_ids: Optional[int] = None
    fallback_rows: Optional[int] = None

    def __post_init__(self) -> None:
        # Unlike EmbeddingBagConfig we keep ``init_fn`` None unless the user set one: the sub-tables'
        # default init is derived from the logical table's range (see initialization.py).
        self.validate()

    def _fail(self, msg: str) -> None:
        raise MultiHashConfigError(f"table '{self.name}': {msg}")

    def validate(self) -> None:
        """Checks the configuration; raises MultiHashConfigError naming the table otherwise."""
        if not self.name:
            raise MultiHashConfigError("MultiHashEmbeddingBagConfig needs a non-empty name")
        if not isinstance(self.num_embeddings, int) or self.num_embeddings <= 0:
            self._fail(f"num_embeddings must be a positive int, got {self.num_embeddings!r}")
        if not isinstance(self.embedding_dim, int) or self.embedding_dim <= 0:
            self._fail(f"embedding_dim must be a positive int, got {self.embedding_dim!r}")
        if not self.feature_names:
            self._fail("feature_names is empty: name the KJT feature(s) that look up this table")
        if len(set(self.feature_names)) != len(self.feature_names):
            self._fail(f"feature_names has duplicates: {self.feature_names}")
        if self.strategy not in STRATEGIES:
            self._fail(f"strategy must be one of {STRATEGIES}, got {self.strategy!r}")
        if self.operation not in OPERATIONS:
            self._fail(f"operation must be one of {OPERATIONS}, got {self.operation!r}")
        if self.pooling not in POOLINGS:
            self._fail(f"pooling must be PoolingType.SUM or PoolingType.MEAN, got {self.pooling!r}")

        if self.strategy in ("full", "generalized_qr", "crt") and self.num_collisions is not None:
            self._fail(f"num_collisions is not used by strategy {self.strategy!r}; remove it")
        if self.strategy in ("full", "hash", "qr", "learned") and self.moduli is not None:
            self._fail(
                f"moduli is not used by strategy {self.strategy!r} "
                "(qr takes num_collisions; generalized_qr and crt take moduli)"
            )
        if self.num_collisions is not None and (
            not isinstance(self.num_collisions, int) or self.num_collisions < 1
        ):
            self._fail(f"num_collisions must be an int >= 1, got {self.num_collisions!r}")
        self._validate_learned()
        n = self.partition_domain()
        if self.strategy == "qr" and self.collisions() >= n and n > 1:
            self._fail(
                f"num_collisions={self.collisions()} must be smaller than "
                f"{'mapping_rows' if self.is_learned() else 'num_embeddings'}={n}, "
                "else the quotient table has a single row"
            )
        if self.strategy in ("generalized_qr", "crt"):
            if not self.moduli or len(self.moduli) < 2:
                self._fail(f"strategy {self.strategy!r} needs moduli: a list of at least 2 ints")
            if any(not isinstance(m, int) or m < 1 for m in self.moduli):
                self._fail(f"moduli must be positive ints, got {self.moduli}")
            prod = math.prod(self.moduli)
            if prod < n:
                self._fail(
                    f"moduli {self.moduli} have product {prod} < "
                    f"{'mapping_rows' if self.is_learned() else 'num_embeddings'}={n}: ids "
                    f"x and x + {prod} would get the same rows in every partition "
                    "(not complementary)"
                )
            if self.strategy == "crt":
                for i, a in enumerate(self.moduli):
                    for b in self.moduli[i + 1 :]:
                        if math.gcd(a, b) != 1:
                            self._fail(
                                f"crt moduli must be pairwise coprime, but {a} and {b} share the "
                                f"factor {math.gcd(a, b)}: ids x and x + lcm of the moduli would "
                                "collide (not complementary)"
                            )
        if self.dims is not None:
            if self.operation != "concat" or self.strategy in ("full", "hash", "learned"):
                self._fail(
                    "dims is only used with operation='concat' on a multi-partition strategy "
                    f"(got strategy={self.strategy!r}, operation={self.operation!r})"
                )
            if len(self.dims) != len(self.partition_sizes()):
                self._fail(
                    f"dims {self.dims} has {len(self.dims)} entries but strategy "
                    f"{self.strategy!r} has {len(self.partition_sizes())} partitions"
                )
            if any(not isinstance(d, int) or d < 1 for d in self.dims):
                self._fail(f"dims must be positive ints, got {self.dims}")
            if sum(self.dims) != self.embedding_dim:
                self._fail(
                    f"concat dims {self.dims} add up to {sum(self.dims)}, "
                    f"not embedding_dim={self.embedding_dim}"
                )

    def _validate_learned(self) -> None:
        fields = {"mapping_rows": self.mapping_rows, "mapping_ids": self.mapping_ids, "fallback_rows": self.fallback_rows}
        for key, v in fields.items():
            if v is not None and (not isinstance(v, int) or isinstance(v, bool) or v < 1):
                self._fail(f"{key} must be a positive int, got {v!r}")
        if not self.is_learned():
            used = [k for k, v in fields.items() if v is not None]
            if used:
                self._fail(
                    f"{used} only apply to a learned mapping: use strategy 'learned', or set "
                    f"mapping_rows on one of {PARTITIONS_AFTER_MAPPING}"
                )
            return
        if self.strategy not in ("learned",) + PARTITIONS_AFTER_MAPPING:
            self._fail(f"mapping_rows cannot be combined with strategy {self.strategy!r}")
        rows = self.mapped_rows()
        if rows < 2:
            self._fail(f"a learned mapping needs at least 2 rows (one for unknown ids), got {rows}")
        if self.learned_fallback_rows() >= rows:
            self._fail(f"fallback_rows={self.learned_fallback_rows()} leaves no row for known ids (mapping_rows={rows})")
        if self.learned_ids() > self.num_embeddings:
            self._fail(f"mapping_ids={self.learned_ids()} exceeds num_embeddings={self.num_embeddings}")

    def is_learned(self) -> bool:
        """True when ids go through a learned id -> row mapping first."""
        return self.strategy == "learned" or self.mapping_rows is not None

    def mapped_rows(self) -> int:
        """Rows of the learned mapping's output (the domain the partitions then split)."""
        if self.mapping_rows is not None:
            return self.mapping_rows
        return math.ceil(self.num_embeddings / self.collisions())

    def learned_ids(self) -> int:
        """Ids the learned mapping stores."""
        return self.mapping_ids if self.mapping_ids is not None else self.num_embeddings

    def learned_fallback_rows(self) -> int:
        """Rows reserved for ids the learned mapping does not store (the last rows)."""
        if self.fallback_rows is not None:
            return self.fallback_rows
        # dense: every id has a row, so ids unseen when fitting share one "unknown" row (as a
        # vocabulary's out-of-vocabulary id); sparse: the many unstored ids need more
        return 1 if self.learned_ids() == self.num_embeddings else max(1, self.mapped_rows() // 8)

    def partition_domain(self) -> int:
        """The index space the partitions split: mapped rows for a learned table, else ids."""
        return self.mapped_rows() if self.is_learned() else self.num_embeddings

    def collisions(self) -> int:
        """m for qr, N / rows for hash and learned (defaults applied)."""
        return self.num_collisions if self.num_collisions is not None else DEFAULT_NUM_COLLISIONS

    def partition_sizes(self) -> List[int]:
        """Rows of each sub-table, in partition order."""
        n = self.partition_domain()
        if self.strategy == "learned":
            return [n]
        if self.strategy == "full":
            return [n]
        if self.strategy == "hash":
            return [math.ceil(n / self.collisions())]
        if self.strategy == "qr":
            m = self.collisions()
            return [math.ceil(n / m), m]
        assert self.moduli is not None
        return list(self.moduli)

    def num_partitions(self) -> int:
        return len(self.partition_sizes())

    def is_composed(self) -> bool:
        """True when an id's embedding is built from several sub-table rows."""
        return self.num_partitions() > 1

    def looks_up_per_id(self) -> bool:
        """True for mult of several partitions: the product must be taken per id, before pooling,
        so its sub-tables are looked up unpooled (an EmbeddingCollection)."""
        return self.is_composed() and self.operation == "mult"

    def partition_dims(self) -> List[int]:
        """Embedding dim of each sub-table."""
        k = self.num_partitions()
        if k == 1 or self.operation in ("add", "mult"):
            return [self.embedding_dim] * k
        if self.dims is not None:
            return list(self.dims)
        base, extra = divmod(self.embedding_dim, k)
        if base == 0:
            self._fail(f"embedding_dim={self.embedding_dim} is too small to concat {k} partitions")
        return [base + (1 if i < extra else 0) for i in range(k)]

    def partition_suffixes(self) -> List[str]:
        """Suffix of each sub-table's name (``t_C1__q``) and sub-feature's name (``C1__q``)."""
        if self.strategy == "full":
            return [""]
        if self.strategy == "hash":
            return ["__hash"]
        if self.strategy == "learned":
            return ["__learned"]
        if self.strategy == "qr":
            return ["__q", "__r"]
        return [f"__p{i}" for i in range(self.num_partitions())]
