"""Criteo TSV day files (plain or .gz) -> TorchRec's preprocessed npy layout, once, before training.

Each input file becomes ``<day>_dense.npy`` (float32 [n, 13], log(1 + max(x, 0)), the TSV
reader's values), ``<day>_sparse.npy`` (table ids [n, 26], int32 when every size fits, else int64)
and ``<day>_labels.npy`` (int32 [n, 1]), where ``<day>`` is the file name without ``.gz`` and
``.txt``/``.tsv``: what ``data.format: criteo_npy`` (TorchRec's InMemoryBinaryCriteoIterDataPipe)
reads. The id mapping is decided here, once: hashing mod the sizes, or a vocabulary built in one
counting pass over the training days (``vocabulary.json`` beside the npy files); the loader's own
``% size`` leaves these ids as they are.

Files are streamed in chunks of lines (bounded memory) into temporary files, renamed when the day
is complete; ``preprocess.json`` records the id mapping, ``<day>.preprocess.json`` a finished day
and the source file it was made from (name, size, mtime). A rerun skips the finished days and
redoes a half-written one; processes given different days of one folder may run at once.
Bad lines are reported as the trainer's reader reports them (file:line).
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, BinaryIO, Dict, List, Optional, Sequence

import numpy as np
from tqdm import tqdm

from torchrec_multihash.app.config import ConfigError, load_config
from torchrec_multihash.app.provenance import files
from torchrec_multihash.argtypes import at_least, folder
from torchrec_multihash.datasets.batching import block_ids, parse_lines
from torchrec_multihash.datasets.criteo_tsv import NUM_DENSE, NUM_SPARSE, BadLines, LineStream
from torchrec_multihash.datasets.id_mapping import HashingIds, IdMapping, Vocabulary
from torchrec_multihash.datasets.value_counts import count_values_in_processes
from torchrec_multihash.errors import MultiHashError

RECORD = "preprocess.json"
VOCABULARY = "vocabulary.json"
_HEADER = 128  # bytes of every npy header written here: room for any shape, rewritten in place at the end


def day_name(path: Path) -> str:
    """``day_3.gz`` -> ``day_3``; ``train.txt`` -> ``train``."""
    name = path.name[: -len(".gz")] if path.name.endswith(".gz") else path.name
    for suffix in (".txt", ".tsv"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    return name


def npy_paths(out_dir: Path, day: str) -> List[Path]:
    """Dense, sparse and labels files of a day."""
    return [out_dir / f"{day}_{kind}.npy" for kind in ("dense", "sparse", "labels")]


class _NpyWriter:
    """Appends rows to an .npy file whose row count is known only at the end: the header is
    written with room to spare and rewritten with the real shape by ``close``."""

    def __init__(self, path: Path, dtype: Any, cols: int) -> None:
        self.path, self.dtype, self.cols, self.rows = path, np.dtype(dtype), cols, 0
        self.file: BinaryIO = open(path, "wb")
        self.file.write(b"\0" * _HEADER)

    def append(self, arr: np.ndarray) -> None:
        self.file.write(np.ascontiguousarray(arr, dtype=self.dtype).reshape(-1, self.cols).tobytes())
        self.rows += len(arr)

    def close(self) -> None:
        header = {"descr": np.lib.format.dtype_to_descr(self.dtype), "fortran_order": False, "shape": (self.rows, self.cols)}
        text = repr(header).encode("latin1")
        body = text.ljust(_HEADER - 10 - 1) + b"\n"
        self.file.seek(0)
        self.file.write(b"\x93NUMPY\x01\x00" + len(body).to_bytes(2, "little") + body)
        self.file.close()


class PreprocessError(MultiHashError, ValueError):
    """Preprocessing cannot go on as asked (e.g. an output folder made with another id mapping)."""


def _write_json(path: Path, data: Dict[str, Any]) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1))
    tmp.replace(path)


def _rows_of(path: Path) -> Optional[int]:
    try:
        return int(np.load(path, mmap_mode="r").shape[0])
    except (OSError, ValueError):
        return None


def convert_day(
    src: Path, out_dir: Path, to_id: IdMapping, bad: BadLines, chunk_lines: int = 1 << 16, labeled: bool = True, progress: bool = True
) -> int:
    """Writes one day's npy files (under temporary names, renamed at the end); returns its rows."""
    day = day_name(src)
    final = npy_paths(out_dir, day)
    tmp = [p.with_name(f".{p.name}.part") for p in final]
    id_dtype = np.int32 if max(to_id.sizes()) <= np.iinfo(np.int32).max else np.int64
    writers = [_NpyWriter(tmp[0], np.float32, NUM_DENSE), _NpyWriter(tmp[1], id_dtype, NUM_SPARSE), _NpyWriter(tmp[2], np.int32, 1)]
    stream = LineStream([src], tolerate_corrupt=bad.limit > 0)
    bar = tqdm(desc=day, unit=" lines", unit_scale=True, disable=None if progress else True, dynamic_ncols=True)
    bad_data = False
    try:
        while True:
            lines = stream.take(chunk_lines)
            for _, corrupt in stream.corrupt:
                bad.add(str(corrupt))
            stream.corrupt.clear()
            if not lines:
                break
            block, errors = parse_lines(lines, labeled)
            for error in errors:
                bad.add(error)
            if block is not None:
                writers[0].append(block.dense)
                writers[1].append(block_ids(block, to_id))
                writers[2].append(block.labels.astype(np.int32))
            bar.update(len(lines))
    except MultiHashError:  # bad data: nothing of the day stays (a killed run's half day is redone on resume)
        bad_data = True
        raise
    finally:
        bar.close()
        stream.close()
        for w in writers:
            w.close()
        if bad_data:
            for t in tmp:
                t.unlink(missing_ok=True)
    for t, f in zip(tmp, final):
        t.replace(f)
    return writers[0].rows


