#!/usr/bin/env bash
# The one prepared GPU run (issue 16): gpu-marked tests, LoRA levers, DreamBooth memory levers.
#
# Run from the repository root on the GPU machine, with the wheels carried in .whl/ (add
# deepspeed, hjson, ninja, py-cpuinfo, msgpack and einops for the ZeRO-2 gpu test; it skips
# without them):
#   bash benchmarks/gpu/run_all.sh            (writes JSON + logs to $OUT, default /tmp/sdtrain-gpu)
#   DRY=1 bash benchmarks/gpu/run_all.sh      (CPU check of the script itself: tiny model)
# Every part has its own timeout and the whole run stops starting new parts after BUDGET seconds
# (default 450), so it ends within 8 minutes. Partial JSON is written as each case finishes.
set -u
cd "$(dirname "$0")/../.."
ROOT=$PWD
OUT=${OUT:-/tmp/sdtrain-gpu}
BUDGET=${BUDGET:-450}
DRY=${DRY:-0}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
START=$SECONDS
log() { echo "[$((SECONDS - START))s] $*" | tee -a "$OUT/run_all.log"; }
left() { echo $((BUDGET - (SECONDS - START))); }
# part NAME TIMEOUT COMMAND...: run with min(TIMEOUT, time left), log the exit status
part() {
  local name=$1 limit=$2
  shift 2
  local remain
  remain=$(left)
  if [ "$remain" -lt 20 ]; then
    log "$name: skipped (budget spent)"
    echo "{\"skipped\": \"budget spent\"}" >"$OUT/$name.skipped.json"
    return
  fi
  [ "$limit" -gt "$remain" ] && limit=$remain
  log "$name: start (timeout ${limit}s)"
  timeout -k 10 "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc$([ $rc -eq 124 ] && echo ' (timed out)')"
  tail -n 5 "$OUT/$name.log" | sed 's/^/    /'
}

# (a) carried wheels -> /tmp/site (diffusers, pydantic, peft, pytest ...; nothing from the net).
# .whl/optional/huggingface_hub 1.33 only when the installed hub is older than diffusers needs
# (>= 1.32; transformers 5.17 wants < 2.0, so a 2.x is never carried).
HUB_OK='import sys; from importlib.metadata import version as v; p = tuple(int(x) for x in v("huggingface_hub").split(".")[:2]); sys.exit(0 if p >= (1, 32) else 1)'
if [ -d .whl ] && ls .whl/*.whl >/dev/null 2>&1; then
  log "installing $(ls .whl/*.whl | wc -l) carried wheels into /tmp/site"
  $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    >"$OUT/pip.log" 2>&1 || log "pip install failed (see pip.log)"
  if ls .whl/optional/huggingface_hub-*.whl >/dev/null 2>&1 && ! $PY -c "$HUB_OK" 2>/dev/null; then
    log "installed huggingface_hub is missing or older than 1.32: adding the carried 1.33"
    $PY -m pip install -q --no-index --no-deps --no-compile --target /tmp/site \
      .whl/optional/huggingface_hub-*.whl >>"$OUT/pip.log" 2>&1 || log "hub install failed"
  fi
fi
export PYTHONPATH=/tmp/site:$ROOT/src:$ROOT/benchmarks${PYTHONPATH:+:$PYTHONPATH}
export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 DIFFUSERS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
$PY - <<'EOF' 2>&1 | tee "$OUT/env.txt"
import importlib, sys
import torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.cuda.is_available(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
for name in ("diffusers", "transformers", "huggingface_hub", "accelerate", "peft", "pydantic",
             "safetensors", "PIL", "pytest"):
    try:
        module = importlib.import_module(name)
        print(name, getattr(module, "__version__", "?"), module.__file__)
    except Exception as error:
        print(name, "MISSING", error)
import sdtrain
print("sdtrain", sdtrain.__file__)
EOF

if [ "$DRY" = 1 ]; then
  LORA_ARGS="--dry --steps 2 --warmup 1 --batches 1"
  DB_ARGS="--dry --steps 3"
else
  LORA_ARGS="--steps 15 --warmup 3 --batches 1,4"
  DB_ARGS="--steps 4"
fi

# (b) the gpu-marked tests (fp16 + scaler, bf16, SDPA, state save/load on CUDA, 2 processes;
#     the compiled run's test is part (e))
part pytest_gpu 100 $PY -m pytest -m gpu -k "not compiled" -q -p no:cacheprovider \
  -o addopts="" tests
# (c) LoRA 512 px, batch 1 and 4: eager -> no host syncs -> fused AdamW, then the compiled ones
part lora_eager 100 $PY benchmarks/gpu/bench_lora.py --variants eager,nosync,fused $LORA_ARGS \
  --out "$OUT/lora_eager.json"
part lora_cudagraphs 150 $PY benchmarks/gpu/bench_lora.py --variants cudagraphs $LORA_ARGS \
  --out "$OUT/lora_cudagraphs.json"
part lora_compile 110 $PY benchmarks/gpu/bench_lora.py --variants compile $LORA_ARGS \
  --out "$OUT/lora_compile.json"
# (d) full-UNet DreamBooth step, peak VRAM per memory lever (skips if the command is missing)
part dreambooth 120 $PY benchmarks/gpu/bench_dreambooth.py $DB_ARGS --lever-timeout 60 \
  --work /tmp/sdtrain-gpu-db --out "$OUT/dreambooth.json"
# (e) the engine's torch_compile with CUDA graphs (three compiled runs: last, it is the slowest)
part pytest_gpu_compile 150 $PY -m pytest -m gpu -k compiled -q -p no:cacheprovider \
  -o addopts="" tests

# (f) summary
$PY benchmarks/gpu/summarize.py "$OUT" | tee "$OUT/summary.txt"
log "done in $((SECONDS - START))s; results in $OUT"
