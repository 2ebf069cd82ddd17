"""Raw categorical values -> table ids: TorchRec-style hashing, or a frequency-ordered vocabulary."""

import collections
import itertools
import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Protocol, Sequence

import numpy as np

from torchrec_multihash.datasets.criteo_tsv import CriteoRow
from torchrec_multihash.datasets.heavy_hitters import HeavyHitters


class IdMapping(Protocol):
    """Raw categorical value of a feature -> table id, one at a time or many at once."""

    def __call__(self, feature: int, value: Optional[int]) -> int: ...

    def map_array(self, feature: int, values: np.ndarray, missing: np.ndarray) -> np.ndarray: ...

    def sizes(self) -> List[int]: ...


class HashingIds:
    """``value % N`` per feature (TorchRec's Criteo preprocessing); a missing value is id 0."""

    def __init__(self, num_embeddings_per_feature: Sequence[int]) -> None:
        self.num_embeddings_per_feature = list(num_embeddings_per_feature)

    def sizes(self) -> List[int]:
        """Table rows of each feature: the configured sizes."""
        return list(self.num_embeddings_per_feature)

    def __call__(self, feature: int, value: Optional[int]) -> int:
        return 0 if value is None else value % self.num_embeddings_per_feature[feature]

    def map_array(self, feature: int, values: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Many values of one feature at once (``missing`` marks the missing ones)."""
        return np.where(missing, 0, values % self.num_embeddings_per_feature[feature])


class Vocabulary:
    """Per feature, values seen at least ``min_count`` times get ids 1, 2, ... by falling frequency;
    id 0 is shared by missing, rare and unseen values (out of vocabulary)."""

    OOV = 0

    def __init__(self, ids: List[Dict[int, int]], min_count: int, source: Optional[Dict[str, Any]] = None) -> None:
        self.ids = ids
        self.min_count = min_count
        self.source = source  # what it was built from (data files, config keys), saved with it

    @classmethod
    def build(cls, rows: Iterable[CriteoRow], num_features: int, min_count: int = 1, max_size: int = 1_000_000, chunk: int = 4096) -> "Vocabulary":
        """Counts each feature's values in bounded memory (HeavyHitters of capacity ``max_size``:
        exact while a feature has at most ``2 * max_size`` distinct values) and keeps the
        ``max_size`` most frequent seen at least ``min_count`` times."""
        counters: List[HeavyHitters[int]] = [HeavyHitters(max_size) for _ in range(num_features)]
        it = iter(rows)
        for part in iter(lambda: list(itertools.islice(it, chunk)), []):
            for f, counter in enumerate(counters):
                counter.update([v for v in (r.sparse[f] for r in part) if v is not None])
        ids = [{v: i + 1 for i, (v, _) in enumerate(c.most_common(max_size, min_count))} for c in counters]
        return cls(ids, min_count)

    @classmethod
    def from_values(cls, values: Sequence[np.ndarray], min_count: int) -> "Vocabulary":
        """Per feature, its vocabulary in id order (``ValueCounts.most_common``'s): ids 1, 2, ..."""
        return cls([dict(zip(v.tolist(), range(1, len(v) + 1))) for v in values], min_count)

    def sizes(self) -> List[int]:
        """Table rows each feature needs (vocabulary + the OOV id)."""
        return [len(m) + 1 for m in self.ids]

    def __call__(self, feature: int, value: Optional[int]) -> int:
        return self.OOV if value is None else self.ids[feature].get(value, self.OOV)

    def map_array(self, feature: int, values: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Many values of one feature at once (``missing`` marks the missing ones)."""
        get = self.ids[feature].get
        return np.where(missing, self.OOV, np.array([get(v, self.OOV) for v in values.tolist()], dtype=np.int64))

    def save(self, path: Path) -> None:
        """Writes the vocabulary (and its ``source``) atomically: a reader never sees half of it."""
        data = {"min_count": self.min_count, "source": self.source, "features": [[f"{v:x}" for v in sorted(m, key=m.__getitem__)] for m in self.ids]}
        tmp = Path(path).with_name(f".{Path(path).name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(data))
        tmp.replace(path)

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        try:
            data = json.loads(Path(path).read_text())
            ids = [{int(h, 16): i + 1 for i, h in enumerate(values)} for values in data["features"]]
            min_count = int(data["min_count"])
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ValueError(f"{path}: not a vocabulary file written by Vocabulary.save ({e})") from None
        for f, (values, mapping) in enumerate(zip(data["features"], ids)):
            if len(mapping) != len(values):  # a value twice: its ids would collapse, the table silently shrink
                counts = collections.Counter(int(v, 16) for v in values)
                twice = next(v for v in values if counts[int(v, 16)] > 1)
                raise ValueError(
                    f"{path}: feature {f} lists value {twice} more than once: not a vocabulary file written by Vocabulary.save (edited?)"
                )
        return cls(ids, min_count, data.get("source"))
