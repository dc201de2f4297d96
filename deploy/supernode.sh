#!/usr/bin/env bash
# Start a camera's SuperNode. Usage: supernode.sh PKI_DIR SUPERLINK_ADDR NODE_KEY NODE_CONFIG [PORT]
# NODE_CONFIG e.g. "data-path='/srv/cam/data.yaml' teacher-path='/srv/cam/teacher.pt'" (teacher optional).
set -euo pipefail
pki=${1:?usage}; link=${2:?usage}; key=${3:?usage}; config=${4:?usage}; port=${5:-9094}
exec flower-supernode --root-certificates "$pki/ca.crt" --superlink "$link" --auth-supernode-private-key "$key" \
  --node-config "$config" --port "$port"
