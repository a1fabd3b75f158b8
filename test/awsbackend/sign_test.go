package awsbackend

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"os"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/sign"
)

// pemKey encodes k as PKCS#8, SEC 1 ("EC") or PKCS#1 ("RSA").
func pemKey(t *testing.T, k crypto.Signer, form string) []byte {
	t.Helper()
	b, err := sign.MarshalPrivateKeyPEM(k, form)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func mustDigest(t *testing.T, path string) []byte {
	t.Helper()
	d, _, err := sign.FileDigest(t.Context(), path)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestSignFile(t *testing.T) {
	img, _ := writeFile(t, 10)
	d := mustDigest(t, img)
	for _, tc := range []struct {
		name    string
		spec    backend.FileSpec
		wantKey string
		wantErr string
	}{
		{"unsigned", backend.FileSpec{}, "", ""},
		{"default ecdsa", backend.FileSpec{Signature: []byte{1, 2}}, "sig-sha256-ecdsa", ""},
		{"algorithm the device must refuse", backend.FileSpec{Signature: []byte{1}, SigAlgorithm: "sha1-rsa"}, "sig-sha1-rsa", ""},
		{"malformed algorithm", backend.FileSpec{Signature: []byte{1}, SigAlgorithm: "SHA256\"x"}, "", "signature algorithm"},
		{"ecdsa key, default algorithm", backend.FileSpec{SigningKeyPEM: pemKey(t, mustEC(t), "sec1")}, "sig-sha256-ecdsa", ""},
		{"rsa key, pss", backend.FileSpec{SigningKeyPEM: pemKey(t, rsaKey(t), "pkcs1"), SigAlgorithm: backend.SigSHA256RSAPSS}, "sig-sha256-rsa-pss", ""},
		{"unknown algorithm with key", backend.FileSpec{SigningKeyPEM: pemKey(t, mustEC(t), "pkcs8"), SigAlgorithm: "sha1-ecdsa"}, "", `cannot sign with algorithm "sha1-ecdsa"`},
	} {
		t.Run(tc.name, func(t *testing.T) {
			key, sig, err := signFile(tc.spec, d)
			if tc.wantErr != "" {
				if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
					t.Fatalf("error %v, want %q", err, tc.wantErr)
				}
				return
			}
			if err != nil || key != tc.wantKey {
				t.Fatalf("signFile = %q, %v; want %q", key, err, tc.wantKey)
			}
			if tc.spec.SigningKeyPEM == nil {
				if string(sig) != string(tc.spec.Signature) {
					t.Fatalf("signature %x passed through as %x", tc.spec.Signature, sig)
				}
				return
			}
			// Signed here: the signature verifies over the digest with the key's public half.
			k, err := sign.ParsePrivateKey(tc.spec.SigningKeyPEM)
			if err != nil {
				t.Fatal(err)
			}
			var ok bool
			switch pub := k.Public().(type) {
			case *ecdsa.PublicKey:
				ok = ecdsa.VerifyASN1(pub, d, sig)
			case *rsa.PublicKey:
				ok = rsa.VerifyPSS(pub, crypto.SHA256, d, sig, &rsa.PSSOptions{SaltLength: 32}) == nil
			}
			if !ok {
				t.Fatalf("%s signature does not verify", key)
			}
		})
	}
}

func rsaKey(t *testing.T) *rsa.PrivateKey {
	k, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

func mustEC(t *testing.T) *ecdsa.PrivateKey {
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	return k
}

// TestLargeImageFlatMemory: hashing, signing and uploading a 64 MiB image allocates a small,
// fixed amount, not the image (the stand-in hashes the upload as a stream too).
func TestLargeImageFlatMemory(t *testing.T) {
	if testing.Short() {
		t.Skip("large file")
	}
	const size = 64 << 20
	img := filepath.Join(t.TempDir(), "big.img")
	f, err := os.Create(img)
	if err != nil {
		t.Fatal(err)
	}
	// Sparse: costs no disk, reads as zeros.
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.Close()
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	_, keyPEM := ecKeyPEM(t)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	err = b.CreateJob(t.Context(), backend.JobSpec{
		JobID: "big", Protocols: []string{backend.ProtocolMQTT},
		Files: []backend.FileSpec{{LocalPath: img, SigningKeyPEM: keyPEM}},
	})
	runtime.ReadMemStats(&after)
	if err != nil {
		t.Fatalf("CreateJob: %v", err)
	}
	s.mu.Lock()
	sum := s.objectSums[testBucket+"/"+b.objectKey("big", 0, img)]
	s.mu.Unlock()
	if want := hexString(mustDigest(t, img)); sum != want {
		t.Fatalf("uploaded SHA-256 %s, want %s", sum, want)
	}
	allocated := after.TotalAlloc - before.TotalAlloc
	t.Logf("CreateJob of a %d MiB image allocated %.1f MiB", size>>20, float64(allocated)/(1<<20))
	if allocated > 8<<20 {
		t.Errorf("CreateJob allocated %d bytes for a %d-byte image: something buffers it", allocated, size)
	}
}
