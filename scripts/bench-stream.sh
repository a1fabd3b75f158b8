#!/bin/sh
# Stream download benchmark: ota-net's MQTT stream downloader through a local mosquitto,
# against the raw broker floor (same run) and the AWS C agent's request shape, plus the
# downloader's peak RSS at several image sizes, and the real ota-net and ota-writer binaries end
# to end (throughput and ota-net's peak RSS at 16, 64 and 256 MiB). Extra arguments go to the program
# (-size 64, -reps 3, -rss-sizes 16,64,256, -sweep).
set -eu
cd "$(dirname "$0")/.."
bin=$(mktemp -d)
trap 'rm -rf "$bin"' EXIT
go build -o "$bin/streambench" ./test/bench/streambench
go build -o "$bin/streamdl" ./test/bench/streamdl
go build -o "$bin/ota-writer" ./cmd/ota-writer
go build -o "$bin/ota-net" ./cmd/ota-net
exec "$bin/streambench" "$@"
