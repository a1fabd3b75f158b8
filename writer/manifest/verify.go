package manifest

import (
	"context"
	"io"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

// MaxFileSize is the largest manifest file: the header and a record for every block.
const MaxFileSize = int64(prefixSize) + MaxHeaderSize + MaxBlocks*HashSize

// Verifier is the writer's trust store (*verify.Store of writer/verify). This package takes
// it as an interface so that ota-net can read chunk tables without linking the writer's
// verification code.
type Verifier interface {
	Verify(ctx context.Context, r io.ReaderAt, size int64, alg otav1.SigAlgorithm, sig []byte, certName string) ([]byte, error)
}

// Verify checks the manifest file's signature (its OTA file entry's, e.g. sig-sha256-ecdsa,
// over all size bytes of r) against the writer's trust store, exactly as an image's, and
// only then parses it. The file must not change afterwards: the writer keeps it in its own
// state directory. Errors are the store's (REASON_SIG_CHECK_FAILED, REASON_UNTRUSTED_SIGNER,
// ...) and Open's.
func Verify(ctx context.Context, store Verifier, r io.ReaderAt, size int64, alg otav1.SigAlgorithm, sig []byte, certName string) (*Manifest, error) {
	if size > MaxFileSize {
		return nil, bad("%d bytes is larger than any manifest", size)
	}
	if _, err := store.Verify(ctx, r, size, alg, sig, certName); err != nil {
		return nil, err
	}
	return Open(r, size)
}
