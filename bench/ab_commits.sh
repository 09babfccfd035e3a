#!/usr/bin/env bash
# Interleaved A/B of `loratune train` between two commits (does a change cost speed?), on any CPU:
#   bench/ab_commits.sh REV_A REV_B [ROUNDS] [-- extra train flags]
# Each round trains once with each commit's source (a git worktree, this checkout's .venv), MiniLM on the
# built-in data, 60 steps; prints tokens/s, seconds, precision and threads from each run's results.json.
set -euo pipefail
cd "$(dirname "$0")/.."
a=${1:?REV_A}; b=${2:?REV_B}; rounds=${3:-3}; shift $(( $# < 3 ? $# : 3 ))
[ "${1:-}" = "--" ] && shift
work=$(mktemp -d /tmp/lt-ab-XXXXXX)
trap 'git worktree remove --force "$work/A" >/dev/null 2>&1; git worktree remove --force "$work/B" >/dev/null 2>&1; rm -rf "$work"' EXIT
git worktree add -q --detach "$work/A" "$a"
git worktree add -q --detach "$work/B" "$b"
for r in $(seq "$rounds"); do
  for side in A B; do
    out="$work/run-$side-$r"
    PYTHONPATH="$work/$side/src" .venv/bin/python -m loratune train --max-steps 60 --log-every 1000 --out "$out" "$@" \
      >/dev/null 2>"$work/err-$side-$r" || { cat "$work/err-$side-$r"; exit 1; }
    .venv/bin/python -c "import json; t = json.load(open('$out/results.json'))['train']; \
print('$side', $r, round(t['tokens_per_s']), 'tokens/s', round(t['seconds'], 1), 's', t['precision'], t['threads'], 'threads')"
  done
done
