#!/usr/bin/env bash
# Start an MLflow tracking server unless one already answers at HOST:PORT (idempotent: ray_cluster.yaml
# runs it on every `ray up`, and a second run while the first server lives does nothing).
#
#   scripts/start_mlflow_server.sh HOST PORT BACKEND_STORE_URI ARTIFACTS_DESTINATION [STATE_DIR]
#
# HOST: the address to bind (on a cluster: the head's private IP; workers log to http://HOST:PORT).
# BACKEND_STORE_URI: sqlite:////abs/path.db (on shared storage) or postgresql+psycopg://user:pw@host/db.
# ARTIFACTS_DESTINATION: a directory (shared storage) or s3://bucket/prefix (needs boto3: the
#   [cluster] extra; credentials from the node's instance profile). Artifacts are proxied by the
#   server, so workers only need HTTP access to it.
# STATE_DIR (default ~/.granet-mlflow): mlflow.log, mlflow.pid (the server's process group), lock.
#
# Host headers accepted: HOST:PORT (the workers' URL) and localhost / 127.0.0.1 (an SSH tunnel
# `ssh -L PORT:HOST:PORT`); MLflow's default refuses any other name or address with 403.
# The server runs in its own session (setsid), with one worker and no job runner
# (MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false: 2 processes, ~0.5 GiB instead of 13 and 2.6 GiB).
# Stop it with: kill -- -"$(cat STATE_DIR/mlflow.pid)"
set -euo pipefail

if [ $# -lt 4 ]; then
    sed -n '4,5p' "$0" >&2
    exit 2
fi
host=$1
port=$2
backend=$3
artifacts=$4
state=${5:-$HOME/.granet-mlflow}
url="http://$host:$port"
python=${PYTHON:-python3}

answers() {
    "$python" - "$url/health" <<'EOF'
import sys, urllib.request
try:
    with urllib.request.urlopen(sys.argv[1], timeout=3) as r:
        sys.exit(0 if r.status == 200 else 1)
except Exception:
    sys.exit(1)
EOF
}

mkdir -p "$state"
exec 9>"$state/lock"
flock 9  # two concurrent runs: the second waits, then finds the first's server answering

if answers; then
    echo "mlflow server already answers at $url: nothing to do"
    exit 0
fi

pid=""
if [ -s "$state/mlflow.pid" ]; then
    pid=$(cat "$state/mlflow.pid")
    # a stale file (that server is gone, its PID maybe reused after a reboot): start anew
    if ! tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q "mlflow server"; then
        pid=""
    fi
fi

if [ -z "$pid" ]; then
    case "$backend" in
        sqlite:////*) mkdir -p "$(dirname "/${backend#sqlite:////}")" ;;
    esac
    case "$artifacts" in
        *://*) ;;
        *) mkdir -p "$artifacts" ;;
    esac
    MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid nohup mlflow server \
        --backend-store-uri "$backend" --artifacts-destination "$artifacts" \
        --host "$host" --port "$port" --workers 1 \
        --allowed-hosts "$host,$host:$port,localhost,localhost:$port,127.0.0.1,127.0.0.1:$port" \
        >>"$state/mlflow.log" 2>&1 </dev/null 9>&- &
    pid=$!
    echo "$pid" >"$state/mlflow.pid"
    echo "mlflow server starting at $url (pid $pid, log $state/mlflow.log)"
else
    echo "mlflow server (pid $pid) is starting: waiting for $url"
fi

for _ in $(seq 1 180); do
    if answers; then
        echo "mlflow server answers at $url"
        exit 0
    fi
    if ! kill -0 "$pid" 2>/dev/null; then
        echo "mlflow server exited; last lines of $state/mlflow.log:" >&2
        tail -n 20 "$state/mlflow.log" >&2
        exit 1
    fi
    sleep 1
done
echo "mlflow server did not answer at $url within 180 s (log: $state/mlflow.log)" >&2
exit 1
