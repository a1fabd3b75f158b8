// Package verify is the writer's trust store and signature check. The store holds only the
// keys named in the configuration; a job's cert_name can select among them, never add one.
// Verification streams the image from the medium through the hash and never buffers it.
package verify

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rsa"
	"crypto/sha1" //nolint:gosec // refused unless allow_sha1
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"path/filepath"
	"sync"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/target"
)

// MinRSABits is the smallest RSA modulus accepted in the trust store.
const MinRSABits = 2048

// Read-back buffers: readBufs buffers of readBuf bytes, aligned for O_DIRECT (the medium's
// read-back reads straight into them), so one is read while another is hashed. Large enough
// for a device without read-ahead to stream, small enough to keep memory flat.
const (
	readBuf  = 512 << 10
	readBufs = 2
)

var bufPool = sync.Pool{New: func() any { b := target.AlignedBuffer(readBuf); return &b }}

// Key is one trusted key.
type Key struct {
	// Name is the base name of the configured file; CN the certificate's common name ("" for
	// a bare public key). A job's cert_name selects a key by either.
	Name string
	CN   string
	Path string
	Pub  crypto.PublicKey
}

// Store is the trust store. It is immutable after Load and safe for concurrent use.
type Store struct {
	keys      []Key
	allowSHA1 bool
}

// Load reads every configured PEM file. Each must hold a certificate or a public key of a
// supported type; anything else is a configuration error (refuse to start rather than
// silently trust less or more).
func Load(paths []string, allowSHA1 bool) (*Store, error) {
	s := &Store{allowSHA1: allowSHA1}
	for _, p := range paths {
		data, err := os.ReadFile(p)
		if err != nil {
			return nil, fmt.Errorf("trusted key: %w", err)
		}
		k, err := ParseKey(data)
		if err != nil {
			return nil, fmt.Errorf("trusted key %s: %w", p, err)
		}
		k.Path, k.Name = p, filepath.Base(p)
		s.keys = append(s.keys, k)
	}
	return s, nil
}

// ParseKey reads the first certificate or public key in PEM data.
func ParseKey(data []byte) (Key, error) {
	for {
		var blk *pem.Block
		blk, data = pem.Decode(data)
		if blk == nil {
			return Key{}, errors.New("no PEM certificate or public key")
		}
		var k Key
		switch blk.Type {
		case "CERTIFICATE":
			cert, err := x509.ParseCertificate(blk.Bytes)
			if err != nil {
				return Key{}, err
			}
			k = Key{CN: cert.Subject.CommonName, Pub: cert.PublicKey}
		case "PUBLIC KEY":
			pub, err := x509.ParsePKIXPublicKey(blk.Bytes)
			if err != nil {
				return Key{}, err
			}
			k = Key{Pub: pub}
		case "RSA PUBLIC KEY":
			pub, err := x509.ParsePKCS1PublicKey(blk.Bytes)
			if err != nil {
				return Key{}, err
			}
			k = Key{Pub: pub}
		default:
			continue // e.g. parameters before the key
		}
		return k, checkKey(k.Pub)
	}
}

func checkKey(pub crypto.PublicKey) error {
	switch p := pub.(type) {
	case *ecdsa.PublicKey:
		if p.Curve != elliptic.P256() {
			return fmt.Errorf("ECDSA curve %s not supported (P-256 only)", p.Curve.Params().Name)
		}
	case *rsa.PublicKey:
		if p.N.BitLen() < MinRSABits {
			return fmt.Errorf("RSA key of %d bits, at least %d required", p.N.BitLen(), MinRSABits)
		}
	case ed25519.PublicKey:
	default:
		return fmt.Errorf("key type %T not supported", pub)
	}
	return nil
}

// Keys returns the trusted keys (copies).
func (s *Store) Keys() []Key { return append([]Key(nil), s.keys...) }

// Algorithms lists what this store can verify, in preference order.
func (s *Store) Algorithms() []otav1.SigAlgorithm {
	a := []otav1.SigAlgorithm{
		otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256,
		otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256,
		otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256,
		otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256,
	}
	if s.allowSHA1 {
		a = append(a, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1, otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA1)
	}
	return a
}

