#!/usr/bin/env bash
# Create a CA, a SuperLink server certificate (for the names/IPs given) and per-device ECDSA node keys.
# Usage: deploy/certs.sh OUT_DIR [SERVER_NAME_OR_IP ...] -- [DEVICE_ID ...]
# Example: deploy/certs.sh runs/pki 127.0.0.1 localhost -- cam00 cam01
set -euo pipefail
out=${1:?usage: certs.sh OUT_DIR [SERVER_NAMES...] -- [DEVICE_IDS...]}; shift
names=(); devices=(); seen_sep=0
for a in "$@"; do
  if [ "$a" = "--" ]; then seen_sep=1; continue; fi
  if [ $seen_sep = 0 ]; then names+=("$a"); else devices+=("$a"); fi
done
[ ${#names[@]} -gt 0 ] || names=(127.0.0.1 localhost)
mkdir -p "$out/nodes"
umask 077
if [ ! -f "$out/ca.key" ]; then  # created once; re-running never replaces a CA devices already trust
  openssl req -x509 -newkey rsa:4096 -nodes -days 3650 -subj "/CN=fedcam CA" -keyout "$out/ca.key" -out "$out/ca.crt"
fi
san=""
for n in "${names[@]}"; do
  if [[ $n =~ ^[0-9.]+$ ]]; then san+="IP:$n,"; else san+="DNS:$n,"; fi
done
openssl req -newkey rsa:4096 -nodes -subj "/CN=${names[0]}" -keyout "$out/server.key" -out "$out/server.csr"
openssl x509 -req -in "$out/server.csr" -CA "$out/ca.crt" -CAkey "$out/ca.key" -CAcreateserial -days 825 \
  -extfile <(printf "subjectAltName=%s\nextendedKeyUsage=serverAuth\n" "${san%,}") -out "$out/server.crt"
rm -f "$out/server.csr"
for d in "${devices[@]}"; do  # Flower SuperNode authentication keys: ECDSA, one pair per device
  [ -f "$out/nodes/$d" ] || ssh-keygen -q -t ecdsa -b 384 -N "" -C "$d" -f "$out/nodes/$d"
done
echo "CA: $out/ca.crt  server: $out/server.crt (${names[*]})  node keys: ${devices[*]:-none} in $out/nodes/"
