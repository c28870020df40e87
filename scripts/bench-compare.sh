#!/bin/sh
# Before and after in one run: `make bench` at REV (a temporary worktree) and at the working
# tree, back to back on this machine, with the same arguments. Ends with both JSON lines.
#
#   sh scripts/bench-compare.sh REV [bench arguments...]
#   sh scripts/bench-compare.sh HEAD~1 --client fast,null --emulator-records 0
set -eu
rev=${1:?usage: scripts/bench-compare.sh REV [bench arguments...]}
shift
python=${PYTHON:-.venv/bin/python}
here=$(pwd)
before=$(mktemp -d)
trap 'git worktree remove --force "$before" >/dev/null 2>&1 || rm -rf "$before"' EXIT
git worktree add --detach --quiet "$before" "$rev"
[ -e "$before/node_modules" ] || ln -s "$here/node_modules" "$before/node_modules"
echo "== before: $rev ($(git rev-parse --short "$rev"))"
(cd "$before" && PYTHONPATH="$before/src:$before" "$here/$python" -m bench "$@") | tee "$before/.before"
echo "== after: working tree ($(git rev-parse --short HEAD)$(git diff --quiet HEAD -- src bench || echo ', modified'))"
PYTHONPATH="$here/src:$here" "$python" -m bench "$@" | tee "$before/.after"
echo "== records per CPU-second, before -> after"
tail -n 1 "$before/.before"
tail -n 1 "$before/.after"
