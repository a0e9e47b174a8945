#!/usr/bin/env bash
# The main job on embedded defaults: a short real Flower simulation of Artemis (compression
# both ways, QSGD s=1) and of Flower's own FedAvg side by side, recorded to the default
# SQLite round-history store ($FEDSQUEEZE_HOME/fedsqueeze.db, ~/.fedsqueeze by default),
# ending with a table of accuracy and bytes each way per strategy.
# Fashion-MNIST (small CNN) when its IDX files are present, else the synthetic task.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=.venv/bin/python
FSQ=.venv/bin/fedsqueeze

if [ -f benchmarks/codecs.py ]; then
    echo ">> compression codecs (quick benchmark)"
    "$PY" -m benchmarks.codecs --quick
fi

FSQ_HOME="${FEDSQUEEZE_HOME:-$HOME/.fedsqueeze}"
mkdir -p "$FSQ_HOME"
RESULTS="$FSQ_HOME/demo-results.json"   # run ids of what was just recorded

if "$PY" -c "import sys; from tasks.fashion_mnist import data_available; sys.exit(0 if data_available() else 1)"; then
    TASK=(--task fashion-mnist --local-steps 10 --batch-size 32 --client-lr 0.05)
    echo ">> task: Fashion-MNIST (small CNN), 10 clients, Dirichlet(0.5) label skew"
else
    TASK=(--task synthetic-logreg --local-steps 5 --client-lr 0.5)
    echo ">> Fashion-MNIST IDX files not found (sudo apt-get install dataset-fashion-mnist,"
    echo "   or set FEDSQUEEZE_FMNIST_DIR): using the synthetic logistic-regression task instead"
fi

echo ">> simulation: artemis and flwr-fedavg, 5 rounds, participation p = 0.5"
"$FSQ" simulate \
    --strategy artemis --strategy flwr-fedavg \
    "${TASK[@]}" \
    --clients 10 --participation 0.5 --rounds 5 --seed 0 \
    --timeout 900 \
    --json "$RESULTS"
echo ">> recorded to the round-history store; results in $RESULTS"

# The REST service on the runs just recorded, left running in the background so that the
# printed commands work as pasted (stop it with the kill line printed below).
API_PORT="${FEDSQUEEZE_API_PORT:-8080}"
API_URL="http://127.0.0.1:$API_PORT"
api_up() { "$PY" -c "import httpx, sys; sys.exit(httpx.get('$API_URL/ready', timeout=2).status_code != 200)" 2>/dev/null; }
if api_up; then
    echo ">> REST service already running at $API_URL"
else
    echo ">> starting the REST service at $API_URL (log: $FSQ_HOME/api.log)"
    nohup "$FSQ" api serve --port "$API_PORT" --log-level warning >"$FSQ_HOME/api.log" 2>&1 &
    echo $! >"$FSQ_HOME/api.pid"
    for _ in $(seq 60); do api_up && break; sleep 0.5; done
    api_up || { echo "REST service did not start; see $FSQ_HOME/api.log"; exit 1; }
fi
RUN_ID=$("$PY" -c "import httpx; print(httpx.get('$API_URL/runs', params={'limit': 1}).json()['items'][0]['id'])")
"$FSQ" stats runs --url "$API_URL" --limit 5
echo ">> query the runs just recorded (from the repository root):"
echo "   .venv/bin/fedsqueeze stats rounds $RUN_ID --url $API_URL"
echo "   curl -s $API_URL/runs/$RUN_ID"
echo "   (API docs: $API_URL/docs)"
if [ -f "$FSQ_HOME/api.pid" ]; then
    echo ">> stop the REST service: kill \$(cat $FSQ_HOME/api.pid)"
fi
