#!/usr/bin/env bash
# Benchmark: unwrapKey (RSA-OAEP-256, RSA-2048) over HTTPS with concurrent
# clients against a fresh vault, beside `openssl speed rsa2048` private
# operations on the same machine in the same run.
#
#   crates/atrest-vault/bench/unwrap.sh            # 16 clients, 10 s
#   CONC=32 SECS=20 crates/atrest-vault/bench/unwrap.sh
#
# Prints the vault benchmark's JSON line and summary line, openssl's figure,
# and the ratio to the target (70% of openssl x cores used by the vault).
set -euo pipefail
cd "$(dirname "$0")/../../.."
CONC=${CONC:-16}
SECS=${SECS:-10}
# PIN=1 puts the vault on CPU 0 and the clients on CPU 1 (taskset), so the
# two do not disturb each other's caches and scheduling.
PIN=${PIN:-0}
srv_pin=(); cli_pin=()
if [ "$PIN" = 1 ]; then srv_pin=(taskset -c 0); cli_pin=(taskset -c 1); fi
TARGET_DIR=${CARGO_TARGET_DIR:-target}
cargo build --release -q -p atrest
BIN="$TARGET_DIR/release/atrest"

tmp=$(mktemp -d)
pid=""
cleanup() { [ -n "$pid" ] && kill "$pid" 2>/dev/null; wait 2>/dev/null; rm -rf "$tmp"; }
trap cleanup EXIT
"$BIN" vault init-key --out "$tmp/unseal.key" 2>/dev/null
ATREST_LOG=warn "${srv_pin[@]}" "$BIN" vault serve --data "$tmp/data" --listen 127.0.0.1:0 --unseal-key-file "$tmp/unseal.key" 2>/dev/null &
pid=$!
for _ in $(seq 1 300); do [ -s "$tmp/data/vault.url" ] && break; sleep 0.1; done

cores=$(nproc)
echo "== openssl speed rsa2048, $cores processes ($(openssl version | cut -d' ' -f1-2))"
ossl=$(openssl speed -seconds 5 -multi "$cores" rsa2048 2>/dev/null | awk '/^rsa 2048 bits/ {print $(NF-1)}' | tail -1)
ossl1=$(openssl speed -seconds 5 rsa2048 2>/dev/null | awk '/^rsa 2048 bits/ {print $(NF-1)}' | tail -1)
echo "openssl rsa2048 private ops/s: ${ossl} total on ${cores} cores, ${ossl1} on 1 core"

echo "== vault unwrapKey over HTTPS (client and server share this machine)"
cpu0=$(awk '{print $14+$15}' "/proc/$pid/stat")
out=$("${cli_pin[@]}" "$BIN" vault bench --data "$tmp/data" --concurrency "$CONC" --seconds "$SECS")
cpu1=$(awk '{print $14+$15}' "/proc/$pid/stat")
echo "$out"
ops=$(echo "$out" | head -1 | python3 -c 'import json,sys; print(json.load(sys.stdin)["ops_per_sec"])')
tck=$(getconf CLK_TCK)
python3 - "$ops" "$ossl1" "$cpu0" "$cpu1" "$tck" "$SECS" <<'PY'
import sys
ops, ossl1, c0, c1, tck, secs = map(float, sys.argv[1:])
cores_used = (c1 - c0) / tck / secs
target = 0.7 * ossl1 * cores_used
print(f"vault server used {cores_used:.2f} cores; target 70% x {ossl1:.0f}/s x {cores_used:.2f} = {target:.0f} ops/s; "
      f"measured {ops:.0f} ops/s = {ops / (ossl1 * cores_used) * 100:.0f}% of openssl per core used -> "
      f"{'MEETS' if ops >= target else 'BELOW'} target")
PY
