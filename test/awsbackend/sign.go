package awsbackend

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

// Signature scheme, shared with the writer's verifier. Every algorithm signs the SHA-256 digest
// of the whole file, so a file of any size is hashed as a stream and never held in memory:
//
//	sig-sha256-ecdsa    ECDSA over SHA-256, ASN.1 DER signature (AWS's default; P-256 expected)
//	sig-sha256-rsa      RSASSA-PKCS1-v1_5 with SHA-256
//	sig-sha256-rsa-pss  RSASSA-PSS, SHA-256, MGF1-SHA-256, salt length 32 (this project's extension)
//	sig-sha256-ed25519  pure Ed25519 over the 32-byte SHA-256 digest (this project's extension;
//	                    not Ed25519ph, and not Ed25519 over the raw file)
//
// The document value is base64 of the raw signature, as for AWS's own keys.

// pssSaltLength is the hash length: it verifies under both "auto" and "digest" salt settings
// (Go's PSSSaltLengthAuto, openssl's rsa_pss_saltlen:auto or :digest).
const pssSaltLength = rsa.PSSSaltLengthEqualsHash

// SigKey is the job document key that carries a signature made with alg ("sig-" + alg).
func SigKey(alg string) string { return "sig-" + alg }

// FileDigest returns the SHA-256 of the file at path, read as a stream, and its size.
func FileDigest(path string) (digest []byte, size int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	h := sha256.New()
	n, err := io.Copy(h, f)
	if err != nil {
		return nil, 0, fmt.Errorf("hash %s: %w", path, err)
	}
	return h.Sum(nil), n, nil
}

// ParsePrivateKey reads a PKCS#8, SEC 1 (EC) or PKCS#1 (RSA) private key from PEM.
func ParsePrivateKey(pemBytes []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(pemBytes)
	if block == nil {
		return nil, errors.New("signing key: no PEM block")
	}
	if k, err := x509.ParsePKCS8PrivateKey(block.Bytes); err == nil {
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("signing key: unsupported key type %T", k)
		}
		return s, nil
	}
	if k, err := x509.ParseECPrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	if k, err := x509.ParsePKCS1PrivateKey(block.Bytes); err == nil {
		return k, nil
	}
	return nil, fmt.Errorf("signing key: %q block is not a PKCS#8, EC or PKCS#1 private key", block.Type)
}

// DefaultAlgorithm is the algorithm used for a key when the FileSpec names none.
func DefaultAlgorithm(key crypto.Signer) (string, error) {
	switch key.(type) {
	case *ecdsa.PrivateKey:
		return backend.SigSHA256ECDSA, nil
	case *rsa.PrivateKey:
		return backend.SigSHA256RSA, nil
	case ed25519.PrivateKey:
		return backend.SigSHA256Ed25519, nil
	}
	return "", fmt.Errorf("signing key: unsupported key type %T", key)
}

// SignDigest signs a SHA-256 digest with key according to alg (see the scheme above).
func SignDigest(key crypto.Signer, alg string, digest []byte) ([]byte, error) {
	if len(digest) != sha256.Size {
		return nil, fmt.Errorf("digest is %d bytes, want %d", len(digest), sha256.Size)
	}
	mismatch := func() error { return fmt.Errorf("signing key %T cannot make %s signatures", key, alg) }
	switch alg {
	case backend.SigSHA256ECDSA:
		k, ok := key.(*ecdsa.PrivateKey)
		if !ok {
			return nil, mismatch()
		}
		return ecdsa.SignASN1(rand.Reader, k, digest)
	case backend.SigSHA256RSA:
		k, ok := key.(*rsa.PrivateKey)
		if !ok {
			return nil, mismatch()
		}
		return rsa.SignPKCS1v15(rand.Reader, k, crypto.SHA256, digest)
	case backend.SigSHA256RSAPSS:
		k, ok := key.(*rsa.PrivateKey)
		if !ok {
			return nil, mismatch()
		}
		return rsa.SignPSS(rand.Reader, k, crypto.SHA256, digest,
			&rsa.PSSOptions{SaltLength: pssSaltLength, Hash: crypto.SHA256})
	case backend.SigSHA256Ed25519:
		k, ok := key.(ed25519.PrivateKey)
		if !ok {
			return nil, mismatch()
		}
		return ed25519.Sign(k, digest), nil
	}
	return nil, fmt.Errorf("cannot sign with algorithm %q", alg)
}

// signFile returns the document signature key and value for f: it signs the file itself
// when f.SigningKeyPEM is set, otherwise passes f.Signature through. An unsigned file gives
// an empty key (tests use unsigned jobs to check that nothing unsigned is ever activated).
func signFile(f backend.FileSpec, digest []byte) (key string, sig []byte, err error) {
	if len(f.SigningKeyPEM) > 0 {
		k, err := ParsePrivateKey(f.SigningKeyPEM)
		if err != nil {
			return "", nil, err
		}
		alg := f.SigAlgorithm
		if alg == "" {
			if alg, err = DefaultAlgorithm(k); err != nil {
				return "", nil, err
			}
		}
		sig, err := SignDigest(k, alg, digest)
		if err != nil {
			return "", nil, err
		}
		return SigKey(alg), sig, nil
	}
	if len(f.Signature) == 0 {
		return "", nil, nil
	}
	alg := f.SigAlgorithm
	if alg == "" {
		alg = backend.SigSHA256ECDSA
	}
	// Any well-formed name passes, so tests can send algorithms the device must refuse.
	if !validAlgName(alg) {
		return "", nil, fmt.Errorf("signature algorithm %q: want lower-case letters, digits and '-'", alg)
	}
	return SigKey(alg), f.Signature, nil
}

func validAlgName(s string) bool {
	if s == "" || len(s) > 60 {
		return false
	}
	for _, r := range s {
		if !(r >= 'a' && r <= 'z' || r >= '0' && r <= '9' || r == '-') {
			return false
		}
	}
	return true
}
