"""The names by which configs choose a strategy."""

from enum import Enum


class StrategyName(str, Enum):
    """A strategy's name in configs (YAML ``embeddings.strategy: qr``); a ``str``, so it compares
    equal to its value. Each has one class registered under it (``registry.py``)."""

    FULL = "full"
    HASH = "hash"
    QR = "qr"
    GENERALIZED_QR = "generalized_qr"
    CRT = "crt"
    LEARNED = "learned"

    __str__ = str.__str__  # "qr", not "StrategyName.QR", in messages and f-strings
    __format__ = str.__format__
