#!/usr/bin/env bash
# Plans the pod configs ahead of time on simulated CPU devices (compile only, nothing allocated)
# and prints the per-device memory / FLOPs / collectives table of BUILD.md "Scale-out".
#
#   scripts/plan_pods.sh [OUT_DIR]      (default bench_results/plans; ~20 min on a 2-core CPU)
#
# Each line runs `jaxbatch plan`, which sets XLA_FLAGS=--xla_force_host_platform_device_count=N
# itself; the JSON of every plan lands in OUT_DIR and the summary table is printed at the end.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench_results/plans}"
PY="${PYTHON:-.venv/bin/python}"
mkdir -p "$OUT"

plan() {  # plan NAME CONFIG [ARGS...]
  local name="$1" config="$2"
  shift 2
  echo "== $name: jaxbatch plan --config $config $*"
  "$PY" -m jaxbatch.train.cli plan --config "$config" --json "$OUT/$name.json" "$@"
}

plan r50_32k_dp            configs/imagenet_resnet50_lars.py --devices 256
plan r50_32k_fsdp8         configs/imagenet_resnet50_lars.py --devices 256 --mesh data=32,fsdp=8
plan bert_phase1_64k_dp    configs/bert_lamb.py:phase1       --devices 256
plan bert_phase1_64k_fsdp  configs/bert_lamb.py:phase1       --devices 256 --mesh data=16,fsdp=16
plan bert_phase1_64k_mb4   configs/bert_lamb.py:phase1       --devices 256 --config.micro_batches=4
plan bert_phase2_32k_dp    configs/bert_lamb.py:phase2       --devices 256
plan bert_phase2_32k_mb8_remat configs/bert_lamb.py:phase2   --devices 256 \
  --config.micro_batches=8 --config.model.remat_policy=full
plan siglip_32k_dp         configs/siglip_pod.py             --devices 256

"$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
from jaxbatch.train.plan import format_bytes
rows = []
for path in sorted(pathlib.Path(sys.argv[1]).glob("*.json")):
    p = json.loads(path.read_text())
    if "plans" in p:
        continue
    mesh = "×".join(str(p["mesh"][k]) for k in ("data", "fsdp", "tensor"))
    coll = ", ".join(f"{k} {v}" for k, v in p["collectives"].items() if v)
    rows.append(
        f"| {path.stem} | {mesh} | {p['batch_size']} ({p['per_device_batch']}/dev, "
        f"{p['micro_batches']} mb) | {format_bytes(p['param_bytes'])} | "
        f"{format_bytes(p['opt_state_bytes'])} | {format_bytes(p['temp_bytes'])} | "
        f"{format_bytes(p['peak_bytes'])} | {p['flops']:.3g} | {coll} |"
    )
print("| plan | mesh d×f×t | batch | params | opt state | temp | peak | FLOPs/dev | collectives |")
print("|---|---|---|---|---|---|---|---|---|")
print("\n".join(rows))
PYEOF
