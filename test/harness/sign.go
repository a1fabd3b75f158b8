package harness

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"io"
	mrand "math/rand/v2"
	"os"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/sign"
)

// Signer is a code-signing identity made for one run (sign.Identity: an ECDSA P-256 key, the
// AWS default, and a self-signed certificate the writer trusts), with the job file spec
// that carries it.
type Signer struct{ *sign.Identity }

// NewSigner generates a key and a certificate with common name cn.
func NewSigner(cn string) (*Signer, error) {
	id, err := sign.NewIdentity(cn)
	if err != nil {
		return nil, err
	}
	return &Signer{id}, nil
}

// SignFile signs the SHA-256 of the file at path (ASN.1 DER ECDSA signature, as in
// sig-sha256-ecdsa).
func (s *Signer) SignFile(path string) ([]byte, error) {
	return sign.File(context.Background(), path, s.KeyPEM, backend.SigSHA256ECDSA)
}

// File returns the job file spec for image: the cloud signs it with this signer's key.
func (s *Signer) File(image string) backend.FileSpec {
	return backend.FileSpec{
		LocalPath:     image,
		DevicePath:    DevicePath,
		FileType:      0,
		CertName:      s.CertName,
		SigningKeyPEM: s.KeyPEM,
		SigAlgorithm:  backend.SigSHA256ECDSA,
	}
}

// WriteImage writes size pseudo-random bytes derived from seed (the same seed gives the same
// image) to path, streaming.
func WriteImage(path string, size int64, seed uint64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	r := mrand.New(mrand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	buf := make([]byte, 64<<10)
	for left := size; left > 0; {
		n := min(left, int64(len(buf)))
		for i := int64(0); i < n; i += 8 {
			v := r.Uint64()
			for j := int64(0); j < 8 && i+j < n; j++ {
				buf[i+j] = byte(v >> (8 * j))
			}
		}
		if _, err := f.Write(buf[:n]); err != nil {
			f.Close()
			return err
		}
		left -= n
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

// CorruptCopy copies src to dst with one byte flipped at offset off.
func CorruptCopy(src, dst string, off int64) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.Create(dst)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	b := make([]byte, 1)
	if _, err := out.ReadAt(b, off); err != nil {
		out.Close()
		return fmt.Errorf("corrupt at %d: %w", off, err)
	}
	b[0] ^= 0xff
	if _, err := out.WriteAt(b, off); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}

// FileSHA256 is the hex SHA-256 of a file, read as a stream.
func FileSHA256(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}

// FilePrefixSHA256 is the hex SHA-256 of the first n bytes of a file (a slot can be larger
// than the image written to it); an error if the file is shorter.
func FilePrefixSHA256(path string, n int64) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.CopyN(h, f, n); err != nil {
		return "", fmt.Errorf("%s: %w", path, err)
	}
	return hex.EncodeToString(h.Sum(nil)), nil
}
