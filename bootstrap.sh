#!/usr/bin/env bash
# One command from a fresh clone to a result. Sets up (idempotently) a virtual environment with the
# pinned CPU build of PyTorch, lls and its test tools, and Fashion-MNIST, then runs a task:
#
#   ./bootstrap.sh train [lls train options]   SmallConv + LLS (square basis) on Fashion-MNIST, 1 epoch
#   ./bootstrap.sh test [pytest options]       the test suite
#   ./bootstrap.sh lls ARGS...                 any lls command inside the environment
#
# Environment: PYTHON (default python3), LLS_VENV (default .venv), LLS_TORCH (default torch==2.13.0;
# set it to your own build, e.g. a CUDA wheel, on other machines), LLS_EXECUTORCH (default
# executorch==1.5.1: the on-device runtime the edge tests use; empty to leave it out).
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${LLS_VENV:-.venv}
TORCH_SPEC=${LLS_TORCH:-torch==2.13.0}
EXECUTORCH_SPEC=${LLS_EXECUTORCH-executorch==1.5.1}
FASHION_DIR=/usr/share/datasets/fashion-mnist

as_root() {
    if [ "$(id -u)" = 0 ]; then "$@"; elif command -v sudo >/dev/null; then sudo -n "$@"; else return 1; fi
}

setup_venv() {
    if [ ! -x "$VENV/bin/python" ]; then
        echo "bootstrap: creating $VENV" >&2
        if ! "$PYTHON" -m venv "$VENV" 2>/dev/null; then
            # Debian ships venv separately
            rm -rf "$VENV"
            as_root apt-get install -y -qq python3-venv >&2
            "$PYTHON" -m venv "$VENV"
        fi
    fi
    local stamp="$VENV/.lls-installed" want
    want="$(sha256sum <pyproject.toml | cut -c1-16) $TORCH_SPEC $EXECUTORCH_SPEC"
    if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
        echo "bootstrap: installing $TORCH_SPEC and lls into $VENV" >&2
        # torch first and pinned: an unpinned torch would pull a multi-GB CUDA build
        "$VENV/bin/pip" install --disable-pip-version-check -q "$TORCH_SPEC"
        "$VENV/bin/pip" install --disable-pip-version-check -q -e ".[dev]"
        if [ -n "$EXECUTORCH_SPEC" ]; then
            # without its declared requirements (coremltools, pandas, torchao...): what its export,
            # runtime and training import is in the dev extra (pyproject.toml, `edge`); torch stays
            "$VENV/bin/pip" install --disable-pip-version-check -q --no-deps "$EXECUTORCH_SPEC"
        fi
        echo "$want" >"$stamp"
    fi
}

setup_fashion_mnist() {
    [ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ] && return 0
    echo "bootstrap: installing Debian's dataset-fashion-mnist" >&2
    if command -v apt-get >/dev/null && (as_root apt-get update -qq && as_root apt-get install -y -qq \
        dataset-fashion-mnist) >&2; then
        return 0
    fi
    echo "bootstrap: no apt; lls will download Fashion-MNIST (checksum-verified) on first use" >&2
}

task=${1:-train}
[ $# -gt 0 ] && shift
setup_venv
setup_fashion_mnist
case "$task" in
train) exec "$VENV/bin/lls" train "$@" ;;
test) exec "$VENV/bin/python" -m pytest "$@" ;;
lls) exec "$VENV/bin/lls" "$@" ;;
*)
    echo "usage: ./bootstrap.sh train|test|lls [args...]" >&2
    exit 2
    ;;
esac
