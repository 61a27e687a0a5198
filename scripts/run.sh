#!/usr/bin/env bash
# Run the whole service locally on CPU with the bundled model:
#   bash scripts/run.sh
# Installs what is missing (redis-server, .venv, the vLLM CPU engine venv, the model), then
# starts Redis, vLLM, one worker and the gateway; Ctrl-C stops them all. Logs: var/log/.
#
# Overrides (environment):
#   VLLM_URL=http://gpu-host:8000   use a running vLLM instead of starting one (skips the
#                                   engine install); SERVED_MODEL_NAME must match it
#   MODEL_DIR=/path/to/hf-folder    serve another model folder with the local vLLM
#   SERVED_MODEL_NAME=name          the model id clients send (default SmolLM2-135M-Instruct);
#                                   several, comma-separated, serve the model under each name
#                                   (each a model of its own to the queue, README "Several
#                                   models"), e.g. SmolLM2-135M-Instruct,smol-mini
#   VLLM_ARGS="..."                 more engine flags, after the defaults of local/launch.py
#                                   (--max-model-len 2048 --dtype float32 --enforce-eager);
#                                   a flag given again wins, e.g. "--max-model-len 4096"
#   EMBEDDINGS=0                    no embedding model (by default a second vLLM serves
#                                   all-MiniLM-L6-v2 from its PyPI package on VLLM_EMBED_PORT,
#                                   with its own worker: /v1/embeddings, README "Embeddings")
#   EMBED_MAX_ACTIVE=32             that worker's slots (embedding jobs are short and merged)
#   TOOL_CALL_PARSER=hermes          vLLM's tool-call parser for the served model's family
#                                   (README, "Tool calling"); "none" runs vLLM without tools
#   GATEWAY_PORT=8080 GATEWAY_METRICS_PORT=9101 VLLM_PORT=8000 REDIS_PORT=6379
#   WORKER_METRICS_PORT=9100
#   AUTH=none                       no API keys (otherwise a key "dev" is created and printed)
#   PAYLOAD_KEYS=key[,old-key]      the keys sealing prompts and answers in Redis (otherwise
#                                   one is made once and kept in var/payload-keys)
#   REDIS_HA=1 [SENTINEL_PORT=26379] Redis with failover: a replica on REDIS_PORT+1 and three
#                                   sentinels on SENTINEL_PORT..+2; the services find the
#                                   primary through them (README, "High availability")
#   PROMETHEUS_PORT=9090, or PROMETHEUS=0 to run without Prometheus
#   TRACING=1 [PHOENIX_PORT=6006]  traces (README "Tracing"): Arize Phoenix (installed into
#                                   .cache/phoenix-venv once) on PHOENIX_PORT; the gateway,
#                                   the workers and vLLM send it their spans
#   OPEN_WEBUI=1 [OPEN_WEBUI_PORT=3000]  also Open WebUI (installed into .cache/webui-venv
#                                   once), with compose/open-webui.env's settings, no login
#   MAX_ACTIVE=4 QUEUE_MODE=queue QUEUE_MAX=64 ... (every setting of the service, see README)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

VAR_DIR="${LLMQ_VAR:-$PWD/var}"
LOG_DIR="$VAR_DIR/log"
export GATEWAY_PORT="${GATEWAY_PORT:-8080}"
# This host only; GATEWAY_HOST=0.0.0.0 serves other machines (every route still needs a key).
export GATEWAY_HOST="${GATEWAY_HOST:-127.0.0.1}"
export WORKER_METRICS_PORT="${WORKER_METRICS_PORT:-9100}"
export WORKER_METRICS_HOST="${WORKER_METRICS_HOST:-127.0.0.1}"  # as every port of the local run
export GATEWAY_METRICS_PORT="${GATEWAY_METRICS_PORT:-9101}"
export MAX_ACTIVE="${MAX_ACTIVE:-4}"
REDIS_PORT="${REDIS_PORT:-6379}"
PROMETHEUS="${PROMETHEUS:-1}"
PROMETHEUS_PORT="${PROMETHEUS_PORT:-9090}"
VLLM_PORT="${VLLM_PORT:-8000}"
EMBEDDINGS="${EMBEDDINGS:-1}"
VLLM_EMBED_PORT="${VLLM_EMBED_PORT:-8001}"
EMBED_MAX_ACTIVE="${EMBED_MAX_ACTIVE:-32}"
EMBED_MODEL_NAME="all-MiniLM-L6-v2"
EMBED_WORKER_METRICS_PORT="${EMBED_WORKER_METRICS_PORT:-9102}"
OPEN_WEBUI="${OPEN_WEBUI:-0}"
TRACING="${TRACING:-0}"
PHOENIX_PORT="${PHOENIX_PORT:-6006}"
REDIS_HA="${REDIS_HA:-0}"
SENTINEL_PORT="${SENTINEL_PORT:-26379}"
OPEN_WEBUI_PORT="${OPEN_WEBUI_PORT:-3000}"
SERVED_MODEL_NAME="${SERVED_MODEL_NAME:-SmolLM2-135M-Instruct}"
SAMPLE_MODEL="${SERVED_MODEL_NAME%%,*}"  # the first served name, for the samples printed
VLLM_ARGS="${VLLM_ARGS:-}"
TOOL_CALL_PARSER="${TOOL_CALL_PARSER:-hermes}"
START_ENGINE=1
if [ -n "${VLLM_URL:-}" ]; then START_ENGINE=0; EMBEDDINGS=0; else export VLLM_URL="http://127.0.0.1:$VLLM_PORT"; fi
EMBED_URL="http://127.0.0.1:$VLLM_EMBED_PORT"
export REDIS_URL="${REDIS_URL:-redis://127.0.0.1:$REDIS_PORT/0}"

