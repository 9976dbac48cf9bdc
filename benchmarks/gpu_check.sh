#!/usr/bin/env bash
# One call on the lent GPU machine: install the carried wheels, build the extension, run the GPU tests and the
# benchmarks, and bring everything back packed. Unpack it into benchmarks/results/gpu/ (or copy what matters into
# benchmarks/results/) and commit it with the GPU name and versions (env.json).
#
#   bash benchmarks/gpu_check.sh OUT_DIR [STEP ...]
#
# What comes back: the device tool returns at most 8 files from $OUT (16 MiB each), and a run writes about 30 (logs,
# JSON, markdown, PNG). So every step writes into a work folder (DCF_WORK, default /tmp/dcf-gpu-check, kept across
# the calls of one warm machine) and after each step the whole folder is packed into OUT_DIR/gpu_check.tar.gz, next to
# copies of status.txt and env.json: three files, rewritten after every step, so a call cut short still returns what
# it finished.
#
# STEP: build info gpu_tests train_bench e2e_rn50 ops tune_score probe compile_baselines export_bench e2e_more rest
# (default: all but build, in that order: the GPU tests (at most DCF_TESTS_S seconds, default 180), then each issue's
# targets (training, end to end, operators), the score forward's plans (tune_score) and the probe, then
# torch.compile's minutes of compilation, then the rest), and
# save_prebuilt (what make test-gpu-torch leaves for the GPU session, below). The extension is built when it is
# missing and no prebuilt one fits (or with `build`); a warm machine keeps it. With the 15 minutes of device time of
# a session (the machine's start included) plan one full call, `bash benchmarks/gpu_check.sh $OUT` with timeout_s
# 600 and kind nvidia-h200, and, if minutes are left, a short second one for what the first had no time for. Name the
# kind: the issues' targets and DESIGN.md's anchors are an H200's, and a call naming none may start an H100 (HBM3,
# 3.35 TB/s where the H200 has 4.8); on another GPU status.txt and the Targets sections say whose verdicts they are.
#
# The GPU machine receives a copy of the checkout, not ../shared: before the call, `make gpu-wheels` puts the wheels
# it lacks (open_clip, ftfy, wcwidth from ../shared; onnxscript, onnx-ir, cmake from PyPI) into ./wheels (ignored by
# git); carry that folder. `make test-gpu-torch` also leaves there the extension it built (wheels/prebuilt: Python 3.12,
# torch 2.11, sm_90, with the hash of the sources it was built from). When its hash matches csrc/ and setup.py and it
# loads, it is used instead of building (a minute or two of the GPU session); otherwise the extension is built.
#
# Time: every step runs under what is left of DCF_BUDGET_S seconds (default 560: the device tool's 600 s per call,
# less the start and the copy back). A step past it gets SIGINT (pytest prints its summary; the benchmarks have
# already written every row they measured, they rewrite their results after each one); a step that would start with
# under 45 s left is skipped. status.txt has each step's exit code and seconds.
set -uo pipefail
PACK=${1:?usage: bash benchmarks/gpu_check.sh OUT_DIR [STEP ...]}
shift
OUT=${DCF_WORK:-/tmp/dcf-gpu-check}  # where every step writes; packed into PACK after each step
mkdir -p "$PACK" "$OUT"
PACK=$(cd "$PACK" && pwd) OUT=$(cd "$OUT" && pwd)
START=$(date +%s)
BUDGET_S=${DCF_BUDGET_S:-560}
TESTS_S=${DCF_TESTS_S:-180}

pack() {  # the work folder into PACK/gpu_check.tar.gz (replaced whole) and status.txt beside it
  [[ $PACK == "$OUT" ]] && return
  tar czf "$PACK/gpu_check.tar.gz.part" -C "$OUT" . && mv -f "$PACK/gpu_check.tar.gz.part" "$PACK/gpu_check.tar.gz"
  local f
  for f in status.txt env.json; do
    [[ -f $OUT/$f ]] && cp -f "$OUT/$f" "$PACK/$f"
  done
  return 0
}

