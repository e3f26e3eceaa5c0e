#!/usr/bin/env bash
# make test-ray: the tiny run's experts and oracles stages as Ray tasks on a local cluster started
# here (a head and two worker nodes on localhost), mixed with the local path both ways (some files
# cached by the local run beforehand, some deleted afterwards and retrained locally), give files
# byte-identical to the local run's; both worker nodes train; a worker whose packages differ from
# the driver's refuses the job.
# usage: tests/ray_check.sh VENV_PYTHON LOCAL_TINY_WORK (models/work/tiny after make models-tiny)
set -euo pipefail
VPY=$1
LOCAL=$(cd "$2" && pwd)
RAY=$(dirname "$VPY")/ray
cd "$(dirname "$0")/../models"
for f in suite.json experts oracles; do
  [ -e "$LOCAL/$f" ] || { echo "ray_check: $LOCAL/$f missing: run make models-tiny first" >&2; exit 1; }
done
W=$(mktemp -d)
export RAY_USAGE_STATS_ENABLED=0 OMP_WAIT_POLICY=PASSIVE
trap '"$RAY" stop --force >/dev/null 2>&1 || true; rm -rf "$W"' EXIT
PORT=$("$VPY" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
ADDR=127.0.0.1:$PORT
"$RAY" start --head --node-ip-address=127.0.0.1 --port="$PORT" --num-cpus=0 --include-dashboard=false \
  --object-store-memory=100000000 --disable-usage-stats >"$W/head.log" 2>&1 || { cat "$W/head.log"; exit 1; }
for i in 1 2; do
  "$RAY" start --address="$ADDR" --node-ip-address=127.0.0.1 --num-cpus=2 --object-store-memory=100000000 \
    >"$W/worker$i.log" 2>&1 || { cat "$W/worker$i.log"; exit 1; }
done

mkdir -p "$W/work/experts"
cp "$LOCAL/suite.json" "$W/work/"
ls "$LOCAL/experts/"*.npz | head -2 | xargs -I{} cp {} "$W/work/experts/"
"$VPY" -m pipeline.run --tiny --work "$W/work" --only experts --ray-address "$ADDR" 2>&1 | grep -v 'it/s\]\|s/it\]'
"$VPY" -m pipeline.run --tiny --work "$W/work" --only oracles --ray-address "$ADDR" 2>&1 | grep -v 'it/s\]\|s/it\]'

# a worker that would compute other bits refuses: the driver's fingerprint with another torch
"$VPY" - "$ADDR" "$W/work" <<'PY'
import sys

import ray

from pipeline import scale
from pipeline.work import Work

w = Work(True, sys.argv[2])
task = w.suite["experts"][0]
want = dict(scale.fingerprint(), torch="0.0-not-this")
ray.init(address=sys.argv[1], runtime_env={"py_modules": [scale.HERE]}, log_to_driver=False, logging_level="WARNING")
ref = ray.remote(num_cpus=2, max_retries=0)(scale._ray_train).remote(w.cfg, task.to_json(), 1000, 2, want)
try:
    ray.get(ref)
except ray.exceptions.RayTaskError as e:
    msg = str(e)
    assert "torch: driver 0.0-not-this" in msg, msg
    print("ray_check: a worker with other packages refused the job:", msg.strip().splitlines()[-1])
else:
    raise SystemExit("ray_check: a worker trained a job whose fingerprint differs from its own")
PY
"$RAY" stop --force >/dev/null 2>&1

# what Ray trained, and on how many nodes
nodes=$("$VPY" -c '
import json, sys
runs = [json.load(open(f)) for f in sys.argv[1:]]
print(len({r["node"] for r in runs if r["on"] == "ray"}))' "$W/work/"{experts,oracles}/*.run.json)
[ "$nodes" -ge 2 ] || { echo "ray_check: the jobs ran on $nodes worker node(s), not both" >&2; exit 1; }

# two files Ray trained are deleted and retrained by the local path
ls "$W/work/experts/"*.npz | tail -2 | xargs rm
"$VPY" -m pipeline.run --tiny --work "$W/work" --only experts 2>&1 | grep -v 'it/s\]\|s/it\]'

(cd "$LOCAL" && sha256sum experts/*.npz oracles/*.npz) >"$W/local.sha"
n=$(wc -l <"$W/local.sha")
(cd "$W/work" && sha256sum -c --quiet "$W/local.sha") || { echo "ray_check: files differ from the local run's" >&2; exit 1; }
[ "$(ls "$W/work/"{experts,oracles}/*.npz | wc -l)" -eq "$n" ] || { echo "ray_check: file count differs" >&2; exit 1; }
echo "ray_check: $n expert and oracle files byte-identical to the local run's (Ray on $nodes worker nodes, mixed with the local path)"
