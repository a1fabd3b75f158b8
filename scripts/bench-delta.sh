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
# stream_MiB is the download over an MQTT stream in 64 KiB stream blocks (every block that
# overlaps a needed chunk). Then the peak RSS of `ota-writer manifest` and of the device's lookup (deltabench
# -manifest) for a 256 MiB and a 2 GiB image (sparse files with data spread through them).
#
#   scripts/bench-delta.sh        CHUNKS=16384,65536,262144 BASE=HEAD~40 ONLY=debian,zeros,rss PATCH_LEVEL=19 FULL=1 scripts/bench-delta.sh
# Needs root (the Debian tree has root-owned files), mkfs.ext4, zstd, /usr/bin/time, go.
set -euo pipefail
CHUNKS=${CHUNKS:-16384,65536,262144}
BASE=${BASE:-HEAD~40}
CACHE=${CACHE:-/var/cache/gwota-test}
ONLY=${ONLY:-debian,zeros,rss}
PATCH_LEVEL=${PATCH_LEVEL:-19}
FULL=${FULL:-} # 1: also zstd the whole image (slow: half an hour for 384 MiB on a busy machine)
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
  local name=$1 v1=$2 v2=$3
  zstd -q -"$PATCH_LEVEL" --patch-from="$v1" "$v2" -o "$work/patch" -f 2>/dev/null
  local patch full
  patch=$(stat -c %s "$work/patch")
  full=$(stat -c %s "$v2")
  local whole=""
  if [ -n "$FULL" ]; then
    zstd -q -"$PATCH_LEVEL" "$v2" -o "$work/full.zst" -f
    whole=", zstd -$PATCH_LEVEL of the image $(mib "$(stat -c %s "$work/full.zst")") MiB"
  fi
  echo "== $name: image $(mib "$full") MiB$whole, zstd -$PATCH_LEVEL --patch-from $(mib "$patch") MiB"
  printf '%-8s %8s %8s %10s %10s %10s %10s %8s %10s %8s\n' chunk zero% found% missing_MiB manifest_MiB chunks_MiB download_MiB x_patch stream_MiB x_patch
  "$work/deltabench" -new "$v2" -local "$v1" -chunk-size "$CHUNKS" | while read -r line; do
    python3 - "$line" "$patch" <<'PY'
import json, sys
f = json.loads(sys.argv[1]); patch = int(sys.argv[2]); M = 1048576
print("%-8s %8.1f %8.1f %10.1f %10.2f %10.1f %10.1f %8.2f %10.1f %8.2f" % (
    "%dK" % (f["chunk_size"] // 1024), 100 * f["zero_blocks"] / f["blocks"], 100 * f["found_blocks"] / f["blocks"],
    f["missing_blocks"] * 4096 / M, f["manifest_bytes"] / M, f["chunk_bytes"] / M, f["download_bytes"] / M,
    f["download_bytes"] / patch, f["stream_download_bytes"] / M, f["stream_download_bytes"] / patch))
PY
  done
}

# --- pair 1: Debian root file system -----------------------------------------------------
tarball=$(ls "$CACHE"/rootfs-bookworm-*.tar 2>/dev/null | head -1 || true)
if ! want debian; then
  :
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
  rm -f "$work/deb1.img" "$work/deb2.img"
else
  echo "== debian: skipped, no $CACHE/rootfs-bookworm-*.tar (run test/systemdlive once)"
fi

# --- pair 2: large zero regions ----------------------------------------------------------
goroot=$(go env GOROOT)
if want zeros; then
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
mkimg "$work/z1" 512 "$work/z1.img"
mkimg "$work/z2" 512 "$work/z2.img"
rm -rf "$work/z1" "$work/z2"
report zeros "$work/z1.img" "$work/z2.img"
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
