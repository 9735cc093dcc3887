#!/usr/bin/env bash
# Installs Fashion-MNIST (the full 60k/10k) from Debian's dataset-fashion-mnist package.
# Nothing is downloaded at run time by repguide itself; this is the one install step.
set -u
DIR=/usr/share/datasets/fashion-mnist
if ls "$DIR"/train-images-idx3-ubyte.gz >/dev/null 2>&1; then
    echo "Fashion-MNIST: found in $DIR"
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Fashion-MNIST: installing Debian package dataset-fashion-mnist"
    apt-get update -qq >/dev/null 2>&1 || true
    if DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends dataset-fashion-mnist >/dev/null; then
        echo "Fashion-MNIST: installed in $DIR"
        exit 0
    fi
fi
echo "Fashion-MNIST: not installed. As root run:"
echo "    apt-get update && apt-get install -y --no-install-recommends dataset-fashion-mnist"
echo "or set REPGUIDE_FASHION_MNIST to a folder holding the four *-ubyte.gz files."
echo "Tests that need it will be skipped."
exit 0
