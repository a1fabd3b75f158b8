#!/usr/bin/env bash
# bench-delta.sh: what a device downloads to go from v1 to v2 of an ext4 image through a
# manifest (writer/manifest): the manifest plus the compressed chunks that hold at least one
# block the device cannot find in v1 (at any 4 KiB-aligned offset) and that is not all zeros,
# against the full image and against `zstd -19 --patch-from=v1 v2` (the byte-level delta
# floor, which needs the whole base and a window as large as the image on the device).
# Two pairs, both built with `mkfs.ext4 -d` from directory trees:
#   debian: the Debian 12 root file system of test/systemdlive (cached tar), 384 MiB; v2 has
#           the two daemons rebuilt from a newer commit, curl, socat and zstd added with their
#           libraries, /usr/share/doc and man pages of some packages removed, /etc edited.
#   zeros:  512 MiB holding the Go tree's src/crypto, src/net and src/encoding (about 95 %
#           zeros); v2 edits every 20th Go file, removes a directory, adds src/go and the
#           openssl and zstd programs with their libraries.
# Per pair, one table: bytes a device on v1 downloads (the manifest and the chunks it needs,
# built without and with --base v1; with it, the device on v1 fetches the delta chunks of the
# chunks it lacks: compressed against a range of v1, see docs/MANIFEST.md), against the full
# image, zstd of the whole image and the
# zstd patch; the times are computed from the bytes (512 KiB/s: AWS IoT's stream quota;
# 5 Mbit/s), not measured end to end. The last column is the same download over an MQTT
# stream of 64 KiB blocks (every stream block that overlaps a needed chunk). Then the peak
# RSS of `ota-writer manifest` and of the device's lookup (deltabench -manifest) for a 256 MiB
# and a 2 GiB image (sparse files with data spread through them).
#
#   scripts/bench-delta.sh
#   CHUNK=16384 LEVEL=best BASE=HEAD~40 ONLY=debian,zeros,rss PATCH_LEVEL=19 NOFULL=1 KEEP=/tmp/pairs scripts/bench-delta.sh
# Needs root (the Debian tree has root-owned files), mkfs.ext4, zstd, /usr/bin/time, go.
set -euo pipefail
CHUNK=${CHUNK:-16384}
LEVEL=${LEVEL:-} # zstd level of the chunks (ota-writer manifest --level); its default when empty
DICT=${DICT:-} # largest dictionary of a delta chunk in bytes (deltabench -dict-size); the default when empty
BASE=${BASE:-HEAD~40}
CACHE=${CACHE:-/var/cache/gwota-test}
ONLY=${ONLY:-debian,zeros,rss}
PATCH_LEVEL=${PATCH_LEVEL:-19}
NOFULL=${NOFULL:-} # 1: skip zstd of the whole image (minutes per pair)
ZSIZE=${ZSIZE:-512} # MiB of the zeros pair (scripts/bench-ready.sh builds a 64 MiB one)
KEEP=${KEEP:-} # a directory: keep the built image pairs there and reuse them on the next run
want() { [[ ",$ONLY," == *",$1,"* ]]; }
cd "$(dirname "$0")/.."
for t in mkfs.ext4 zstd /usr/bin/time go tar; do command -v "$t" >/dev/null || { echo "bench-delta: $t missing" >&2; exit 1; }; done

work=$(mktemp -d /tmp/bench-delta.XXXXXX)
trap 'rm -rf "$work"' EXIT
go build -o "$work/ota-writer" ./cmd/ota-writer
go build -o "$work/deltabench" ./test/bench/deltabench
mib() { awk -v b="$1" 'BEGIN { printf "%.1f", b / 1048576 }'; }

mkimg() { # dir size_mib out
  mkfs.ext4 -q -F -b 4096 -d "$1" "$3" "$2M"
}

