"""Each rank reads only its own share of the TSV files: byte ranges of plain files aligned to line
starts, whole .gz files; over the ranks, every line exactly once, with its file and line number."""

import gzip
import random

import pytest
import torch

from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError, LineStream, Span, read_rows
from torchrec_multihash.datasets.tsv_ranges import SharedReadWarning, rank_share


def _lines(spans):
    """(file name, line number, raw line) of every non-blank line of the spans, in order."""
    stream = LineStream(spans)
    try:
        return [(p.name, int(n), raw) for p, n, raw in stream.take(10**9)]
    finally:
        stream.close()


def _write(path, text: bytes):
    path.write_bytes(text)
    return path


def _text(n: int, seed: int, ending: bytes = b"\n", trailing: bool = True, blanks: bool = True) -> bytes:
    """n lines of random length (1 to 40 bytes), some blank."""
    rng = random.Random(seed)
    lines = [b"" if blanks and rng.random() < 0.1 else bytes(rng.choice(b"abc\t") for _ in range(rng.randint(1, 40))) for _ in range(n)]
    text = ending.join(lines)
    return text + ending if trailing and lines else text


@pytest.mark.parametrize(
    "ending,trailing,blanks", [(b"\n", True, True), (b"\n", False, True), (b"\r\n", True, True), (b"\r\n", False, False), (b"\n", False, False)]
)
def test_every_cut_of_a_file_splits_its_lines_exactly(tmp_path, ending, trailing, blanks):
    """Cutting at any byte: the lines starting before the cut, then those starting at or after it,
    are the file's lines, with their numbers in the file."""
    path = _write(tmp_path / "f.txt", _text(30, 1, ending, trailing, blanks))
    whole = _lines([path])
    assert len(whole) >= 20 and all(raw.endswith(ending) for _, _, raw in whole[:-1])
    for cut in range(path.stat().st_size + 2):
        assert _lines([Span(path, 0, cut), Span(path, cut)]) == whole, cut
    for a, b in [(0, 1), (5, 9), (17, 300), (1, 2)]:  # three pieces, some empty
        assert _lines([Span(path, 0, a), Span(path, a, b), Span(path, b)]) == whole


@pytest.mark.parametrize("world_size", [1, 2, 3, 5, 8, 40])
def test_ranks_shares_of_plain_files_are_every_line_once(tmp_path, world_size):
    files = [
        _write(tmp_path / "a.txt", _text(50, 2)),
        _write(tmp_path / "empty.txt", b""),
        _write(tmp_path / "tiny.txt", b"x\ty\n"),  # fewer lines than ranks
        _write(tmp_path / "crlf.txt", _text(40, 3, b"\r\n", trailing=False)),
        _write(tmp_path / "blank.txt", b"\n\n\r\n"),
    ]
    whole = _lines(files)
    shares = [rank_share(files, rank, world_size) for rank in range(world_size)]
    assert all((s.slot, s.slots) == (0, 1) for s in shares)  # each rank keeps all its lines
    assert [line for s in shares for line in _lines(s.spans)] == whole
    sizes = [sum(len(raw) for _, _, raw in _lines(s.spans)) for s in shares]
    assert max(sizes) - min(sizes) <= 2 * 42 + 2  # equal bytes, up to a line at each end


def test_gz_files_go_whole_to_ranks_balanced_by_size(tmp_path):
    sizes = [30, 200, 10, 120, 60]
    files = []
    for i, n in enumerate(sizes):
        files.append(tmp_path / f"day_{i}.gz")
        with gzip.open(files[-1], "wb") as f:
            f.write(_text(n, 10 + i, blanks=False))
    shares = [rank_share(files, rank, 2) for rank in range(2)]
    owned = [[s.path.name for s in share.spans] for share in shares]
    # by compressed size, largest first to the lighter rank; each rank in file order
    by_size = sorted(range(5), key=lambda i: -files[i].stat().st_size)
    assert by_size[0] == 1 and "day_1.gz" in owned[0] and sorted(owned[0] + owned[1]) == [f.name for f in files]
    assert all(s.start == 0 and s.end is None for share in shares for s in share.spans)
    assert sorted(line for share in shares for line in _lines(share.spans)) == sorted(_lines(files))
    with pytest.raises(ValueError, match="a .gz file can only be read whole"):
        LineStream([Span(files[0], 5)])


def test_fewer_gz_files_than_ranks_every_rank_reads_all_with_a_warning(tmp_path):
    with gzip.open(tmp_path / "day.gz", "wb") as f:
        f.write(_text(20, 4))
    files = [tmp_path / "day.gz", _write(tmp_path / "b.txt", _text(20, 5))]
    with pytest.warns(SharedReadWarning, match=r"2 file\(s\), some gzipped, for 3 ranks: .* every rank reads every file and keeps every 3-th batch"):
        share = rank_share(files, 2, 3)
    assert (share.slot, share.slots) == (2, 3) and [s.path for s in share.spans] == files


def test_a_bad_line_in_a_range_is_named_by_its_line_in_the_file(shared_data, tmp_path):
    """The second rank's range starts mid-file: its bad line is still named file:line."""
    lines = (shared_data / "criteo_kaggle_900" / "train.txt").read_bytes().splitlines(keepends=True)
    lines[700] = b"garbage\n"
    path = _write(tmp_path / "bad.txt", b"".join(lines))
    share = rank_share([path], 1, 2)
    assert share.spans[0].start > 0
    with pytest.raises(CriteoFormatError, match=r"bad.txt:701: expected 40 tab-separated columns"):
        list(read_rows(share.spans))
    assert len(list(read_rows(rank_share([path], 0, 2).spans))) < 700  # the other rank never meets it


def _rows(batches):
    """Per batch, its samples' dense features and ids side by side."""
    return [torch.cat([b.dense_features.double(), b.sparse_features.values().view(26, -1).t().double()], dim=1) for b in batches]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_each_rank_resumes_with_the_batches_an_uninterrupted_run_takes(shared_data, tmp_path, num_workers):
    """What ``--resume`` relies on: a rank's ``train(epoch, skip)`` is its uninterrupted batches
    from the ``skip``-th on (the data position is the count of the rank's batches done)."""
    from torchrec_multihash.app.config import load_config
    from torchrec_multihash.app.data import make_data

    lines = (shared_data / "criteo_kaggle_900" / "train.txt").read_bytes().splitlines(keepends=True)
    files = [_write(tmp_path / "day_0.txt", b"".join(lines[:300])), _write(tmp_path / "day_1.txt", b"".join(lines[300:]))]
    sets = [f"data.train={[str(f) for f in files]}", f"data.test={[str(files[0])]}", "train.batch_size=64", f"data.num_workers={num_workers}"]
    cfg = load_config("configs/criteo_kaggle_qr.yaml", sets)
    seen = []
    for rank in (0, 1):
        data = make_data(cfg, rank, 2, tmp_path)
        straight = _rows(data.train(0, 0))
        assert len(straight) >= 6  # about 450 lines each, the last partial batch dropped
        for skip in (1, 4, len(straight)):
            resumed = _rows(data.train(0, skip))
            assert len(resumed) == len(straight) - skip and all(a.equal(b) for a, b in zip(resumed, straight[skip:]))
        seen += [tuple(row) for b in straight for row in b.tolist()]
    assert len(set(seen)) == len(seen) >= 12 * 64  # the ranks' batches are distinct samples
