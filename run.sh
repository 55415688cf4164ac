#!/usr/bin/env bash
# pickcell's one entry point for a fresh machine: sets everything up, then runs a job.
#
#   ./run.sh demo     set up, then run the main job (a simulated cell at work)
#   ./run.sh test     set up, then run the whole test suite
#   ./run.sh <cmd>    set up, then run any command inside the environment (e.g. pickcell --help)
#
# Set-up is idempotent: it creates or reuses .venv/ at the repository root, and reinstalls only
# when pyproject.toml changed since the last successful install.
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
cd "$root"
venv="$root/.venv"

need_libusb() { ! ldconfig -p 2>/dev/null | grep -q 'libusb-1.0.so.0'; }

# open3d's wheel links against libusb-1.0 at import time.
if need_libusb; then
  echo "[setup] installing system library libusb-1.0-0 (needed by open3d)" >&2
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd="sudo"
  if ! { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq libusb-1.0-0; } >/dev/null 2>&1; then
    echo "[setup] ERROR: could not install libusb-1.0-0. Install it yourself (apt-get install -y libusb-1.0-0) and re-run." >&2
    exit 1
  fi
fi

# The web console's browser tests (tests/console) drive Debian's chromium through Playwright, which
# ships its driver but not a browser. Installed for `./run.sh test` only, and only when missing.
need_chromium() { [ ! -x /usr/bin/chromium ]; }
if [ "${1:-demo}" = "test" ] && need_chromium; then
  echo "[setup] installing chromium (needed by the console's browser tests)" >&2
  sudo_cmd=""
  [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null 2>&1 && sudo_cmd="sudo"
  if ! { $sudo_cmd apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo_cmd apt-get install -y -qq chromium; } >/dev/null 2>&1; then
    echo "[setup] ERROR: could not install chromium. Install it yourself (apt-get install -y chromium) and re-run." >&2
    exit 1
  fi
fi

python_bin="${PYTHON:-python3}"
if [ ! -x "$venv/bin/python" ]; then
  echo "[setup] creating $venv" >&2
  "$python_bin" -m venv "$venv"
fi
stamp="$venv/.pickcell-installed"
want="$(sha256sum pyproject.toml | cut -d' ' -f1)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[setup] installing pickcell and its pinned dependencies into .venv (first run takes a minute)" >&2
  # The environment takes about 2.6 GB (torch, open3d, pybullet, ray). pip unpacks into TMPDIR,
  # which on some machines is a small RAM disk: keep its scratch beside the venv, and say plainly
  # when the disk is too full rather than fail half-way through an install.
  free_kb="$(df -Pk "$root" | awk 'NR==2 {print $4}')"
  if [ ! -f "$stamp" ] && [ -n "$free_kb" ] && [ "$free_kb" -lt 2900000 ]; then
    echo "[setup] ERROR: $((free_kb / 1024)) MB free on the disk holding $root; a new environment needs about 2.8 GB. Free some space and re-run." >&2
    exit 1
  fi
  mkdir -p "$venv/.tmp"
  export TMPDIR="$venv/.tmp"
  "$venv/bin/python" -m pip install -q --upgrade pip
  # torch is pinned (pyproject.toml) to the CPU build. Machines that carry its wheel on local disk
  # (pip's find-links) install it from there; elsewhere, when PyTorch's CPU index is reachable, it
  # is fetched from there instead of PyPI's multi-GB CUDA build.
  extra=()
  if "$venv/bin/python" -c "import socket; socket.setdefaulttimeout(3); socket.create_connection(('download.pytorch.org', 443)).close()" 2>/dev/null; then
    extra=(--extra-index-url https://download.pytorch.org/whl/cpu)
  fi
  "$venv/bin/python" -m pip install -q "${extra[@]}" -e ".[dev]"
  echo "$want" > "$stamp"
  rm -rf "$venv/.tmp"
  unset TMPDIR
fi
export PATH="$venv/bin:$PATH"
export MPLBACKEND=Agg

job="${1:-demo}"
[ $# -gt 0 ] && shift
case "$job" in
  demo) exec pickcell demo "$@" ;;
  test) exec python -m pytest "$@" ;;
  *)    exec "$job" "$@" ;;
esac
