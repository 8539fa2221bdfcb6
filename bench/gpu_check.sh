#!/usr/bin/env bash
# The GPU check for DP (issue 3), prepared to run as ONE call on a lent device machine
# (H100 or H200, at most ~9 minutes; nothing is downloaded: models are built from configs):
#
#     bash bench/gpu_wheels.sh     # here, once: the wheels the machine lacks (opacus, datasets, ...)
#     run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=600)
#
# With .whl/ present, they are installed into /tmp/site there first (no network needed).
#
# Results land in $OUT (the device tool brings back at most 8 files, so with $OUT set they are
# also packed into one $OUT/gpu_check.tar: `tar -xf gpu_check.tar -C bench/results`) or,
# without $OUT, in bench/results/. Commit the .md/.json pairs in bench/results/.
#
# What it measures (bench/bench_dp_gpu.py; bf16 autocast, sequence 128):
#   dp_gpu_lora_b512   LoRA, expected Poisson batch 512, the batch sizes DP-SGD trains with,
#                      physical cap 1.1x (563): BERT-base and GPT-2, non-DP vs hubtune hooks /
#                      ghost vs a plain Opacus loop. The issue's target: DP-LoRA >= 0.9x non-DP
#                      throughput at <= 1.1x peak memory.
#   dp_gpu_lora_rl256  the same for RoBERTa-large at batch 256 (cap 282), which fits in 78 GiB.
#   dp_gpu_b32         batch 32 (cap 48), LoRA and full fine-tuning, all three models: the
#                      small-batch regime, where the fixed per-step cost dominates.
#   dp_gpu_order       BERT-base LoRA at batch 32, hubtune vs the plain loop three times
#                      round-robin: does the first DP variant in a process pay for new shapes?
#   dp_gpu_lm          causal language models (issue 16): GPT-2 small (tied embeddings) and a
#                      LLaMA-style ~125M config, sequence 256, LoRA, expected batch 64 (cap
#                      72), hubtune's per-sequence loss: non-DP vs DP-LoRA hooks / ghost vs a
#                      plain Opacus loop, samples/s and peak memory.
# Before them, a CUDA run of the DP correctness tests (per-example gradients, steps, ledger).
# Each part has its own time limit; the benchmark rewrites its result files after every run,
# so a part cut off by its limit still leaves the rows it measured.
#
# GPU_CHECK_SMOKE=1 runs the same script with tiny models on any machine (a syntax check);
# PYTHON picks the interpreter (default: python, else python3).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-bench/results}
mkdir -p "$out"
smoke=()
if [[ ${GPU_CHECK_SMOKE:-0} == 1 ]]; then
    smoke=(--smoke)
    out=${OUT:-/tmp/gpu_check_smoke}
    mkdir -p "$out"
fi
status=0
py=${PYTHON:-$(command -v python || command -v python3)}
if [[ -d .whl && ${#smoke[@]} == 0 ]]; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

{
    date -u
    git rev-parse --short HEAD 2>/dev/null || true
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv 2>&1 || true
    "$py" -c "import torch, transformers, peft, opacus; print('torch', torch.__version__, 'cuda', torch.version.cuda, torch.cuda.is_available()); print('transformers', transformers.__version__, 'peft', peft.__version__, 'opacus', opacus.__version__)"
    if [[ ${#smoke[@]} == 0 ]]; then
        HUBTUNE_PROGRESS=0 timeout 75 "$py" -m pytest -q -p no:cacheprovider \
            -rf tests/test_privacy_grads.py tests/test_privacy.py -m "not slow" \
            -k "not kill_9 and not two_processes" 2>&1 | grep -E "^(FAILED|ERROR|E  )|passed|failed" | tail -60
    fi
} >"$out/gpu_check_env.txt" 2>&1 || status=1
cat "$out/gpu_check_env.txt"

bench() {
    local name=$1 limit=$2
    shift 2
    echo "== $name: $*"
    timeout "$limit" "$py" bench/bench_dp_gpu.py "${smoke[@]}" --out "$out/$name" "$@" >"$out/$name.log" 2>&1 || {
        status=1
        tail -20 "$out/$name.log"
    }
    grep '^|' "$out/$name.log" || true
    rm -f "$out/$name.log"
}

bench dp_gpu_lora_b512 110 --models bert-base,gpt2 --methods lora --batch 512 --physical 563 \
    --steps 20 --warmup 4 --variants "DP hooks,DP ghost,plain Opacus hooks"
bench dp_gpu_lora_rl256 80 --models roberta-large --methods lora --batch 256 --physical 282 \
    --steps 20 --warmup 4 --variants "DP hooks,DP ghost,plain Opacus hooks"
# Run order (hubtune's DP rows always ran right after non-DP, the plain loop's last): the same
# two variants three times round-robin, so a first-run cost (new Poisson batch shapes) shows.
bench dp_gpu_order 60 --models bert-base --methods lora --batch 32 --physical 48 --steps 30 \
    --warmup 5 --variants "DP hooks,plain Opacus hooks" --repeats 3
bench dp_gpu_b32 150 --models bert-base,roberta-large,gpt2 --methods lora,full --batch 32 \
    --physical 48 --steps 30 --warmup 5
bench dp_gpu_lm 100 --models gpt2-lm,llama-125m --methods lora --seq 256 --batch 64 \
    --physical 72 --steps 15 --warmup 3 --variants "DP hooks,DP ghost,plain Opacus hooks"
if [[ -n ${OUT:-} ]]; then  # one file back, whatever the number of parts
    (cd "$out" && tar -cf gpu_check.tar --exclude gpu_check.tar ./*.md ./*.json gpu_check_env.txt \
        && find . -maxdepth 1 -type f ! -name gpu_check.tar -delete)
fi
exit $status
