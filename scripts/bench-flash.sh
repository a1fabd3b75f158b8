#!/usr/bin/env bash
# bench-flash.sh: `ota-writer flash` (write + fdatasync + journal, then read the image back from
# the medium past the page cache and verify its signature, in one process) against the shell
# pipeline that does the same work, in the same run:
#     dd if=img of=slot bs=1M conv=fsync &&
#     dd if=slot bs=1M iflag=direct | openssl dgst -sha256 -verify pub.pem -signature sig
# (write, then verify what the medium holds) over ROUNDS rounds (medians), and the writer's
# peak RSS for a 16 MiB versus a BIG_MIB image. Targets: ratio (writer time / pipeline time)
# <= 1.0; peak RSS < 25 MiB and flat.
# BASE=<commit> also builds ota-writer at that commit and times it in the same rounds, to show
# what the read-back from the medium costs against a build that read back through the page
# cache (e.g. BASE=5dce416, the last commit before the read-back went to the medium).
# Both sides read the image from the page cache and write a regular-file slot on the same
# filesystem, or with LOOP=1 (root) a loop device each, backed by files on that filesystem. Wall time is dominated by the disk and noisy on a shared machine, so CPU time
# (user+sys) is reported too. Takes about a minute on 2 cores.
#
#   scripts/bench-flash.sh            ROUNDS=5 BIG_MIB=256 BLOCK=1048576 BASE=5dce416 LOOP=1 scripts/bench-flash.sh
set -euo pipefail
ROUNDS=${ROUNDS:-5}
BIG_MIB=${BIG_MIB:-256}
SMALL_MIB=${SMALL_MIB:-16}
BLOCK=${BLOCK:-1048576}
BASE=${BASE:-}
LOOP=${LOOP:-}
cd "$(dirname "$0")/.."
for t in openssl dd /usr/bin/time go; do command -v "$t" >/dev/null || { echo "bench-flash: $t missing" >&2; exit 1; }; done

work=$(mktemp -d /tmp/bench-flash.XXXXXX)
loops=()
cleanup() {
  for d in "${loops[@]}"; do losetup --detach "$d" || true; done
  rm -rf "$work"
}
trap cleanup EXIT
go build -o "$work/ota-writer" ./cmd/ota-writer
if [ -n "$BASE" ]; then
  mkdir "$work/base"
  git archive "$BASE" | tar -x -C "$work/base"
  (cd "$work/base" && go build -o "$work/ota-writer-base" ./cmd/ota-writer)
fi

openssl ecparam -name prime256v1 -genkey -noout -out "$work/key.pem" 2>/dev/null
openssl ec -in "$work/key.pem" -pubout -out "$work/pub.pem" 2>/dev/null
for mib in "$SMALL_MIB" "$BIG_MIB"; do
  head -c "$((mib << 20))" /dev/urandom >"$work/img$mib"
  openssl dgst -sha256 -sign "$work/key.pem" -out "$work/img$mib.sig" "$work/img$mib"
done
: >"$work/slot_a"; : >"$work/slot_b"; : >"$work/slot_dd"
slot_a=$work/slot_a slot_b=$work/slot_b slot_dd=$work/slot_dd
if [ -n "$LOOP" ]; then
  for s in slot_a slot_b slot_dd; do
    truncate -s "$((BIG_MIB << 20))" "$work/$s"
    d=$(losetup --find --show "$work/$s")
    loops+=("$d")
    printf -v "$s" '%s' "$d"
  done
fi

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
slots = ["$slot_a", "$slot_b"]
TOML

now() { date +%s.%N; }
# flash_once MIB [BINARY]: prints "wall_s cpu_s peak_rss_kib"; fresh state so nothing is resumed.
flash_once() {
  rm -rf "$work/state"
  /usr/bin/time -f '%e %U %S %M' -o "$work/t" "${2:-$work/ota-writer}" flash --config "$work/writer.toml" --target rootfs \
    --image "$work/img$1" --sig-file "$work/img$1.sig" --sig-alg ecdsa-p256-sha256 --cert-name pub.pem --block-size "$BLOCK" >/dev/null 2>"$work/flash.err" \
    || { cat "$work/flash.err" >&2; exit 1; }
  awk '{printf "%s %.3f %s\n", $1, $2 + $3, $4}' "$work/t"
}
# pipeline_once MIB: prints "wall_s cpu_s".
pipeline_once() {
  /usr/bin/time -f '%e %U %S' -o "$work/t" sh -c 'dd if="$3" of="$4" bs=1M conv=fsync status=none &&
    dd if="$4" bs=1M count="$5" iflag=direct status=none | openssl dgst -sha256 -verify "$1" -signature "$2" >/dev/null' \
    _ "$work/pub.pem" "$work/img$1.sig" "$work/img$1" "$slot_dd" "$1" \
    || { echo "bench-flash: pipeline failed" >&2; exit 1; }
  awk '{printf "%s %.3f\n", $1, $2 + $3}' "$work/t"
}
median() { sort -g | awk '{a[NR]=$1} END {print (NR%2) ? a[(NR+1)/2] : (a[NR/2]+a[NR/2+1])/2}'; }

