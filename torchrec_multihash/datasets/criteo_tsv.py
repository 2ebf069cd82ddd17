"""Streaming reader of the Criteo TSV layout (plain or .gz, one file or several).

A line: label, 13 integer features (may be empty or negative), 26 categorical features (8 hex
digits, may be empty), tab-separated; test files may lack the label. Files are streamed line by
line, never loaded whole; every error names the file and line.
"""

import gzip
import math
import os
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Union

NUM_DENSE = 13
NUM_SPARSE = 26
DEFAULT_SPARSE_NAMES = [f"C{i + 1}" for i in range(NUM_SPARSE)]

PathLike = Union[str, os.PathLike]


class CriteoFormatError(ValueError):
    """A line or file that is not in the Criteo TSV layout; the message gives file and line."""


@dataclass
class CriteoRow:
    """One parsed sample: label (None for unlabeled files), transformed dense features, raw
    categorical values (the hex strings as ints; None where empty)."""

    label: Optional[int]
    dense: List[float]
    sparse: List[Optional[int]]


def _open(path: Path):
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="ascii", newline="\n")
    return open(path, "rt", encoding="ascii", newline="\n")


def iter_lines(paths: Sequence[PathLike]) -> Iterator[tuple]:
    """Yields (path, line number from 1, line without newline) for every line of every file."""
    for p in paths:
        path = Path(p)
        if not path.is_file():
            raise CriteoFormatError(f"{path}: no such file")
        lineno = 0
        try:
            with _open(path) as f:
                for lineno, line in enumerate(f, start=1):
                    yield path, lineno, line.rstrip("\n").rstrip("\r")
        except (EOFError, zlib.error, gzip.BadGzipFile) as e:
            raise CriteoFormatError(
                f"{path}: truncated or corrupt gzip after line {lineno} ({e}); the lines before "
                "it were read"
            ) from None
        except UnicodeDecodeError as e:
            raise CriteoFormatError(f"{path}:{lineno + 1}: not ASCII text ({e.reason})") from None


def transform_dense(x: int) -> float:
    """The usual log(1 + x), with negatives clamped to 0."""
    return math.log1p(x) if x > 0 else 0.0


def parse_line(line: str, path: PathLike, lineno: int, labeled: bool = True) -> CriteoRow:
    """Parses one line; raises CriteoFormatError naming file, line and column."""
    fields = line.split("\t")
    expected = 1 + NUM_DENSE + NUM_SPARSE if labeled else NUM_DENSE + NUM_SPARSE
    if len(fields) != expected:
        raise CriteoFormatError(
            f"{path}:{lineno}: expected {expected} tab-separated columns "
            f"({'label, ' if labeled else ''}{NUM_DENSE} integer, {NUM_SPARSE} categorical), "
            f"found {len(fields)}"
        )
    label: Optional[int] = None
    if labeled:
        if fields[0] not in ("0", "1"):
            raise CriteoFormatError(f"{path}:{lineno}: label must be 0 or 1, got {fields[0]!r}")
        label = int(fields[0])
        fields = fields[1:]
    dense: List[float] = []
    for i, v in enumerate(fields[:NUM_DENSE]):
        if v == "":
            dense.append(0.0)
            continue
        try:
            dense.append(transform_dense(int(v)))
        except ValueError:
            raise CriteoFormatError(f"{path}:{lineno}: integer feature I{i + 1} is not an integer: {v!r}") from None
    sparse: List[Optional[int]] = []
    for i, v in enumerate(fields[NUM_DENSE:]):
        if v == "":
            sparse.append(None)
            continue
        try:
            sparse.append(int(v, 16))
        except ValueError:
            raise CriteoFormatError(
                f"{path}:{lineno}: categorical feature C{i + 1} is not a hex string: {v!r}"
            ) from None
    return CriteoRow(label=label, dense=dense, sparse=sparse)


def read_rows(paths: Sequence[PathLike], labeled: bool = True) -> Iterator[CriteoRow]:
    """Streams the parsed rows of the files, in order."""
    for path, lineno, line in iter_lines(paths):
        if line == "":
            continue
        yield parse_line(line, path, lineno, labeled)
