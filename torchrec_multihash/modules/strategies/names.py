"""The names by which configs choose a strategy, an operation and a composition."""

from enum import Enum


class _Name(str, Enum):
    """A name a config gives as a string (YAML ``operation: mult``); a ``str``, so it compares equal
    to its value, and prints as it."""

    def __str__(self) -> str:  # "qr", not "StrategyName.QR", in messages and f-strings
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)


class StrategyName(_Name):
    """The built-in strategies' names (YAML ``embeddings.strategy: qr``). Each has one class
    registered under it (``registry.py``); a strategy of your own is registered under a new name."""

    FULL = "full"
    HASH = "hash"
    QR = "qr"
    GENERALIZED_QR = "generalized_qr"
    CRT = "crt"
    LEARNED = "learned"


class Operation(_Name):
    """How the rows of an id's partitions are combined."""

    ADD = "add"
    MULT = "mult"  # element-wise
    CONCAT = "concat"


class Compose(_Name):
    """How mult composes a bag of several ids."""

    PER_ID = "per_id"  # sum_i w_i q[x_i] * r[x_i]: each id's product, then pooled
    POOLED = "pooled"  # (sum_i w_i q[x_i]) * (sum_i r[x_i]): each partition pooled, then multiplied (the original DLRM code)
