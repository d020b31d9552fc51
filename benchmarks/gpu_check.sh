#!/usr/bin/env bash
# The GPU checks of issue 12, as one script for a machine with a CUDA GPU and PyTorch but
# without medseg's other dependencies installed (the workplace's lent GPU machine): the GPU
# tests, then the benchmarks' GPU comparisons, then the end-to-end comparison on that
# machine's CPU (which may have native bf16). Logs go to $OUT (default ./gpu-check).
#
#   WHEELS=.whl HIPPOCAMPUS=path/to/hippocampus bash benchmarks/gpu_check.sh [STEP...]
#
# STEPs (default: all, in this order): tests inference_gpu precision_gpu batch_gpu
# inference_cpu startup.
#
# WHEELS: a folder of wheels for what the machine lacks (monai, nibabel, pydicom, pynrrd,
# slicerio, highdicom, pyjpegls, pylibjpeg, pylibjpeg-openjpeg), installed into /tmp/site.
# HIPPOCAMPUS: the MSD hippocampus folder (imagesTr, labelsTr) the realdata tests and the
# precision benchmark read; it is linked where they look (../shared/data/hippocampus).
set -u
OUT=${OUT:-gpu-check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
if [ -n "${WHEELS:-}" ]; then
    $python -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "$WHEELS"/*.whl || exit 1
    export PYTHONPATH=/tmp/site:$PWD
fi
if [ -n "${HIPPOCAMPUS:-}" ] && [ ! -e ../shared/data/hippocampus ]; then
    mkdir -p ../shared/data && ln -s "$(realpath "$HIPPOCAMPUS")" ../shared/data/hippocampus
fi
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm --format=csv | tee "$OUT/gpu.txt"
$python -c "import torch, monai; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'monai', monai.__version__, 'threads', torch.get_num_threads())" | tee -a "$OUT/gpu.txt"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log to $OUT/NAME.log
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    local start=$SECONDS
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    echo "== $name: exit $? after $((SECONDS - start)) s"
    tail -n "${TAIL:-14}" "$OUT/$name.log"
}

run_step() {
    case $1 in
    tests) step tests 180 $python -m pytest -q -p no:cacheprovider -m gpu tests/test_gpu.py ;;
    inference_gpu) step inference_gpu 120 $python benchmarks/inference.py --device cuda --sliding --repeats 2 ;;
    precision_gpu) step precision_gpu 90 $python benchmarks/precision.py --device cuda ;;
    batch_gpu) step batch_gpu 100 $python benchmarks/batch.py --device cuda --scans 40 --single-calls 2 --no-ray ;;
    inference_cpu) step inference_cpu 150 $python benchmarks/inference.py --device cpu ;;
    startup) TAIL=40 step startup 120 $python benchmarks/startup.py --repeats 2 ;;
    *) echo "unknown step $1" && exit 2 ;;
    esac
}
for name in "${@:-tests inference_gpu precision_gpu batch_gpu inference_cpu startup}"; do
    for one in $name; do run_step "$one"; done
done
