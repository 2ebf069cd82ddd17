#!/bin/bash
# The GPU checks of one device lease, in one call (see README.md beside this): installs .gpu/'s
# FBGEMM and TorchRec into /tmp/site, a smoke test, tests/distributed/test_cuda.py, then the bench's methods one
# process each (step_time, as `bench` runs them) until BUDGET seconds are spent. Writes log.txt,
# tests.log, op_counts.md, bench.jsonl (one JSON object per method and workload) and bench_err.txt
# under $OUT.
set -u
export PYTHONUNBUFFERED=1
REPO=$PWD
T0=$(date +%s)
DEADLINE=$((T0 + ${BUDGET:-560}))
left() { echo $((DEADLINE - $(date +%s))); }
log() { echo "[$(($(date +%s) - T0))s] $*"; }
exec > >(tee -a "$OUT/log.txt") 2>&1
log "setup"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv
python3 -c "import torch, sys; print(sys.version.split()[0], torch.__version__, torch.version.cuda, torch.cuda.is_available())"
nproc
mkdir -p /tmp/site
if command -v xz >/dev/null; then xz -dc -T16 .gpu/fb.tar.xz | tar -x -C /tmp/site; else python3 -c "import tarfile; tarfile.open('.gpu/fb.tar.xz').extractall('/tmp/site')"; fi
python3 .gpu/patch_fbgemm.py /tmp/site || exit 2
python3 -m pip install -q --upgrade --no-index --no-deps --no-compile --target /tmp/site .gpu/whl/tensordict-*.whl .gpu/whl/pyvers-*.whl .gpu/whl/torchrec-*.whl
export PYTHONPATH=/tmp/site:$REPO/.gpu/pyextra:$REPO
if [ "${SMOKE:-1}" = 1 ]; then
  log "smoke"
  timeout 90 python3 .gpu/smoke.py || { log "smoke failed: stop"; exit 3; }
fi
python3 -c "import torchrec_multihash; print('torchrec_multihash', torchrec_multihash.__version__)" || exit 4

log "CUDA tests"
timeout $(( $(left) < 110 ? $(left) : 110 )) python3 -m pytest -q -s -p no:cacheprovider tests/distributed/test_cuda.py 2>&1 | tee "$OUT/tests.log" | grep -v Warning | tail -40

bench() { # tag spec methods...
  local tag=$1 spec; spec=$(cat "$2"); shift 2
  for m in "$@"; do
    if [ "$(left)" -lt 30 ]; then log "no time left for $tag $m"; return; fi
    local t=$(( $(left) - 10 < 75 ? $(left) - 10 : 75 ))
    local line
    line=$(timeout $t python3 -m torchrec_multihash.bench.step_time --method "$m" --spec "$spec" --device cuda 2>>"$OUT/bench_err.txt" | grep '^BENCH ')
    if [ -n "$line" ]; then
      echo "{\"tag\": \"$tag\", ${line#BENCH \{}" >> "$OUT/bench.jsonl"
      log "$tag $m: $(echo "${line#BENCH }" | python3 -c 'import json,sys; r=json.load(sys.stdin); print("step %.2f ms, vs EBC %s, peak %.0f MiB" % (r["step_ms"], r.get("vs_baseline", "-"), r["peak_mib"]))')"
    else
      log "$tag $m FAILED (see bench_err.txt)"
    fi
  done
}
M="torchrec_ebc full hash qr_add qr_add_stacked qr_mult qr_concat generalized_qr"
export OMP_NUM_THREADS=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776
log "operators and kernel launches per step"
timeout $(( $(left) < 90 ? $(left) : 90 )) python3 -m torchrec_multihash.bench.op_counts --device cuda --top "${OPS_TOP:-0}" 2>>"$OUT/bench_err.txt" | tee "$OUT/op_counts.md"
log "bench, default batches"
bench one_hot .gpu/spec_one_hot.json $M
bench multi_hot .gpu/spec_multi_hot.json $M naive_qr
log "bench, batch 16384"
bench multi_hot_b16k .gpu/spec_multi_hot_b16k.json $M
bench one_hot_b16k .gpu/spec_one_hot_b16k.json $M
if [ "$(left)" -gt 60 ]; then
  log "train end-to-end"
  timeout $(( $(left) - 5 )) python3 -m torchrec_multihash.cli bench --device cuda --workloads "" --scaling "" --loader-lines 0 --train-samples 200000 --out "$OUT/train" 2>&1 | tail -15
fi
log "done"
