#!/usr/bin/env bash
# Installs Fashion-MNIST (Debian package dataset-fashion-mnist: the four IDX .gz files into
# /usr/share/datasets/fashion-mnist) when it is missing. Needs root or sudo; no-op otherwise.
set -euo pipefail
DIR=/usr/share/datasets/fashion-mnist
if [ -f "$DIR/t10k-images-idx3-ubyte.gz" ] && [ -f "$DIR/train-images-idx3-ubyte.gz" ]; then
  echo "Fashion-MNIST present in $DIR"
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi
echo "Installing Fashion-MNIST (apt-get install -y dataset-fashion-mnist) ..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq dataset-fashion-mnist
ls "$DIR"
