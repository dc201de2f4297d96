#!/usr/bin/env bash
# Start a SuperLink with TLS and SuperNode authentication. Usage: superlink.sh PKI_DIR [PORT] [STATE_DIR] [HOST]
# PKI_DIR holds ca.crt, server.crt, server.key (deploy/certs.sh). Flower 1.42 serves Fleet, Control and the
# runtime APIs on this one port. Binds 127.0.0.1 unless HOST says otherwise.
set -euo pipefail
pki=${1:?usage: superlink.sh PKI_DIR [PORT] [STATE_DIR] [HOST]}; port=${2:-9091}; state=${3:-.}; host=${4:-127.0.0.1}
mkdir -p "$state"
exec flower-superlink --ssl-ca-certfile "$pki/ca.crt" --ssl-certfile "$pki/server.crt" --ssl-keyfile "$pki/server.key" \
  --enable-supernode-auth --database "$state/state.db" --host "$host" --port "$port" \
  --disable-runtime-dependency-installation
