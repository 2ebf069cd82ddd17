#!/bin/bash
# Builds .gpu/ (git-ignored, about 60 MB): what scripts/gpu_check/run.sh installs on a lent GPU
# machine that has no network: fbgemm_gpu's CUDA wheel cut to sm_90 (H100/H200) and to the
# libraries training needs, TorchRec and its pure-Python needs, and the bench's specs.
# The machine's image has torch 2.11.0+cu130 (2026-12): fbgemm_gpu 1.6.0 and torchrec 1.6.1 pair
# with it (torchrec 1.8 needs fbgemm_gpu >= 1.8, built for torch 2.13). Run from the repo root.
set -euo pipefail
FBGEMM=${FBGEMM:-1.6.0} TORCHREC=${TORCHREC:-1.6.1} ARCH=${ARCH:-90}
PY=${PY:-.venv/bin/python}
WHEEL_ARGS=(--no-deps --only-binary=:all: --python-version 3.12 --implementation cp
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
mkdir -p .gpu/whl .gpu/pyextra
$PY -m pip download -q "${WHEEL_ARGS[@]}" -d "$work" "fbgemm-gpu==$FBGEMM"
(cd "$work" && unzip -q fbgemm_gpu-*.whl && rm fbgemm_gpu-*.whl)
for so in "$work"/fbgemm_gpu/*.so; do $PY scripts/gpu_check/fatbin_keep.py "$so" "$ARCH"; done
# variable-batch, global-weight-decay and inference kernels: not used by training (patch_fbgemm.py
# takes them off fbgemm_gpu's load list)
rm "$work"/fbgemm_gpu/fbgemm_gpu_tbe_training_backward_{vbe,gwd}.so "$work"/fbgemm_gpu/fbgemm_gpu_tbe_inference.so
tar -C "$work" -cf - . | xz -T0 -6 > .gpu/fb.tar.xz
$PY -m pip download -q "${WHEEL_ARGS[@]}" -d .gpu/whl "torchrec==$TORCHREC" tensordict==0.15.3 pyvers==0.2.3
cp -r "$($PY -c 'import iopath, os; print(os.path.dirname(iopath.__file__))')" .gpu/pyextra/
cp scripts/gpu_check/{smoke.py,patch_fbgemm.py} .gpu/
$PY - <<'PY'
import json
from torchrec_multihash.bench.workload import BenchSpec
for name in ("one_hot", "multi_hot"):
    spec = BenchSpec.workload(name, False)
    open(f".gpu/spec_{name}.json", "w").write(json.dumps(spec.to_dict()))
    spec.batch_size = 16384
    open(f".gpu/spec_{name}_b16k.json", "w").write(json.dumps(spec.to_dict()))
PY
du -sh .gpu
