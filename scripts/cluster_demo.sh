#!/usr/bin/env bash
# Multi-node Ray on one machine: a head and two worker nodes as separate `ray start` processes
# on 127.0.0.1, then `dfr-pipeline train` and `dfr-pipeline score` with --address, then the
# Ray node that trained each model and scored each row.
#
# Why: proves the jobs really spread over nodes (separate raylets, object stores and worker
# processes) without a real cluster. Workers declare one logical GPU each, so
# --gpus-per-task 0.5 places two training tasks per worker; without a physical GPU the code
# falls back to CPU. The head declares no CPUs, so all work lands on the workers.
#
# Usage (venv active):  scripts/cluster_demo.sh [WORKDIR]
#   DFR_DEMO_S3=1   use a local moto S3 server (needs moto[server]) instead of local files.
# Everything it starts is stopped on exit (also on error or Ctrl-C), by process group; it
# never runs `ray stop`, which would kill every Ray instance on the machine.
set -euo pipefail

WORK="$(realpath -m "${1:-dfr-cluster-demo}")"
mkdir -p "$WORK"
TEMP="$(mktemp -d /tmp/dfrc-XXXXXX)"  # short: Unix socket paths are limited to 107 bytes
PY="${PYTHON:-python}"
RAY=("$PY" -m ray.scripts.scripts)
PGIDS=()

