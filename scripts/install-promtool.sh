#!/bin/sh
# Puts promtool, from Debian's `prometheus` package, into a bin directory (default .venv/bin)
# for the alert and /metrics checks of tests/deploy/test_deploy.py. Only that one binary is taken out
# of the package (it needs nothing but libc): no Prometheus server is installed or started.
#
#   sh scripts/install-promtool.sh [BIN_DIR]       (`make test` runs it)
#
# Does nothing when BIN_DIR or PATH already has a promtool. Needs apt-get; `apt-get update`
# runs first if the package lists are missing (as root, or through sudo).
set -eu

bin_dir=${1:-.venv/bin}
if [ -x "$bin_dir/promtool" ] || command -v promtool >/dev/null 2>&1; then
    exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
    echo "install-promtool: no apt-get here; install promtool (part of Prometheus) on PATH" >&2
    exit 1
fi
mkdir -p "$bin_dir"
bin_dir=$(cd "$bin_dir" && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"

echo "install-promtool: fetching Debian's prometheus package for promtool"
if ! apt-get download prometheus >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" = 0 ] || sudo=sudo
    $sudo apt-get update -qq
    apt-get download prometheus >/dev/null 2>&1 || apt-get download prometheus
fi
dpkg-deb --fsys-tarfile prometheus_*.deb | tar -x ./usr/bin/promtool
install -m 0755 usr/bin/promtool "$bin_dir/promtool"
"$bin_dir/promtool" --version 2>&1 | head -n 1