timed() {  # timed NAME LOG COMMAND...: COMMAND > OUT/LOG under the time that is left (and STEP_CAP_S, when set)
  local name=$1 log=$2 left=$(( START + BUDGET_S - $(date +%s) ))
  shift 2
  if (( left < 45 )); then
    echo "$name: skipped, ${left} s left of DCF_BUDGET_S=${BUDGET_S}" | tee -a "$OUT/status.txt"
    return
  fi
  local limit=$(( left - 15 )) cap=${STEP_CAP_S:-0}
  (( cap > 0 && cap < limit )) && limit=$cap
  local begin=$(date +%s) load
  load=$(cut -d' ' -f1 /proc/loadavg 2>/dev/null || echo "?")
  timeout --signal=INT --kill-after=15 "$limit" "$@" > "$OUT/$log" 2>&1
  local rc=$? note=""
  (( rc == 124 || rc == 137 )) && note=" (stopped: time limit of ${limit} s)"
  echo "$name: exit $rc in $(( $(date +%s) - begin )) s${note}; load average ${load} at its start" \
    | tee -a "$OUT/status.txt"
  (( rc == 124 || rc == 137 )) && busy_processes "after $name was stopped"
  return 0
}

busy_processes() {  # busy_processes WHEN: processes using a CPU now (over half a second; a step's leftovers:
  # compile workers, a stopped test's children) into status.txt, where a host-bound benchmark after them runs slower
  # (h200_2026-12-04c's official batch-1 row took 28.65 ms where the first calls of two sessions had measured 15.70
  # and 16.11)
  python3 - "$1" >> "$OUT/status.txt" 2>/dev/null <<'PY'
import os, sys, time

def cpu_ticks():
    ticks = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            ticks[pid] = int(fields[11]) + int(fields[12])  # utime + stime
        except (OSError, IndexError, ValueError):
            pass
    return ticks

before = cpu_ticks()
time.sleep(0.5)
after = cpu_ticks()
busy = []
for pid, t in after.items():
    share = (t - before.get(pid, t)) / os.sysconf("SC_CLK_TCK") / 0.5
    if share >= 0.2:
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                command = f.read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            command = "?"
        busy.append((share, pid, command[:140]))
if busy:
    print(f"busy processes ({sys.argv[1]}; cores, pid, command):")
    for share, pid, command in sorted(busy, reverse=True)[:5]:
        print(f"  {share:.1f} {pid} {command}")
PY
  return 0
}
cd "$(dirname "$0")/.."
export HF_HUB_OFFLINE=1

