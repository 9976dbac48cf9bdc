#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, build the extension, run the test suite (GPU tests
# included) and the benchmarks (operators, then end to end), and write everything to OUT_DIR. Copy the JSON and
# markdown results into benchmarks/results/ and commit them.
#
#   bash benchmarks/gpu_check.sh OUT_DIR [STEP ...]
#
# STEP: build gpu_tests ops e2e_rn50 export_bench train_bench rest e2e_more (default: all, in that order). The
# extension is built when it is missing (or with `build`); a warm machine keeps it, so a session can split the work
# into two calls under the 10-minute limit of one, e.g. `... OUT gpu_tests ops e2e_rn50` then
# `... OUT export_bench train_bench rest e2e_more`.
#
# The GPU machine receives a copy of the checkout, not ../shared: before the call, `make gpu-wheels` puts the wheels
# it lacks (open_clip, ftfy, wcwidth from ../shared; onnxscript, onnx-ir from PyPI) into ./wheels (ignored by git);
# carry that folder.
set -uo pipefail
OUT=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [STEP ...]}
shift
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

if compgen -G "wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/dcf-site wheels/*.whl > "$OUT/wheels.log" 2>&1
  export PYTHONPATH=/tmp/dcf-site${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

python3 - > "$OUT/env.json" <<'PY'
import json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
print(json.dumps(info, indent=2))
PY
cat "$OUT/env.json"

build() {
  local start=$(date +%s)
  TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    python3 setup.py build_ext --inplace > "$OUT/build.log" 2>&1
  echo "build: exit $? in $(( $(date +%s) - start )) s" | tee -a "$OUT/status.txt"
}

gpu_tests() {  # the operators on CUDA (all backends) and the model, engine and AOTInductor package on CUDA
  python3 -m pytest -q -rs tests/test_ops.py tests/test_gpu.py > "$OUT/tests_gpu.log" 2>&1
  echo "GPU tests: exit $?" | tee -a "$OUT/status.txt"
  tail -3 "$OUT/tests_gpu.log"
}

ops() {
  python3 benchmarks/bench_ops.py --dtype bf16 --out "$OUT" > "$OUT/bench_ops.txt" 2>&1
  echo "bench_ops: exit $?" | tee -a "$OUT/status.txt"
}

e2e_rn50() {  # the engine issue's headline: RN50 512x512 batch 1 and 16
  python3 benchmarks/bench_e2e.py --archs RN50 --modes whole --batches 1 16 --out "$OUT" --tag rn50_whole \
    > "$OUT/bench_e2e_rn50_whole.txt" 2>&1
  echo "bench_e2e RN50 whole: exit $?" | tee -a "$OUT/status.txt"
}

export_bench() {  # the AOTInductor package against the engine on the GPU, ONNX Runtime on this machine's CPU cores
  python3 benchmarks/bench_export.py --archs RN50 --out "$OUT" --tag rn50 > "$OUT/bench_export.txt" 2>&1
  echo "bench_export RN50: exit $?" | tee -a "$OUT/status.txt"
}

train_bench() {  # one training step, official style against the trainer (RN50 512x512 batch 16)
  python3 benchmarks/bench_train.py --out "$OUT" --tag rn50_b16 > "$OUT/bench_train.txt" 2>&1
  echo "bench_train RN50: exit $?" | tee -a "$OUT/status.txt"
}

rest() {  # the CPU suite on this machine's torch/triton, and CMake's CUDA build
  DENSECLIP_FAST_CMAKE_CUDA=1 python3 -m pytest -q -rs tests/ --ignore=tests/test_ops.py --ignore=tests/test_gpu.py \
    > "$OUT/tests_rest.log" 2>&1
  echo "other tests: exit $?" | tee -a "$OUT/status.txt"
  tail -3 "$OUT/tests_rest.log"
}

e2e_more() {  # slide mode and the other architectures
  python3 benchmarks/bench_e2e.py --archs RN50 --modes slide --batches 1 --out "$OUT" --tag rn50_slide \
    --contestants official official-bf16 engine-fp32 engine-bf16 > "$OUT/bench_e2e_rn50_slide.txt" 2>&1
  echo "bench_e2e RN50 slide: exit $?" | tee -a "$OUT/status.txt"
  python3 benchmarks/bench_e2e.py --archs RN101 ViT-B/16 --modes whole --batches 1 16 --out "$OUT" --tag others \
    --contestants official official-bf16 engine-fp32 engine-bf16 > "$OUT/bench_e2e_others.txt" 2>&1
  echo "bench_e2e RN101 ViT-B/16: exit $?" | tee -a "$OUT/status.txt"
}

# Most valuable first, each step writing its files as it goes, so a run cut short still brings results back.
ALL_STEPS="gpu_tests ops e2e_rn50 export_bench train_bench rest e2e_more"
STEPS=${*:-$ALL_STEPS}
if ! compgen -G "denseclip_fast/_C*.so" > /dev/null || [[ " $STEPS " == *" build "* ]]; then
  build
fi
for step in $STEPS; do
  [[ $step == build ]] && continue
  [[ " $ALL_STEPS " == *" $step "* ]] || { echo "unknown step $step (steps: build $ALL_STEPS)"; exit 2; }
  $step
done
