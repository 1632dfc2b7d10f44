#!/usr/bin/env bash
# Re-measure the issue-4 targets on one GPU, in parts that each finish in well under 10 minutes on an H100
# (what one command on this project's GPU machines may take). Results are appended to
# benchmarks/results/*-cuda.md with the device, date and commit, as every benchmark's --record does.
#
#   bash benchmarks/gpu_session.sh test    # the tests that need CUDA (the rest run on the CPU)
#   bash benchmarks/gpu_session.sh step    # target 1: the image step (plain port vs fast path) + a kernel profile
#   bash benchmarks/gpu_session.sh mog     # target 2: MoG seed-steps/s, float32 and TF32 Triton kernels
#   bash benchmarks/gpu_session.sh eval    # targets 3-5: Jacobian, Inception Score, concurrent runs
#   bash benchmarks/gpu_session.sh cost    # the README's per-figure cost table (~6 min); GAIN = the
#                                          # 4-run ConOpt throughput gain from `eval` (default 1.33)
#
# torch-fidelity must be importable for `eval` and `cost` (see the top-level README).
set -euo pipefail
part=${1:?usage: bash benchmarks/gpu_session.sh test|step|mog|eval|cost}
export PYTHONUNBUFFERED=1
py=${PYTHON:-python}
case "$part" in
  test)
    "$py" -m pytest -q -p no:cacheprovider tests/test_rmsprop_triton.py tests/test_step.py tests/test_mog_fused.py \
          tests/test_mog_triton.py -k "cuda"
    ;;
  step)
    "$py" benchmarks/bench_step.py --device cuda --methods simga,altga,conopt --variants plain,fast,fast-split-d,fast-noalign,fast-unpaired \
          --check-iters 10 --record
    "$py" benchmarks/profile_step.py --method conopt --variant fast --rows 30 --summary
    "$py" benchmarks/profile_step.py --method conopt --variant gemm --rows 5 --by-shape
    "$py" benchmarks/bench_gemm.py --device cuda --method conopt --record
    # Fig. 10's ResNet: stride-1 convolutions "adjoint" (the fast path now) vs native (before)
    "$py" benchmarks/bench_step.py --device cuda --arch resnet_cf --image-size 64 --f-dim 128 --batch 128 \
          --methods simga,conopt --variants plain,fast,fast-native1,fast-unpaired --iters 10 --warmup 3 --check-iters 3 --record
    ;;
  mog)
    "$py" benchmarks/bench_mog.py --device cuda --seeds 256 --methods conopt --engines fused --graph-k 10 \
          --repeat 5 --triton-precisions ieee:16:4:1 ieee:16:8:1 tf32:32:4:16 --record
    # the kernels alone against those before the narrow-layer change: AGAINST_FILE (a copy of that
    # numgan/mog_triton.py, for a machine without the git history), else git revision AGAINST (default dda02e1)
    if [ -n "${AGAINST_FILE:-}" ]; then against=(--against-file "$AGAINST_FILE"); else against=(--against "${AGAINST:-dda02e1}"); fi
    "$py" benchmarks/bench_mog_kernels.py "${against[@]}" --configs ieee:16:4 ieee:16:8 ieee:32:8 tf32:32:4 --record
    ;;
  eval)
    "$py" benchmarks/bench_jacobian.py --device cuda --record
    "$py" benchmarks/bench_inception.py --device cuda --record
    "$py" benchmarks/bench_sweep.py --device cuda --iters 300 --ks 1,4 --methods conopt,altga --record
    ;;
  cost)
    "$py" benchmarks/bench_cost.py --device cuda --concurrency-gain "${GAIN:-1.33}" --record
    ;;
  *)
    echo "unknown part '$part': choose test, step, mog, eval or cost" >&2
    exit 2
    ;;
esac
