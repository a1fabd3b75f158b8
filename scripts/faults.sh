#!/usr/bin/env bash
# The worst-day suite at a chosen size, and its report (docs/RELIABILITY.md).
#   scripts/faults.sh -n N [-fuzztime D] [-j JOBS] [-o FILE]
# -n scales every suite (crash runs at random moments, power cuts, hostile rounds; CI's
# `go test` uses small defaults); -fuzztime runs each fuzz target that long when
# scripts/fuzz.sh exists, JOBS targets at once (default 1). Needs root (loop devices, FUSE, other uids), like scripts/test.sh.
set -euo pipefail
cd "$(dirname "$0")/.."
n=50 fuzztime="" jobs=1 out=docs/RELIABILITY.md
while [ $# -gt 0 ]; do
  case "$1" in
    -n) n=$2; shift 2 ;;
    -fuzztime) fuzztime=$2; shift 2 ;;
    -j) jobs=$2; shift 2 ;;
    -o) out=$2; shift 2 ;;
    *) echo "usage: $0 -n N [-fuzztime D] [-j JOBS] [-o FILE]" >&2; exit 2 ;;
  esac
done
dir=$(mktemp -d)
# The suites' JSON summaries are kept in fuzz-out/summaries (not committed), so a report can
# be written again from the same run.
trap 'mkdir -p fuzz-out/summaries && cp "$dir"/*.json fuzz-out/summaries/ 2>/dev/null; rm -rf "$dir"' EXIT
export GWOTA_FAULTS_OUT=$dir GWOTA_FAULTS_N=$n
# The issue's blackout: an hour-long outage is the same code path as a minute-long one.
export GWOTA_BLACKOUT=${GWOTA_BLACKOUT:-60s}
# Every package that writes a summary to GWOTA_FAULTS_OUT.
pkgs=()
for p in ./test/crash ./test/powercut ./test/hostile ./test/netfaults; do
  [ -d "$p" ] && pkgs+=("$p")
done
echo "== fault suites (${pkgs[*]}), N=$n"
go test -count=1 -timeout 6h "${pkgs[@]}"
if [ -n "$fuzztime" ] && [ -x scripts/fuzz.sh ]; then
  echo "== fuzzing, $fuzztime per target"
  # A failing target still gets its row in the report; the logs stay for the failure.
  scripts/fuzz.sh -t "$fuzztime" -j "$jobs" -o "$dir" || { mkdir -p fuzz-out && cp -r "$dir/fuzz-logs" fuzz-out/ && echo "fuzz logs kept in fuzz-out/fuzz-logs"; }
fi
rev=$(git rev-parse --short HEAD 2>/dev/null || echo unknown)
git diff --quiet HEAD -- 2>/dev/null || rev="$rev (with local changes)"
go run ./test/cmd/faultreport -in "$dir" -o "$out" -commit "$rev" \
  -cmd "GWOTA_BLACKOUT=$GWOTA_BLACKOUT scripts/faults.sh -n $n${fuzztime:+ -fuzztime $fuzztime -j $jobs}"
echo "wrote $out"
