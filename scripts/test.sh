#!/usr/bin/env bash
# The project's test command (README, .ci/run). Works on a fresh machine by itself: installs
# the Debian packages the tests need when they are missing (as root; otherwise it names them),
# fetches Go modules through the module proxy, then runs every check.
set -euo pipefail
cd "$(dirname "$0")/.."

# command -> Debian package
declare -A need=(
  [protoc]=protobuf-compiler
  [mosquitto]=mosquitto
  [fw_setenv]=libubootenv-tool
  [grub-editenv]=grub-common
  [openssl]=openssl
  [losetup]=mount
  [mkfs.ext4]=e2fsprogs
  # writer/manifest: the delta benchmark's floor (zstd --patch-from)
  [zstd]=zstd
  [systemd-analyze]=systemd
  [setpriv]=util-linux
  [unshare]=util-linux
  [dpkg-deb]=dpkg
  # test/systemdlive: a Debian container booted with systemd as PID 1
  [systemd-nspawn]=systemd-container
  [mmdebstrap]=mmdebstrap
  [ip]=iproute2
  [nsenter]=util-linux
  # test/e2e proxy tests, netagent/webproxy: a real web proxy, and a TLS front for it
  [tinyproxy]=tinyproxy
  [socat]=socat
)
missing=()
for cmd in "${!need[@]}"; do
  command -v "$cmd" >/dev/null 2>&1 || [ -x "/usr/sbin/$cmd" ] || missing+=("${need[$cmd]}")
done
# The well-known .proto imports come only with libprotobuf-dev.
[ -f /usr/include/google/protobuf/descriptor.proto ] || missing+=(libprotobuf-dev)
if [ ${#missing[@]} -gt 0 ]; then
  mapfile -t missing < <(printf '%s\n' "${missing[@]}" | sort -u)
  if [ "$(id -u)" = 0 ]; then
    echo "test.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "test.sh: please install these Debian packages first: ${missing[*]}" >&2
    exit 1
  fi
fi

echo "== go mod download"
go mod download

echo "== gofmt"
unformatted=$(gofmt -l $(git ls-files '*.go' | grep -v '\.pb\.go$') 2>/dev/null || true)
if [ -n "$unformatted" ]; then echo "gofmt: not formatted:"; echo "$unformatted"; exit 1; fi

echo "== go vet"
go vet ./...
# ota-net's benchmark build with the writer linked in (cmd/ota-net/inproc.go) is behind a tag.
go vet -tags gwota_inproc ./cmd/ota-net

echo "== generated protobuf code"
scripts/genproto.sh --check

if [ -x scripts/check-deploy.sh ]; then
  echo "== deployment checks"
  scripts/check-deploy.sh
fi

echo "== go test -race"
go test -race -count=1 -timeout 30m ./... 2>&1 | tee /tmp/gwota-test.log
