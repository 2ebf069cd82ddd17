"""Strategies: how a logical table is stored as sub-tables, one class per kind.

Every module of this package is imported here, so a new strategy is one new file holding one
``Strategy`` subclass decorated with ``@register("its_name")`` (see docs/strategies.md).
"""

import importlib
import pkgutil

from torchrec_multihash.modules.strategies.base import (  # noqa: F401
    STACKED_SUFFIX,
    TOLERANCE,
    SingleTableStrategy,
    Sizing,
    StackedRows,
    Strategy,
    SubTable,
    stacked_table_name,
    sub_feature_name,
    sub_table_name,
)
from torchrec_multihash.modules.strategies.names import Compose, Operation, StrategyName  # noqa: F401
from torchrec_multihash.modules.strategies.registry import (  # noqa: F401
    parse_strategy,
    register,
    registered_strategies,
    strategy_class,
)

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")
