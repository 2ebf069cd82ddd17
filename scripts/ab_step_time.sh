#!/bin/bash
# Paired step-time ratios (vs TorchRec's EBC, as `bench` measures them) of two revisions of this
# repository, run alternately so that the machine's load hits both alike: on a noisy machine a
# single bench run moves +-10%, so compare code by alternating A/B runs.
#
#   scripts/ab_step_time.sh REV_A REV_B [METHODS] [WORKLOADS] [REPEATS]
#   scripts/ab_step_time.sh HEAD~1 WORKTREE "qr_add qr_mult" "one_hot multi_hot" 2
#
# REV_B may be WORKTREE (the working tree as it is: uncommitted changes and new files included). Prints one
# line per run: workload, method, revision, paired ratio, the two step times. CPU, one core,
# caching malloc (as `bench`). Uses this checkout's .venv.
set -eu
A=$1 B=$2 METHODS=${3:-"qr_add qr_mult generalized_qr"} WORKLOADS=${4:-"one_hot multi_hot"} REPEATS=${5:-2}
REPO=$(git rev-parse --show-toplevel)
PY=$REPO/.venv/bin/python
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
tree() { # rev dir: the revision's tracked files in dir
  if [ "$1" = WORKTREE ]; then # tracked and new files, as they are (deleted ones left out)
    (cd "$REPO" && git ls-files -z -c -o --exclude-standard | while IFS= read -r -d '' f; do [ -e "$f" ] && printf '%s\0' "$f"; done | xargs -0 tar -cf - | tar -xf - -C "$2")
  else
    (cd "$REPO" && git archive "$1" | tar -xf - -C "$2")
  fi
}
mkdir "$TMP/a" "$TMP/b"
tree "$A" "$TMP/a"
tree "$B" "$TMP/b"
for rep in $(seq "$REPEATS"); do
  for wl in $WORKLOADS; do
    spec=$(cd "$TMP/a" && "$PY" -c "from torchrec_multihash.bench.workload import BenchSpec; import json; print(json.dumps(BenchSpec.workload('$wl').to_dict()))")
    for m in $METHODS; do
      for side in a b; do
        rev=$([ $side = a ] && echo "$A" || echo "$B")
        line=$(cd "$TMP/$side" && OMP_NUM_THREADS=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=1099511627776 PYTHONPATH="$TMP/$side" \
          "$PY" -m torchrec_multihash.bench.step_time --method "$m" --spec "$spec" --device cpu 2>/dev/null | grep '^BENCH ' || true)
        if [ -z "$line" ]; then echo "$wl $m $rev FAILED"; continue; fi
        echo "$wl $m $rev $(echo "${line#BENCH }" | "$PY" -c 'import json,sys; r=json.load(sys.stdin); print("%.3fx  step %.1f ms  torchrec_ebc %.1f ms" % (r["vs_baseline"], r["paired_step_ms"], r["paired_baseline_step_ms"]))')"
      done
    done
  done
done
