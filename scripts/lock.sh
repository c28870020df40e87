#!/bin/sh
# Regenerates the lock files (`make lock` runs it) with uv's resolver:
#
#   requirements.lock        the service's dependencies (pyproject.toml [project.dependencies]),
#                            every version pinned, every file's sha256 listed; the image and
#                            `make local`/`make test` install it with pip --require-hashes
#   requirements-build.lock  the build backend (pyproject.toml [build-system] requires), for
#                            the image's builder stage
#
#   sh scripts/lock.sh [OUT_DIR] [uv pip compile options...]   (default OUT_DIR: the checkout)
#
# One resolution for every platform (--universal: markers are kept, so the same file serves
# x86_64 and arm64 images) and for the oldest Python the project supports (3.11, the image's).
# Versions already in OUT_DIR's files are kept unless pyproject.toml no longer allows them;
# `--upgrade` moves everything to the newest allowed, `--upgrade-package NAME` one package.
set -eu
root=$(cd "$(dirname "$0")/.." && pwd)
out=${1:-$root}
[ $# -gt 0 ] && shift
uv=${UV:-$(dirname "$(command -v python3)")/uv}
[ -x "$uv" ] || uv=uv
cd "$root"
common="--universal --python-version 3.11 --generate-hashes --no-header --quiet"
# shellcheck disable=SC2086
"$uv" pip compile pyproject.toml $common -o "$out/requirements.lock" "$@"
python3 -c 'import tomllib; print("\n".join(tomllib.load(open("pyproject.toml", "rb"))["build-system"]["requires"]))' |
    "$uv" pip compile - $common -o "$out/requirements-build.lock" "$@"
