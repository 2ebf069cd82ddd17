"""Streaming reader of the Criteo TSV layout (plain or .gz, one file or several).

A line: label, 13 integer features (may be empty or negative), 26 categorical features (8 hex
digits, may be empty), tab-separated; test files may lack the label. Files are streamed line by
line, never loaded whole; every error names the file and line.
"""

import bisect
import gzip
import itertools
import math
import os
import re
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import numpy as np

from torchrec_multihash.errors import MultiHashError

NUM_DENSE = 13
NUM_SPARSE = 26
DEFAULT_SPARSE_NAMES = [f"C{i + 1}" for i in range(NUM_SPARSE)]

PathLike = Union[str, os.PathLike]


class CriteoFormatError(MultiHashError, ValueError):
    """A line or file that is not in the Criteo TSV layout; the message gives file and line."""


class BadLineWarning(UserWarning):
    """A bad line was skipped (``data.skip_bad_lines``)."""


class BadLines:
    """Accounting of skipped bad lines: up to ``limit`` are counted and skipped (0: the first one
    stops the run with its error), the first ``warn_first`` with a warning; one more stops the
    run with an error naming the last one and the count."""

    def __init__(self, limit: int = 0, warn_first: int = 5) -> None:
        if limit < 0:
            raise ValueError(f"data.skip_bad_lines must be >= 0, got {limit}")
        self.limit, self.warn_first = limit, warn_first
        self.count = 0

    def add(self, error: str) -> None:
        """Counts one bad line (``error`` names file and line), or raises CriteoFormatError."""
        if self.limit == 0:
            raise CriteoFormatError(error)
        self.count += 1
        if self.count > self.limit:
            raise CriteoFormatError(f"{self.count} bad lines, more than data.skip_bad_lines={self.limit}; the last: {error}")
        if self.count <= self.warn_first:
            # explicit, at no source line: the message names the data's file and line, not ours
            warnings.warn_explicit(f"skipped bad line ({self.count} so far): {error}", BadLineWarning, "data.skip_bad_lines", 0)


@dataclass
class CriteoRow:
    """One parsed sample: label (None for unlabeled files), transformed dense features, raw
    categorical values (the hex strings as ints; None where empty)."""

    label: Optional[int]
    dense: List[float]
    sparse: List[Optional[int]]


_EMPTY = (b"\n", b"\r\n", b"\r")  # blank lines: skipped, not counted
# what a field may hold: decimal integers (Criteo's -1 included), 1 to 16 hex digits (a 64-bit id);
# int() would also take "+7", "1_000", " 7" and "0x1f"
_INT = re.compile(r"-?[0-9]+")
_HEX = re.compile(r"[0-9a-fA-F]{1,16}")


_File = Union[gzip.GzipFile, BinaryIO]  # what _open returns (the stubs of gzip.open and open share no file type)


def _open(path: Path) -> _File:
    if path.suffix == ".gz":  # (a larger read buffer would lose the lines before a truncation)
        return gzip.open(path, "rb")
    return open(path, "rb", buffering=1 << 20)


@dataclass(frozen=True)
class Span:
    """The lines of ``path`` whose first byte lies in ``[start, end)`` (``end`` None: to the end of
    the file): a byte range aligned to line starts. A .gz file is only read whole."""

    path: Path
    start: int = 0
    end: Optional[int] = None


def lines_before(path: Path, offset: int, block: int = 1 << 24) -> int:
    """Newlines in the first ``offset`` bytes of a plain file: the lines before that offset."""
    count = 0
    with open(path, "rb") as f:
        while offset > 0:
            data = f.read(min(block, offset))
            if not data:
                break
            count += data.count(b"\n")
            offset -= len(data)
    return count


class LineNumber:
    """A line's number in its file, for a range that starts inside the file: the newlines before the
    range are counted only when the number is shown (an error message), once per range."""

    __slots__ = ("_base", "_index")

    def __init__(self, base: "_LinesBefore", index: int) -> None:
        self._base, self._index = base, index

    def __int__(self) -> int:
        return self._base.count() + self._index

    def __str__(self) -> str:
        return str(int(self))

    __repr__ = __str__


class _LinesBefore:
    """The lines of ``path`` before byte ``offset``, counted on first use."""

    def __init__(self, path: Path, offset: int) -> None:
        self.path, self.offset, self._count = path, offset, -1

    def count(self) -> int:
        if self._count < 0:
            self._count = lines_before(self.path, self.offset)
        return self._count


Line = Union[int, LineNumber]  # a line number as reported in errors


def _as_span(p: Union[PathLike, Span]) -> Span:
    if isinstance(p, Span):
        if p.path.suffix == ".gz" and (p.start, p.end) != (0, None):
            raise ValueError(f"{p.path}: a .gz file can only be read whole, not bytes {p.start}..{p.end}")
        return p
    return Span(Path(p))


