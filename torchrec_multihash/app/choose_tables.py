"""``embeddings.strategy: auto`` in the app: the choice made from one pass over the training data,
on rank 0 before training, and kept in the run folder while the data and config stay the same."""

import copy
import json
import math
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchrec.modules.embedding_configs import EmbeddingBagConfig

from torchrec_multihash.app.auto_choice import choice_path, describe, read_choice
from torchrec_multihash.app.config import PRECISIONS, Config, ConfigError
from torchrec_multihash.app.data import make_data
from torchrec_multihash.app.provenance import Record, data_record, differences, tables_record
from torchrec_multihash.auto import AutoChoiceError, choose_tables, table_statistics
from torchrec_multihash.auto.choice import full_bytes


def budget_bytes(cfg: Config, plain: List[EmbeddingBagConfig]) -> int:
    """``embeddings.budget_bytes``, else what a single strategy at ``embeddings.compression``
    would take: tables over the threshold ``compression`` times smaller, the rest full."""
    emb = cfg.embeddings
    if emb.budget_bytes is not None:
        return emb.budget_bytes
    return int(sum(full_bytes(c) / (emb.compression if c.num_embeddings > emb.threshold else 1) for c in plain))


def _unmet(cfg: Config, plain: List[EmbeddingBagConfig], budget: int, least: int) -> str:
    """Why a budget of ``budget`` bytes cannot be met (the tables take ``least`` at the least), and what would do."""
    emb = cfg.embeddings
    small = sum(full_bytes(c) for c in plain if c.num_embeddings <= emb.threshold)
    why = (
        f"the least the tables take is {least:,} bytes: those over embeddings.threshold={emb.threshold} rows at the smallest "
        f"configuration of embeddings.auto_candidates {list(emb.auto_candidates)}, the others full ({small:,} bytes)"
    )
    if emb.budget_bytes is not None:
        return f"strategy auto: embeddings.budget_bytes={budget:,} cannot be met: {why}; give at least {least:,}"
    big = sum(full_bytes(c) for c in plain) - small
    most = f"; give a compression of at most {math.floor(10 * big / (least - small)) / 10:g}" if least > small else ""
    return f"strategy auto: embeddings.compression={emb.compression:g} (a budget of {budget:,} bytes) cannot be met: {why}{most}"


def _source(cfg: Config) -> Record:
    return {**data_record(cfg), **tables_record(cfg)}


def choose_for_config(cfg: Config, plain: List[EmbeddingBagConfig], show_progress: bool = True) -> Dict[str, Any]:
    """The choice for ``plain`` (the config's uncompressed tables) from one pass over all of the
    training data, as the report ``auto.json`` holds."""
    data = make_data(cfg, 0, 1, Path(cfg.train.output_dir))
    stats = table_statistics(plain, data.train(0, 0), show_progress=show_progress)
    budget = budget_bytes(cfg, plain)
    try:
        with warnings.catch_warnings():  # a budget it cannot meet: refused below, naming the key
            warnings.filterwarnings("ignore", message="strategy auto: a budget of")
            precisions = [cfg.embeddings.precision] if cfg.embeddings.precision else list(PRECISIONS)
            choices = choose_tables(plain, stats, budget, cfg.embeddings.threshold, cfg.embeddings.auto_candidates, precisions)
    except AutoChoiceError as e:
        raise ConfigError(f"embeddings (strategy auto, auto_candidates {cfg.embeddings.auto_candidates}): {e}") from None
    least = sum(ch.bytes for ch in choices)  # over the budget: every table at its smallest
    if least > budget:
        raise ConfigError(_unmet(cfg, plain, budget, least))
    return {
        "budget_bytes": budget,
        "bytes": sum(ch.bytes for ch in choices),
        "full_bytes": sum(full_bytes(c) for c in plain),
        "tables": [ch.to_dict() for ch in choices],
        "statistics": {name: s.summary() for name, s in stats.items()},
        "source": _source(cfg),
    }


def saved_choice(cfg: Config) -> Optional[Dict[str, Any]]:
    """The saved choice if it may be used: ``embeddings.auto_choice`` (which must exist), or the
    run folder's if it was made for the same data and config; else None."""
    path = choice_path(cfg)
    if cfg.embeddings.auto_choice:
        if not path.is_file():
            raise ConfigError(f"embeddings.auto_choice {path} does not exist")
        return read_choice(path)
    if not path.is_file():
        return None
    report = read_choice(path)
    changed = differences(report.get("source"), _source(cfg))
    if changed:
        print(f"strategy auto: choosing again, {path} was made for other data or settings: {'; '.join(changed[:3])}", flush=True)
        return None
    return report


def ensure_choice(cfg: Config, plain: List[EmbeddingBagConfig]) -> None:
    """Rank 0, before training: the saved choice, or a new one saved in the run folder; printed."""
    report = saved_choice(cfg)
    if report is not None:
        print(f"strategy auto: the choice in {choice_path(cfg)}", flush=True)
    else:
        report = choose_for_config(copy.deepcopy(cfg), plain)
        path = choice_path(cfg)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(path)
    print(describe(report), flush=True)


def plan_choice(cfg: Config, plain: List[EmbeddingBagConfig]) -> Dict[str, Any]:
    """For ``plan``: the saved choice, else one made now (not saved)."""
    report = saved_choice(cfg)
    return report if report is not None else choose_for_config(copy.deepcopy(cfg), plain, show_progress=False)
