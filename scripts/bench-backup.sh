#!/usr/bin/env bash
# Backup and restore throughput of a real server (release build):
#   cargo build --release -p atrest && scripts/bench-backup.sh [MB]
# Loads about MB megabytes (default 200) into a server, then times an
# online backup while pgbench-free idle, an online backup under a write
# load, `backup verify`, and a restore. Prints JSON and a summary line.
set -euo pipefail
MB=${1:-200}
BIN=${ATREST_BIN:-$(dirname "$0")/../target/release/atrest}
T=$(mktemp -d)
trap 'kill $SRV 2>/dev/null || true; rm -rf "$T"' EXIT
echo "pw-bench-backup" > "$T/pw"
"$BIN" server create --name bench --data "$T/s" --keystore "$T/ks" --admin-password-file "$T/pw" --listen 127.0.0.1:0 >/dev/null
"$BIN" server start --data "$T/s" 2>"$T/log" & SRV=$!
for _ in $(seq 200); do grep -q '"Ready"' "$T/s/state.json" 2>/dev/null && break; sleep 0.1; done
PORT=$(python3 -c "import json;print(json.load(open('$T/s/state.json'))['listen'].rsplit(':',1)[1])")
export PGPASSWORD=pw-bench-backup
PSQL=(psql "host=127.0.0.1 port=$PORT user=atrest dbname=postgres sslmode=require" -X -q -A -t -v ON_ERROR_STOP=1)
ROWS=$((MB * 1024 / 4))   # ~4 KB per row
"${PSQL[@]}" -c "CREATE TABLE blobs (id int PRIMARY KEY, b blob)"
"${PSQL[@]}" -c "INSERT INTO blobs SELECT value, randomblob(4000) FROM generate_series(1, $ROWS)"
now() { date +%s.%N; }
t0=$(now); "$BIN" server backup --data "$T/s" > "$T/b1.json"; t1=$(now)
# Under a write load: a client updating rows while the backup runs.
( for i in $(seq 1 400); do "${PSQL[@]}" -c "UPDATE blobs SET b = randomblob(4000) WHERE id = $i" >/dev/null; done ) & W=$!
t2=$(now); "$BIN" server backup --data "$T/s" > "$T/b2.json"; t3=$(now)
wait $W
t4=$(now); "$BIN" server backup verify --data "$T/s" > /dev/null; t5=$(now)
ID=$(python3 -c "import json;print(json.load(open('$T/b1.json'))['id'])")
kill $SRV; wait $SRV 2>/dev/null || true
t6=$(now); "$BIN" server restore --from "$T/s/backups/backups/$ID" --name copy --data "$T/r" --listen 127.0.0.1:0 >/dev/null; t7=$(now)
python3 - "$T" "$t0" "$t1" "$t2" "$t3" "$t4" "$t5" "$t6" "$t7" <<'PY'
import json, sys
t = sys.argv[1]; x = list(map(float, sys.argv[2:]))
b1 = json.load(open(f"{t}/b1.json")); b2 = json.load(open(f"{t}/b2.json"))
mb = b1["size_bytes"] / 1e6
r = {
  "bench": "backup", "megabytes": round(mb, 1),
  "backup_idle_s": round(x[1]-x[0], 3), "backup_idle_mb_s": round(mb/(x[1]-x[0]), 1),
  "backup_under_writes_s": round(x[3]-x[2], 3), "backup_under_writes_mb_s": round(b2["size_bytes"]/1e6/(x[3]-x[2]), 1),
  "verify_all_s": round(x[5]-x[4], 3), "verify_mb_s": round((b1["size_bytes"]+b2["size_bytes"])/1e6/(x[5]-x[4]), 1),
  "restore_s": round(x[7]-x[6], 3), "restore_mb_s": round(mb/(x[7]-x[6]), 1),
}
print(json.dumps(r))
print(f"summary: backup {r['backup_idle_mb_s']} MB/s idle, {r['backup_under_writes_mb_s']} MB/s under writes; verify {r['verify_mb_s']} MB/s; restore {r['restore_mb_s']} MB/s ({r['megabytes']} MB)")
PY
