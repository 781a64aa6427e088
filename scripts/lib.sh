# Shared helpers for the setup, demo, test and benchmark scripts. Source it; do not run it.
# Everything here is idempotent and quick when the work is already done.

set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${HEPAFLOW_VENV:-$ROOT/.venv}"
export CARGO_TERM_COLOR="${CARGO_TERM_COLOR:-never}"

log() { printf '[hepaflow] %s\n' "$*" >&2; }

as_root() {
  if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi
}

# apt_install PKG...: installs the Debian packages that are missing.
apt_install() {
  local missing=()
  for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  if [ "${#missing[@]}" -gt 0 ]; then
    log "installing Debian packages: ${missing[*]}"
    as_root env DEBIAN_FRONTEND=noninteractive apt-get update -qq
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
}

# system_deps: what the build and the tests need from Debian.
system_deps() {
  # postgresql-15: the server binaries for the embedded cluster and the tests' own cluster.
  apt_install ca-certificates python3 python3-venv python3-pip pkg-config postgresql-15
}

# test_deps: what only the tests need from Debian: the browser the dashboard tests drive.
test_deps() {
  apt_install chromium chromium-driver
}

# python_env NAME REQUIREMENTS_FILE: a venv under $VENV (NAME "" = the main one) with the
# pinned requirements; reinstalled only when the requirements file changes.
python_env() {
  local dir="$1" req="$2"
  local stamp="$dir/.requirements.sha256"
  local want
  want="$(sha256sum "$req" | cut -d' ' -f1)"
  if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ] && [ -x "$dir/bin/python" ]; then
    return 0
  fi
  log "creating Python environment $(basename "$dir") from $(basename "$req")"
  if [ ! -x "$dir/bin/python" ]; then
    python3 -m venv "$dir" || { apt_install python3-venv; rm -rf "$dir"; python3 -m venv "$dir"; }
  fi
  "$dir/bin/python" -m pip install -q --disable-pip-version-check -r "$req"
  echo "$want" >"$stamp"
}

# torch_env: PyTorch 2.13.0 from PyPI, whose wheel carries the libtorch that tch links.
# A machine with an NVIDIA GPU gets the full wheel with its CUDA libraries; others the wheel
# alone with the two CUDA runtime pieces libtorch needs to load (about 1.2 GB).
TORCH_VENV="${HEPAFLOW_TORCH_VENV:-$ROOT/.venv-torch}"
TORCH_VERSION=2.13.0
torch_env() {
  local kind=cpu
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then kind=cuda; fi
  local stamp="$TORCH_VENV/.torch-$TORCH_VERSION-$kind"
  if [ ! -f "$stamp" ]; then
    log "installing PyTorch $TORCH_VERSION ($kind) for libtorch into $(basename "$TORCH_VENV")"
    [ -x "$TORCH_VENV/bin/python" ] || python3 -m venv "$TORCH_VENV"
    if [ "$kind" = cuda ]; then
      "$TORCH_VENV/bin/python" -m pip install -q --disable-pip-version-check "torch==$TORCH_VERSION"
    else
      "$TORCH_VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
        "torch==$TORCH_VERSION" nvidia-cuda-runtime==13.0.96 nvidia-cuda-cupti==13.0.85
    fi
    touch "$stamp"
  fi
  LIBTORCH="$(echo "$TORCH_VENV"/lib/python3*/site-packages/torch)"
  export LIBTORCH
}

# build: release build of the binary (linked to libtorch with an rpath: no LD_LIBRARY_PATH).
build() {
  torch_env
  (cd "$ROOT" && cargo build --release --locked -q)
}