mkdir -p "$LOG_DIR" "$VAR_DIR/redis"
PIDS=()
NAMES=()

stop_all() {
  trap - EXIT
  trap '' INT TERM  # a second Ctrl-C must not cut the shutdown short
  step "stopping"
  local i
  for ((i = ${#PIDS[@]} - 1; i >= 0; i--)); do
    if kill -0 "${PIDS[$i]}" 2>/dev/null; then
      echo "  stopping ${NAMES[$i]} (pid ${PIDS[$i]})"
      kill -TERM "${PIDS[$i]}" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "${PIDS[$i]}" 2>/dev/null || break; sleep 0.1; done
      kill -KILL "${PIDS[$i]}" 2>/dev/null || true
    fi
  done
  wait 2>/dev/null || true
  echo "  all stopped; logs are in $LOG_DIR"
}
trap 'exit 130' INT TERM  # Ctrl-C during set-up: stop what was started (EXIT trap)
trap stop_all EXIT

# pid_of NAME: the process id of what ``start`` started as NAME.
pid_of() {
  local i
  for i in "${!NAMES[@]}"; do [ "${NAMES[$i]}" = "$1" ] && echo "${PIDS[$i]}"; done
}

# start NAME CMD...: run in the background, log to $LOG_DIR/NAME.log
start() {
  local name=$1; shift
  "$@" >"$LOG_DIR/$name.log" 2>&1 &
  PIDS+=($!)
  NAMES+=("$name")
  echo "  $name started (pid $!, log $LOG_DIR/$name.log)"
}

# The development API key: created on first start (in Redis, whose AOF keeps it across
# runs) and kept in $DEV_KEY_FILE, readable by this user only. AUTH=none skips it.
DEV_KEY_FILE="$VAR_DIR/dev-api-key"
LLMQ_API_KEY=""
ensure_dev_key() {
  if [ "${AUTH:-keys}" = none ]; then LLMQ_API_KEY="none (AUTH=none)"; return; fi
  if [ -s "$DEV_KEY_FILE" ] && .venv/bin/llmq-keys show dev >/dev/null 2>&1; then
    LLMQ_API_KEY=$(cat "$DEV_KEY_FILE"); return
  fi
  .venv/bin/llmq-keys revoke dev >/dev/null 2>&1 || true  # its secret was lost: replace it
  (umask 077; .venv/bin/llmq-keys create dev 2>/dev/null | tail -n1 >"$DEV_KEY_FILE") \
    || die "could not create the development API key (is Redis up?)"
  LLMQ_API_KEY=$(cat "$DEV_KEY_FILE")
  echo "  created the development API key 'dev' ($DEV_KEY_FILE)"
}

# The payload keys (PAYLOAD_KEYS: prompts and answers are sealed before they reach Redis):
# made on first start and kept in $PAYLOAD_KEYS_FILE, readable by this user only, because
# Redis' AOF keeps what they sealed across runs. PAYLOAD_KEYS set by the caller wins.
PAYLOAD_KEYS_FILE="$VAR_DIR/payload-keys"
ensure_payload_keys() {
  if [ -n "${PAYLOAD_KEYS:-}" ]; then export PAYLOAD_KEYS; return; fi
  if [ ! -s "$PAYLOAD_KEYS_FILE" ]; then
    (umask 077; .venv/bin/llmq-keys payload-key >"$PAYLOAD_KEYS_FILE") \
      || die "could not make a payload key"
    echo "  created the payload key ($PAYLOAD_KEYS_FILE)"
  fi
  PAYLOAD_KEYS=$(cat "$PAYLOAD_KEYS_FILE")
  export PAYLOAD_KEYS
}

# Open WebUI as compose's webui profile runs it (compose/open-webui.env, the settings the
# e2e browser test proves), for this host only: no login, nothing downloaded (documents
# would be embedded through the API), the development key.
run_open_webui() {
  mkdir -p "$VAR_DIR/open-webui"
  [ -s "$VAR_DIR/open-webui/secret-key" ] || (umask 077; head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n' >"$VAR_DIR/open-webui/secret-key")
  set -a
  # shellcheck disable=SC1091
  source compose/open-webui.env
  set +a
  export WEBUI_AUTH=False OFFLINE_MODE=True HF_HUB_OFFLINE=1 \
    DATA_DIR="$VAR_DIR/open-webui" OPENAI_API_BASE_URL="http://127.0.0.1:$GATEWAY_PORT/v1" \
    OPENAI_API_KEY="$LLMQ_API_KEY" WEBUI_SECRET_KEY="$(cat "$VAR_DIR/open-webui/secret-key")"
  exec "$WEBUI_VENV/bin/open-webui" serve --host 127.0.0.1 --port "$OPEN_WEBUI_PORT"
}

fail_with_log() {
  echo >&2; tail -n 30 "$LOG_DIR/$1.log" >&2 || true
  die "$1 did not come up: $2 (full log: $LOG_DIR/$1.log)"
}

ensure_redis_server
if [ "$PROMETHEUS" = 1 ] && ! ensure_prometheus_quietly; then
  echo "  (no Prometheus: could not install Debian's prometheus package; continuing without)"
  PROMETHEUS=0
fi
ensure_project_venv
if [ "$START_ENGINE" = 1 ]; then
  ensure_engine_venv
  ensure_model
fi
[ "$EMBEDDINGS" = 1 ] && ensure_embedding_model
[ "$OPEN_WEBUI" = 1 ] && ensure_webui_venv
[ "$TRACING" = 1 ] && ensure_phoenix_venv

step "starting the service"
if [[ "$REDIS_URL" == "redis://127.0.0.1:$REDIS_PORT/0" ]]; then
  if redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1; then
    die "port $REDIS_PORT already has a Redis; set REDIS_PORT=... or REDIS_URL=... to use it"
  fi
  start redis .venv/bin/python -m local.launch redis --port "$REDIS_PORT" \
    --dir "$VAR_DIR/redis" --persistent
  for _ in $(seq 1 50); do redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 && break; sleep 0.1; done
  redis-cli -p "$REDIS_PORT" ping >/dev/null 2>&1 || fail_with_log redis "no PING answer"
  if [ "$REDIS_HA" = 1 ]; then
    # Started fresh each run: the primary on REDIS_PORT (the replica resyncs from it).
    REPLICA_PORT=$((REDIS_PORT + 1))
    start redis-replica .venv/bin/python -m local.launch redis --port "$REPLICA_PORT" \
      --dir "$VAR_DIR/redis-replica" --persistent --replica-of "$REDIS_PORT"
    sentinels=()
    for i in 0 1 2; do
      port=$((SENTINEL_PORT + i))
      start "sentinel-$i" .venv/bin/python -m local.launch sentinel --port "$port" \
        --dir "$VAR_DIR/sentinel-$i" --master-port "$REDIS_PORT"
      sentinels+=("127.0.0.1:$port")
    done
    for i in 0 1 2; do
      port=$((SENTINEL_PORT + i))
      for _ in $(seq 1 50); do redis-cli -p "$port" ping >/dev/null 2>&1 && break; sleep 0.1; done
      redis-cli -p "$port" ping >/dev/null 2>&1 || fail_with_log "sentinel-$i" "no PING answer"
    done
    REDIS_SENTINELS="$(IFS=,; echo "${sentinels[*]}")"
    export REDIS_SENTINELS
  fi
fi

TRACE_FLAGS=()
if [ "$TRACING" = 1 ]; then
  # First, so that every process sends its spans from its start: Phoenix takes OTLP/HTTP
  # on its web port and OTLP/gRPC on PHOENIX_PORT+1 (its data in var/phoenix).
  start phoenix env PHOENIX_WORKING_DIR="$VAR_DIR/phoenix" PHOENIX_PORT="$PHOENIX_PORT" \
    PHOENIX_HOST=127.0.0.1 PHOENIX_GRPC_PORT=$((PHOENIX_PORT + 1)) "$PHOENIX_VENV/bin/phoenix" serve
  wait_http "http://127.0.0.1:$PHOENIX_PORT/healthz" 120 phoenix "$(pid_of phoenix)" \
    || fail_with_log phoenix "no answer on port $PHOENIX_PORT"
  export OTEL_EXPORTER_OTLP_ENDPOINT="http://127.0.0.1:$PHOENIX_PORT"
  # vLLM's own span, a child of the traceparent its worker sends.
  export OTEL_EXPORTER_OTLP_TRACES_PROTOCOL=http/protobuf
  TRACE_FLAGS=(--otlp-traces-endpoint "$OTEL_EXPORTER_OTLP_ENDPOINT/v1/traces")
fi

if [ "$EMBEDDINGS" = 1 ]; then
  # The embedding model on its own vLLM (the pooling runner), loading beside the chat model.
  start vllm-embed env VLLM_CPU_KVCACHE_SPACE=1 OTEL_SERVICE_NAME=vllm-embed .venv/bin/python -m local.launch vllm \
    --python "$ENGINE_VENV/bin/python" --model "$EMBED_MODEL_DIR" --name "$EMBED_MODEL_NAME" \
    --port "$VLLM_EMBED_PORT" --max-num-seqs "$EMBED_MAX_ACTIVE" --max-model-len 256 \
    --tool-call-parser none -- --runner pooling "${TRACE_FLAGS[@]}"
fi
if [ "$START_ENGINE" = 1 ]; then
  # shellcheck disable=SC2086  # VLLM_ARGS is a list of flags
  start vllm env OTEL_SERVICE_NAME=vllm .venv/bin/python -m local.launch vllm --python "$ENGINE_VENV/bin/python" \
    --model "$MODEL_DIR" --name "$SERVED_MODEL_NAME" --port "$VLLM_PORT" \
    --max-num-seqs "$MAX_ACTIVE" --tool-call-parser "$TOOL_CALL_PARSER" -- $VLLM_ARGS \
    "${TRACE_FLAGS[@]}"
  echo "  waiting for vLLM to load the model (about a minute on 2 cores)..."
  wait_http "$VLLM_URL/v1/models" 900 vllm "${PIDS[-1]}" \
    || fail_with_log vllm "no answer on $VLLM_URL/v1/models"
else
  wait_http "$VLLM_URL/v1/models" 60 vllm || die "no vLLM answers on VLLM_URL=$VLLM_URL"
fi

if [ "$EMBEDDINGS" = 1 ]; then
  wait_http "$EMBED_URL/v1/models" 900 vllm-embed "$(pid_of vllm-embed)" \
    || fail_with_log vllm-embed "no answer on $EMBED_URL/v1/models"
fi

ensure_dev_key
ensure_payload_keys
start worker .venv/bin/llmq-worker
if [ "$EMBEDDINGS" = 1 ]; then
  start worker-embed env VLLM_URL="$EMBED_URL" MAX_ACTIVE="$EMBED_MAX_ACTIVE" \
    WORKER_METRICS_PORT="$EMBED_WORKER_METRICS_PORT" .venv/bin/llmq-worker
fi
start gateway .venv/bin/llmq-gateway
wait_http "http://127.0.0.1:$GATEWAY_PORT/health" 60 gateway "${PIDS[-1]}" \
  || fail_with_log gateway "/health is not 200 (is the worker up? see $LOG_DIR/worker.log)"

PROM_LINE=""
if [ "$PROMETHEUS" = 1 ]; then
  targets=(--target "gateway=127.0.0.1:$GATEWAY_METRICS_PORT" --target "worker=127.0.0.1:$WORKER_METRICS_PORT")
  [ "$START_ENGINE" = 1 ] && targets+=(--target "vllm=127.0.0.1:$VLLM_PORT")
  [ "$EMBEDDINGS" = 1 ] && targets+=(--target "worker=127.0.0.1:$EMBED_WORKER_METRICS_PORT" --target "vllm=127.0.0.1:$VLLM_EMBED_PORT")
  .venv/bin/python -m local.prometheus_config --out "$VAR_DIR/prometheus/prometheus.yml" \
    --interval 5s "${targets[@]}"
  start prometheus prometheus --config.file="$VAR_DIR/prometheus/prometheus.yml" \
    --enable-feature=exemplar-storage \
    --storage.tsdb.path="$VAR_DIR/prometheus/data" --web.listen-address="127.0.0.1:$PROMETHEUS_PORT"
  wait_http "http://127.0.0.1:$PROMETHEUS_PORT/-/ready" 30 prometheus "${PIDS[-1]}" \
    || fail_with_log prometheus "not ready on port $PROMETHEUS_PORT"
  PROM_LINE="Prometheus: http://127.0.0.1:$PROMETHEUS_PORT  (alerts: /alerts; try histogram_quantile(0.95, sum by (le) (rate(api_time_to_first_token_seconds_bucket[1m]))))"
fi

HA_LINE=""
if [ "$REDIS_HA" = 1 ]; then
  HA_LINE="Redis HA: primary :$REDIS_PORT, replica :$REPLICA_PORT, sentinels $REDIS_SENTINELS
  (fail over: redis-cli -p $SENTINEL_PORT SENTINEL FAILOVER mymaster)"
fi

EMBED_LINE=""
if [ "$EMBEDDINGS" = 1 ]; then
  EMBED_LINE="  curl http://127.0.0.1:$GATEWAY_PORT/v1/embeddings -H 'Content-Type: application/json' \\
    -H \"Authorization: Bearer \$LLMQ_API_KEY\" -d '{\"model\": \"$EMBED_MODEL_NAME\", \"input\": [\"a first text\", \"a second\"]}'
"
fi

TRACE_LINE=""
if [ "$TRACING" = 1 ]; then
  TRACE_LINE="Traces (Arize Phoenix): http://127.0.0.1:$PHOENIX_PORT  (every request's trace: gateway, queue, worker, vLLM)"
fi

WEBUI_LINE=""
if [ "$OPEN_WEBUI" = 1 ]; then
  start open-webui run_open_webui
  echo "  waiting for Open WebUI (about 30 s)..."
  wait_http "http://127.0.0.1:$OPEN_WEBUI_PORT/health" 300 open-webui "${PIDS[-1]}" \
    || fail_with_log open-webui "/health is not 200 on port $OPEN_WEBUI_PORT"
  WEBUI_LINE="Open WebUI: http://127.0.0.1:$OPEN_WEBUI_PORT  (no login; its data in $VAR_DIR/open-webui)"
fi

cat <<EOT

==> ready: http://127.0.0.1:$GATEWAY_PORT  (OpenAI API under /v1; health /health)
    metrics: http://127.0.0.1:$GATEWAY_METRICS_PORT/metrics (gateway), :$WORKER_METRICS_PORT (worker)

Development API key (kept in $DEV_KEY_FILE; more keys: .venv/bin/llmq-keys --help):
  export LLMQ_API_KEY=$LLMQ_API_KEY

Try it:
  curl -N http://127.0.0.1:$GATEWAY_PORT/v1/chat/completions -H 'Content-Type: application/json' \\
    -H "Authorization: Bearer \$LLMQ_API_KEY" \\
    -d '{"model": "$SAMPLE_MODEL", "stream": true, "messages": [{"role": "user", "content": "What is the capital of France?"}]}'

  .venv/bin/python -c 'import os; from openai import OpenAI; c = OpenAI(base_url="http://127.0.0.1:$GATEWAY_PORT/v1", api_key=os.environ["LLMQ_API_KEY"]); print(c.chat.completions.create(model="$SAMPLE_MODEL", messages=[{"role": "user", "content": "What is the capital of France?"}]).choices[0].message.content)'
$EMBED_LINE

$PROM_LINE
$TRACE_LINE
$HA_LINE
$WEBUI_LINE
Logs: $LOG_DIR/*.log     Ctrl-C stops everything.
EOT

# Stop everything (EXIT trap) on Ctrl-C, or as soon as any process dies.
INTERRUPTED=""
trap 'INTERRUPTED=1' INT TERM
wait -n "${PIDS[@]}" || true
[ -n "$INTERRUPTED" ] && exit 0
for i in "${!PIDS[@]}"; do
  kill -0 "${PIDS[$i]}" 2>/dev/null || echo "ERROR: ${NAMES[$i]} exited; see $LOG_DIR/${NAMES[$i]}.log" >&2
done
exit 1