// hashOf is the digest an algorithm signs; ok is false for unknown algorithms.
func hashOf(alg otav1.SigAlgorithm) (h crypto.Hash, sha1Variant bool, ok bool) {
	switch alg {
	case otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256,
		otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256, otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256:
		return crypto.SHA256, false, true
	case otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1, otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA1:
		return crypto.SHA1, true, true
	}
	return 0, false, false
}

func keyFits(alg otav1.SigAlgorithm, pub crypto.PublicKey) bool {
	switch pub.(type) {
	case *ecdsa.PublicKey:
		return alg == otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256 || alg == otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1
	case *rsa.PublicKey:
		return alg == otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256 || alg == otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256 ||
			alg == otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA1
	case ed25519.PublicKey:
		return alg == otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256
	}
	return false
}

// Select returns the trusted keys a job may be verified against: those whose file base name
// or certificate CN equals certName (or its base name), restricted to keys that fit alg. An
// empty certName selects every trusted key of a fitting type. It fails with
// REASON_UNSUPPORTED for an unknown or refused algorithm and REASON_UNTRUSTED_SIGNER when no
// key is left (including when none is configured: fail closed).
func (s *Store) Select(alg otav1.SigAlgorithm, certName string) ([]Key, error) {
	_, sha1Variant, ok := hashOf(alg)
	if !ok {
		return nil, status.Errorf(otav1.Reason_REASON_UNSUPPORTED, "signature algorithm %s not supported", alg)
	}
	if sha1Variant && !s.allowSHA1 {
		return nil, status.Errorf(otav1.Reason_REASON_UNSUPPORTED, "signature algorithm %s refused: SHA-1 is not allowed (allow_sha1)", alg)
	}
	if len(s.keys) == 0 {
		return nil, status.Errorf(otav1.Reason_REASON_UNTRUSTED_SIGNER, "no trusted key configured: nothing can be verified")
	}
	base := filepath.Base(certName)
	var out []Key
	named := false
	for _, k := range s.keys {
		if certName != "" && k.Name != certName && k.Name != base && (k.CN == "" || k.CN != certName) {
			continue
		}
		named = true
		if keyFits(alg, k.Pub) {
			out = append(out, k)
		}
	}
	switch {
	case certName != "" && !named:
		return nil, status.Errorf(otav1.Reason_REASON_UNTRUSTED_SIGNER, "certificate %q is not in the trust store", certName).WithMeta("cert_name", certName)
	case len(out) == 0:
		return nil, status.Errorf(otav1.Reason_REASON_UNTRUSTED_SIGNER, "no trusted key named %q fits %s", certName, alg).WithMeta("cert_name", certName)
	}
	return out, nil
}

// Check validates a signature's shape before any data is written, so a job that could never
// verify is refused up front.
func (s *Store) Check(alg otav1.SigAlgorithm, sig []byte, certName string) error {
	if len(sig) == 0 {
		return status.Errorf(otav1.Reason_REASON_SIG_CHECK_FAILED, "no signature: an unsigned image is never activated")
	}
	if len(sig) > 1024 {
		return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "signature of %d bytes is too long", len(sig))
	}
	_, err := s.Select(alg, certName)
	return err
}

// Verify hashes exactly size bytes of r from offset 0 and checks sig against the selected
// keys. It returns the SHA-256 of the image (also for SHA-1 algorithms, for reporting).
// Errors: REASON_SIG_CHECK_FAILED on mismatch, REASON_FILE_CLOSE_FAILED when the medium
// cannot be read back, and those of Select.
func (s *Store) Verify(ctx context.Context, r io.ReaderAt, size int64, alg otav1.SigAlgorithm, sig []byte, certName string) ([]byte, error) {
	keys, err := s.Select(alg, certName)
	if err != nil {
		return nil, err
	}
	if len(sig) == 0 {
		return nil, status.Errorf(otav1.Reason_REASON_SIG_CHECK_FAILED, "no signature")
	}
	h, _, _ := hashOf(alg)
	sum256, sumAlg, err := Digest(ctx, r, size, h)
	if err != nil {
		return nil, err
	}
	for _, k := range keys {
		if verifyDigest(alg, k.Pub, h, sumAlg, sig) {
			return sum256, nil
		}
	}
	return sum256, status.Errorf(otav1.Reason_REASON_SIG_CHECK_FAILED, "signature does not verify against %d trusted key(s)", len(keys)).
		WithMeta("sha256", fmt.Sprintf("%x", sum256))
}

