#!/usr/bin/env bash
# Install the real data the tests and benchmarks read: Fashion-MNIST from Debian's `dataset-fashion-mnist`
# (four gzipped idx files in /usr/share/datasets/fashion-mnist). Idempotent; a no-op when already installed.
set -euo pipefail

DIR=/usr/share/datasets/fashion-mnist
PKG=dataset-fashion-mnist

if [ -f "$DIR/train-images-idx3-ubyte.gz" ] && [ -f "$DIR/t10k-labels-idx1-ubyte.gz" ]; then
  echo "[setup_data] Fashion-MNIST already in $DIR"
  exit 0
fi

SUDO=""
[ "$(id -u)" -ne 0 ] && SUDO="sudo -n"
apt_get() { $SUDO env DEBIAN_FRONTEND=noninteractive apt-get -q -y "$@" >/dev/null; }

if ! apt_get install "$PKG" 2>/dev/null; then
  apt_get update
  apt_get install "$PKG"
fi
echo "[setup_data] installed $PKG: Fashion-MNIST in $DIR"
