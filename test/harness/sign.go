package harness

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/hex"
	"encoding/pem"
	"fmt"
	"io"
	"math/big"
	mrand "math/rand/v2"
	"os"
	"path/filepath"
	"time"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/sign"
)

// Signer is a code-signing identity made for one run: an ECDSA P-256 key (the AWS default)
// and a self-signed certificate the writer trusts.
type Signer struct {
	Key     *ecdsa.PrivateKey
	KeyPEM  []byte // PKCS#8
	CertPEM []byte
	// CertName is the job document's certfile, and the certificate's file name in the writer's
	// trust store.
	CertName string
}

// NewSigner generates a key and a certificate with common name cn.
func NewSigner(cn string) (*Signer, error) {
	key, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		return nil, err
	}
	tmpl := &x509.Certificate{
		SerialNumber:          big.NewInt(time.Now().UnixNano()),
		Subject:               pkix.Name{CommonName: cn},
		NotBefore:             time.Now().Add(-time.Hour),
		NotAfter:              time.Now().Add(24 * time.Hour),
		KeyUsage:              x509.KeyUsageDigitalSignature,
		ExtKeyUsage:           []x509.ExtKeyUsage{x509.ExtKeyUsageCodeSigning},
		BasicConstraintsValid: true,
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		return nil, err
	}
	p8, err := x509.MarshalPKCS8PrivateKey(key)
	if err != nil {
		return nil, err
	}
	return &Signer{
		Key:      key,
		KeyPEM:   pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: p8}),
		CertPEM:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		CertName: cn + ".crt.pem",
	}, nil
}

// WriteCert writes the certificate into dir under CertName and returns its path.
func (s *Signer) WriteCert(dir string) (string, error) {
	p := filepath.Join(dir, s.CertName)
	return p, os.WriteFile(p, s.CertPEM, 0o644)
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
