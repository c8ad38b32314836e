#!/usr/bin/env bash
# Every benchmark of docs/performance.md, sized for this machine: `bash benchmarks/all.sh cpu`
# (about 20 minutes on 2 cores) or `bash benchmarks/all.sh gpu` (one GPU, under 10 minutes).
# Each writes its JSON under results/benchmarks/ and prints its table; run from the repo root.
set -euo pipefail
size=${1:?usage: bash benchmarks/all.sh cpu|gpu}
run() { echo; echo "### python -m benchmarks.$*"; python -m "benchmarks.$@"; }
case "$size" in
  cpu)
    run train_throughput --images 256 --epochs 2 --threads 2
    run packing --trials 1 2 --images 256 --epochs 1
    run inference --repeats 1
    run submission --n 10022
    run ray_overhead
    run search_efficiency --budget 45 --seeds 0 1 2
    ;;
  gpu)
    run train_throughput --images 4096 --epochs 3
    run train_throughput --images 4096 --epochs 3 --precision fp32
    run train_throughput --images 4096 --epochs 3 --batch-size 128
    run train_throughput --models marsseg unet deeplabv3plus --images 4096 --epochs 3 --compile
    run packing --trials 1 2 4 8 --images 4096 --epochs 3
    run inference --images 10022
    run ray_overhead --gpus-per-trial 0.25 --settings default checkpoint-every-4
    run search_efficiency --budget 120 --seeds 0 1 2 --limit-images 2505 --max-epochs 8 \
      --gpus-per-trial 0.25
    ;;
  *) echo "usage: bash benchmarks/all.sh cpu|gpu" >&2; exit 2 ;;
esac
