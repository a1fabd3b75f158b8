#!/usr/bin/env bash
# Builds the gwota .deb with nfpm: ota-writer and ota-net (static, no cgo, so
# the pure-Go resolver is used and ota-net needs no netlink socket), the units,
# sysusers/tmpfiles entries and the example configurations from deploy/.
#
#   scripts/package.sh [OUT_DIR]          (default OUT_DIR: out/)
#
# Environment:
#   GWOTA_ARCH     Debian architecture: amd64 (default: the host's), arm64,
#                  armhf, i386, riscv64.
#   GWOTA_VERSION  package version (default: from git describe, else
#                  0.0~git<commit date>.<short hash>).
#   GWOTA_BIN      directory with prebuilt ota-writer and ota-net; skips the build.
# Prints the path of the package on its last line.
set -euo pipefail

NFPM=github.com/goreleaser/nfpm/v2/cmd/nfpm@v2.45.2

root=$(cd "$(dirname "$0")/.." && pwd)
cd "$root"
out=${1:-$root/out}
mkdir -p "$out"
out=$(cd "$out" && pwd)

arch=${GWOTA_ARCH:-$(dpkg --print-architecture 2>/dev/null || go env GOARCH)}
goarm=
case "$arch" in
amd64 | arm64 | riscv64) goarch=$arch ;;
armhf) goarch=arm goarm=7 ;;
i386) goarch=386 ;;
*) echo "package.sh: unsupported architecture $arch" >&2; exit 2 ;;
esac

if [[ -z ${GWOTA_VERSION:-} ]]; then
	if v=$(git describe --tags --match 'v[0-9]*' 2>/dev/null); then
		GWOTA_VERSION=${v#v}
	else
		GWOTA_VERSION="0.0~git$(git log -1 --format=%cd --date=format:%Y%m%d%H%M%S).$(git rev-parse --short=12 HEAD)"
	fi
fi

tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
if [[ -z ${GWOTA_BIN:-} ]]; then
	for c in ota-writer ota-net; do
		if [[ ! -d cmd/$c ]]; then
			echo "package.sh: cmd/$c is missing: both daemons go into the package" >&2
			exit 1
		fi
	done
	GWOTA_BIN=$tmp/bin
	CGO_ENABLED=0 GOOS=linux GOARCH=$goarch GOARM=$goarm \
		go build -trimpath -ldflags='-s -w -buildid=' -o "$GWOTA_BIN/" ./cmd/ota-writer ./cmd/ota-net
fi
for b in ota-writer ota-net; do
	[[ -x $GWOTA_BIN/$b ]] || { echo "package.sh: $GWOTA_BIN/$b missing or not executable" >&2; exit 1; }
done

export GWOTA_ARCH=$arch GWOTA_VERSION GWOTA_BIN
deb="$out/gwota_${GWOTA_VERSION}-1_${arch}.deb"
rm -f "$deb"
# `go run pkg@version` ignores this module's go.mod: the pin above is the one used.
go run "$NFPM" package --config deploy/nfpm.yaml --packager deb --target "$deb" >&2
echo "$deb"