command -v bc >/dev/null || { echo "bench-flash: bc missing" >&2; exit 1; }
# Warm the page cache for both images, and the binary.
cat "$work/img$SMALL_MIB" "$work/img$BIG_MIB" >/dev/null
flash_once "$SMALL_MIB" >/dev/null

w_times=(); p_times=(); w_cpu=(); p_cpu=(); rss_big=(); b_times=(); b_cpu=()
for r in $(seq "$ROUNDS"); do
  read -r t c rss < <(flash_once "$BIG_MIB")
  w_times+=("$t"); w_cpu+=("$c"); rss_big+=("$rss")
  read -r pt pc < <(pipeline_once "$BIG_MIB")
  p_times+=("$pt"); p_cpu+=("$pc")
  line=$(printf 'round %d: ota-writer flash %5.2fs wall %5.2fs cpu   dd+dd|openssl %5.2fs wall %5.2fs cpu' "$r" "$t" "$c" "$pt" "$pc")
  if [ -n "$BASE" ]; then
    read -r bt bc _ < <(flash_once "$BIG_MIB" "$work/ota-writer-base")
    b_times+=("$bt"); b_cpu+=("$bc")
    line+=$(printf '   base %5.2fs wall %5.2fs cpu' "$bt" "$bc")
  fi
  echo "$line"
done
read -r _ _ rss_small < <(flash_once "$SMALL_MIB")

w_med=$(printf '%s\n' "${w_times[@]}" | median)
p_med=$(printf '%s\n' "${p_times[@]}" | median)
w_cmed=$(printf '%s\n' "${w_cpu[@]}" | median)
p_cmed=$(printf '%s\n' "${p_cpu[@]}" | median)
rss_big_max=$(printf '%s\n' "${rss_big[@]}" | sort -n | tail -1)
ratio=$(echo "$w_med / $p_med" | bc -l)

echo
printf '%-44s %10s %10s %10s\n' "$BIG_MIB MiB image, block $BLOCK, median of $ROUNDS" "wall s" "MB/s" "cpu s"
printf '%-44s %10.3f %10.1f %10.3f\n' "ota-writer flash (write, read back, verify)" "$w_med" "$(echo "$BIG_MIB * 1.048576 / $w_med" | bc -l)" "$w_cmed"
printf '%-44s %10.3f %10.1f %10.3f\n' "dd conv=fsync && dd iflag=direct | openssl" "$p_med" "$(echo "$BIG_MIB * 1.048576 / $p_med" | bc -l)" "$p_cmed"
printf '%-44s %10.2f %10s %10.2f\n' "ratio writer/pipeline (target <= 1.00)" "$ratio" "" "$(echo "$w_cmed / $p_cmed" | bc -l)"
if [ -n "$BASE" ]; then
  b_med=$(printf '%s\n' "${b_times[@]}" | median)
  b_cmed=$(printf '%s\n' "${b_cpu[@]}" | median)
  printf '%-44s %10.3f %10.1f %10.3f\n' "ota-writer flash at $BASE (cached read-back)" "$b_med" "$(echo "$BIG_MIB * 1.048576 / $b_med" | bc -l)" "$b_cmed"
  printf '%-44s %10.3f %10s %10.3f\n' "read-back from the medium costs (s)" "$(echo "$w_med - $b_med" | bc -l)" "" "$(echo "$w_cmed - $b_cmed" | bc -l)"
fi
printf '%-44s %12.1f\n' "peak RSS MiB, $SMALL_MIB MiB image" "$(echo "$rss_small / 1024" | bc -l)"
printf '%-44s %12.1f\n' "peak RSS MiB, $BIG_MIB MiB image (max of rounds)" "$(echo "$rss_big_max / 1024" | bc -l)"
verdict=ok
awk -v r="$ratio" 'BEGIN{exit !(r > 1.0)}' && verdict="SLOWER than the pipeline"
awk -v a="$rss_big_max" 'BEGIN{exit !(a >= 25*1024)}' && verdict="$verdict; RSS over 25 MiB"
echo "verdict: $verdict"