report() { # name v1 v2
  local name=$1 v1=$2 v2=$3 patch full whole=0
  [ -z "${PAIRS_ONLY:-}" ] || return 0 # scripts/bench-ready.sh: build (and KEEP) the pairs only
  zstd -q -"$PATCH_LEVEL" --patch-from="$v1" "$v2" -o "$work/patch" -f 2>/dev/null
  patch=$(stat -c %s "$work/patch")
  full=$(stat -c %s "$v2")
  if [ -z "$NOFULL" ]; then
    zstd -q -T0 -"$PATCH_LEVEL" "$v2" -o "$work/full.zst" -f
    whole=$(stat -c %s "$work/full.zst")
  fi
  local opts=(-new "$v2" -local "$v1" -chunk-size "$CHUNK")
  [ -n "$LEVEL" ] && opts+=(-level "$LEVEL")
  [ -n "$DICT" ] && opts+=(-dict-size "$DICT")
  local nobase base
  nobase=$("$work/deltabench" "${opts[@]}")
  base=$("$work/deltabench" "${opts[@]}" -base)
  python3 - "$name" "$full" "$whole" "$patch" "$nobase" "$base" "$PATCH_LEVEL" <<'PY'
import json, sys
name, full, whole, patch = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
nobase, base, lv = json.loads(sys.argv[5]), json.loads(sys.argv[6]), sys.argv[7]
M = 1048576
def t(b, rate):  # seconds at rate bytes/s, as m:ss
    s = round(b / rate)
    return "%d:%02d" % (s // 60, s % 60)
f = nobase
print("%s: %.0f MiB image, %.1f %% all-zero blocks, %.1f %% found in v1 at any 4 KiB offset, %.1f MiB of blocks missing"
      % (name, full / M, 100 * f["zero_blocks"] / f["blocks"], 100 * f["found_blocks"] / f["blocks"], f["missing_blocks"] * 4096 / M))
print("| %s | download | MiB | x patch | at 512 KiB/s | at 5 Mbit/s | over 64 KiB stream blocks |" % name)
print("|---|---|---:|---:|---:|---:|---:|")
rows = [("full image", full, None), ("zstd -%s of the image" % lv, whole, None), ("zstd -%s --patch-from=v1" % lv, patch, None),
        ("manifest + chunks, no --base", f["download_bytes"], f["stream_download_bytes"]),
        ("manifest + chunks, --base v1", base["download_bytes"], base["stream_download_bytes"])]
for label, b, stream in rows:
    if b == 0:
        print("| | %s | (not run) | | | | |" % label)
        continue
    print("| | %s | %.1f | %.2f | %s | %s | %s |" % (label, b / M, b / patch, t(b, 512 * 1024), t(b, 5e6 / 8),
          "" if stream is None else "%.1f MiB" % (stream / M)))
print("(manifest %.2f MiB of it; chunks of %d KiB, %d chunks needed without --base, %d with, of which %d delta chunks, %.1f MiB; --base build %.0f s)"
      % (f["manifest_bytes"] / M, f["chunk_size"] // 1024, f["chunks_needed"], base["chunks_needed"], base.get("delta_chunks_needed", 0),
         base.get("delta_bytes", 0) / M, base.get("build_seconds", 0)))
PY
}

# --- pair 1: Debian root file system -----------------------------------------------------
tarball=$(ls "$CACHE"/rootfs-bookworm-*.tar 2>/dev/null | head -1 || true)
if ! want debian; then
  :
elif [ -n "$KEEP" ] && [ -e "$KEEP/deb1.img" ] && [ -e "$KEEP/deb2.img" ]; then
  report debian "$KEEP/deb1.img" "$KEEP/deb2.img"
elif [ -n "$tarball" ]; then
  mkdir -p "$work/deb1" "$work/deb2" "$work/src-base"
  tar -xf "$tarball" -C "$work/deb1"
  git archive "$BASE" | tar -x -C "$work/src-base"
  (cd "$work/src-base" && go build -o "$work/deb1/usr/sbin/ota-writer" ./cmd/ota-writer && go build -o "$work/deb1/usr/sbin/ota-net" ./cmd/ota-net)
  cp -a "$work/deb1/." "$work/deb2/"
  go build -o "$work/deb2/usr/sbin/ota-writer" ./cmd/ota-writer
  go build -o "$work/deb2/usr/sbin/ota-net" ./cmd/ota-net
  for b in curl socat zstd; do
    cp -L "/usr/bin/$b" "$work/deb2/usr/bin/$b"
    ldd "/usr/bin/$b" | awk '/=> \//{print $3}' | while read -r lib; do
      [ -e "$work/deb2$lib" ] || { mkdir -p "$work/deb2$(dirname "$lib")"; cp -L "$lib" "$work/deb2$lib"; }
    done
  done
  find "$work/deb2/usr/share/doc" -mindepth 1 -maxdepth 1 -name 'lib*' -exec rm -rf {} +
  rm -rf "$work/deb2/usr/share/man/man8"
  echo 'VERSION_ID_GWOTA="2"' >>"$work/deb2/etc/os-release"
  printf 'gateway-v2\n' >"$work/deb2/etc/hostname"
  mkimg "$work/deb1" 384 "$work/deb1.img"
  mkimg "$work/deb2" 384 "$work/deb2.img"
  rm -rf "$work/deb1" "$work/deb2" "$work/src-base"
  report debian "$work/deb1.img" "$work/deb2.img"
  if [ -n "$KEEP" ]; then mkdir -p "$KEEP" && mv "$work/deb1.img" "$work/deb2.img" "$KEEP/"; fi
  rm -f "$work/deb1.img" "$work/deb2.img"
else
  echo "== debian: skipped, no $CACHE/rootfs-bookworm-*.tar (run test/systemdlive once)"
fi

# --- pair 2: large zero regions ----------------------------------------------------------
goroot=$(go env GOROOT)
if want zeros && [ -n "$KEEP" ] && [ -e "$KEEP/z1.img" ] && [ -e "$KEEP/z2.img" ]; then
  report zeros "$KEEP/z1.img" "$KEEP/z2.img"
elif want zeros; then
mkdir -p "$work/z1/src" "$work/z2"
for d in crypto net encoding; do cp -a "$goroot/src/$d" "$work/z1/src/$d"; done
cp -a "$work/z1/." "$work/z2/"
find "$work/z2/src" -name '*.go' | sort | awk 'NR % 20 == 0' | while read -r f; do
  printf '\n// v2: changed\n' >>"$f"
done
rm -rf "$work/z2/src/net/http/httptest"
cp -a "$goroot/src/go" "$work/z2/src/go"
mkdir -p "$work/z2/usr/bin"
for b in openssl zstd; do
  cp -L "/usr/bin/$b" "$work/z2/usr/bin/$b"
  ldd "/usr/bin/$b" | awk '/=> \//{print $3}' | while read -r lib; do
    mkdir -p "$work/z2$(dirname "$lib")"; cp -L "$lib" "$work/z2$lib"
  done
done
mkimg "$work/z1" "$ZSIZE" "$work/z1.img"
mkimg "$work/z2" "$ZSIZE" "$work/z2.img"
rm -rf "$work/z1" "$work/z2"
report zeros "$work/z1.img" "$work/z2.img"
if [ -n "$KEEP" ]; then mkdir -p "$KEEP" && mv "$work/z1.img" "$work/z2.img" "$KEEP/"; fi
rm -f "$work/z1.img" "$work/z2.img"
fi

# --- peak RSS ------------------------------------------------------------------------------
want rss || exit 0
echo "== peak RSS (KiB) and wall time (s): ota-writer manifest (build) and deltabench -manifest (device lookup)"
for size in 256 2048; do
  img=$work/big$size.img
  truncate -s "${size}M" "$img"
  # Data every 4 MiB (1 MiB random) so both the index and the chunk table fill up.
  for ((off = 0; off < size; off += 4)); do
    head -c 1048576 /dev/urandom | dd of="$img" bs=1M seek="$off" conv=notrunc status=none
  done
  /usr/bin/time -f "%M %e" -o "$work/rss" "$work/ota-writer" manifest --image "$img" --version 1 --target rootfs \
    --compatible bench -o "$work/big.manifest" --chunks "$work/big.chunks" >/dev/null
  build=$(cat "$work/rss")
  # The lookup runs inside the writer, under its 12 MiB soft heap limit (cmd/ota-writer).
  GOMEMLIMIT=12MiB /usr/bin/time -f "%M %e" -o "$work/rss" "$work/deltabench" -manifest "$work/big.manifest" -local "$img" >"$work/lookup"
  echo "$size MiB: build $build (KiB s), lookup $(cat "$work/rss") (KiB s) ($(cat "$work/lookup"))"
  rm -f "$img" "$work/big.manifest" "$work/big.chunks"
done