cleanup() {
  local rc=$?
  for ((i = ${#PGIDS[@]} - 1; i >= 0; i--)); do  # workers first, then the head, then moto
    kill -TERM -- "-${PGIDS[i]}" 2>/dev/null || true
  done
  for _ in $(seq 40); do  # up to 20 s for a clean exit, then SIGKILL what is left
    local alive=0
    for pgid in "${PGIDS[@]}"; do kill -0 -- "-$pgid" 2>/dev/null && alive=1 || true; done
    ((alive)) || break
    sleep 0.5
  done
  for pgid in "${PGIDS[@]}"; do kill -KILL -- "-$pgid" 2>/dev/null || true; done
  for cmdline in /proc/[0-9]*/cmdline; do  # leftovers: only processes naming our temp dir
    if grep -qsF -- "$TEMP" "$cmdline"; then
      pid=${cmdline#/proc/}; pid=${pid%/cmdline}
      [[ $pid != "$$" ]] && kill -KILL "$pid" 2>/dev/null || true
    fi
  done
  rm -rf "$TEMP"
  echo "cluster stopped (logs in $WORK/logs)" >&2
  exit "$rc"
}
trap cleanup EXIT INT TERM

free_port() { "$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }

node_ports() {  # distinct ports per node: defaults would collide on one host
  local low; low=$(( 20000 + RANDOM % 20000 ))
  echo "--node-manager-port=$(free_port) --object-manager-port=$(free_port)" \
    "--min-worker-port=$low --max-worker-port=$((low + 39))" \
    "--dashboard-agent-listen-port=$(free_port) --dashboard-agent-grpc-port=$(free_port)" \
    "--runtime-env-agent-port=$(free_port) --metrics-export-port=$(free_port)"
}

start_node() {  # NAME ARGS...: `ray start --block` in its own session; waits until it is up
  local name=$1; shift
  setsid "${RAY[@]}" start "$@" --block >"$WORK/logs/$name.log" 2>&1 &
  PGIDS+=("$!")
  for _ in $(seq 240); do
    grep -q "Ray runtime started" "$WORK/logs/$name.log" && return 0
    kill -0 "$!" 2>/dev/null || break
    sleep 0.5
  done
  echo "ray start for $name failed:" >&2; tail -20 "$WORK/logs/$name.log" >&2; return 1
}

mkdir -p "$WORK/logs"
export RAY_USAGE_STATS_ENABLED=0 RAY_AUTH_MODE="${RAY_AUTH_MODE:-disabled}"
unset RAY_ADDRESS

if [[ "${DFR_DEMO_S3:-0}" == 1 ]]; then
  S3_PORT=$(free_port)
  setsid moto_server -H 127.0.0.1 -p "$S3_PORT" >"$WORK/logs/moto.log" 2>&1 &
  PGIDS+=("$!")
  export DFR_S3_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"  # nodes started below inherit it
  export AWS_ACCESS_KEY_ID=demo AWS_SECRET_ACCESS_KEY=demo AWS_DEFAULT_REGION=us-east-1
  sleep 2
  ROOT="s3://dfr-demo"
  "$PY" -c "import boto3,os; boto3.client('s3', endpoint_url=os.environ['DFR_S3_ENDPOINT_URL']).create_bucket(Bucket='dfr-demo')"
else
  ROOT="$WORK/store"
fi

PORT=$(free_port)
ADDRESS="127.0.0.1:$PORT"
COMMON=(--node-ip-address=127.0.0.1 "--temp-dir=$TEMP" --object-store-memory=268435456
  --disable-usage-stats)
# shellcheck disable=SC2046  # node_ports is a list of flags
start_node head --head "--port=$PORT" --node-name=dfr-head --num-cpus=0 --num-gpus=0 \
  --include-dashboard=false "${COMMON[@]}" $(node_ports)
for i in 0 1; do
  # shellcheck disable=SC2046
  start_node "worker-$i" "--address=$ADDRESS" "--node-name=dfr-worker-$i" --num-cpus=1 \
    --num-gpus=1 '--resources={"dfr_worker": 1}' "${COMMON[@]}" $(node_ports)
done
echo "cluster up at $ADDRESS (head + 2 workers, temp dir $TEMP)" >&2

# Data: four synthetic product lines (64 px) for training, 60 more images per line to score.
"$PY" - "$WORK" "$ROOT" <<'EOF'
import io, sys
from pathlib import Path
import numpy as np
from PIL import Image
from pipeline import storage
from pipeline.demo.synthetic import SyntheticSpec, render_normal, write_mvtec_dataset

work, root = Path(sys.argv[1]), sys.argv[2]
lines = ("metal_plate", "woven_fabric", "wood_panel", "ceramic_tile")
write_mvtec_dataset(work / "archive", SyntheticSpec(lines, n_train=12, n_test_good=2,
                                                    n_test_defect=2, size=64, seed=3))
rows = ["product_line,train_uri,test_uri"]
for line in lines:
    base = storage.join_uri(root, "archive", line)
    for path in sorted((work / "archive" / line).rglob("*.png")):
        rel = path.relative_to(work / "archive" / line).parts
        storage.write_bytes_atomic(storage.join_uri(base, *rel), path.read_bytes())
    rows.append(f"{line},{storage.join_uri(base, 'train', 'good')},{base}")
    for i in range(60):
        buf = io.BytesIO()
        Image.fromarray(render_normal(line, np.random.default_rng(10_000 + i), 64)).save(buf, "PNG")
        storage.write_bytes_atomic(storage.join_uri(root, "score-input", line, f"{i:04d}.png"),
                                   buf.getvalue())
(work / "manifest.csv").write_text("\n".join(rows) + "\n")
EOF

dfr-pipeline train --address "$ADDRESS" --products "$WORK/manifest.csv" \
  --models-uri "$ROOT/models" --image-size 64 --epochs 3 --gpus-per-task 0.5 \
  --cpus-per-task 0.25
dfr-pipeline score --address "$ADDRESS" --models-uri "$ROOT/models" \
  --input "$ROOT/score-input" --output "$ROOT/scores" --run-date 2024-05-01 \
  --actors 2 --gpus-per-actor 1 --cpus-per-actor 0.5 --decode-cpus 0.25 --batch-size 16 \
  --cache-dir "$WORK/cache" --quiet

# The spread: which node trained each model (model.json extra.node_id), scored each row.
"$PY" - "$ROOT" <<'EOF'
import sys
from pipeline import outputs, registry

root = sys.argv[1]
models = f"{root}/models"
print("trained on:")
for line in registry.list_product_lines(models):
    meta = registry.read_version_metadata(models, line, registry.latest_version(models, line))
    print(f"  {line:14s} node {meta['extra']['node_id'][:12]}  device {meta['extra']['device']}")
df = outputs.read_scores(f"{root}/scores", "2024-05-01")
print(f"scored {len(df)} rows; rows per node:")
for node, count in df["node_id"].value_counts().sort_index().items():
    print(f"  node {node[:12]}  {count}")
EOF
