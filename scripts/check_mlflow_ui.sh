#!/usr/bin/env bash
# Check a study's MLflow UI in a real headless browser.
#
#   scripts/check_mlflow_ui.sh STUDY_DIR [OUT_DIR]
#
# Serves `mlflow server` over STUDY_DIR/mlflow.db on 127.0.0.1 (a free port; job execution off,
# one worker, started in OUT_DIR), opens pages in headless Chromium (--dump-dom, --screenshot)
# and checks, for every study parent run (tag granet.stage=study):
#   - the experiment's runs page and the parent's run page show the parent's name;
#   - the parent's run page lists its child runs (10 at a time: the first min(10, n) required);
#   - one child run's page (the latest child that logged test_acc, else any metric) shows every
#     metric name of the child and the last value of each (as the UI prints numbers: 2.0 -> 2);
#   - the parent's artifacts: for each top-level artifact folder (figures/, tables/) the page of
#     one file in it (a .png in figures/, summary.json in tables/): its artifact tree has a node
#     for every file of the folder, and it previews the selected file (the PNG loaded as an
#     image; summary.json's "status" key in the JSON viewer);
#     the parent must have logged tables/summary.json and at least one figures/*.png.
# Writes into OUT_DIR, which must lie outside STUDY_DIR (default: a new directory under
# ${TMPDIR:-/tmp}): experiment-<id>.html, run-<id>.html/.png, child-<id>.html/.png,
# artifacts-<run id>-<folder>.html/.png, expected.json, result.json, server.log, server.pid,
# chromium.log. Nothing is written into STUDY_DIR. The server is stopped by its PID (process
# group) on exit. Exit status: 0 ok, 1 something is not shown, 2 usage / no store / OUT_DIR
# inside STUDY_DIR, 3 chromium not found, 4 the server did not start.
#
# Environment: PYTHON (default: python), CHROMIUM (default: chromium on PATH), MLFLOW (default:
# the mlflow next to PYTHON), UI_TIME_BUDGET_MS (default 15000).
# Install Chromium on Debian: apt-get update && apt-get install -y chromium
set -euo pipefail

