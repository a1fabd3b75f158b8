#!/usr/bin/env bash
# fuzz.sh: runs every Go fuzz target of the project with `go test -fuzz` for a given time
# each and writes fuzz.json (per target: package, name, seconds, executions, new interesting
# inputs, result) to the report directory. The seed corpora (f.Add and testdata/fuzz) run in
# every ordinary `go test`; this is the long run.
#
#   scripts/fuzz.sh [-t FUZZTIME] [-j JOBS] [-o DIR] [-s N] [TARGET-REGEXP]
#     -t  time per target, as go test's -fuzztime (default 10m; "30s" for a quick look)
#     -j  targets fuzzed at once (default 1; each with -parallel 1: one worker)
#     -o  directory for fuzz.json and the logs (default $GWOTA_FAULTS_OUT, else ./fuzz-out)
#     -s  afterwards, copy up to N of the inputs the fuzzer found interesting (spread over
#         the sizes, at most 8 KiB each) from go's cache into testdata/fuzz/<Target>/ as seeds
#   TARGET-REGEXP selects "package:Target" names, e.g. 'engine|jobdoc'.
# fuzz.json: per target "fuzz_seconds" (fuzzing proper) and "seconds" (with the build).
#
# A failing input is written by go test to the package's testdata/fuzz/<Target>/: commit it
# with the fix, it then runs as a regression test in CI.
# Runs under nice, with TMPDIR on /dev/shm when it exists (the writer targets fsync a lot).
set -euo pipefail
cd "$(dirname "$0")/.."

fuzztime=10m
jobs=1
out=${GWOTA_FAULTS_OUT:-}
filter=.
save=0
while getopts "t:j:o:s:h" opt; do
  case $opt in
    t) fuzztime=$OPTARG ;;
    j) jobs=$OPTARG ;;
    o) out=$OPTARG ;;
    s) save=$OPTARG ;;
    *) sed -n '2,18p' "$0"; exit 2 ;;
  esac
done
shift $((OPTIND - 1))
[ $# -gt 0 ] && filter=$1
out=${out:-fuzz-out}
mkdir -p "$out/fuzz-logs"
out=$(cd "$out" && pwd)

# Every fuzz target: package directory and function name.
targets=$(grep -rl --include='*_test.go' -E '^func Fuzz[A-Za-z0-9_]*\(f \*testing\.F\)' . |
  while read -r f; do
    d=$(dirname "$f")
    grep -oE '^func Fuzz[A-Za-z0-9_]*' "$f" | sed "s|^func |$d:|"
  done | sort | grep -E -- "$filter" || true)
[ -n "$targets" ] || { echo "fuzz.sh: no target matches $filter" >&2; exit 2; }

if [ -d /dev/shm ] && [ -z "${TMPDIR:-}" ]; then
  export TMPDIR=/dev/shm
fi

run_one() {
  local pkg=${1%%:*} name=${1##*:}
  local log="$out/fuzz-logs/$(echo "$pkg" | tr / _ | sed 's/^\._//')_$name.log"
  local start end rc=0
  start=$(date +%s)
  nice -n 19 go test -run '^$' -fuzz "^${name}\$" -fuzztime "$fuzztime" -fuzzminimizetime 5s \
    -parallel 1 "$pkg" >"$log" 2>&1 || rc=$?
  end=$(date +%s)
  # The last progress line holds the totals: "fuzz: elapsed: 10m0s, execs: 123 (..), new interesting: 4 (total: 9)".
  local execs interesting
  execs=$(grep -oE 'execs: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo 0)
  interesting=$(grep -oE 'new interesting: [0-9]+' "$log" | tail -1 | grep -oE '[0-9]+' || echo 0)
  # Fuzzing time proper (the wall time above includes building the instrumented binary).
  local elapsed
  elapsed=$(grep -oE 'elapsed: [0-9hms.]+' "$log" | tail -1 | sed 's/elapsed: //' |
    awk '{ s = 0; x = $0; while (match(x, /^[0-9.]+[hms]/)) { v = substr(x, 1, RLENGTH - 1); u = substr(x, RLENGTH, 1);
      s += (u == "h" ? 3600 : u == "m" ? 60 : 1) * v; x = substr(x, RLENGTH + 1) } printf "%d", s }')
  local result=pass crasher=""
  if [ $rc -ne 0 ]; then
    result=fail
    crasher=$(grep -oE 'testdata/fuzz/[^ ]+' "$log" | tail -1 || true)
  fi
  printf '{"package":"%s","target":"%s","fuzztime":"%s","seconds":%d,"fuzz_seconds":%s,"execs":%s,"new_interesting":%s,"result":"%s","failing_input":"%s","log":"%s"}\n' \
    "${pkg#./}" "$name" "$fuzztime" $((end - start)) "${elapsed:-0}" "${execs:-0}" "${interesting:-0}" "$result" "$crasher" "$log" >"$log.json"
  echo "fuzz.sh: $pkg $name: $result, ${execs:-0} execs in ${elapsed:-0} s of fuzzing ($((end - start)) s with the build)"
}
export -f run_one
export out fuzztime

echo "fuzz.sh: $(echo "$targets" | wc -l) targets, $fuzztime each, $jobs at once, TMPDIR=${TMPDIR:-}"
# Compile the test binaries once, up front (not counted in the targets' times).
go test -count=1 -run '^$' $(echo "$targets" | cut -d: -f1 | sort -u) >/dev/null
echo "$targets" | xargs -P "$jobs" -I{} bash -c 'run_one "$@"' _ {}

failures=0
{
  printf '{"fuzztime":"%s","jobs":%d,"machine":"%s, %s cores","go":"%s","date":"%s","targets":[\n' \
    "$fuzztime" "$jobs" "$(uname -srm)" "$(nproc)" "$(go env GOVERSION)" "$(date -u +%Y-%m-%dT%H:%M:%SZ)"
  first=1
  for t in $targets; do
    pkg=${t%%:*} name=${t##*:}
    f="$out/fuzz-logs/$(echo "$pkg" | tr / _ | sed 's/^\._//')_$name.log.json"
    [ $first -eq 1 ] || printf ',\n'
    first=0
    cat "$f" | tr -d '\n'
    grep -q '"result":"fail"' "$f" && failures=$((failures + 1))
  done
  printf '\n],"failures":%d}\n' "$failures"
} >"$out/fuzz.json.tmp"
mv "$out/fuzz.json.tmp" "$out/fuzz.json"
echo "fuzz.sh: wrote $out/fuzz.json ($failures failing targets)"

if [ "$save" -gt 0 ]; then
  cache="$(go env GOCACHE)/fuzz/$(go list -m)"
  for t in $targets; do
    pkg=${t%%:*} name=${t##*:}
    src="$cache/${pkg#./}/$name"
    [ -d "$src" ] || continue
    dst="$pkg/testdata/fuzz/$name"
    mkdir -p "$dst"
    # Spread over the sizes, not only the smallest.
    mapfile -t files < <(find "$src" -type f -size -8k -printf '%s %p\n' | sort -n | cut -d' ' -f2-)
    m=${#files[@]}
    for ((i = 0; i < save && i < m; i++)); do cp "${files[$((i * m / (save < m ? save : m)))]}" "$dst/"; done
    echo "fuzz.sh: $(ls "$dst" | wc -l) seeds in $dst"
  done
fi
[ "$failures" -eq 0 ]
