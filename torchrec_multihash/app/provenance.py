"""What an artifact of a run was made from: the data files (name, size, modification time or a
sampled content digest) and the
config keys that shape it, as flat ``{key: value}`` records compared key by key."""

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchrec_multihash.app.config import MCH, Config

Record = Dict[str, Any]

# keys that decide which samples a data position means (the resume check's), beyond the files
_SAMPLE_KEYS = (
    "data.format",
    "data.ids",
    "data.min_count",
    "data.max_vocab_size",
    "data.train_samples",
    "data.num_clusters",
    "train.batch_size",
    "train.seed",
)
# keys that decide the tables, so what a checkpoint or a fitted mapping holds
_TABLE_KEYS = (
    "strategy",
    "operation",
    "compression",
    "budget_bytes",
    "auto_candidates",
    "threshold",
    "num_partitions",
    "overrides",
    "feature_names",
    "num_embeddings_per_feature",
    "mapping",
    "fit",
)


# a file's content fingerprint: this many blocks of SAMPLE_BYTES, evenly spaced (first and last included)
SAMPLE_BLOCKS = 64
SAMPLE_BYTES = 4096


def sampled_digest(path: str) -> Optional[str]:
    """SHA-256 of ``SAMPLE_BLOCKS`` evenly spaced blocks of the file: what tells another file of the
    same name and size (shuffled lines, another day) or one edited in place from the one a run read,
    at the cost of a few hundred KB read even for a Criteo-1TB day; None if it cannot be read."""
    try:
        size = Path(path).stat().st_size
        digest = hashlib.sha256()
        with open(path, "rb") as f:
            step = max(SAMPLE_BYTES, size // SAMPLE_BLOCKS)
            for offset in sorted({*range(0, size, step), max(0, size - SAMPLE_BYTES)}):
                f.seek(offset)
                digest.update(f.read(SAMPLE_BYTES))
        return digest.hexdigest()[:16]
    except OSError:
        return None


def files(paths: Optional[List[str]], exact: bool = True) -> List[List[Any]]:
    """[name, size, mtime_ns] per file (``exact``: the resolved path and the time), else [file name,
    size, sampled content digest]: what survives a copy of the data to another folder, and changes
    with another file of that name and size, or an edit in place."""
    out = []
    for p in paths or []:
        size: Optional[int]
        mtime: Optional[int]
        try:
            size, mtime = Path(p).stat().st_size, Path(p).stat().st_mtime_ns
        except OSError:  # the data's own checks name it
            size = mtime = None
        out.append([str(Path(p).resolve()), size, mtime] if exact else [Path(p).name, size, sampled_digest(p)])
    return out


def _key(cfg: Config, dotted: str) -> Any:
    section, key = dotted.split(".")
    value = getattr(getattr(cfg, section), key)
    return json.loads(json.dumps(value, default=str))  # JSON's view: what a record read back holds


def data_record(cfg: Config, exact: bool = True) -> Record:
    """The training data and the keys that decide its samples."""
    multi_hot = {k: _key(cfg, k) for k in ("data.multi_hot_features", "data.max_bag")} if cfg.data.multi_hot_features else {}
    if cfg.data.shuffle:  # recorded where set, as multi_hot
        multi_hot["data.shuffle"] = True
    return {
        "data.train": files(cfg.data.train, exact) if cfg.data.format != "synthetic" else None,
        **{k: _key(cfg, k) for k in _SAMPLE_KEYS},
        **multi_hot,  # recorded where set, so records of runs without them stay as they were
    }


# keys that decide the tables only where set: recorded then alone, so records of runs without them stay as they were
_TABLE_KEYS_IF_USED = {
    "compose": lambda cfg: cfg.embeddings.compose != "per_id",
    "stack_parts": lambda cfg: cfg.embeddings.stack_parts is not None,
    "precision": lambda cfg: cfg.embeddings.precision is not None,
    "mch_eviction": lambda cfg: cfg.embeddings.strategy == MCH,
    "mch_sizing": lambda cfg: cfg.embeddings.strategy == MCH,
}


def tables_record(cfg: Config) -> Record:
    record = {f"embeddings.{k}": _key(cfg, f"embeddings.{k}") for k in _TABLE_KEYS}
    record.update({f"embeddings.{k}": _key(cfg, f"embeddings.{k}") for k, used in _TABLE_KEYS_IF_USED.items() if used(cfg)})
    return record


def run_record(cfg: Config, world_size: int) -> Record:
    """What a checkpoint's data position and tables depend on (the files by name and size)."""
    model = {f"model.{f.name}": _key(cfg, f"model.{f.name}") for f in dataclasses.fields(cfg.model)}
    return {**data_record(cfg, exact=False), **tables_record(cfg), **model, "world_size": world_size}


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 120 else text[:117] + "..."


def _file_changes(key: str, then: Any, now: Any) -> Optional[str]:
    """Each changed file of two ``files`` records of the same files, named with what changed; None
    for other values."""
    pairs = list(zip(then, now)) if isinstance(then, list) and isinstance(now, list) and len(then) == len(now) else []
    if not pairs or not all(isinstance(t, list) and isinstance(n, list) and len(t) == len(n) > 1 and t[0] == n[0] for t, n in pairs):
        return None
    changed = [
        f"{key}: {n[0]} " + ("was modified since (same size)" if t[1] == n[1] else f"has {n[1]} bytes, {t[1]} then") for t, n in pairs if t != n
    ]
    return "; ".join(changed) or None


def differences(recorded: Optional[Record], current: Record) -> List[str]:
    """``key: X then, Y now`` for each key whose value changed (or one line for no record); a changed
    data file is named with what changed."""
    if not recorded:
        return ["it records nothing of what it was made from (written by an older version)"]
    changed = [
        _file_changes(k, recorded.get(k), v) or f"{k}: {_short(recorded.get(k))} then, {_short(v)} now"
        for k, v in current.items()
        if recorded.get(k) != v
    ]
    optional = [f"embeddings.{k}" for k in _TABLE_KEYS_IF_USED]
    dropped = [k for k in optional if k in recorded and k not in current and k.split(".")[0] + ".strategy" in current]
    return changed + [f"{k}: {_short(recorded[k])} then, not set now" for k in dropped]
