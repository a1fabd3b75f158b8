#!/usr/bin/env bash
# Regenerates the Go code of proto/ from the .proto files with Debian's protoc and the
# protoc-gen-go / protoc-gen-go-grpc versions pinned as tools in go.mod.
# --check: regenerate into a temporary tree and fail if the committed code differs.
set -euo pipefail
cd "$(dirname "$0")/.."
command -v protoc >/dev/null || { echo "genproto: protoc missing (apt-get install protobuf-compiler libprotobuf-dev)" >&2; exit 1; }
out=proto
if [ "${1:-}" = "--check" ]; then
  out=$(mktemp -d); trap 'rm -rf "$out"' EXIT
fi
protoc -I proto \
  --plugin=protoc-gen-go="$(go tool -n protoc-gen-go)" \
  --plugin=protoc-gen-go-grpc="$(go tool -n protoc-gen-go-grpc)" \
  --go_out="$out" --go_opt=paths=source_relative \
  --go-grpc_out="$out" --go-grpc_opt=paths=source_relative \
  proto/ota/v1/*.proto
if [ "${1:-}" = "--check" ]; then
  for f in proto/ota/v1/*.pb.go; do
    if ! cmp -s "$f" "$out/${f#proto/}"; then
      echo "genproto: $f does not match the .proto files; run scripts/genproto.sh" >&2
      diff -u "$f" "$out/${f#proto/}" | head -20 >&2 || true
      exit 1
    fi
  done
  n_committed=$(ls proto/ota/v1/*.pb.go | wc -l); n_gen=$(ls "$out"/ota/v1/*.pb.go | wc -l)
  [ "$n_committed" = "$n_gen" ] || { echo "genproto: generated file set differs" >&2; exit 1; }
  echo "genproto: generated code matches the .proto files"
fi
