"""Raw categorical values -> table ids: TorchRec-style hashing, or a frequency-ordered vocabulary."""

import json
from collections import Counter
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Protocol, Sequence

import numpy as np

from torchrec_multihash.datasets.criteo_tsv import CriteoRow


class IdMapping(Protocol):
    """Raw categorical value of a feature -> table id, one at a time or many at once."""

    def __call__(self, feature: int, value: Optional[int]) -> int: ...

    def map_array(self, feature: int, values: np.ndarray, missing: np.ndarray) -> np.ndarray: ...


class HashingIds:
    """``value % N`` per feature (TorchRec's Criteo preprocessing); a missing value is id 0."""

    def __init__(self, num_embeddings_per_feature: Sequence[int]) -> None:
        self.num_embeddings_per_feature = list(num_embeddings_per_feature)

    def __call__(self, feature: int, value: Optional[int]) -> int:
        return 0 if value is None else value % self.num_embeddings_per_feature[feature]

    def map_array(self, feature: int, values: np.ndarray, missing: np.ndarray) -> np.ndarray:
        """Many values of one feature at once (``missing`` marks the missing ones)."""
        return np.where(missing, 0, values % self.num_embeddings_per_feature[feature])


class Vocabulary:
    """Per feature, values seen at least ``min_count`` times get ids 1, 2, ... by falling frequency;
    id 0 is shared by missing, rare and unseen values (out of vocabulary)."""

    OOV = 0

    def __init__(self, ids: List[Dict[int, int]], min_count: int) -> None:
        self.ids = ids
        self.min_count = min_count

    @classmethod
    def build(cls, rows: Iterable[CriteoRow], num_features: int, min_count: int = 1) -> "Vocabulary":
        counts = [Counter() for _ in range(num_features)]
        for row in rows:
            for f, v in enumerate(row.sparse):
                if v is not None:
                    counts[f][v] += 1
        ids = []
        for c in counts:
            kept = sorted((v for v, n in c.items() if n >= min_count), key=lambda v: (-c[v], v))
            ids.append({v: i + 1 for i, v in enumerate(kept)})
        return cls(ids, min_count)

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
        data = {"min_count": self.min_count, "features": [[f"{v:x}" for v in sorted(m, key=m.get)] for m in self.ids]}
        Path(path).write_text(json.dumps(data))

    @classmethod
    def load(cls, path: Path) -> "Vocabulary":
        try:
            data = json.loads(Path(path).read_text())
            ids = [{int(h, 16): i + 1 for i, h in enumerate(values)} for values in data["features"]]
            return cls(ids, int(data["min_count"]))
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(f"{path}: not a vocabulary file written by Vocabulary.save ({e})") from None
