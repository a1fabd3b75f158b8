#!/usr/bin/env bash
# bench-flash.sh: `ota-writer flash` (write + read-back signature verification + fsync, in one
# process) against what a technician would type, in the same run:
#     openssl dgst -sha256 -verify pub.pem -signature sig img && dd if=img of=slot bs=1M conv=fsync
# over ROUNDS rounds (medians), and the writer's peak RSS for a 16 MiB versus a BIG_MIB image.
# Targets: ratio (writer time / pipeline time) <= 1.0; peak RSS < 25 MiB and flat.
# Both sides read the image from the page cache and write a regular-file slot on the same
# filesystem. Takes about a minute on 2 cores.
#
#   scripts/bench-flash.sh            ROUNDS=5 BIG_MIB=256 BLOCK=1048576 scripts/bench-flash.sh
set -euo pipefail
ROUNDS=${ROUNDS:-3}
BIG_MIB=${BIG_MIB:-256}
SMALL_MIB=${SMALL_MIB:-16}
BLOCK=${BLOCK:-1048576}
cd "$(dirname "$0")/.."
for t in openssl dd /usr/bin/time go; do command -v "$t" >/dev/null || { echo "bench-flash: $t missing" >&2; exit 1; }; done

work=$(mktemp -d /tmp/bench-flash.XXXXXX)
trap 'rm -rf "$work"' EXIT
go build -o "$work/ota-writer" ./cmd/ota-writer

openssl ecparam -name prime256v1 -genkey -noout -out "$work/key.pem" 2>/dev/null
openssl ec -in "$work/key.pem" -pubout -out "$work/pub.pem" 2>/dev/null
for mib in "$SMALL_MIB" "$BIG_MIB"; do
  head -c "$((mib << 20))" /dev/urandom >"$work/img$mib"
  openssl dgst -sha256 -sign "$work/key.pem" -out "$work/img$mib.sig" "$work/img$mib"
done
: >"$work/slot_a"; : >"$work/slot_b"; : >"$work/slot_dd"

cat >"$work/writer.toml" <<TOML
socket = "$work/w.sock"
state_dir = "$work/state"
trusted_keys = ["$work/pub.pem"]
max_block_size = $BLOCK
log_level = "warn"
[boot]
backend = "file"
[[target]]
name = "rootfs"
kind = "ab"
file_paths = ["/img"]
slots = ["$work/slot_a", "$work/slot_b"]
TOML

now() { date +%s.%N; }
# flash_once MIB: prints "seconds peak_rss_kib"; fresh state so nothing is resumed.
flash_once() {
  rm -rf "$work/state"
  local t0 t1
  t0=$(now)
  /usr/bin/time -f %M -o "$work/rss" "$work/ota-writer" flash --config "$work/writer.toml" --target rootfs \
    --image "$work/img$1" --sig-file "$work/img$1.sig" --sig-alg ecdsa-p256-sha256 --block-size "$BLOCK" >/dev/null 2>"$work/flash.err" \
    || { cat "$work/flash.err" >&2; exit 1; }
  t1=$(now)
  echo "$(echo "$t1 - $t0" | bc -l) $(cat "$work/rss")"
}
pipeline_once() {
  local t0 t1
  t0=$(now)
  openssl dgst -sha256 -verify "$work/pub.pem" -signature "$work/img$1.sig" "$work/img$1" >/dev/null
  dd if="$work/img$1" of="$work/slot_dd" bs=1M conv=fsync status=none
  t1=$(now)
  echo "$t1 - $t0" | bc -l
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

command -v bc >/dev/null || { echo "bench-flash: bc missing" >&2; exit 1; }
# Warm the page cache for both images, and the binary.
cat "$work/img$SMALL_MIB" "$work/img$BIG_MIB" >/dev/null
flash_once "$SMALL_MIB" >/dev/null

w_times=(); p_times=(); rss_big=()
for r in $(seq "$ROUNDS"); do
  read -r t rss < <(flash_once "$BIG_MIB")
  w_times+=("$t"); rss_big+=("$rss")
  p_times+=("$(pipeline_once "$BIG_MIB")")
  printf 'round %d: ota-writer flash %.3fs   openssl+dd %.3fs\n' "$r" "$t" "${p_times[-1]}"
done
read -r _ rss_small < <(flash_once "$SMALL_MIB")

w_med=$(printf '%s\n' "${w_times[@]}" | median)
p_med=$(printf '%s\n' "${p_times[@]}" | median)
rss_big_max=$(printf '%s\n' "${rss_big[@]}" | sort -n | tail -1)
ratio=$(echo "$w_med / $p_med" | bc -l)

echo
printf '%-44s %12s %12s\n' "what ($BIG_MIB MiB image, block $BLOCK, median of $ROUNDS)" "seconds" "MB/s"
printf '%-44s %12.3f %12.1f\n' "ota-writer flash (write+fsync+verify)" "$w_med" "$(echo "$BIG_MIB * 1.048576 / $w_med" | bc -l)"
printf '%-44s %12.3f %12.1f\n' "openssl dgst -verify && dd conv=fsync" "$p_med" "$(echo "$BIG_MIB * 1.048576 / $p_med" | bc -l)"
printf '%-44s %12.2f %12s\n' "ratio writer/pipeline (target <= 1.00)" "$ratio" ""
printf '%-44s %12.1f\n' "peak RSS MiB, $SMALL_MIB MiB image" "$(echo "$rss_small / 1024" | bc -l)"
printf '%-44s %12.1f\n' "peak RSS MiB, $BIG_MIB MiB image (max of rounds)" "$(echo "$rss_big_max / 1024" | bc -l)"
verdict=ok
awk -v r="$ratio" 'BEGIN{exit !(r > 1.0)}' && verdict="SLOWER than the pipeline"
awk -v a="$rss_big_max" 'BEGIN{exit !(a >= 25*1024)}' && verdict="$verdict; RSS over 25 MiB"
echo "verdict: $verdict"
