#!/usr/bin/env bash
# The GPU check: on a machine with one CUDA GPU and this repository, no network, a few minutes.
#
#   bash scripts/gpu_check.sh pack ASSETS           # here: the demo's config + tokenizer, the calibration text
#   bash scripts/gpu_check.sh run ASSETS RESULTS    # there: everything below, JSON + logs under RESULTS
#
# run: the kernel equivalence tests on CUDA (not the interpreter); scripts/bench_moe.py (bf16, Triton, with
# % of the measured copy bandwidth and matmul rate) at the demo's and at Llama-3-8B shapes; a random-weight
# model of the demo's shape (the real weights do not travel) carved as carve-50 does (calibration on the
# GPU) and distilled end to end for 32 steps on the GPU (steps/s); `moefy validate` of it on Triton and
# `moefy bench` against its dense source (Triton bf16 and fp32, torch bf16). Each step has its own time
# limit and log; a failed step does not stop the others; RESULTS/steps.jsonl says how each ended. Python
# packages the machine lacks can wait as wheels in ASSETS/wheels (installed with --no-index into a
# temporary folder). GPU_CHECK_MODELS_ONLY=1 runs only the model steps. Results: docs/BENCHMARKS.md.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
pack)
    assets=${2:?usage: gpu_check.sh pack ASSETS}
    demo=${MOEFY_DEMO_DIR:-$HOME/.cache/moefy/demo/SmolLM2-135M-Instruct}
    [ -f "$demo/config.json" ] || { echo "no dequantized demo at $demo: run 'make demo' first" >&2; exit 2; }
    mkdir -p "$assets/demo-shape"
    for f in config.json tokenizer.json tokenizer_config.json generation_config.json chat_template.jinja; do
        [ -f "$demo/$f" ] && cp "$demo/$f" "$assets/demo-shape/"
    done
    cp ../shared/data/wikitext-2/valid.txt "$assets/calib.txt"
    du -sh "$assets"
    exit 0 ;;
run) ;;
*) echo "usage: gpu_check.sh pack ASSETS | run ASSETS RESULTS" >&2; exit 2 ;;
esac

assets=$(realpath "${2:?usage: gpu_check.sh run ASSETS RESULTS}")
results=$(mkdir -p "${3:?usage: gpu_check.sh run ASSETS RESULTS}" && realpath "$3")
work=$(mktemp -d)
export PYTHONUNBUFFERED=1 PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
if [ -d "$assets/wheels" ]; then
    python3 -m pip install -q --no-index --no-deps --no-compile --target "$work/site" "$assets"/wheels/*.whl \
        && export PYTHONPATH=$work/site:$PYTHONPATH
fi

step() {  # step NAME SECONDS COMMAND...: its output in RESULTS/NAME.log, its end in RESULTS/steps.jsonl
    local name=$1 limit=$2 start rc
    shift 2
    start=$(date +%s%N)
    echo "== $name (limit ${limit}s)"
    timeout "$limit" "$@" > "$results/$name.log" 2>&1
    rc=$?
    printf '{"step": "%s", "rc": %d, "ms": %d}\n' "$name" "$rc" $((($(date +%s%N) - start) / 1000000)) \
        | tee -a "$results/steps.jsonl"
    tail -n 25 "$results/$name.log"
}

step env 60 bash -c 'nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv;
    python3 -c "import torch, triton, transformers, pydantic; print(\"torch\", torch.__version__, \"triton\",
    triton.__version__, \"transformers\", transformers.__version__, \"pydantic\", pydantic.__version__,
    torch.cuda.get_device_name(), torch.cuda.get_device_capability())"'
if [ -z "${GPU_CHECK_MODELS_ONLY:-}" ]; then  # set: only the model steps below
step kernel_tests 150 python3 -m pytest tests/test_kernels.py -k "triton or biases or route" -p no:cacheprovider \
    -q --junitxml "$results/kernel_tests.xml"
step bench_moe_llama 90 python3 scripts/bench_moe.py --shape 4096x14336 --experts 16:4 256:64 \
    --tokens 1 16 2048 8192 --json "$results/bench_moe_llama.json"
step bench_moe 90 python3 scripts/bench_moe.py --json "$results/bench_moe.json"
fi

dense=$work/demo-shape
moe=$work/demo-shape-carve-50
cat > "$work/carve-50-gpu.yaml" <<'EOF'
name: carve-50-gpu
description: carve-50 calibrated on 32 samples, then 32 steps of end-to-end distillation (steps/s, not quality)
transforms:
  - carve: {experts: 64, shared: 16, top_k: 16, router: fitted, features: contribution,
            compensation: {refit_down: true}}
  - distill: {end_to_end: {lr: 1.5e-3, budget: {tokens: 16384, minutes: 4}}}
calibration: {samples: 32, seq_len: 512}
EOF
step synthetic 60 python3 scripts/synthetic_model.py "$assets/demo-shape" "$dense"
step convert 240 python3 -m moefy convert "$dense" -r "$work/carve-50-gpu.yaml" -o "$moe" --calib "$assets/calib.txt" \
    --device cuda --json "$results/convert.json"
step validate 90 python3 -m moefy validate "$moe" --source "$dense" --backend triton --device cuda --json "$results/validate.json"
for run in triton:bfloat16 triton:float32 torch:bfloat16; do
    backend=${run%:*} dtype=${run#*:}
    step "bench_${backend}_${dtype}" 90 python3 -m moefy bench "$moe" --baseline "$dense" --device cuda --backend "$backend" \
        --dtype "$dtype" --rounds 3 --new-tokens 64 --json "$results/bench_${backend}_${dtype}.json"
done
rm -rf "$work"