// Digest streams exactly size bytes of r through SHA-256 (and h when it is another hash).
// The next buffer is read while the last one is hashed. Reads are rounded up to the read-back
// alignment, so a medium read with O_DIRECT never needs a bounce buffer; bytes past size (the
// rest of a slot) are not hashed.
func Digest(ctx context.Context, r io.ReaderAt, size int64, h crypto.Hash) (sum256, sumH []byte, err error) {
	if size < 0 {
		return nil, nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "negative size")
	}
	s256 := sha256.New()
	var other hash.Hash
	if h == crypto.SHA1 {
		other = sha1.New() //nolint:gosec
	}
	type chunk struct {
		buf *[]byte
		n   int64
		err error
	}
	free := make(chan *[]byte, readBufs)
	filled := make(chan chunk, readBufs) // never blocks: at most readBufs buffers exist
	for range readBufs {
		free <- bufPool.Get().(*[]byte)
	}
	stop := make(chan struct{})
	var wg sync.WaitGroup
	wg.Add(1)
	go func() {
		defer wg.Done()
		defer close(filled)
		for off := int64(0); off < size; {
			var bp *[]byte
			select {
			case bp = <-free:
			case <-stop:
				return
			}
			n := min(int64(len(*bp)), size-off)
			want := min(int64(len(*bp)), (n+target.Alignment-1)&^(target.Alignment-1))
			got, rerr := r.ReadAt((*bp)[:want], off)
			if int64(got) < n {
				if rerr == nil || rerr == io.EOF {
					rerr = io.ErrUnexpectedEOF
				}
				filled <- chunk{bp, n, fmt.Errorf("read back at offset %d: %w", off+int64(got), rerr)}
				return
			}
			filled <- chunk{bp, n, nil}
			off += n
		}
	}()
	defer func() {
		close(stop)
		wg.Wait()
		for c := range filled {
			free <- c.buf
		}
		for range readBufs {
			bufPool.Put(<-free)
		}
	}()
	var done int64
	for c := range filled {
		if c.err != nil {
			free <- c.buf
			return nil, nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "%w", c.err)
		}
		if err := ctx.Err(); err != nil {
			free <- c.buf
			return nil, nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "verification interrupted: %w", err)
		}
		s256.Write((*c.buf)[:c.n])
		if other != nil {
			other.Write((*c.buf)[:c.n])
		}
		done += c.n
		free <- c.buf
	}
	if done != size {
		return nil, nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "read back %d of %d bytes", done, size)
	}
	sum256 = s256.Sum(nil)
	if other != nil {
		return sum256, other.Sum(nil), nil
	}
	return sum256, sum256, nil
}

func verifyDigest(alg otav1.SigAlgorithm, pub crypto.PublicKey, h crypto.Hash, digest, sig []byte) bool {
	switch p := pub.(type) {
	case *ecdsa.PublicKey:
		return ecdsa.VerifyASN1(p, digest, sig)
	case *rsa.PublicKey:
		if alg == otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256 {
			return rsa.VerifyPSS(p, h, digest, sig, &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthAuto, Hash: h}) == nil
		}
		return rsa.VerifyPKCS1v15(p, h, digest, sig) == nil
	case ed25519.PublicKey:
		// Ed25519 signs the 32-byte SHA-256 digest of the file (pure Ed25519 over the digest),
		// so the image is streamed once. openssl equivalent:
		//   openssl dgst -sha256 -binary f > d && openssl pkeyutl -sign -inkey k -rawin -in d
		return ed25519.Verify(p, digest, sig)
	}
	return false
}