if [ $# -lt 1 ] || [ ! -d "$1" ]; then
  echo "usage: $0 STUDY_DIR [OUT_DIR]" >&2
  exit 2
fi
STUDY_DIR=$(cd "$1" && pwd -P)
if [ $# -ge 2 ]; then
  OUT=$(realpath -m "$2")  # resolved before anything is created
  case "$OUT/" in
    "$STUDY_DIR"/*)
      echo "OUT_DIR=$2: must lie outside the study directory $STUDY_DIR" >&2
      exit 2 ;;
  esac
  mkdir -p "$OUT"
else
  OUT=$(mktemp -d "${TMPDIR:-/tmp}/granet-ui-check.XXXXXX")
fi
echo "UI check output: $OUT"
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
# Started in OUT: anything it creates beside itself stays out of the study directory.
(cd "$OUT" && MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false exec setsid "$MLFLOW" server \
  --backend-store-uri "sqlite:///$DB" --host 127.0.0.1 --port "$PORT" --workers 1 \
  >"$OUT/server.log" 2>&1) &
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

# Expected straight from the store: study parent runs, their children, one child's metrics,
# the parent's artifacts by top-level folder.
"$PY" - "$DB" >"$OUT/expected.json" <<'EOF'
import json, sys
from mlflow.tracking import MlflowClient
c = MlflowClient(tracking_uri=f"sqlite:///{sys.argv[1]}")
exps = [e.experiment_id for e in c.search_experiments()]


def files(run_id, path=None):
    out = []
    for a in c.list_artifacts(run_id, path):
        out += files(run_id, a.path) if a.is_dir else [a.path]
    return out


out = []
for run in c.search_runs(exps, filter_string="tags.`granet.stage` = 'study'", max_results=100):
    kids = c.search_runs([run.info.experiment_id],
                         filter_string=f"tags.`mlflow.parentRunId` = '{run.info.run_id}'",
                         max_results=10000, order_by=["attributes.start_time DESC"])
    with_metrics = [k for k in kids if k.data.metrics]
    pick = next((k for k in with_metrics if "test_acc" in k.data.metrics),
                with_metrics[0] if with_metrics else None)
    folders = {}
    for f in files(run.info.run_id):
        if "/" in f:
            folders.setdefault(f.split("/", 1)[0], []).append(f)
    shown = {}
    for folder, fs in sorted(folders.items()):
        fs.sort()
        pngs = [f for f in fs if f.endswith(".png")]
        summ = [f for f in fs if f.endswith("/summary.json")]
        shown[folder] = {"files": fs, "open": (pngs or summ or fs)[0]}
    out.append({
        "experiment_id": run.info.experiment_id, "run_id": run.info.run_id,
        "name": run.info.run_name, "children": [k.info.run_name for k in kids],
        "child": None if pick is None else {
            "run_id": pick.info.run_id, "name": pick.info.run_name,
            "metrics": dict(sorted(pick.data.metrics.items()))},
        "artifacts": shown,
    })
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

# One line per page to open: URL-path NAME MODE
"$PY" - "$OUT/expected.json" >"$OUT/pages.txt" <<'EOF'
import json, sys, urllib.parse
for p in json.load(open(sys.argv[1])):
    base = f"#/experiments/{p['experiment_id']}/runs"
    print(f"{base} experiment-{p['experiment_id']} dom-only")
    print(f"{base}/{p['run_id']} run-{p['run_id']} shot")
    if p["child"]:
        print(f"{base}/{p['child']['run_id']} child-{p['child']['run_id']} shot")
    for folder, a in p["artifacts"].items():
        path = urllib.parse.quote(a["open"])
        print(f"{base}/{p['run_id']}/artifacts/{path} artifacts-{p['run_id']}-{folder} "
              f"{'shot' if a['open'].endswith('.png') else 'dom-only'}")
EOF
while read -r path name mode; do
  [ -f "$OUT/$name.html" ] && continue
  if [ "$mode" = dom-only ]; then
    browse "$URL/$path" "$name" dom-only
  else
    browse "$URL/$path" "$name"
  fi
done <"$OUT/pages.txt"
rm -rf "$OUT/.chromium-profile"

"$PY" - "$OUT" <<'EOF'
import json, math, re, sys
from pathlib import Path
out = Path(sys.argv[1])


def shows(name, dom):  # the text as a whole text node, not a substring of a longer one
    return re.search(r">\s*" + re.escape(name) + r"\s*<", dom) is not None


def js_number(v):
    """A float as the UI (JavaScript's Number.toString) prints it; None where Python's repr
    and JavaScript differ (exponent forms)."""
    if math.isfinite(v) and v == int(v) and abs(v) < 1e21:
        return str(int(v))
    r = repr(v)
    return None if ("e" in r or not math.isfinite(v)) else r


def read(name):
    p = out / f"{name}.html"
    return p.read_text(errors="replace") if p.is_file() else ""


expected = json.loads((out / "expected.json").read_text())
res = {"parents": [], "ok": bool(expected)}
for p in expected:
    exp_dom, run_dom = read(f"experiment-{p['experiment_id']}"), read(f"run-{p['run_id']}")
    shown = [k for k in p["children"] if shows(k, run_dom)]
    need = min(10, len(p["children"]))
    in_exp, in_run = shows(p["name"], exp_dom), shows(p["name"], run_dom)
    ok = in_exp and in_run and len(shown) >= need
    rec = {"name": p["name"], "run_id": p["run_id"],
           "in_experiment_page": in_exp, "in_run_page": in_run,
           "children": len(p["children"]), "children_shown": len(shown),
           "not_shown": [k for k in p["children"] if k not in shown][:20]}
    # one child's metrics: every name, and every value the UI prints unambiguously
    c = p["child"]
    if c is None:
        rec["child"] = {"ok": False, "why": "no child run with metrics"}
        ok = False
    else:
        dom = read(f"child-{c['run_id']}")
        names_missing = [m for m in c["metrics"] if not shows(m, dom)]
        values_missing = []
        for m, v in c["metrics"].items():
            s = js_number(v)
            if s is not None and f'title="{s}"' not in dom and not shows(s, dom):
                values_missing.append(f"{m}={s}")
        cok = (bool(c["metrics"]) and not names_missing and not values_missing
               and shows(c["name"], dom))
        rec["child"] = {"run_id": c["run_id"], "name": c["name"], "ok": cok,
                        "metrics": len(c["metrics"]),
                        "test_acc": c["metrics"].get("test_acc"),
                        "names_not_shown": names_missing, "values_not_shown": values_missing}
        ok = ok and cok
    # the parent's artifacts
    arts = {}
    files = [f for a in p["artifacts"].values() for f in a["files"]]
    needed = {"tables/summary.json": "tables/summary.json" in files,
              "figures/*.png": any(f.startswith("figures/") and f.endswith(".png")
                                   for f in files)}
    for folder, a in p["artifacts"].items():
        dom = read(f"artifacts-{p['run_id']}-{folder}")
        # the artifact tree holds a node per file (the folder may be drawn collapsed)
        missing = [f for f in a["files"] if not re.search(
            r'data-testid="artifact-tree-node"[^>]*artifact-name="'
            + re.escape(f.rsplit("/", 1)[-1]) + '"', dom)]
        sel = a["open"]
        if sel.endswith(".png"):
            preview = re.search(r'<img[^>]*alt="' + re.escape(sel) + r'"[^>]*src="(blob:|data:)',
                                dom) is not None
        elif sel.endswith(".json"):
            preview = shows('"status"', dom)  # the JSON viewer shows summary.json's keys
        else:
            preview = True
        aok = not missing and shows(sel, dom) and preview
        arts[folder] = {"files": len(a["files"]), "opened": sel, "not_listed": missing,
                        "selected_shown": shows(sel, dom), "preview": preview, "ok": aok}
        ok = ok and aok
    rec["artifacts"] = arts
    rec["artifacts_logged"] = needed
    ok = ok and all(needed.values())
    rec["ok"] = ok
    res["parents"].append(rec)
    res["ok"] = res["ok"] and ok
(out / "result.json").write_text(json.dumps(res, indent=1))
print(json.dumps(res, indent=1))
sys.exit(0 if res["ok"] else 1)
EOF
