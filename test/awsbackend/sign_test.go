package awsbackend

import (
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"

	"github.com/gwota/gwota/test/backend"
)

// pemKey encodes k as PKCS#8, SEC 1 ("EC") or PKCS#1 ("RSA").
func pemKey(t *testing.T, k crypto.Signer, form string) []byte {
	t.Helper()
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
		der, err = x509.MarshalECPrivateKey(k.(*ecdsa.PrivateKey))
		typ = "EC PRIVATE KEY"
	case "pkcs1":
		der = x509.MarshalPKCS1PrivateKey(k.(*rsa.PrivateKey))
		typ = "RSA PRIVATE KEY"
	}
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: typ, Bytes: der})
}

func openssl(t *testing.T, args ...string) error {
	t.Helper()
	out, err := exec.Command("openssl", args...).CombinedOutput()
	if err != nil {
		return fmt.Errorf("openssl %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

// opensslVerify checks sig over the file at path with openssl, the way a third party would.
func opensslVerify(t *testing.T, alg, pubPath, sigPath, path string) error {
	t.Helper()
	switch alg {
	case backend.SigSHA256ECDSA, backend.SigSHA256RSA:
		return openssl(t, "dgst", "-sha256", "-verify", pubPath, "-signature", sigPath, path)
	case backend.SigSHA256RSAPSS:
		// saltlen:digest is strict: it also proves the salt length is 32.
		return openssl(t, "dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest",
			"-verify", pubPath, "-signature", sigPath, path)
	case backend.SigSHA256Ed25519:
		// Pure Ed25519 over the 32-byte SHA-256 digest of the file.
		digest, _, err := FileDigest(path)
		if err != nil {
			t.Fatal(err)
		}
		dPath := sigPath + ".digest"
		if err := os.WriteFile(dPath, digest, 0o600); err != nil {
			t.Fatal(err)
		}
		return openssl(t, "pkeyutl", "-verify", "-pubin", "-inkey", pubPath, "-rawin", "-in", dPath, "-sigfile", sigPath)
	}
	t.Fatalf("no openssl check for %s", alg)
	return nil
}

func TestSignFileVerifiesWithOpenSSL(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Fatal("openssl is required here (Debian package openssl)")
	}
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	for _, tc := range []struct {
		name    string
		key     crypto.Signer
		form    string
		alg     string // requested ("" = the key's default)
		wantAlg string
	}{
		{"ecdsa pkcs8 default", ec, "pkcs8", "", backend.SigSHA256ECDSA},
		{"ecdsa sec1", ec, "sec1", backend.SigSHA256ECDSA, backend.SigSHA256ECDSA},
		{"rsa pkcs1 default", rk, "pkcs1", "", backend.SigSHA256RSA},
		{"rsa pkcs8", rk, "pkcs8", backend.SigSHA256RSA, backend.SigSHA256RSA},
		{"rsa-pss", rk, "pkcs8", backend.SigSHA256RSAPSS, backend.SigSHA256RSAPSS},
		{"ed25519 default", ed, "pkcs8", "", backend.SigSHA256Ed25519},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img, _ := writeFile(t, 200_001) // not a multiple of any buffer size
			key, sig, err := signFile(backend.FileSpec{LocalPath: img, SigningKeyPEM: pemKey(t, tc.key, tc.form), SigAlgorithm: tc.alg}, mustDigest(t, img))
			if err != nil {
				t.Fatalf("signFile: %v", err)
			}
			if key != "sig-"+tc.wantAlg {
				t.Errorf("document key %q, want sig-%s", key, tc.wantAlg)
			}
			dir := t.TempDir()
			pubDER, err := x509.MarshalPKIXPublicKey(tc.key.Public())
			if err != nil {
				t.Fatal(err)
			}
			pubPath, sigPath := filepath.Join(dir, "pub.pem"), filepath.Join(dir, "sig.bin")
			os.WriteFile(pubPath, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: pubDER}), 0o600)
			os.WriteFile(sigPath, sig, 0o600)
			if err := opensslVerify(t, tc.wantAlg, pubPath, sigPath, img); err != nil {
				t.Fatalf("openssl rejects the signature: %v", err)
			}
			// And the check can fail: one flipped byte must not verify.
			data, _ := os.ReadFile(img)
			data[len(data)/2] ^= 1
			os.WriteFile(img, data, 0o600)
			if err := opensslVerify(t, tc.wantAlg, pubPath, sigPath, img); err == nil {
				t.Fatal("openssl accepts the signature over a modified file")
			}
		})
	}
}

func mustDigest(t *testing.T, path string) []byte {
	t.Helper()
	d, _, err := FileDigest(path)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func TestSignFilePassThrough(t *testing.T) {
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
			if err != nil || key != tc.wantKey || string(sig) != string(tc.spec.Signature) {
				t.Fatalf("signFile = %q, %x, %v; want %q, %x", key, sig, err, tc.wantKey, tc.spec.Signature)
			}
		})
	}
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
