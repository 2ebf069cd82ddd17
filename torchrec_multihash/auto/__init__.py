"""``strategy: auto``: the strategy, operation and size of each table, chosen to fit a total
memory budget from statistics of the training data."""

from torchrec_multihash.auto.choice import AutoChoiceError, TableChoice, auto_configs, choose_tables  # noqa: F401
from torchrec_multihash.auto.statistics import TableStatistics, table_statistics  # noqa: F401
