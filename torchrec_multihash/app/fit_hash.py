"""``torchrec-multihash fit-hash``: fits the learned id -> row mappings of a config's learned
tables on its training data, and writes them to a directory that ``train`` reads
(``embeddings.mapping=DIR``)."""

import copy
import dataclasses
import resource
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchrec_multihash.app.auto_choice import is_auto
from torchrec_multihash.app.choose_tables import ensure_choice
from torchrec_multihash.app.config import Config, ConfigError, config_parser, load_config
from torchrec_multihash.app.data import make_data
from torchrec_multihash.app.model import build_tables, plain_tables
from torchrec_multihash.argtypes import folder
from torchrec_multihash.datasets.criteo_tsv import CriteoFormatError
from torchrec_multihash.learned.fit import FitOptions, FittedMapping, describe, fit_mappings, save_mappings
from torchrec_multihash.modules.config import MultiHashConfigError


def fit_options(cfg: Config) -> FitOptions:
    """``embeddings.fit`` as FitOptions (seeded by ``train.seed`` unless it sets one)."""
    try:
        return FitOptions(**{"seed": cfg.train.seed, **cfg.embeddings.fit})
    except TypeError as e:
        fields = [f.name for f in dataclasses.fields(FitOptions)]
        raise ConfigError(f"embeddings.fit: {e}; its keys are {fields}") from None


def fit_for_config(cfg: Config, out: Path, show_progress: bool = True, source: Optional[Dict[str, Any]] = None) -> Dict[str, FittedMapping]:
    """Fits the mappings of ``cfg``'s learned tables on all of its training data (one process)
    and saves them in ``out``, with ``source`` (what they were fitted for) in its report."""
    if Path(out).exists() and not Path(out).is_dir():
        raise ConfigError(f"fit-hash: {out} is a file; give a folder to write the mapping to")
    data = make_data(cfg, 0, 1, Path(cfg.train.output_dir))
    cfg.embeddings.num_embeddings_per_feature = data.num_embeddings_per_feature
    tables = build_tables(cfg)
    if not any(t.has_mapping() for t in tables):
        raise ConfigError("fit-hash: the config has no learned table (set embeddings.strategy=learned)")
    options = fit_options(cfg)
    t0 = time.perf_counter()
    try:
        fitted = fit_mappings(tables, lambda: data.train(0, 0), data.num_dense, options, show_progress=show_progress)
    except (KeyError, ValueError) as e:
        if isinstance(e, (ConfigError, CriteoFormatError)):
            raise
        raise ConfigError(f"fit-hash: {e}") from None
    if not any(f.stats.get("seen_ids") for f in fitted.values()):
        raise ConfigError(f"fit-hash: the training data gave no batch to fit on (fewer samples than train.batch_size={cfg.train.batch_size}?)")
    seconds = time.perf_counter() - t0
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    save_mappings(
        out,
        fitted,
        {
            "fit_options": dataclasses.asdict(options),
            "seconds": seconds,
            "peak_rss_mib": peak_mib,
            "strategy": cfg.embeddings.strategy,
            "compression": cfg.embeddings.compression,
            "source": source,
        },
    )
    if show_progress:
        for name, line in describe(fitted):
            print(f"  {name}: {line}")
        print(f"Fitted {len(fitted)} learned table(s) in {seconds:.1f} s (peak RSS {peak_mib:,.0f} MiB); mapping in {Path(out).resolve()}")
    return fitted


def main(argv: Optional[List[str]] = None) -> int:
    p = config_parser("torchrec-multihash fit-hash", __doc__)
    p.add_argument("--out", type=folder, required=True, help="directory to write the mapping to")
    args = p.parse_args(argv)
    try:
        cfg = load_config(args.config, args.set)
        if is_auto(cfg):  # the tables auto chooses (saved in train.output_dir, as train would)
            sized = copy.deepcopy(cfg)
            sized.embeddings.num_embeddings_per_feature = make_data(cfg, 0, 1, Path(cfg.train.output_dir)).num_embeddings_per_feature
            ensure_choice(sized, plain_tables(sized))
        fit_for_config(cfg, args.out)
    except (ConfigError, CriteoFormatError, MultiHashConfigError) as e:
        message = str(e).removeprefix("fit-hash: ")  # its own errors say fit-hash (for train, which fits too)
        print(f"torchrec-multihash fit-hash: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
