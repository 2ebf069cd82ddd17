"""``generalized_qr``: the mixed-radix digits of ``x`` with radices ``moduli``."""

import math
from typing import Iterator, List, Tuple

from torchrec_multihash.modules.strategies.base import ceil_div
from torchrec_multihash.modules.strategies.composed import ModuliStrategy, small_radix_limit
from torchrec_multihash.modules.strategies.names import StrategyName
from torchrec_multihash.modules.strategies.registry import register


@register(StrategyName.GENERALIZED_QR)
class GeneralizedQR(ModuliStrategy):
    """Digit j of ``x`` is ``(x // (m_1 ... m_{j-1})) % m_j``; the product of radices covers N."""

    def partition_spec(self) -> List[Tuple[int, int]]:
        sizes = self.sizes()
        return [(math.prod(sizes[:i]), m) for i, m in enumerate(sizes)]  # place value, radix

    @classmethod
    def candidates(cls, n: int, k: int) -> Iterator[List[int]]:
        for m in range(2, small_radix_limit(n, k) + 1):
            for j in range(k - 1):  # radices between m^(k-1) and (m+1)^(k-1), one step at a time
                small = [m + 1] * j + [m] * (k - 1 - j)
                yield small + [ceil_div(n, math.prod(small))]
