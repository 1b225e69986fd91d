#!/bin/sh
# Fill .gpu/ (ignored by git) with what benchmarks/gpu_engine.py needs on a device machine, which
# cannot download anything: the Fashion-MNIST .gz files and a schedulefree wheel (~30 MB in all).
#
#   sh benchmarks/gpu_carry.sh        # then carry ".gpu" with the device run (see gpu_engine.py)
#
# FASHION_MNIST_DIR: where the four .gz files are (default: the system copy); PYTHON: the
# interpreter whose pip downloads the wheel (default: python3).
set -eu
cd "$(dirname "$0")/.."
source_dir=${FASHION_MNIST_DIR:-/usr/share/datasets/fashion-mnist}
mkdir -p .gpu/fashion-mnist .gpu/wheels
cp "$source_dir"/train-images-idx3-ubyte.gz "$source_dir"/train-labels-idx1-ubyte.gz \
   "$source_dir"/t10k-images-idx3-ubyte.gz "$source_dir"/t10k-labels-idx1-ubyte.gz .gpu/fashion-mnist/
"${PYTHON:-python3}" -m pip download --quiet --no-deps schedulefree==1.4.1 -d .gpu/wheels
du -sh .gpu
