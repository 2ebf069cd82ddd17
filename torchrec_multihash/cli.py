"""The ``torchrec-multihash`` command."""

import argparse
import importlib
import logging
import os
import sys
from typing import List, Optional

from torchrec_multihash.app.quiet import FX_TRACING_LOGGER, loggers_at

# command -> (module whose main(argv) runs it, imported on use; what it does)
COMMANDS = {
    "demo": ("torchrec_multihash.app.demo", "train a small DLRM with full and with multi-hash tables on a synthetic task and compare"),
    "train": ("torchrec_multihash.app.train", "train a sharded DLRM with multi-hash tables (one process, or a rank per process: torchrun/TorchX)"),
    "fit-hash": ("torchrec_multihash.app.fit_hash", "fit the learned id -> row mappings of a config's learned tables on its training data"),
    "bench": ("torchrec_multihash.bench.bench", "step time and memory of every strategy vs TorchRec's EBC and a naive Q-R; scaling; reader speed"),
    "quality": ("torchrec_multihash.bench.quality", "test AUC and log loss against embedding bytes for several strategies, compressions and seeds"),
    "export": ("torchrec_multihash.app.export", "write a trained model as one TorchScript file with quantized tables, for serving"),
    "preprocess": (
        "torchrec_multihash.app.preprocess",
        "turn Criteo TSV day files into TorchRec's npy layout once (ids decided there; resumable per day)",
    ),
    "plan": ("torchrec_multihash.app.plan", "show where TorchRec's planner puts each sub-table for a topology (need not exist)"),
}


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(
        prog="torchrec-multihash",
        description="Compositional (multi-hash) embedding tables for TorchRec / DLRM.",
        epilog="\n".join(f"  {k:10s} {help_}" for k, (_, help_) in COMMANDS.items()),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=sorted(COMMANDS), help="see below; COMMAND --help for its options")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0 if argv else 2
    args, _ = parser.parse_known_args(argv[:1])
    # torch's note that is_fx_tracing covers torch.export too says nothing to a user of this tool,
    # and every rank of a job would print it
    try:
        with loggers_at(logging.ERROR, [FX_TRACING_LOGGER]):
            return importlib.import_module(COMMANDS[args.command][0]).main(argv[1:])
    except BrokenPipeError:  # the output piped into a reader that stopped (`plan ... | head`): nothing to say
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's final flush must not fail again
        return 141  # 128 + SIGPIPE, what a shell reports
    except OSError as e:  # a folder it cannot write, a path that is a folder or a file: what and where, not a traceback
        where = f": {e.filename}" if e.filename else ""
        print(f"torchrec-multihash {args.command}: {e.strerror or e}{where}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
