#!/usr/bin/env bash
# One-GPU device check, run from the repository root of a fresh clone with the packages installed:
#
#   bash scripts/device_check.sh [result.json]        # default: device_check.json (copied to $OUT if set)
#   DEVICE_CHECK_SMOKE=1 bash scripts/device_check.sh  # CPU plumbing check: resnet18, 64x64, one config
#
# Steps, each under `timeout` and all within DEVICE_CHECK_BUDGET_S seconds (default 450, under 8 minutes):
#   1. device name, driver / CUDA / cuDNN / torch versions;
#   2. python -m pytest -q -m cuda tests/test_cuda.py;
#   3. python main.py ... --mode benchmark for fp32, bf16, fp16, channels_last (bf16) and compile (bf16), then the
#      video model (ped2 preset, bf16) on the synthetic video demo
#      at batch 8 and 32: wide_resnet50_2, MODEL.pretrained=false, 256x256, random inputs.
# A failing or hanging step is recorded (exit code, stderr tail) and the next one runs. Everything lands
# in ONE JSON file, with the figures set against the targets (bf16 evaluation >= 1000 images/s incl.
# maps, smoothing and scores; bf16 training >= 200 images/s).
set -u

RESULT=${1:-device_check.json}
SMOKE=${DEVICE_CHECK_SMOKE:-0}
BUDGET=${DEVICE_CHECK_BUDGET_S:-450}
PYTHON=${PYTHON:-python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SECONDS=0
STEP=0

if [ "$SMOKE" = "1" ]; then
  BACKBONE=resnet18; SIZE=64; BATCHES="8"; CONFIGS="fp32"; STEPS=2; PYTEST_TIMEOUT=120
else
  BACKBONE=wide_resnet50_2; SIZE=256; BATCHES="8 32"; CONFIGS="fp32 bf16 fp16 channels_last compile"; STEPS=5; PYTEST_TIMEOUT=210
fi

# run_step NAME TIMEOUT_S COMMAND...: run under timeout (capped by the budget left), keep stdout/stderr,
# and write NAME, exit code and seconds to $WORK/<n>.meta for the JSON assembly.
run_step() {
  local name=$1 limit=$2; shift 2
  STEP=$((STEP + 1))
  local id; id=$(printf '%02d' "$STEP")
  local left=$((BUDGET - SECONDS - 5))
  if [ "$left" -lt 20 ]; then
    printf '%s\n%s\n%s\n' "$name" "skipped" "0" > "$WORK/$id.meta"
    echo "[device_check] $name: skipped (time budget spent)" >&2
    return
  fi
  [ "$limit" -gt "$left" ] && limit=$left
  echo "[device_check] $name (timeout ${limit}s)" >&2
  local start=$SECONDS
  timeout --kill-after=10 "$limit" "$@" > "$WORK/$id.out" 2> "$WORK/$id.err"
  local rc=$?
  printf '%s\n%s\n%s\n' "$name" "$rc" "$((SECONDS - start))" > "$WORK/$id.meta"
  echo "[device_check] $name: exit $rc after $((SECONDS - start))s" >&2
}

run_step "environment" 60 "$PYTHON" - <<'PY'
import json, subprocess, torch
info = {"torch": torch.__version__, "cuda_runtime": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
if torch.cuda.is_available():
    info |= {"device_name": torch.cuda.get_device_name(0), "device_count": torch.cuda.device_count(),
             "capability": list(torch.cuda.get_device_capability(0)), "cudnn": torch.backends.cudnn.version()}
try:
    smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                         capture_output=True, text=True, timeout=30)
    info["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    info["driver"] = smi.stdout.split(",")[1].strip() if smi.returncode == 0 and "," in smi.stdout else None
except (OSError, subprocess.TimeoutExpired) as exc:
    info["nvidia_smi"] = f"unavailable: {exc}"
print(json.dumps(info))
PY

run_step "pytest_cuda" "$PYTEST_TIMEOUT" "$PYTHON" -m pytest -q -m cuda -p no:cacheprovider tests/test_cuda.py

for batch in $BATCHES; do
  for config in $CONFIGS; do
    amp=bf16; channels_last=false; compile=false; limit=60
    case $config in
      fp32) amp=none ;;
      fp16) amp=fp16 ;;
      channels_last) channels_last=true ;;
      compile) compile=true; limit=150 ;;
    esac
    [ "$SMOKE" = "1" ] && amp=none
    run_step "benchmark_${config}_b${batch}" "$limit" "$PYTHON" main.py --task_type anomaly --model_name dmad \
      --yaml_config configs/anomaly/unsupervised/dmad/demo.yaml --mode benchmark \
      "DATASET.datadir=$WORK/no_data" DATASET.demo=false "DATASET.resize=[$SIZE,$SIZE]" \
      "MODEL.backbone=$BACKBONE" MODEL.pretrained=false \
      "DATALOADER.batch_size=$batch" "TEST.batch_size=$batch" "TRAIN.amp=$amp" \
      "TRAIN.channels_last=$channels_last" "TRAIN.compile=$compile" \
      BENCHMARK.warmup=1 "BENCHMARK.train_steps=$STEPS" "BENCHMARK.eval_images=$((batch * 4))" \
      "RESULT.savedir=$WORK/runs" RESULT.assets_dir=null LOG.wandb=false
  done
