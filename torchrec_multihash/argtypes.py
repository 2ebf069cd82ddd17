"""argparse types for the commands' numbers: a value no run can use is refused by the parser,
naming the option (``error: argument --steps: must be >= 1, got 0``), not found out later."""

import argparse
import math
from pathlib import Path
from typing import Callable


def at_least(least: float, kind: type = int) -> Callable[[str], float]:
    """An argparse ``type``: a finite number of ``kind`` (int or float) of at least ``least``."""

    def parse(text: str) -> float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'a whole number' if kind is int else 'a number'}, got {text!r}") from None
        if not math.isfinite(value) or value < least:
            raise argparse.ArgumentTypeError(f"must be >= {least:g}, got {text}")
        return value

    parse.__name__ = kind.__name__  # what argparse names in its messages
    return parse


def above(bound: float) -> Callable[[str], float]:
    """An argparse ``type``: a finite float greater than ``bound``."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        if not math.isfinite(value) or value <= bound:
            raise argparse.ArgumentTypeError(f"must be > {bound:g} and finite, got {text}")
        return value

    parse.__name__ = "float"
    return parse


def folder(text: str) -> Path:
    """An argparse ``type`` for an output folder: a path that is not an existing file."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a file: give a folder (it is created if missing)")
    return path


def file_to_write(text: str) -> Path:
    """An argparse ``type`` for an output file: a path that is not an existing folder."""
    path = Path(text)
    if path.is_dir():
        raise argparse.ArgumentTypeError(f"{text} is a folder: give the file to write, e.g. {path / 'model.pt'}")
    return path
