package emulator

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"io"
	"os"

	"github.com/gwota/gwota/test/backend"
)

// sigKeys maps a signature algorithm to its afr_ota document key.
var sigKeys = map[string]string{
	backend.SigSHA256ECDSA:   "sig-sha256-ecdsa",
	backend.SigSHA256RSA:     "sig-sha256-rsa",
	backend.SigSHA256RSAPSS:  "sig-sha256-rsa-pss",
	backend.SigSHA256Ed25519: "sig-sha256-ed25519",
}

// hashFile streams the file through SHA-256: an image is never read into memory whole.
func hashFile(f *os.File) ([]byte, int64, error) {
	h := sha256.New()
	n, err := io.Copy(h, io.NewSectionReader(f, 0, 1<<62))
	if err != nil {
		return nil, 0, err
	}
	return h.Sum(nil), n, nil
}

// ParsePrivateKey reads a PKCS#8, SEC1 (EC) or PKCS#1 (RSA) private key in PEM.
func ParsePrivateKey(pemBytes []byte) (crypto.Signer, error) {
	blk, _ := pem.Decode(pemBytes)
	if blk == nil {
		return nil, errors.New("signing key: no PEM block")
	}
	var key any
	var err error
	switch blk.Type {
	case "PRIVATE KEY":
		key, err = x509.ParsePKCS8PrivateKey(blk.Bytes)
	case "EC PRIVATE KEY":
		key, err = x509.ParseECPrivateKey(blk.Bytes)
	case "RSA PRIVATE KEY":
		key, err = x509.ParsePKCS1PrivateKey(blk.Bytes)
	default:
		return nil, fmt.Errorf("signing key: unsupported PEM type %q", blk.Type)
	}
	if err != nil {
		return nil, fmt.Errorf("signing key: %w", err)
	}
	s, ok := key.(crypto.Signer)
	if !ok {
		return nil, fmt.Errorf("signing key: %T cannot sign", key)
	}
	return s, nil
}

// defaultAlgorithm picks the algorithm a key implies when the spec names none.
func defaultAlgorithm(k crypto.Signer) string {
	switch k.(type) {
	case *rsa.PrivateKey:
		return backend.SigSHA256RSA
	case ed25519.PrivateKey:
		return backend.SigSHA256Ed25519
	default:
		return backend.SigSHA256ECDSA
	}
}

// signDigest signs the SHA-256 digest of a file. ECDSA gives an ASN.1 DER signature, RSA
// PKCS#1 v1.5 or PSS (salt length = hash length). Ed25519 signs the 32-byte SHA-256 digest
// itself (pure Ed25519 over the digest), so a device can verify a streamed image without
// holding it: the device side must do the same.
func signDigest(k crypto.Signer, alg string, digest []byte) ([]byte, error) {
	switch alg {
	case backend.SigSHA256ECDSA:
		ek, ok := k.(*ecdsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("algorithm %s needs an EC key, got %T", alg, k)
		}
		return ecdsa.SignASN1(rand.Reader, ek, digest)
	case backend.SigSHA256RSA:
		rk, ok := k.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("algorithm %s needs an RSA key, got %T", alg, k)
		}
		return rsa.SignPKCS1v15(rand.Reader, rk, crypto.SHA256, digest)
	case backend.SigSHA256RSAPSS:
		rk, ok := k.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("algorithm %s needs an RSA key, got %T", alg, k)
		}
		return rsa.SignPSS(rand.Reader, rk, crypto.SHA256, digest, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	case backend.SigSHA256Ed25519:
		ek, ok := k.(ed25519.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("algorithm %s needs an Ed25519 key, got %T", alg, k)
		}
		return ed25519.Sign(ek, digest), nil
	default:
		return nil, fmt.Errorf("unknown signature algorithm %q", alg)
	}
}