class LineStream:
    """The non-blank lines of several files (or byte ranges of files: ``Span``) in order, numbered
    across them from 0 (``position``).

    ``skip(n)`` passes over n lines without decoding them (how a rank passes other ranks'
    batches); ``take(n)`` returns the next n as (path, line number in the file, raw bytes). A truncated
    or corrupt ``.gz`` raises CriteoFormatError after the lines before it; with
    ``tolerate_corrupt`` it ends that file instead and is recorded in ``corrupt`` as
    (position, error) for the caller to report.
    """

    def __init__(self, paths: Sequence[Union[PathLike, Span]], tolerate_corrupt: bool = False) -> None:
        self.spans = [_as_span(p) for p in paths]
        self.tolerate_corrupt = tolerate_corrupt
        self.position = 0
        self.corrupt: List[Tuple[int, CriteoFormatError]] = []
        self._next_span = 0
        self._file: Optional[_File] = None
        self._path = Path()
        self._lineno = 0  # lines (blank ones included) read from the current span
        self._offset = 0  # byte offset of the next line in the current file
        self._end: Optional[int] = None
        self._before: Optional[_LinesBefore] = None  # lines of the file before the span (None: it starts the file)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open(self, span: Span) -> _File:
        """Opens the span's file at its first line: the first line starting at ``span.start`` or later."""
        if not span.path.is_file():
            raise CriteoFormatError(f"{span.path}: no such file")
        f = _open(span.path)
        self._path, self._lineno, self._offset, self._end, self._before = span.path, 0, 0, span.end, None
        if span.start > 0:
            f.seek(span.start - 1)
            f.readline()  # the rest of the line that starts before the span (or just its newline)
            self._offset = f.tell()
            self._before = _LinesBefore(span.path, self._offset)
        return f

    def _current(self) -> Optional[_File]:
        """The open file, opening the next span when needed; None after the last."""
        while self._file is None:
            if self._next_span == len(self.spans):
                return None
            span = self.spans[self._next_span]
            self._next_span += 1
            self._file = self._open(span)
            if self._end is not None and self._offset >= self._end:
                self.close()  # no line starts in the span
        return self._file

    def _in_span(self, chunk: List[bytes]) -> List[bytes]:
        """The chunk's lines that start before the span's end (closing the file after the last)."""
        if self._end is None:
            return chunk
        starts = list(itertools.accumulate(map(len, chunk), initial=self._offset))
        self._offset = starts[-1]
        if self._offset < self._end:
            return chunk
        self.close()
        return chunk[: bisect.bisect_left(starts, self._end, hi=len(chunk))]

    def _read(self, n: int) -> List[bytes]:
        """Up to n raw lines of the current span ([] at the end of all), with corruption handled."""
        f = self._current()
        if f is None:
            return []
        chunk: List[bytes] = []
        try:
            chunk.extend(itertools.islice(f, n))  # keeps the lines read before an error
        except (EOFError, OSError, zlib.error) as e:
            error = CriteoFormatError(
                f"{self._path}: truncated or corrupt gzip after line {self._lineno + len(chunk)} ({e}); the lines before it were read"
            )
            if not self.tolerate_corrupt:
                raise error from None
            self.corrupt.append((self.position + len(chunk) - _count_blank(chunk), error))
            self.close()
            if not chunk:
                return self._read(n)
            return chunk
        if not chunk:
            self.close()
            return self._read(n)
        return self._in_span(chunk) or self._read(n)

    def _line(self) -> Line:
        """The number in its file of the line last read."""
        return self._lineno if self._before is None else LineNumber(self._before, self._lineno)

    def skip(self, n: int) -> int:
        """Passes over up to n lines without decoding them; returns how many (fewer at the end)."""
        done = 0
        while done < n:
            chunk = self._read(min(n - done, 1 << 16))
            if not chunk:
                break
            self._lineno += len(chunk)
            kept = len(chunk) - _count_blank(chunk)
            done += kept
            self.position += kept
        return done

    def take(self, n: int) -> List[Tuple[Path, Line, bytes]]:
        """The next n lines (fewer at the end) as (path, line number from 1, raw bytes)."""
        out: List[Tuple[Path, Line, bytes]] = []
        while len(out) < n:
            chunk = self._read(n - len(out))
            if not chunk:
                break
            for line in chunk:
                self._lineno += 1
                if line not in _EMPTY:
                    out.append((self._path, self._line(), line))
                    self.position += 1
        return out


def _count_blank(lines: List[bytes]) -> int:
    return sum(lines.count(e) for e in _EMPTY)


def transform_dense(x: int) -> float:
    """The usual log(1 + x), with negatives clamped to 0."""
    return math.log1p(x) if x > 0 else 0.0


