package sign

import (
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"os"
	"path/filepath"
	"time"
)

// Identity is a code-signing identity made in Go for one run: an ECDSA P-256 key (the AWS
// default) and a self-signed certificate the writer can trust. Tests that want the operator's
// own tool use OpenSSL instead.
type Identity struct {
	Key     *ecdsa.PrivateKey
	KeyPEM  []byte // PKCS#8
	CertPEM []byte
	// CertName is the job document's certfile, and the certificate's file name in the
	// writer's trust store (cn + ".crt.pem" unless changed).
	CertName string
}

// NewIdentity generates a key and a certificate with common name cn.
func NewIdentity(cn string) (*Identity, error) {
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
	return &Identity{
		Key:      key,
		KeyPEM:   pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: p8}),
		CertPEM:  pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		CertName: cn + ".crt.pem",
	}, nil
}

// WriteCert writes the certificate into dir under CertName and returns its path.
func (id *Identity) WriteCert(dir string) (string, error) {
	p := filepath.Join(dir, id.CertName)
	return p, os.WriteFile(p, id.CertPEM, 0o644)
}

// WritePublicKey writes the bare public key (PKIX PEM, a trust store entry without a
// certificate) to path.
func (id *Identity) WritePublicKey(path string) error {
	der, err := x509.MarshalPKIXPublicKey(&id.Key.PublicKey)
	if err != nil {
		return err
	}
	return os.WriteFile(path, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o644)
}

// Sign signs data held in memory (small test images) as sig-sha256-ecdsa: ASN.1 DER ECDSA
// over its SHA-256.
func (id *Identity) Sign(data []byte) ([]byte, error) {
	sum := sha256.Sum256(data)
	return ecdsa.SignASN1(rand.Reader, id.Key, sum[:])
}
