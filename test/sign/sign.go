// Package sign signs image files the way a fleet operator does for AWS IoT OTA jobs, for the
// test backends (the emulator and the AWS backend) that put the signature in the job document.
//
// Every algorithm signs the SHA-256 digest of the whole file, so a file of any size is hashed
// as a stream and never held in memory:
//
//	sig-sha256-ecdsa    ECDSA over SHA-256, ASN.1 DER signature (AWS's default; P-256 expected)
//	sig-sha256-rsa      RSASSA-PKCS1-v1_5 with SHA-256
//	sig-sha256-rsa-pss  RSASSA-PSS, SHA-256, MGF1-SHA-256, salt length 32 (this project's extension)
//	sig-sha256-ed25519  pure Ed25519 over the 32-byte SHA-256 digest (this project's extension;
//	                    not Ed25519ph, and not Ed25519 over the raw file)
//
// The document value is base64 of the raw signature, as for AWS's own keys. The writer's
// verifier must follow the same scheme.
package sign

import (
	"context"
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

// pssSaltLength is the hash length: it verifies under both "auto" and "digest" salt settings
// (Go's PSSSaltLengthAuto, openssl's rsa_pss_saltlen:auto or :digest).
const pssSaltLength = rsa.PSSSaltLengthEqualsHash

// DocKey is the afr_ota job document key that carries a signature made with alg
// ("sig-" + alg). It does not check that alg is one this package can make: tests also send
// signatures made elsewhere under names the device must refuse.
func DocKey(alg string) string { return "sig-" + alg }

// Supported reports whether this package can sign with alg.
func Supported(alg string) bool {
	switch alg {
	case backend.SigSHA256ECDSA, backend.SigSHA256RSA, backend.SigSHA256RSAPSS, backend.SigSHA256Ed25519:
		return true
	}
	return false
}

// Digest streams r through SHA-256 and returns the digest and the byte count. ctx is checked
// between reads, so hashing a large image can be abandoned.
func Digest(ctx context.Context, r io.Reader) (digest []byte, n int64, err error) {
	h := sha256.New()
	n, err = io.Copy(h, ctxReader{ctx, r})
	if err != nil {
		return nil, n, err
	}
	return h.Sum(nil), n, nil
}

// FileDigest returns the SHA-256 of the file at path, read as a stream, and its size.
func FileDigest(ctx context.Context, path string) (digest []byte, size int64, err error) {
	f, err := os.Open(path)
	if err != nil {
		return nil, 0, err
	}
	defer f.Close()
	digest, size, err = Digest(ctx, f)
	if err != nil {
		return nil, 0, fmt.Errorf("hash %s: %w", path, err)
	}
	return digest, size, nil
}

type ctxReader struct {
	ctx context.Context
	r   io.Reader
}

func (c ctxReader) Read(p []byte) (int, error) {
	if err := c.ctx.Err(); err != nil {
		return 0, err
	}
	return c.r.Read(p)
}

// File signs the file at path with the PEM private key, using alg ("" = the key's default,
// see DefaultAlgorithm). The file is hashed as a stream.
func File(ctx context.Context, path string, keyPEM []byte, alg string) ([]byte, error) {
	k, alg, err := Key(keyPEM, alg)
	if err != nil {
		return nil, err
	}
	digest, _, err := FileDigest(ctx, path)
	if err != nil {
		return nil, err
	}
	return SignDigest(k, alg, digest)
}

// Key parses a PEM private key and resolves alg: "" becomes the key's default algorithm.
// The pair is not checked for fit here; SignDigest refuses a key that cannot make alg.
func Key(keyPEM []byte, alg string) (crypto.Signer, string, error) {
	k, err := ParsePrivateKey(keyPEM)
	if err != nil {
		return nil, "", err
	}
	if alg == "" {
		if alg, err = DefaultAlgorithm(k); err != nil {
			return nil, "", err
		}
	}
	return k, alg, nil
}

// ParsePrivateKey reads a PKCS#8, SEC 1 (EC) or PKCS#1 (RSA) private key from PEM. The block
// type is a hint: a key whose label does not match its encoding is still read.
func ParsePrivateKey(pemBytes []byte) (crypto.Signer, error) {
	block, _ := pem.Decode(pemBytes)
	if block == nil {
		return nil, errors.New("signing key: no PEM block")
	}
	parsers := []func([]byte) (any, error){
		x509.ParsePKCS8PrivateKey,
		func(b []byte) (any, error) { return x509.ParseECPrivateKey(b) },
		func(b []byte) (any, error) { return x509.ParsePKCS1PrivateKey(b) },
	}
	// Try the labelled encoding first, so its error is the one reported.
	switch block.Type {
	case "EC PRIVATE KEY":
		parsers[0], parsers[1] = parsers[1], parsers[0]
	case "RSA PRIVATE KEY":
		parsers[0], parsers[2] = parsers[2], parsers[0]
	}
	var first error
	for _, parse := range parsers {
		k, err := parse(block.Bytes)
		if err != nil {
			if first == nil {
				first = err
			}
			continue
		}
		s, ok := k.(crypto.Signer)
		if !ok {
			return nil, fmt.Errorf("signing key: unsupported key type %T", k)
		}
		return s, nil
	}
	return nil, fmt.Errorf("signing key: %q block is not a PKCS#8, EC or PKCS#1 private key: %w", block.Type, first)
}

// DefaultAlgorithm is the algorithm used for a key when the caller names none.
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

// SignDigest signs a SHA-256 digest with key according to alg (see the package comment).
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

// MarshalPrivateKeyPEM encodes k as PEM in form "pkcs8", "sec1" (ECDSA, "EC PRIVATE KEY") or
// "pkcs1" (RSA, "RSA PRIVATE KEY"): the encodings ParsePrivateKey accepts, for tests.
func MarshalPrivateKeyPEM(k crypto.Signer, form string) ([]byte, error) {
	var (
		der []byte
		typ string
		err error
	)
	switch form {
	case "pkcs8":
		der, err = x509.MarshalPKCS8PrivateKey(k)
		typ = "PRIVATE KEY"
	case "sec1":
		ek, ok := k.(*ecdsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("sec1 needs an ECDSA key, not %T", k)
		}
		der, err = x509.MarshalECPrivateKey(ek)
		typ = "EC PRIVATE KEY"
	case "pkcs1":
		rk, ok := k.(*rsa.PrivateKey)
		if !ok {
			return nil, fmt.Errorf("pkcs1 needs an RSA key, not %T", k)
		}
		der = x509.MarshalPKCS1PrivateKey(rk)
		typ = "RSA PRIVATE KEY"
	default:
		return nil, fmt.Errorf("unknown key form %q", form)
	}
	if err != nil {
		return nil, err
	}
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der}), nil
}
