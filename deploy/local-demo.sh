#!/usr/bin/env bash
# The Deployment Engine on loopback: a SuperLink with TLS and SuperNode authentication, two registered
# SuperNodes (one per camera folder of a generated world), one refused unregistered node, and a 2-round
# `flwr run` that ends with a published snapshot. Every process started here is stopped by PID on exit.
# Usage: deploy/local-demo.sh [WORK_DIR]   (run from the repository root after `make setup`)
set -euo pipefail
repo=$(cd "$(dirname "$0")/.." && pwd)
work=$(realpath -m "${1:-$repo/runs/deploy-demo}")
port=${FEDCAM_SUPERLINK_PORT:-29091}
export PATH="$repo/.venv/bin:$PATH" FLWR_TELEMETRY_ENABLED=0 FLWR_DISABLE_UPDATE_CHECK=1 YOLO_OFFLINE=1 \
       FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION=1
mkdir -p "$work"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; wait 2>/dev/null || true; }
trap cleanup EXIT

tiny="data.imgsz=64 data.cameras=2 data.base-train=24 data.base-val=12 data.camera-train=16 data.camera-val=8"
tiny+=" data.camera-pool=8 model.student-width=0.0625 train.batch=8 snapshot.calib-frames=8"
fedcam data make --out "$work/world" --cameras 2 $(for kv in $tiny; do echo --set "$kv"; done) >/dev/null

"$repo/deploy/certs.sh" "$work/pki" 127.0.0.1 localhost -- cam00 cam01 intruder >/dev/null
FLWR_HOME="$work/superlink" "$repo/deploy/superlink.sh" "$work/pki" "$port" "$work/superlink" &
pids+=($!)
mkdir -p "$work/cli"
printf '[superlink]\ndefault = "fleet"\n[superlink.fleet]\naddress = "127.0.0.1:%s"\nroot-certificates = "%s"\n' \
  "$port" "$work/pki/ca.crt" > "$work/cli/config.toml"
for i in $(seq 1 60); do  # bounded wait for the SuperLink
  FLWR_HOME="$work/cli" flwr supernode register "$work/pki/nodes/cam00.pub" fleet >/dev/null 2>&1 && break
  sleep 1
done
FLWR_HOME="$work/cli" flwr supernode register "$work/pki/nodes/cam01.pub" fleet
for i in 0 1; do
  FLWR_HOME="$work/sn$i" "$repo/deploy/supernode.sh" "$work/pki" "127.0.0.1:$port" "$work/pki/nodes/cam0$i" \
    "data-path='$work/world/cam0$i/data.yaml'" $((port + 10 + i)) &
  pids+=($!)
done
# An unregistered key is refused by the SuperLink's node authentication.
FLWR_HOME="$work/sn9" timeout 60 flower-supernode --root-certificates "$work/pki/ca.crt" --superlink "127.0.0.1:$port" \
  --auth-supernode-private-key "$work/pki/nodes/intruder" --port $((port + 19)) --max-retries 2 \
  > "$work/intruder.log" 2>&1 || true
cd "$repo"
FLWR_HOME="$work/cli" flwr run . fleet --stream --run-config \
  "$tiny data.root='$work/world' fed.rounds=2 run-dir='$work/run' snapshot.recover-epochs=0 snapshot.round-to=1"
grep -q '"kind": "snapshot"' "$work/run/events.jsonl" && echo "snapshot: $(cat "$work/run/snapshots/global/latest.json")"
