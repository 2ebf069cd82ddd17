"""Does loading keep up with training? The time training waits for batches, and a loader's speed alone."""

import time
from pathlib import Path
from typing import Dict, Iterable, Iterator, TypeVar

from torchrec_multihash.app.config import Config
from torchrec_multihash.app.data import make_data

T = TypeVar("T")


class DataWait:
    """``timed(batches)`` yields the batches and adds the time spent getting each (inside the
    iterator's ``next()``) to ``seconds``."""

    def __init__(self) -> None:
        self.seconds = 0.0

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        it = iter(batches)
        while True:
            t0 = time.perf_counter()
            try:
                b = next(it)
            except StopIteration:
                return
            finally:
                self.seconds += time.perf_counter() - t0
            yield b


def measure_loader(cfg: Config, batches: int = 100, rank: int = 0, world_size: int = 1) -> Dict[str, float]:
    """Reads this rank's first ``batches`` training batches of ``cfg``'s data (no model, no
    process group) and returns their samples, seconds (worker start-up included) and samples/s."""
    data = make_data(cfg, rank, world_size, Path(cfg.train.output_dir))
    samples, t0 = 0, time.perf_counter()
    for i, b in enumerate(data.train(0, 0)):
        samples += b.labels.numel()
        if i + 1 == batches:
            break
    seconds = time.perf_counter() - t0
    return {"samples": samples, "seconds": seconds, "samples_per_s": samples / max(seconds, 1e-9), "rank": rank, "world_size": world_size}
