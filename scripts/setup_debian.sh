#!/usr/bin/env bash
# Debian packages the project can use: Fashion-MNIST for the large-batch study and the
# --dataset fashion-mnist option of the vision recipe (installs to /usr/share/datasets/fashion-mnist);
# Python's full documentation (python3.11-doc, reST sources under /usr/share/doc/python3.11/html/_sources)
# for the masked-LM study and the fine-tuning task.
set -euo pipefail
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq dataset-fashion-mnist python3.11-doc
