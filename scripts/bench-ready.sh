#!/usr/bin/env bash
# bench-ready.sh: time to `ready` of a delta update against a full download, measured end to
# end (deltabench -ready): the emulator with AWS IoT's quotas (512 KiB/s on the MQTT
# connection), a real ota-writer whose running slot holds v1 and a real ota-net; a full
# update to v2 (the signed image) and a delta update (manifest and chunk file from
# `ota-writer manifest`), over MQTT under the quota alone and over a 5 Mbit/s toxiproxy link
# (MQTT, HTTP). Per run: seconds from creating the job to the ready update at the cloud,
# bytes the cloud served, peak RSS (VmHWM) of ota-net and ota-writer read from /proc at ready.
# Pairs, built by scripts/bench-delta.sh (PAIRS_ONLY, kept in $KEEP and reused):
#   zeros$ZSIZE: the zeros pair at ZSIZE MiB (default 64: a full download takes about 2
#                minutes per case), full and delta;
#   debian:      the 384 MiB Debian pair, delta only (FULL=1 adds the full downloads, about
#                12.5 minutes each).
#
#   scripts/bench-ready.sh
#   ZSIZE=128 ONLY=zeros CASES=quota-mqtt KEEP=/var/tmp/gwota-pairs scripts/bench-ready.sh
# Needs root (bench-delta.sh), mkfs.ext4, zstd, go, python3.
set -euo pipefail
cd "$(dirname "$0")/.."
ZSIZE=${ZSIZE:-64}
ONLY=${ONLY:-zeros,debian}
CASES=${CASES:-quota-mqtt,link-mqtt,link-http}
KEEP=${KEEP:-/var/tmp/gwota-pairs}
FULL=${FULL:-}
want() { [[ ",$ONLY," == *",$1,"* ]]; }

work=$(mktemp -d /tmp/bench-ready.XXXXXX)
trap 'rm -rf "$work"' EXIT
go build -o "$work/deltabench" ./test/bench/deltabench

table() { # name: JSON lines on stdin -> a markdown table
  python3 -c '
import json, sys
name = sys.argv[1]
M = 1048576
rows = [json.loads(l) for l in sys.stdin if l.strip()]
print("| %s | update | time to ready (s) | MiB served | reused blocks | ota-net peak RSS (MiB) | ota-writer peak RSS (MiB) |" % name)
print("|---|---|---:|---:|---:|---:|---:|")
for r in rows:
    print("| %s | %s | %.1f | %.1f | %s | %.1f | %.1f |" % (r["case"], r["kind"], r["ready_s"], r["served_bytes"] / M,
          r.get("reused", ""), r["ota_net_vmhwm_kib"] / 1024, r["ota_writer_vmhwm_kib"] / 1024))
' "$1"
}

run() { # name v1 v2 kinds
  echo "$1: $(du -h --apparent-size "$2" | cut -f1) images, cases $CASES, kinds $4"
  "$work/deltabench" -ready -local "$2" -new "$3" -ready-cases "$CASES" -ready-kinds "$4" | tee "$work/$1.jsonl" >&2
  table "$1" <"$work/$1.jsonl"
}

echo "bench-ready at $(git rev-parse --short=12 HEAD), $(nproc) cores, load $(cut -d' ' -f1-3 /proc/loadavg)"
if want zeros; then
  ONLY=zeros ZSIZE="$ZSIZE" PAIRS_ONLY=1 NOFULL=1 KEEP="$KEEP/zeros$ZSIZE" scripts/bench-delta.sh >/dev/null
  run "zeros$ZSIZE" "$KEEP/zeros$ZSIZE/z1.img" "$KEEP/zeros$ZSIZE/z2.img" full,delta
fi
if want debian; then
  ONLY=debian PAIRS_ONLY=1 NOFULL=1 KEEP="$KEEP/debian" scripts/bench-delta.sh >/dev/null
  if [ -e "$KEEP/debian/deb1.img" ]; then
    run debian "$KEEP/debian/deb1.img" "$KEEP/debian/deb2.img" "${FULL:+full,}delta"
  else
    echo "debian: no pair (bench-delta.sh needs test/systemdlive's cached root file system)" >&2
    exit 1
  fi
fi
