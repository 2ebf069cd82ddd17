"""The names by which configs choose a strategy."""

from enum import Enum


class StrategyName(str, Enum):
    """The built-in strategies' names (YAML ``embeddings.strategy: qr``); a ``str``, so it compares
    equal to its value. Each has one class registered under it (``registry.py``); a strategy of
    your own is registered under a new name."""

    FULL = "full"
    HASH = "hash"
    QR = "qr"
    GENERALIZED_QR = "generalized_qr"
    CRT = "crt"
    LEARNED = "learned"

    def __str__(self) -> str:  # "qr", not "StrategyName.QR", in messages and f-strings
        return str(self.value)

    def __format__(self, spec: str) -> str:
        return format(str(self.value), spec)
