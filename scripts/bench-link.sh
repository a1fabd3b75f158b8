#!/bin/sh
# Link benchmark report: the real ota-net and ota-writer against the emulator through toxiproxy
# (LAN, LTE, satellite, lossy links; AWS quotas on and off; ota-net's defaults and the AWS C
# agent's request shape; MQTT and HTTP), the gRPC hop against the in-process writer
# (writer/server BenchmarkHop) and, when the tree has it, test/bench/httpvscurl. Writes
# docs/BENCHMARKS.md (OUT=path elsewhere). About 30 minutes; figures, not pass/fail.
# Extra arguments go to linkbench (-reps 3 is the default here; -only 'sat/16' runs a subset).
set -eu
cd "$(dirname "$0")/.."
out=docs/BENCHMARKS.md
[ -z "${OUT:-}" ] || out=$OUT
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
go build -o "$tmp/linkbench" ./test/bench/linkbench
go test -run '^$' -bench Hop -benchtime 1024x -count 3 ./writer/server/ | tee "$tmp/hop.txt"
curl=""
if [ -d test/bench/httpvscurl ]; then
	# HTTP download against curl -o of the same URL through the same proxy.
	go run ./test/bench/httpvscurl -size 64 -reps 5 >"$tmp/httpvscurl.txt" 2>&1 || echo "httpvscurl failed (exit $?)" >>"$tmp/httpvscurl.txt"
	curl="$tmp/httpvscurl.txt"
fi
"$tmp/linkbench" -report "$out" -reps 3 -hop "$tmp/hop.txt" -httpvscurl "$curl" \
	-command "scripts/bench-link.sh${*:+ $*}" "$@"
echo "wrote $out"