def _id_mapping(args: argparse.Namespace, out_dir: Path, inputs: List[Path]) -> IdMapping:
    if args.ids == "hashing":
        sizes = list(args.sizes or [])
        if args.config is not None:
            sizes = list(load_config(args.config).embeddings.num_embeddings_per_feature)
        if len(sizes) != NUM_SPARSE or min(sizes) < 1:
            raise ConfigError(f"hashing needs {NUM_SPARSE} positive sizes (--config or --sizes), got {len(sizes)}")
        return HashingIds(sizes)
    vocab_from = [Path(p) for p in args.vocab_from] if args.vocab_from else inputs
    source = {"files": files([str(p) for p in vocab_from], exact=False), "min_count": args.min_count, "max_vocab_size": args.max_vocab_size}
    path = out_dir / VOCABULARY
    if path.is_file():
        try:
            vocab = Vocabulary.load(path)
        except ValueError as e:
            raise PreprocessError(f"{e}: delete it to build it again") from None
        if vocab.source == source:
            return vocab
        raise PreprocessError(f"{path} was built from other data or settings ({vocab.source} vs {source}): use another --out-dir or delete it")
    print(f"Counting the categorical values of {len(vocab_from)} file(s) for the vocabulary...", file=sys.stderr, flush=True)
    counts = count_values_in_processes(vocab_from, NUM_SPARSE, args.max_vocab_size, args.processes, args.skip_bad_lines, not args.unlabeled)
    vocab = Vocabulary.from_values([counts.most_common(f, args.max_vocab_size, args.min_count) for f in range(NUM_SPARSE)], args.min_count)
    vocab.source = source
    vocab.save(path)
    return vocab


def preprocess(args: argparse.Namespace) -> Dict[str, Any]:
    inputs = [Path(p) for p in args.inputs]
    missing = [str(p) for p in inputs if not p.is_file()]
    if missing:
        raise ConfigError(f"no such input file(s): {missing}")
    days = [day_name(p) for p in inputs]
    if len(set(days)) < len(days):
        raise ConfigError(f"input files share output names: {days}")
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    to_id = _id_mapping(args, out_dir, inputs)
    mapping = {"ids": args.ids, "sizes": to_id.sizes(), "labeled": not args.unlabeled}
    record_path = out_dir / RECORD
    if record_path.is_file():
        old = json.loads(record_path.read_text())
        if {k: old.get(k) for k in mapping} != mapping:
            raise PreprocessError(
                f"{out_dir} holds days made with another id mapping ({ {k: old.get(k) for k in mapping} }): use another --out-dir or delete it"
            )
    else:
        _write_json(record_path, mapping)
    record: Dict[str, Any] = {**mapping, "days": {}}
    bad = BadLines(args.skip_bad_lines)
    for src, day in zip(inputs, days):
        source = files([str(src)], exact=False)[0] + [Path(src).stat().st_mtime_ns]
        day_path = out_dir / f"{day}.{RECORD}"
        done = json.loads(day_path.read_text()) if day_path.is_file() else None
        if done and done.get("source") == source and all(_rows_of(p) == done.get("rows") for p in npy_paths(out_dir, day)):
            print(f"{day}: done before ({done['rows']:,} rows), skipped", file=sys.stderr, flush=True)
            record["days"][day] = done
            continue
        day_path.unlink(missing_ok=True)
        start, bad_before = time.perf_counter(), bad.count
        rows = convert_day(src, out_dir, to_id, bad, args.chunk_lines, not args.unlabeled, progress=not args.quiet)
        seconds = time.perf_counter() - start
        record["days"][day] = {"source": source, "rows": rows, "bad_lines": bad.count - bad_before, "seconds": round(seconds, 3)}
        _write_json(day_path, record["days"][day])
        print(f"{day}: {rows:,} rows in {seconds:.1f} s ({rows / max(seconds, 1e-9):,.0f} lines/s)", file=sys.stderr, flush=True)
    return record


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="torchrec-multihash preprocess", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="Criteo TSV day files (plain or .gz), one npy triplet each")
    p.add_argument("--out-dir", type=folder, required=True, help="folder of the npy files (and preprocess.json, vocabulary.json)")
    p.add_argument("--ids", choices=("hashing", "vocabulary"), default="hashing", help="hashing mod the sizes, or a frequency vocabulary")
    p.add_argument("--config", default=None, help="hashing: take the sizes from this config's embeddings.num_embeddings_per_feature")
    p.add_argument("--sizes", type=int, nargs="+", help="hashing: 26 table sizes (instead of --config)")
    p.add_argument("--vocab-from", nargs="+", help="vocabulary: the files to count (default: all inputs; give the training days only)")
    p.add_argument("--min-count", type=int, default=1, help="vocabulary: values seen fewer times share the OOV id 0")
    p.add_argument("--max-vocab-size", type=int, default=1_000_000, help="vocabulary: most ids per feature")
    p.add_argument(
        "--processes",
        type=at_least(1),
        default=1,
        help="vocabulary: count in this many processes, each its share of the files (bad lines limited in each)",
    )
    p.add_argument("--skip-bad-lines", type=int, default=0, help="skip up to this many bad lines in all (0: the first one stops)")
    p.add_argument("--unlabeled", action="store_true", help="files without the label column (labels written as 0)")
    p.add_argument("--chunk-lines", type=int, default=1 << 16, help="lines parsed at once (memory: about 1 KiB each)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parser().parse_args(argv)
    try:
        preprocess(args)
    except MultiHashError as e:
        print(f"torchrec-multihash preprocess: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