def parse_line(line: str, path: PathLike, lineno: Line, labeled: bool = True) -> CriteoRow:
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
        if not _INT.fullmatch(v):
            raise CriteoFormatError(f"{path}:{lineno}: integer feature I{i + 1} is not an integer: {v[:24]!r} (decimal digits, - allowed)")
        try:
            dense.append(transform_dense(int(v)))
        except ValueError:
            raise CriteoFormatError(f"{path}:{lineno}: integer feature I{i + 1} is not an integer: {v!r}") from None
        except OverflowError:
            raise CriteoFormatError(f"{path}:{lineno}: integer feature I{i + 1} is too large: {v[:20]!r}...") from None
    sparse: List[Optional[int]] = []
    for i, v in enumerate(fields[NUM_DENSE:]):
        if v == "":
            sparse.append(None)
            continue
        if not _HEX.fullmatch(v):
            raise CriteoFormatError(f"{path}:{lineno}: categorical feature C{i + 1} is not a hex string: {v[:24]!r} (1 to 16 hex digits)")
        sparse.append(int(v, 16))
    return CriteoRow(label=label, dense=dense, sparse=sparse)


# a Criteo line is at most a few hundred bytes; a longer one is not Criteo data (and a field of tens of MB
# would make the vectorized parse allocate its width for every row: terabytes)
MAX_LINE_BYTES = 1 << 16


def parse_raw(raw: bytes, path: PathLike, lineno: Line, labeled: bool = True) -> CriteoRow:
    """Parses one line as read from the file (bytes, newline included)."""
    if len(raw) > MAX_LINE_BYTES:
        raise CriteoFormatError(f"{path}:{lineno}: the line is {len(raw):,} bytes long, more than any Criteo line (at most {MAX_LINE_BYTES:,})")
    try:
        line = raw.rstrip(b"\n").rstrip(b"\r").decode("ascii")
    except UnicodeDecodeError as e:
        raise CriteoFormatError(f"{path}:{lineno}: not ASCII text ({e.reason})") from None
    if "\r" in line:
        raise CriteoFormatError(f"{path}:{lineno}: a carriage return inside the line: CR-only (old Mac) line endings? convert with tr '\\r' '\\n'")
    return parse_line(line, path, lineno, labeled)


class ParsedBlock(NamedTuple):
    """Many lines parsed at once: labels [n] (0 when unlabeled), transformed dense [n, 13],
    categorical values [n, 26] and where they are missing [n, 26]."""

    labels: np.ndarray
    dense: np.ndarray
    sparse: np.ndarray
    missing: np.ndarray


def parse_block(lines: Sequence[bytes], labeled: bool = True) -> Optional[ParsedBlock]:
    """Vectorized parse of lines as read from a file, the same values as ``parse_line`` row by row;
    None when any line is not plain Criteo (a bad line, or a categorical value that is not 8 hex
    digits): parse those line by line, which names what is wrong."""
    n, cols = len(lines), 1 + NUM_DENSE + NUM_SPARSE if labeled else NUM_DENSE + NUM_SPARSE
    stripped = [line.rstrip(b"\n").rstrip(b"\r") for line in lines]
    if any(len(line) > MAX_LINE_BYTES or line.count(b"\t") != cols - 1 or b"\r" in line for line in stripped):
        return None
    fields = np.array(b"\t".join(stripped).split(b"\t"), dtype="S").reshape(n, cols)
    labels = np.zeros(n, dtype=np.float32)
    if labeled:
        if not np.isin(fields[:, 0], [b"0", b"1"]).all():
            return None
        labels = (fields[:, 0] == b"1").astype(np.float32)
        fields = fields[:, 1:]
    try:
        ints = np.where(fields[:, :NUM_DENSE] == b"", b"0", fields[:, :NUM_DENSE])
        if not np.char.isdigit(np.char.lstrip(ints, b"-")).all():  # what _INT refuses, named by the line parser
            return None
        ints = ints.astype(np.int64)
        missing = fields[:, NUM_DENSE:] == b""
        hex8 = np.where(missing, b"00000000", fields[:, NUM_DENSE:])
        if not (np.char.str_len(hex8) == 8).all():
            return None
        raw = bytes.fromhex(hex8.astype("S8").tobytes().decode("ascii"))  # (all 8 bytes long: no padding)
    except (ValueError, OverflowError, UnicodeDecodeError):
        return None
    if len(raw) != 4 * n * NUM_SPARSE:  # whitespace inside a value
        return None
    sparse = np.frombuffer(raw, dtype=">u4").astype(np.int64).reshape(n, NUM_SPARSE)
    dense = np.log1p(np.maximum(ints, 0).astype(np.float64)).astype(np.float32)
    return ParsedBlock(labels, dense, sparse, missing)


def read_rows(paths: Sequence[PathLike], labeled: bool = True, bad_lines: Optional[BadLines] = None) -> Iterator[CriteoRow]:
    """Streams the parsed rows of the files, in order; a bad line raises, or is skipped and
    counted by ``bad_lines`` when that allows it."""
    bad = bad_lines if bad_lines is not None else BadLines()
    stream = LineStream(paths, tolerate_corrupt=bad.limit > 0)
    try:
        while True:
            lines = stream.take(4096)
            for _, error in stream.corrupt:
                bad.add(str(error))
            stream.corrupt.clear()
            if not lines:
                return
            for path, lineno, raw in lines:
                try:
                    row = parse_raw(raw, path, lineno, labeled)
                except CriteoFormatError as e:
                    bad.add(str(e))
                    continue
                yield row
    finally:
        stream.close()
