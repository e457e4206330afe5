#!/bin/sh
# Train several lesion-model configurations side by side on one GPU machine (the device
# machine: PyTorch there, no ../shared), from the pack, for SECONDS of wall time, and put
# what comes back in $OUT: each job's best.pt (weights, run state, data digest, metrics) and
# a compact last checkpoint, and all logs in one file. Compare them here with
# `train --export-best` + `evaluate` (models/training/README.md).
#
#   sh models/training/device_jobs.sh SECONDS 'name args…' ['name args…' …]
#
# Each job gets 16/N CPU threads (augmentation runs on the CPU), a cosine schedule over its
# share of SECONDS less a minute (start, data, exports) and is stopped with SIGTERM at SECONDS
# (it finishes the step, validates and saves).
set -u
: "${OUT:?set OUT to the folder that comes back}"
secs=$1
shift
pack=${PACK:-models/training/pack/cxr-lesions-384.npz}
runs=${RUNS:-/tmp/shadowspot-runs}
threads=$(( ${CPUS:-16} / $# ))
minutes=$(python3 -c "print(round(($secs - 60) / 60, 2))")
export PYTHONUNBUFFERED=1
nvidia-smi -L 2>/dev/null || echo "no nvidia-smi"
names=""
for job in "$@"; do
    name=${job%% *}
    args=${job#"$name"}
    names="$names $name"
    # shellcheck disable=SC2086  # the job's arguments are words
    timeout -k 60 -s TERM "$secs" python3 -m models.training.train --pack "$pack" \
        --run "$name" --runs-dir "$runs" --model-dir "$runs/$name/model" \
        --threads "$threads" --minutes "$minutes" $args >"$runs-$name.log" 2>&1 &
done
wait
for name in $names; do
    echo "== $name" >>"$OUT/train.log"
    cat "$runs-$name.log" >>"$OUT/train.log"
    tail -n 3 "$runs-$name.log"
    cp "$runs/$name/best.pt" "$OUT/$name-best.pt"
    python3 -m models.training.train --run "$name" --runs-dir "$runs" \
        --write-checkpoint "$OUT/$name-last.pt"
done
ls -la "$OUT"
