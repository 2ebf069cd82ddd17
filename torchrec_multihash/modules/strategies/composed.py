"""What the complementary-partition strategies (qr, generalized_qr, crt) share: the search for the
smallest sizes within a budget, and moduli given as a list."""

import math
from abc import abstractmethod
from typing import Any, Dict, Iterator, List, Optional

from torchrec_multihash.modules.strategies.base import Sizing, Strategy, split_dims, within_budget


class PartitionedStrategy(Strategy):
    """Several sub-tables, one row of each per id; every id gets a distinct tuple of rows."""

    follows_mapping = True
    default_partitions = 2

    @classmethod
    def check_num_partitions(cls, k: int) -> None:
        if k < 2:
            raise ValueError(f"strategy {cls.name!s} needs at least 2 partitions, got num_partitions={k}")

    @classmethod
    @abstractmethod
    def candidates(cls, n: int, k: int) -> Iterator[List[int]]:
        """Sub-table sizes for ``n`` ids in ``k`` partitions, from the fewest rows in the small
        partitions up (the big one takes the rest)."""

    @classmethod
    @abstractmethod
    def fields_for(cls, sizes: List[int]) -> Dict[str, Any]:
        """The config fields that give these sizes."""

    @classmethod
    def sized_for(cls, num_embeddings: int, dim: int, compression: float, operation: str, num_partitions: int) -> Sizing:
        full = num_embeddings * dim
        dims = split_dims(dim, num_partitions, operation)
        best: Optional[Sizing] = None
        for sizes in cls.candidates(num_embeddings, num_partitions):
            cost = sum(r * d for r, d in zip(sizes, dims))
            sizing = Sizing(cls.fields_for(sizes), full / cost)
            if within_budget(cost, full, compression):
                return sizing
            if best is None or sizing.factor > best.factor:
                best = sizing
        assert best is not None
        return best


def small_radix_limit(n: int, k: int) -> int:
    """Past ``n^(1/k)`` the small partitions only make the tables grow again."""
    return max(2, math.ceil(n ** (1.0 / k)) + 1)


class ModuliStrategy(PartitionedStrategy):
    """Sub-table sizes are the config's ``moduli`` (at least 2, product >= the ids to split)."""

    uses = ("moduli",)
    default_partitions = 3

    def sizes(self) -> List[int]:
        assert self.config.moduli is not None
        return list(self.config.moduli)

    def suffixes(self) -> List[str]:
        """``__p{i}``; the largest partition keeps the logical name (constraints keyed by it apply)."""
        sizes = self.sizes()
        main = sizes.index(max(sizes))
        return ["" if i == main else f"__p{i}" for i in range(len(sizes))]

    @classmethod
    def fields_for(cls, sizes: List[int]) -> Dict[str, Any]:
        return {"moduli": list(sizes)}

    def validate(self) -> None:
        c, moduli = self.config, self.config.moduli
        if not moduli or len(moduli) < 2:
            c.fail(f"strategy {self.name!s} needs moduli: a list of at least 2 ints")
        assert moduli is not None
        if any(not isinstance(m, int) or isinstance(m, bool) or m < 1 for m in moduli):
            c.fail(f"moduli must be positive ints, got {moduli}")
        prod = math.prod(moduli)
        if prod < self.domain:
            c.fail(
                f"moduli {moduli} have product {prod} < {c.domain_name()}={self.domain}: ids x and "
                f"x + {prod} would get the same rows in every partition (not complementary)"
            )
