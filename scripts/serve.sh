#!/usr/bin/env bash
# A local Prefect server plus a worker that runs the distill deployments.
#   scripts/serve.sh start   # server on 127.0.0.1:$PORT, work pool + limits, deployments, worker (background)
#   scripts/serve.sh stop    # stops the worker and the server
#   scripts/serve.sh status
# State (database, logs, PIDs) lives in .prefect/ under the repository; `rm -rf .prefect` forgets everything.
# Environment: DISTILL_PREFECT_PORT (default 4200), DISTILL_PROFILE (default cpu-demo), DISTILL_POOL (distill-pool),
# DISTILL_PREFECT_HOME (default .prefect: the state folder).
# After a server crash, `scripts/serve.sh start` again restarts just the server; runs in flight carry on.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
PORT=${DISTILL_PREFECT_PORT:-4200}
PROFILE=${DISTILL_PROFILE:-cpu-demo}
POOL=${DISTILL_POOL:-distill-pool}
STATE=${DISTILL_PREFECT_HOME:-$ROOT/.prefect}
BIN=${VENV:-$ROOT/.venv}/bin

export PREFECT_HOME=$STATE
export PREFECT_API_URL=http://127.0.0.1:$PORT/api
export PREFECT_SERVER_ANALYTICS_ENABLED=false DO_NOT_TRACK=1 HF_HUB_OFFLINE=1
export PREFECT_LOGGING_EXTRA_LOGGERS=distill
# Concurrency-slot leases on disk (under PREFECT_HOME), not in server memory: a server restart would otherwise
# forget the leases of running tasks, so their slots are never given back and their next renewal fails.
export PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE=prefect.server.concurrency.lease_storage.filesystem
# The worker looks for new runs every few seconds (the default 10 s is a long wait for a demo).
export PREFECT_WORKER_QUERY_SECONDS=${PREFECT_WORKER_QUERY_SECONDS:-3}
export PATH=$BIN:$PATH

alive() { [[ -f $STATE/$1.pid ]] && kill -0 "$(cat "$STATE/$1.pid")" 2>/dev/null; }

stop_one() {
  local name=$1
  if alive "$name"; then
    local pid; pid=$(cat "$STATE/$name.pid")
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 30); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null || true
    echo "stopped $name (pid $pid)"
  fi
  rm -f "$STATE/$name.pid"
}

start() {
  mkdir -p "$STATE"
  if alive server; then
    echo "server already running (pid $(cat "$STATE/server.pid"))"
  else
    # setsid: the server and its children form their own group, so stop ends all of them.
    setsid prefect server start --host 127.0.0.1 --port "$PORT" >"$STATE/server.log" 2>&1 &
    echo $! >"$STATE/server.pid"
    echo -n "waiting for the Prefect server on $PREFECT_API_URL "
    for _ in $(seq 1 120); do
      if curl -fsS "$PREFECT_API_URL/health" >/dev/null 2>&1; then break; fi
      alive server || { echo; echo "server exited; last lines of $STATE/server.log:"; tail -20 "$STATE/server.log"; exit 1; }
      echo -n "."; sleep 1
    done
    curl -fsS "$PREFECT_API_URL/health" >/dev/null || { echo; echo "server not healthy after 120 s; see $STATE/server.log"; exit 1; }
    echo " up"
  fi
  python -m flows.deployments setup --pool "$POOL"
  python -m flows.deployments deploy --profile "$PROFILE" --pool "$POOL"
  if alive worker; then
    echo "worker already running (pid $(cat "$STATE/worker.pid"))"
  else
    setsid prefect worker start --pool "$POOL" --type process --name "distill-local" >"$STATE/worker.log" 2>&1 &
    echo $! >"$STATE/worker.pid"
  fi
  cat <<EOF

Prefect server: http://127.0.0.1:$PORT (UI), logs in $STATE/server.log and $STATE/worker.log.
Run the pipeline through the deployment:

  export PREFECT_API_URL=$PREFECT_API_URL
  .venv/bin/prefect deployment run distill/full --watch

Stop everything with: make stop   (or scripts/serve.sh stop)
EOF
}

stop() {
  # Worker first, so no run starts on a server that is going away.
  for name in worker server; do
    if alive "$name"; then
      pgid=$(ps -o pgid= -p "$(cat "$STATE/$name.pid")" | tr -d ' ')
      kill -TERM -- "-$pgid" 2>/dev/null || true
    fi
    stop_one "$name"
  done
}

status() {
  for name in server worker; do
    if alive "$name"; then echo "$name: running (pid $(cat "$STATE/$name.pid"))"; else echo "$name: stopped"; fi
  done
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) status ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
