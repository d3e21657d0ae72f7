#!/usr/bin/env bash
# Online DEK rotation of a real server (release build):
#   cargo build --release -p atrest && scripts/bench-rotation.sh [MB] [SECONDS]
# Loads about MB megabytes (default 200) into a server (with the
# infrastructure layer when INFRA=1), then measures in one run:
#   * pgbench TPS with no rotation (SECONDS, default 15, 4 clients);
#   * pgbench TPS while a rotation runs at the default throttle
#     (dek_rotation.pages_per_second, 2000 pages/s);
#   * rotation throughput unthrottled, idle, and under the pgbench load
#     with rotations back to back for the whole run (and the TPS then).
# Prints JSON and a summary line.
set -euo pipefail
MB=${1:-200}
SECS=${2:-15}
BIN=${ATREST_BIN:-$(dirname "$0")/../target/release/atrest}
T=$(mktemp -d)
trap 'kill $SRV 2>/dev/null || true; wait $SRV 2>/dev/null || true; rm -rf "$T"' EXIT
echo "pw-bench-rotation" > "$T/pw"
EXTRA=()
[ "${INFRA:-0}" = 1 ] && EXTRA=(--infrastructure-encryption --infra-keystore "$T/iks")
"$BIN" server create --name bench --data "$T/s" --keystore "$T/ks" --admin-password-file "$T/pw" --listen 127.0.0.1:0 "${EXTRA[@]}" >/dev/null
"$BIN" server start --data "$T/s" 2>"$T/log" & SRV=$!
for _ in $(seq 200); do grep -q '"Ready"' "$T/s/state.json" 2>/dev/null && break; sleep 0.1; done
PORT=$(python3 -c "import json;print(json.load(open('$T/s/state.json'))['listen'].rsplit(':',1)[1])")
export PGPASSWORD=pw-bench-rotation
CONN="host=127.0.0.1 port=$PORT user=atrest dbname=postgres sslmode=require"
PSQL=(psql "$CONN" -X -q -A -t -v ON_ERROR_STOP=1)
ROWS=$((MB * 1024 / 4))   # ~4 KB per row
"${PSQL[@]}" -c "CREATE TABLE blobs (id int PRIMARY KEY, b blob)"
"${PSQL[@]}" -c "INSERT INTO blobs SELECT value, randomblob(4000) FROM generate_series(1, $ROWS)"
"${PSQL[@]}" -c "CREATE TABLE accounts (aid int PRIMARY KEY, abalance int NOT NULL);
  CREATE TABLE history (aid int, delta int);
  INSERT INTO accounts SELECT value, 0 FROM generate_series(1, 10000)"
cat > "$T/bench.sql" <<'SQL'
\set aid random(1, 10000)
\set delta random(-5000, 5000)
BEGIN;
UPDATE accounts SET abalance = abalance + :delta WHERE aid = :aid;
SELECT abalance FROM accounts WHERE aid = :aid;
INSERT INTO history (aid, delta) VALUES (:aid, :delta);
END;
SQL
bench() { pgbench -n -f "$T/bench.sql" -M prepared -c 4 -j 2 -T "$1" "$CONN" 2>/dev/null | sed -n 's/^tps = \([0-9.]*\).*/\1/p'; }
rotate() { "$BIN" server rotate-dek --data "$T/s" "$@" >/dev/null 2>&1; }
pages() { python3 -c "import json,sys;d=json.load(open('$T/s/dek-rotation.json'))['databases'];print(sum(p['pages_total'] for p in d if p['database']=='postgres'))"; }
now() { date +%s.%N; }

sync; tps_base=$(bench "$SECS")
rotate                      # default throttle, in the background
sync; tps_throttled=$(bench "$SECS")
rotate --pages-per-second 100000000 --wait   # let it finish
t0=$(now); rotate --pages-per-second 100000000 --wait; t1=$(now)
P1=$(pages)
# Under load: rotations back to back while pgbench runs.
bench "$SECS" > "$T/tps_load" & B=$!
t2=$(now); P2=0
while kill -0 $B 2>/dev/null; do
  rotate --pages-per-second 100000000 --wait
  P2=$((P2 + $(pages)))
  t3=$(now)
done
wait $B; tps_load=$(cat "$T/tps_load")
python3 - "$tps_base" "$tps_throttled" "$tps_load" "$t0" "$t1" "$t2" "$t3" "$P1" "$P2" "${INFRA:-0}" <<'PY'
import json, sys
a = sys.argv[1:]
base, thr, load = float(a[0]), float(a[1]), float(a[2])
t0, t1, t2, t3 = map(float, a[3:7]); p1, p2 = int(a[7]), int(a[8])
mb_idle = p1 * 4096 / 1e6 / (t1 - t0); mb_load = p2 * 4096 / 1e6 / (t3 - t2)
r = {"bench": "dek-rotation", "scenario": 2 if a[9] == "1" else 1,
     "database_mb": round(p1 * 4096 / 1e6, 1),
     "rotation_idle_s": round(t1 - t0, 2), "rotation_idle_mb_s": round(mb_idle, 1),
     "rotation_under_pgbench_s": round(t3 - t2, 2), "rotation_under_pgbench_mb_s": round(mb_load, 1),
     "tps_no_rotation": base, "tps_default_throttle": thr, "tps_unthrottled_rotation": load,
     "tps_cost_default_throttle": round(1 - thr / base, 3),
     "tps_cost_unthrottled": round(1 - load / base, 3)}
print(json.dumps(r))
print(f"summary: rotation {r['rotation_idle_mb_s']} MB/s idle, {r['rotation_under_pgbench_mb_s']} MB/s under pgbench "
      f"({r['database_mb']} MB); pgbench TPS {base:.0f} without, {thr:.0f} at the default throttle "
      f"({r['tps_cost_default_throttle']*100:.1f}% cost), {load:.0f} unthrottled ({r['tps_cost_unthrottled']*100:.1f}% cost)")
PY
