"""The most frequent values of a stream, counted in memory bounded by a capacity, not by the data."""

import heapq
from collections import Counter
from typing import Generic, Hashable, List, Sequence, Tuple, TypeVar

V = TypeVar("V", bound=Hashable)  # the counted values (ties in most_common are broken by value)


class HeavyHitters(Generic[V]):
    """Misra-Gries counting with batched decrements: holds at most ``2 * capacity`` values between
    updates; when it holds more, the ``capacity + 1``-th largest count is subtracted from every count
    and the values left at zero or below are dropped.

    Exact while the stream has at most ``2 * capacity`` distinct values. Beyond, a count is too
    low by at most ``n / (capacity + 1)`` (``n``: values seen), so every value seen more often than
    that is still held.
    """

    def __init__(self, capacity: int) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.counts: Counter[V] = Counter()
        self.seen = 0
        self.pruned = False  # True once counts may be under the true ones

    def __len__(self) -> int:
        return len(self.counts)

    def update(self, values: Sequence[V]) -> None:
        """Counts a chunk of values (the chunk's distinct values are held at once, briefly)."""
        self.counts.update(values)
        self.seen += len(values)
        if len(self.counts) > 2 * self.capacity:
            delta = heapq.nlargest(self.capacity + 1, self.counts.values())[-1]
            self.counts = Counter({v: n - delta for v, n in self.counts.items() if n > delta})
            self.pruned = True

    def most_common(self, k: int, min_count: int = 1) -> List[Tuple[V, int]]:
        """Up to ``k`` values counted at least ``min_count`` times, by falling count then value."""
        kept = [(v, n) for v, n in self.counts.items() if n >= min_count]
        return heapq.nsmallest(k, kept, key=lambda vn: (-vn[1], vn[0]))
