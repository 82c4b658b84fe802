#!/usr/bin/env bash
# Debian packages the project can use: Fashion-MNIST for the large-batch study and the
# --dataset fashion-mnist option of the vision recipe (installs to /usr/share/datasets/fashion-mnist).
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq dataset-fashion-mnist
