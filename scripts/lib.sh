# Shared set-up steps for scripts/*.sh (sourced, not run).

step() { printf '\n==> %s\n' "$*"; }
die() { printf '\nERROR: %s\n' "$*" >&2; exit 1; }

PYTHON="${PYTHON:-python3}"

ensure_redis_server() {
  if command -v redis-server >/dev/null 2>&1; then return; fi
  step "installing redis-server (Debian package)"
  command -v apt-get >/dev/null || die "redis-server is missing and apt-get is not available; install Redis >= 6 yourself"
  local sudo=""
  [ "$(id -u)" = 0 ] || sudo="sudo"
  $sudo apt-get update -qq || die "apt-get update failed (network?)"
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq redis-server >/dev/null \
    || die "apt-get install redis-server failed"
  # Debian's package starts a system-wide instance; the project starts its own.
  command -v redis-server >/dev/null || die "redis-server still not on PATH"
}

ensure_project_venv() {
  local stamp=.venv/.installed-$(sha1sum pyproject.toml | cut -c1-12)
  if [ -x .venv/bin/python ] && [ -f "$stamp" ]; then return; fi
  step "creating .venv with the project and its dev tools"
  "$PYTHON" -c 'import sys; assert sys.version_info >= (3, 11), sys.version' \
    || die "Python >= 3.11 is required (set PYTHON=...)"
  [ -x .venv/bin/python ] || "$PYTHON" -m venv .venv || die "python -m venv failed"
  .venv/bin/pip install -q --upgrade pip >/dev/null 2>&1 || true
  .venv/bin/pip install -q -e '.[dev]' || die "pip install -e '.[dev]' failed"
  rm -f .venv/.installed-*
  touch "$stamp"
}
