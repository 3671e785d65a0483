#!/usr/bin/env bash
# Check a study's MLflow UI in a real headless browser.
#
#   scripts/check_mlflow_ui.sh STUDY_DIR [OUT_DIR]
#
# Serves `mlflow server` over STUDY_DIR/mlflow.db on 127.0.0.1 (a free port; job execution off,
# one worker), opens the experiment's runs page and every study parent run's page in headless
# Chromium (--dump-dom and --screenshot), and checks that each parent run's name and its child
# runs' names appear (the run page lists child runs 10 at a time: the first min(10, n) are
# required). Writes into OUT_DIR (default STUDY_DIR/ui-check): experiment-<id>.html,
# run-<run_id>.html/.png, expected.json, result.json, server.log, server.pid. The server is
# stopped by its PID (process group) on exit. Exit status: 0 ok, 1 a name is missing, 2 usage /
# no store, 3 chromium not found, 4 the server did not start.
#
# Environment: PYTHON (default: python), CHROMIUM (default: chromium on PATH), MLFLOW (default:
# the mlflow next to PYTHON), UI_TIME_BUDGET_MS (default 15000).
# Install Chromium on Debian: apt-get update && apt-get install -y chromium
set -euo pipefail

if [ $# -lt 1 ] || [ ! -d "$1" ]; then
  echo "usage: $0 STUDY_DIR [OUT_DIR]" >&2
  exit 2
fi
STUDY_DIR=$(cd "$1" && pwd)
OUT=${2:-$STUDY_DIR/ui-check}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
PY=${PYTHON:-python}
DB="$STUDY_DIR/mlflow.db"
if [ ! -f "$DB" ]; then
  echo "no MLflow store at $DB" >&2
  exit 2
fi
CHROMIUM=${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}
if [ -z "$CHROMIUM" ]; then
  echo "chromium not found (Debian: apt-get install -y chromium)" >&2
  exit 3
fi
MLFLOW=${MLFLOW:-$(dirname "$(command -v "$PY")")/mlflow}
BUDGET=${UI_TIME_BUDGET_MS:-15000}
PORT=$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
URL="http://127.0.0.1:$PORT"

# setsid: the server leads its own process group, so it and its workers stop by this PID.
MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false setsid "$MLFLOW" server \
  --backend-store-uri "sqlite:///$DB" --host 127.0.0.1 --port "$PORT" --workers 1 \
  >"$OUT/server.log" 2>&1 &
SERVER_PID=$!
echo "$SERVER_PID" >"$OUT/server.pid"
stop_server() {
  kill -TERM -- "-$SERVER_PID" 2>/dev/null || true
  for _ in $(seq 1 40); do
    kill -0 "$SERVER_PID" 2>/dev/null || return 0
    sleep 0.25
  done
  kill -KILL -- "-$SERVER_PID" 2>/dev/null || true
}
trap stop_server EXIT

for _ in $(seq 1 180); do
  if "$PY" -c "import urllib.request,sys; urllib.request.urlopen('$URL/health', timeout=2)" \
       2>/dev/null; then
    break
  fi
  if ! kill -0 "$SERVER_PID" 2>/dev/null; then
    echo "mlflow server exited; see $OUT/server.log" >&2
    exit 4
  fi
  sleep 0.5
done
if ! "$PY" -c "import urllib.request; urllib.request.urlopen('$URL/health', timeout=2)"; then
  echo "mlflow server did not answer on $URL; see $OUT/server.log" >&2
  exit 4
fi

# Expected names straight from the store: study parent runs and their children.
"$PY" - "$DB" >"$OUT/expected.json" <<'EOF'
import json, sys
from mlflow.tracking import MlflowClient
c = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}")
exps = [e.experiment_id for e in c.search_experiments()]
out = []
for run in c.search_runs(exps, filter_string="tags.`granet.stage` = 'study'", max_results=100):
    kids = c.search_runs([run.info.experiment_id],
                         filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
                         max_results=10000, order_by=["attributes.start_time DESC"])
    out.append({"experiment_id": run.info.experiment_id, "run_id": run.info.run_id,
                "name": run.info.run_name, "children": [k.info.run_name for k in kids]})
print(json.dumps(out, indent=1))
EOF

browse() {  # browse URL NAME [dom-only]: DOM (and screenshot) of one page
  local flags=(--headless --no-sandbox --disable-gpu --disable-quic --no-first-run
    --disable-background-networking --disable-component-update --disable-sync
    --hide-scrollbars --window-size=1400,1000 "--virtual-time-budget=$BUDGET")
  timeout 120 "$CHROMIUM" "${flags[@]}" "--user-data-dir=$OUT/.chromium-profile" \
    --dump-dom "$1" >"$OUT/$2.html" 2>>"$OUT/chromium.log" || true
  [ "${3:-}" = dom-only ] && return 0
  timeout 120 "$CHROMIUM" "${flags[@]}" "--user-data-dir=$OUT/.chromium-profile" \
    "--screenshot=$OUT/$2.png" "$1" >>"$OUT/chromium.log" 2>&1 || true
}

for line in $("$PY" -c "import json; [print(f\"{p['experiment_id']}:{p['run_id']}\")
  for p in json.load(open('$OUT/expected.json'))]"); do
  exp=${line%%:*}
  run=${line#*:}
  [ -f "$OUT/experiment-$exp.html" ] || browse "$URL/#/experiments/$exp/runs" "experiment-$exp" \
    dom-only
  browse "$URL/#/experiments/$exp/runs/$run" "run-$run"
done
rm -rf "$OUT/.chromium-profile"

"$PY" - "$OUT" <<'EOF'
import json, re, sys
from pathlib import Path
out = Path(sys.argv[1])


def shows(name, dom):  # the name as a whole text node, not a substring of a longer name
    return re.search(r">\s*" + re.escape(name) + r"\s*<", dom) is not None


expected = json.loads((out / "expected.json").read_text())
res = {"parents": [], "ok": bool(expected)}
for p in expected:
    exp_dom = (out / f"experiment-{p['experiment_id']}.html").read_text(errors="replace")
    run_dom = (out / f"run-{p['run_id']}.html").read_text(errors="replace")
    shown = [k for k in p["children"] if shows(k, run_dom)]
    need = min(10, len(p["children"]))
    in_exp, in_run = shows(p["name"], exp_dom), shows(p["name"], run_dom)
    ok = in_exp and in_run and len(shown) >= need
    res["parents"].append({"name": p["name"], "run_id": p["run_id"],
                           "in_experiment_page": in_exp, "in_run_page": in_run,
                           "children": len(p["children"]), "children_shown": len(shown),
                           "not_shown": [k for k in p["children"] if k not in shown][:20],
                           "ok": ok})
    res["ok"] = res["ok"] and ok
(out / "result.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
sys.exit(0 if res["ok"] else 1)
EOF