done


# The video model (ped2 preset) on the synthetic video demo generated at the benchmark size: clips/s for training and
# for evaluation with the per-frame scores.
vamp=bf16; [ "$SMOKE" = "1" ] && vamp=none
run_step "benchmark_video_ped2_${vamp}_b8" 150 "$PYTHON" main.py --task_type anomaly --model_name dmad \
  --yaml_config configs/anomaly/unsupervised/dmad/ped2.yaml --mode benchmark \
  "DATASET.datadir=$WORK/video_data" DATASET.target=video_demo DATASET.demo=true "DATASET.resize=[$SIZE,$SIZE]" \
  DATALOADER.batch_size=8 TEST.batch_size=8 "TRAIN.amp=$vamp" \
  BENCHMARK.warmup=1 "BENCHMARK.train_steps=$STEPS" BENCHMARK.eval_images=32 \
  "RESULT.savedir=$WORK/runs" RESULT.assets_dir=null LOG.wandb=false

"$PYTHON" - "$WORK" "$RESULT" "$SMOKE" "$SECONDS" <<'PY'
"""Assemble the step records into one JSON document and compare the figures to the targets."""
import json, sys
from pathlib import Path

work, result_path, smoke, seconds = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])
steps, benchmarks = [], []
environment, pytest_summary = None, None
for meta in sorted(work.glob("*.meta")):
    name, rc, secs = meta.read_text().splitlines()[:3]
    out = meta.with_suffix(".out").read_text(errors="replace") if meta.with_suffix(".out").exists() else ""
    err = meta.with_suffix(".err").read_text(errors="replace") if meta.with_suffix(".err").exists() else ""
    record = {"step": name, "exit_code": None if rc == "skipped" else int(rc), "seconds": int(secs), "status": "ok"}
    if rc == "skipped":
        record["status"] = "skipped: time budget spent"
    elif rc != "0":
        record["status"] = "timeout" if rc in ("124", "137") else "failed"
        record["error_tail"] = (err or out)[-3000:]
    json_lines = [line for line in out.splitlines() if line.startswith("{")]
    if name == "environment" and json_lines:
        environment = json.loads(json_lines[-1])
    elif name == "pytest_cuda":
        tail = [line for line in out.splitlines() if line.strip()]
        pytest_summary = record["summary"] = tail[-1] if tail else None
    elif name.startswith("benchmark_") and json_lines and rc == "0":
        config, batch = name[len("benchmark_"):].rsplit("_b", 1)
        record["result"] = json.loads(json_lines[-1]) | {"config": config}
        benchmarks.append(record["result"])
    steps.append(record)

def best(key, dtype="bfloat16"):
    values = [b[key] for b in benchmarks if b.get("dtype") == dtype and b.get(key) is not None]
    return max(values) if values else None

targets = {
    "eval_images_per_s_bf16": {"target": 1000, "best": best("eval_images_per_s")},
    "train_images_per_s_bf16": {"target": 200, "best": best("train_images_per_s")},
}
for t in targets.values():
    t["met"] = None if t["best"] is None else t["best"] >= t["target"]
document = {
    "smoke": smoke, "total_seconds": seconds, "environment": environment, "pytest_cuda": pytest_summary,
    "benchmarks": benchmarks, "targets": targets, "steps": steps,
}
result_path.write_text(json.dumps(document, indent=2) + "\n")
print(json.dumps({"targets": targets, "pytest_cuda": pytest_summary,
                  "failed_steps": [s["step"] for s in steps if s["status"] != "ok"]}))
PY

if [ -n "${OUT:-}" ] && [ -d "$OUT" ]; then
  cp "$RESULT" "$OUT/"
fi
echo "[device_check] wrote $RESULT in ${SECONDS}s" >&2
