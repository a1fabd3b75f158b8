#!/bin/sh
# Link benchmark report: the real ota-net and ota-writer against the emulator through toxiproxy
# (LAN, LTE, satellite, lossy links; AWS quotas on and off; ota-net's defaults and the AWS C
# agent's request shape; MQTT and HTTP), the gRPC hop end to end (chosen cells run alternately
# through both processes and through ota-net's benchmark build with the writer linked in), the
# gRPC hop per call (writer/server BenchmarkHop) and, when the tree has it,
# test/bench/httpvscurl. Writes docs/BENCHMARKS.md (OUT=path elsewhere). About 20 minutes;
# figures, not pass/fail.
#
# GWOTA_BENCH_HOP_ONLY=1 runs only the hop (end to end and per call, about 4 minutes) and
# writes it to OUT (default $TMPDIR/gwota-bench-hop.markdown, never over the committed report).
# Extra arguments go to linkbench (-reps 3 is the default here; -only 'sat/16' runs a subset of
# the matrix, -hopcells 'lan/64' of the hop cells, -hopcells '' none).
set -eu
cd "$(dirname "$0")/.."
out=docs/BENCHMARKS.md
hoponly=""
if [ -n "${GWOTA_BENCH_HOP_ONLY:-}" ]; then
	hoponly=1
	out=${TMPDIR:-/tmp}/gwota-bench-hop.markdown
fi
[ -z "${OUT:-}" ] || out=$OUT
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
go build -o "$tmp/linkbench" ./test/bench/linkbench
go test -run '^$' -bench Hop -benchtime 1024x -count 3 ./writer/server/ | tee "$tmp/hop.txt"
curl=""
if [ -z "$hoponly" ] && [ -d test/bench/httpvscurl ]; then
	# HTTP download against curl -o of the same URL through the same proxy.
	go run ./test/bench/httpvscurl -size 64 -reps 5 >"$tmp/httpvscurl.txt" 2>&1 || echo "httpvscurl failed (exit $?)" >>"$tmp/httpvscurl.txt"
	curl="$tmp/httpvscurl.txt"
fi
cmd="scripts/bench-link.sh${*:+ $*}"
[ -z "$hoponly" ] || cmd="GWOTA_BENCH_HOP_ONLY=1 $cmd"
"$tmp/linkbench" -report "$out" -reps 3 -matrix="$([ -z "$hoponly" ] && echo true || echo false)" \
	-hop "$tmp/hop.txt" -httpvscurl "$curl" -command "$cmd" "$@"
echo "wrote $out"
