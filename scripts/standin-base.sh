#!/bin/sh
# A local stand-in for python:3.11-slim, for a machine that reaches a Debian mirror but no
# container registry: Debian bookworm (minbase) with its Python 3.11, pip and venv, laid out as
# the official image is (python, python3, pip on /usr/local/bin; no EXTERNALLY-MANAGED marker),
# committed into buildah's local storage. It is a way to build and check the image offline,
# not a base to ship.
#
#   sh scripts/standin-base.sh [TAG]              (default localhost/python-standin:3.11-slim)
#   make image PYTHON_IMAGE=localhost/python-standin:3.11-slim
#
# Needs root, debootstrap and buildah. MIRROR defaults to the first Debian mirror apt uses here.
set -eu

tag=${1:-localhost/python-standin:3.11-slim}
suite=${SUITE:-bookworm}
if [ -z "${MIRROR:-}" ]; then
    MIRROR=$(sed -n 's|^URIs: \(.*/debian\)$|\1|p; s|^deb \([^ ]*/debian\) .*|\1|p' \
        /etc/apt/sources.list /etc/apt/sources.list.d/*.list /etc/apt/sources.list.d/*.sources \
        2>/dev/null | head -n 1)
fi
MIRROR=${MIRROR:-http://deb.debian.org/debian}

rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
echo "standin-base: debootstrap $suite from $MIRROR"
debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,ca-certificates \
    "$suite" "$rootfs" "$MIRROR" >/dev/null
ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python"
ln -sf /usr/bin/python3.11 "$rootfs/usr/local/bin/python3"
ln -sf /usr/bin/pip3 "$rootfs/usr/local/bin/pip"
rm -f "$rootfs"/usr/lib/python3.*/EXTERNALLY-MANAGED
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/* "$rootfs"/var/log/*
version=$(chroot "$rootfs" /usr/local/bin/python -V)

ctr=$(buildah from scratch)
buildah copy --quiet "$ctr" "$rootfs" / >/dev/null
buildah config --env PATH=/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd python3 \
    --label org.opencontainers.image.description="stand-in for python:3.11-slim (Debian $suite)" \
    "$ctr"
buildah commit --quiet --rm "$ctr" "$tag" >/dev/null
echo "standin-base: $tag ($version)"
