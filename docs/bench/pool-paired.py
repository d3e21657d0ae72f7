"""Pools the per-round paired ratios (scenario 2 or 4 against the same
round's scenario 1) of several `atrest bench storage` JSON outputs and
prints, per regime and workload, the pooled median and a bootstrap 95%
interval of that median, in wall and in CPU time."""
import json, random, sys

def load(path):
    s = open(path).read()
    return json.JSONDecoder().raw_decode(s)[0]

def paired(runs, side):
    return [100 * (x - y) / y for x, y in zip(runs[side], runs["scenario1"])]

def median(v):
    v = sorted(v)
    n = len(v)
    return v[n // 2] if n % 2 else (v[n // 2 - 1] + v[n // 2]) / 2

def ci(v, rng, n=4000):
    meds = sorted(median([rng.choice(v) for _ in v]) for _ in range(n))
    return meds[int(0.025 * n)], meds[int(0.975 * n)]

rng = random.Random(1)
pooled = {}
for path in sys.argv[1:]:
    for w in load(path)["workloads"]:
        key = (w["regime"], w["workload"])
        p = pooled.setdefault(key, {m: {"scenario2": [], "scenario4": []} for m in ("wall", "cpu")})
        for side in ("scenario2", "scenario4"):
            p["wall"][side] += paired(w["runs_seconds"], side)
            p["cpu"][side] += paired(w["cpu"]["runs_seconds"], side)
rows = []
for (regime, workload), p in pooled.items():
    cells = []
    for m in ("wall", "cpu"):
        for side in ("scenario2", "scenario4"):
            v = p[m][side]
            lo, hi = ci(v, rng)
            cells.append(f"{median(v):+.1f}% [{lo:+.1f}, {hi:+.1f}]")
    n = len(p["wall"]["scenario2"])
    print(f"| {regime} | {workload} | {n} | " + " | ".join(cells) + " |")
