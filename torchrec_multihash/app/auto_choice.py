"""``embeddings.strategy: auto`` in the app: the saved per-table choice (``auto.json`` in the run
folder, or ``embeddings.auto_choice``), which every command that builds the tables reads."""

import json
from pathlib import Path
from typing import Any, Dict, List, Optional

from torchrec_multihash.app.config import AUTO, Config, ConfigError
from torchrec_multihash.app.provenance import Record
from torchrec_multihash.auto import TableChoice

AUTO_FILE = "auto.json"


def is_auto(cfg: Config) -> bool:
    return str(cfg.embeddings.strategy) == AUTO


def choice_path(cfg: Config) -> Path:
    """``embeddings.auto_choice``, else the run folder's ``auto.json``."""
    return Path(cfg.embeddings.auto_choice) if cfg.embeddings.auto_choice else Path(cfg.train.output_dir) / AUTO_FILE


def read_choice(path: Path) -> Dict[str, Any]:
    try:
        report = json.loads(path.read_text())
        [TableChoice.from_dict(d) for d in report["tables"]]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not a choice written by strategy auto ({type(e).__name__}: {e}): delete it to choose again") from None
    return dict(report)


def load_choices(cfg: Config, report: Optional[Dict[str, Any]] = None) -> List[TableChoice]:
    """The saved choice's tables (``report``: one already read)."""
    if report is None:
        path = choice_path(cfg)
        if not path.is_file():
            raise ConfigError(
                f"embeddings.strategy auto: no choice at {path}; `torchrec-multihash train` makes one from the training data "
                "(or set embeddings.auto_choice to an auto.json of a run on the same data)"
            )
        report = read_choice(path)
    return [TableChoice.from_dict(d) for d in report["tables"]]


def describe(report: Dict[str, Any]) -> str:
    """The choice per table and why, with the budget, as a block of text."""
    lines = [
        f"strategy auto: {report['bytes']:,} bytes of a budget of {report['budget_bytes']:,} "
        f"({report['full_bytes'] / max(1, report['bytes']):.1f}x smaller than full tables)"
    ]
    for d in report["tables"]:
        ch = TableChoice.from_dict(d)
        what = ("full" if ch.strategy == "full" else f"{ch.strategy} {ch.compression:g}x") + (" fp16" if ch.precision == "fp16" else "")
        lines.append(f"  {ch.table:12s} {what:16s} {ch.bytes:>12,} B  {ch.reason}")
    return "\n".join(lines)


def choice_record(choices: List[TableChoice]) -> Record:
    """What a checkpoint records of the choice: strategy, compression and precision per table."""
    return {"embeddings.auto": {ch.table: [ch.strategy, ch.compression, ch.precision] for ch in choices}}