SITE=${DCF_SITE:-/tmp/dcf-site}  # where the carried wheels are installed
if compgen -G "wheels/*.whl" > /dev/null; then
  python3 -m pip install -q --no-index --no-deps --upgrade --target "$SITE" wheels/*.whl > "$OUT/wheels.log" 2>&1
  echo "wheels: exit $? ($(compgen -G 'wheels/*.whl' | wc -l) wheels, wheels.log)" | tee -a "$OUT/status.txt"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH} PATH=$SITE/bin:$PATH  # cmake >= 3.26 for the C++ examples
else
  echo "wheels: none carried (make gpu-wheels, then carry [\"wheels\"]): open_clip and the ONNX tools are missing" \
    | tee -a "$OUT/status.txt"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
python3 -c "import open_clip, ftfy" > /dev/null 2>&1 \
  || echo "WARNING: open_clip / ftfy do not import: the model tests and benchmarks will fail" | tee -a "$OUT/status.txt"

python3 - > "$OUT/env.json" <<'PY'
import json, platform, torch
from benchmarks.common import code_hash
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None, "code": code_hash()}
try:
    import triton
    info["triton"] = triton.__version__
except ImportError:
    info["triton"] = None
print(json.dumps(info, indent=2))
PY
cat "$OUT/env.json"
GPU_NAME=$(python3 -c 'import json, sys; print(json.load(open(sys.argv[1]))["gpu"] or "")' "$OUT/env.json" 2>/dev/null)
if [[ -n $GPU_NAME && $GPU_NAME != *H200* ]]; then
  echo "NOTE: this GPU is ${GPU_NAME}, not the H200 that the targets and DESIGN.md's anchors name: compare its" \
    "timings only with rows measured on it (each benchmark runs its baselines in the same call)" | tee -a "$OUT/status.txt"
fi

build() {  # the extension, stamped with the hash of its sources (a warm machine keeps it for the next call)
  rm -f denseclip_fast/_C*.so "$STAMP"
  # sm_90 only, whatever the machine's environment sets (some CUDA images list eight architectures: 8x the build)
  TORCH_CUDA_ARCH_LIST=${DCF_CUDA_ARCHS:-9.0} MAX_JOBS=${MAX_JOBS:-16} \
    timed build build.log python3 setup.py build_ext --inplace
  compgen -G "denseclip_fast/_C*.so" > /dev/null && sources_hash > "$STAMP"
}

STAMP=denseclip_fast/_C.sources.sha256
ext_current() {  # an extension here built from these sources: a warm machine keeps the last call's, maybe stale
  compgen -G "denseclip_fast/_C*.so" > /dev/null && [[ -f $STAMP && $(cat "$STAMP") == "$(sources_hash)" ]]
}

sources_hash() {  # what the extension is built from
  cat setup.py $(find csrc -type f | LC_ALL=C sort) | sha256sum | cut -d' ' -f1
}

use_prebuilt() {  # wheels/prebuilt's extension, when built from these sources and loadable here with CUDA kernels
  [[ -f wheels/prebuilt/SOURCES.sha256 ]] || return 1
  if [[ $(cat wheels/prebuilt/SOURCES.sha256) != "$(sources_hash)" ]]; then
    echo "prebuilt extension: built from other sources, building" | tee -a "$OUT/status.txt"
    return 1
  fi
  rm -f denseclip_fast/_C*.so "$STAMP"
  cp wheels/prebuilt/_C*.so denseclip_fast/
  if python3 -c "from denseclip_fast.ops import build_info as b, extension_available as e; assert e() and b()['cuda']" \
      > "$OUT/prebuilt.log" 2>&1; then
    cp wheels/prebuilt/SOURCES.sha256 "$STAMP"
    echo "prebuilt extension: loaded" | tee -a "$OUT/status.txt"
    return 0
  fi
  rm -f denseclip_fast/_C*.so
  echo "prebuilt extension: does not load here (prebuilt.log), building" | tee -a "$OUT/status.txt"
  return 1
}

save_prebuilt() {  # this extension and the hash of its sources into wheels/prebuilt, for use_prebuilt elsewhere
  rm -rf wheels/prebuilt && mkdir -p wheels/prebuilt && cp denseclip_fast/_C*.so wheels/prebuilt/ \
    && sources_hash > wheels/prebuilt/SOURCES.sha256
  echo "save_prebuilt: exit $?" | tee -a "$OUT/status.txt"
}

info() {  # the extension and the backend the operators choose here, per dtype
  python3 - > "$OUT/info.txt" 2>&1 <<'PY'
import torch
from denseclip_fast import ops
from denseclip_fast.ops import backends
print("build_info:", ops.build_info())
device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
for dtype in (torch.float32, torch.float16, torch.bfloat16):
    print(device, dtype, "score:", backends.resolve("pixel_text_score", device, dtype),
          "attention:", backends.resolve("context_attention", device, dtype, head_dim=64))
PY
  echo "info: exit $?" | tee -a "$OUT/status.txt"
  cat "$OUT/info.txt"
}

gpu_tests() {  # the operators on CUDA (all backends) and the model, engine and AOTInductor package on CUDA
  # seven pytest processes at once: most of their time is compiling (Triton kernels, one specialisation per dtype,
  # block and argument divisibility; AOTInductor), one core each, on 16 cores; at most TESTS_S seconds, so that the
  # benchmarks after them keep their time (a test cut short is reported by pytest's summary as it stops). The model,
  # engine, AOTInductor and training tests have a process of their own: behind test_gpu.py's 96 kernel tests (many
  # Triton compiles) they would likely not be reached in TESTS_S
  # (2 CPU threads each: seven processes of torch's default 16 threads would contend for the 16 cores; no pytest
  # cache: seven processes would write it at once)
  local STEP_CAP_S=$TESTS_S kernels="tensor_core or portable or called_directly"
  local -a pytest=(env OMP_NUM_THREADS=2 python3 -m pytest -q -rs --durations=10 -p no:cacheprovider)
  timed "GPU tests: Triton score operators" tests_gpu_triton_score.log \
    "${pytest[@]}" tests/test_ops.py -k "triton and (score or concat)" &
  timed "GPU tests: Triton attention and other operator tests" tests_gpu_triton.log \
    "${pytest[@]}" tests/test_ops.py -k "triton and not (score or concat)" &
  timed "GPU tests: CUDA C++ and reference operators" tests_gpu_ops.log \
    "${pytest[@]}" tests/test_ops.py -k "not triton" &
  timed "GPU tests: CUDA kernels (tensor-core and portable)" tests_gpu_kernels.log \
    "${pytest[@]}" tests/test_gpu.py -k "$kernels" &
  timed "GPU tests: model, engine, training, resampling" tests_gpu_model.log \
    "${pytest[@]}" tests/test_gpu.py tests/test_resample.py tests/test_cross_entropy.py tests/test_triton_labels.py \
    tests/test_projections.py tests/test_decoder_norms.py \
    -k "not ($kernels) and not aoti" &
  # each AOTInductor package test in a process of its own: loading the CUDA C++ one crashed its process on the H200
  # (segmentation fault, h200_2026-12-04b), which took the other one's failure message and the tests after it along;
  # -s: uncaptured, so that a crash's C++ frames (the test's native_frames_on_crash) reach the log, not pytest's
  # capture file, lost with the process
  timed "GPU tests: AOTInductor, Triton" tests_gpu_aoti_triton.log \
    "${pytest[@]}" -s tests/test_gpu.py -k "aoti and triton" &
  timed "GPU tests: AOTInductor, CUDA C++" tests_gpu_aoti_cuda.log \
    "${pytest[@]}" -s tests/test_gpu.py -k "aoti and not triton" &
  wait
  for log in tests_gpu_triton_score tests_gpu_triton tests_gpu_ops tests_gpu_kernels tests_gpu_model \
      tests_gpu_aoti_triton tests_gpu_aoti_cuda; do
    tail -1 "$OUT/$log.log" 2>/dev/null
  done
}

ops() {  # the fused operators against eager and SDPA: the kernels issue's targets (torch.compile: compile_baselines)
  timed bench_ops bench_ops.txt python3 benchmarks/bench_ops.py --dtype bf16 --compile no --out "$OUT"
  # the host time of the eager and autograd paths (launches stubbed), which the small shapes' timings include
  timed bench_host bench_host.txt python3 benchmarks/bench_host.py --out "$OUT"
  # the engine's Triton resamplings against ATen's, one by one (which launch the e2e profile's bilinear time is)
  timed bench_resample bench_resample.txt python3 benchmarks/bench_resample.py --out "$OUT"
  # a ViT engine's pyramid GroupNorm and transposed convolutions, PyTorch's against the engine's (cuda_group_norm,
  # cuda_convt): seconds, and ViT's own run (e2e_more) may not be reached
  timed bench_pyramid bench_pyramid.txt python3 benchmarks/bench_pyramid.py --out "$OUT"
  # predict's label maps on the GPU: the fused resize and argmax (labels) against the resize then the max (unfused)
  timed "bench_labels cuda" bench_labels.txt python3 benchmarks/bench_labels.py --device cuda --repeats 30 --out "$OUT"
}

e2e_rn50() {  # the engine issue's headline: RN50 512x512 batch 1 and 16 (torch.compile: compile_baselines); the
  # profile of engine-bf16 (torch.profiler) is taken after every row is measured (bench_e2e.profile_after_measuring)
  timed "bench_e2e RN50 whole" bench_e2e_rn50_whole.txt \
    python3 benchmarks/bench_e2e.py --archs RN50 --modes whole --batches 1 16 --out "$OUT" --tag rn50_whole \
    --contestants official official-bf16 engine-fp32 engine-bf16 engine-bf16-plain-conv engine-bf16-aten-resample \
    engine-bf16-separate-qkv engine-bf16-aten-add-ln
}

compile_baselines() {  # torch.compile of the official model and of the operator references: minutes of compilation,
  # so after every step that judges a target; the end-to-end one first (the engine issue's strongest baseline)
  timed "bench_e2e RN50 whole torch.compile" bench_e2e_rn50_compile.txt \
    python3 benchmarks/bench_e2e.py --archs RN50 --modes whole --batches 1 16 --out "$OUT" --tag rn50_compile \
    --contestants compile-ro
  timed "bench_ops torch.compile" bench_ops_compile.txt \
    python3 benchmarks/bench_ops.py --dtype bf16 --compile only --out "$OUT" --tag compile
}

export_bench() {  # the AOTInductor package against the engine on the GPU (the ONNX Runtime part runs on CPU machines)
  timed "bench_export RN50" bench_export.txt \
    python3 benchmarks/bench_export.py --parts gpu --archs RN50 --out "$OUT" --tag rn50
}

train_bench() {  # one training step, official style against the trainer (RN50 512x512 batch 16)
  timed "bench_train RN50" bench_train.txt python3 benchmarks/bench_train.py --out "$OUT" --tag rn50_b16
  # the text encoder's part of that step (and of set_classes): its shared start against every prompt run whole
  timed "bench_text" bench_text.txt python3 benchmarks/bench_text.py --device cuda --repeats 30 --out "$OUT"
  # can this machine's CPUs feed that step? (the DataLoader's samples/s per worker count)
  timed "bench_data" bench_data.txt python3 benchmarks/bench_data.py --out "$OUT" --tag gpu_machine
}

rest() {  # the CPU suite on this machine's torch/triton, and CMake's CUDA build
  DENSECLIP_FAST_CMAKE_CUDA=1 timed "other tests" tests_rest.log \
    python3 -m pytest -q -rs --durations=15 tests/ --ignore=tests/test_ops.py --ignore=tests/test_gpu.py \
    --ignore=tests/test_resample.py --ignore=tests/test_cross_entropy.py --ignore=tests/test_triton_labels.py \
    --ignore=tests/test_projections.py
  tail -3 "$OUT/tests_rest.log" 2>/dev/null
}

probe() {  # which Triton score specialisations are wrong here (the NCHW 16-bit forward was on an H200): <= 200 s
  local STEP_CAP_S=200
  timed "triton_nchw_probe" triton_nchw_probe.txt python3 benchmarks/triton_nchw_probe.py --out "$OUT"
}

tune_score() {  # the Triton score forward's plans and blocks (chosen without a GPU) timed against each other (the
  # backward's sweep was measured in the first session and adopted: FUSED_BLOCKS_NHWC); each variant's scores are
  # compared with the default's too, so a wrong plan shows in its error column
  timed "tune_score" tune_score.txt python3 benchmarks/tune_score.py --out "$OUT" --directions forward
}

e2e_more() {  # slide mode, the other architectures, and start-up on the GPU
  timed "bench_e2e RN50 slide" bench_e2e_rn50_slide.txt \
    python3 benchmarks/bench_e2e.py --archs RN50 --modes slide --batches 1 --out "$OUT" --tag rn50_slide \
    --contestants official official-bf16 engine-fp32 engine-bf16
  # ViT first: its 8.07 ms at batch 1 (h200_2026-12-04) has never been profiled; the ViT-only contestants are not
  # run on RN101 (bench_e2e.VIT_ONLY)
  timed "bench_e2e ViT-B/16 RN101" bench_e2e_others.txt \
    python3 benchmarks/bench_e2e.py --archs ViT-B/16 RN101 --modes whole --batches 1 16 --out "$OUT" --tag others \
    --contestants official official-bf16 engine-fp32 engine-bf16 engine-bf16-fp32-ln engine-bf16-quick-gelu \
    engine-bf16-cudnn-convt engine-bf16-aten-group-norm
  # a fresh process to its first segmentation on the GPU (CUDA's start, the load, the Segmenter, the first call)
  timed "bench_startup cuda" bench_startup.txt \
    python3 benchmarks/bench_startup.py --device cuda --formats pth safetensors --size 512 --repeats 2 --out "$OUT"
  # uint8 images in, logits and label maps out (the command line's path: preprocessing and resizes included)
  timed "bench_predict cuda" bench_predict.txt python3 benchmarks/bench_predict.py --device cuda --repeats 30 --out "$OUT"
}

# Most valuable first, each step writing its files as it goes, so a run cut short still brings results back.
# train_bench right after the tests: the training issue's target needs only its two rows (official-style and trainer
# steps in one run); tune_score before the probe and torch.compile's minutes: it decides score.ROWS_FROM and
# TEXT_NORMS_FROM (and checks their results against the default's).
ALL_STEPS="info gpu_tests train_bench e2e_rn50 ops tune_score probe compile_baselines export_bench e2e_more rest"
STEPS=${*:-$ALL_STEPS}
for step in $STEPS; do
  [[ " build $ALL_STEPS save_prebuilt " == *" $step "* ]] \
    || { echo "unknown step $step (steps: build $ALL_STEPS save_prebuilt)"; exit 2; }
done
# a warm machine keeps the work folder: each call's lines begin with its time and code (results carry both too)
echo "== call at $(date -u +%FT%TZ), code $(python3 -c 'from benchmarks.common import code_hash; print(code_hash())' \
  2>/dev/null || echo unknown), steps: $STEPS" | tee -a "$OUT/status.txt"
busy_processes "at the call's start"
if [[ " $STEPS " == *" build "* ]]; then
  build
elif ext_current; then
  echo "extension: built from these sources by an earlier call" | tee -a "$OUT/status.txt"
elif ! use_prebuilt; then
  build
fi
pack
for step in $STEPS; do
  [[ $step == build ]] && continue
  $step
  pack
done
