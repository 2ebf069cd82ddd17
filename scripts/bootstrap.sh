#!/usr/bin/env bash
# Creates .venv/ in the repository root on first use and installs the pinned stack into it.
# A second run reuses .venv/ (a stamp file records what was installed).
#
#   MULTIHASH_TORCH_VARIANT=cpu|cuda   override the auto-detection (cuda when `nvidia-smi -L` finds a GPU)
#   MULTIHASH_PYTHON=/path/to/python3.11   interpreter used to create the venv
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.venv"
TORCH_VERSION=2.13.0
FBGEMM_VERSION=1.8.0
TORCHREC_VERSION=1.8.0

variant="${MULTIHASH_TORCH_VARIANT:-auto}"
if [ "$variant" = auto ]; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    variant=cuda
  else
    variant=cpu
  fi
fi
case "$variant" in
  cpu) fbgemm="fbgemm-gpu-cpu==$FBGEMM_VERSION" ;;
  cuda) fbgemm="fbgemm-gpu==$FBGEMM_VERSION" ;;
  *) echo "bootstrap: MULTIHASH_TORCH_VARIANT must be cpu, cuda or auto, not '$variant'" >&2; exit 2 ;;
esac

# The stamp changes whenever the requirements, setup.cfg or the variant change.
want="$(cat "$ROOT/requirements/"*.txt "$ROOT/setup.cfg" "$0" | sha256sum | cut -c1-16)-$variant"
stamp="$VENV/.multihash-stamp"
if [ -x "$VENV/bin/python" ] && [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

python="${MULTIHASH_PYTHON:-}"
if [ -z "$python" ]; then
  for p in python3.11 python3; do
    if command -v "$p" >/dev/null 2>&1; then python="$p"; break; fi
  done
fi
if [ -z "$python" ]; then
  echo "bootstrap: no python3.11 or python3 found; set MULTIHASH_PYTHON" >&2; exit 2
fi
if ! "$python" -c 'import sys; sys.exit(0 if sys.version_info[:2] >= (3, 10) else 1)'; then
  echo "bootstrap: $python is $("$python" --version 2>&1); Python >= 3.10 is needed (3.11 recommended)" >&2
  exit 2
fi

echo "bootstrap: installing the $variant stack into $VENV (first use; later runs reuse it)" >&2
[ -x "$VENV/bin/python" ] || "$python" -m venv "$VENV"
pipi() {  # pip install, without the noise of find-links folders that do not exist here
  "$VENV/bin/python" -m pip install --disable-pip-version-check -q "$@" 2>&1 \
    | { grep -v "^WARNING: Location 'file://" || true; }
  return "${PIPESTATUS[0]}"
}
pipi "torch==$TORCH_VERSION" "$fbgemm"
# torch is named again so nothing below can move it off the pinned version.
pipi -r "$ROOT/requirements/base.txt" -r "$ROOT/requirements/tools.txt" -r "$ROOT/requirements/test.txt" "torch==$TORCH_VERSION"
# torchrec's own requirements pull the newest CUDA fbgemm-gpu, which breaks fbgemm-gpu-cpu:
# install it alone (its other needs are in requirements/base.txt).
pipi --no-deps "torchrec==$TORCHREC_VERSION"
pipi --no-deps -e "$ROOT"
"$VENV/bin/python" - <<'PY'
import torch, torchrec, fbgemm_gpu  # noqa: F401  fails loudly if the stack does not load together
print(f"bootstrap: torch {torch.__version__}, torchrec {torchrec.__version__ if hasattr(torchrec, '__version__') else '?'}, "
      f"cuda available: {torch.cuda.is_available()}")
PY
echo "$want" > "$stamp"
