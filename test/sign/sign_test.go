package sign

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/pem"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/gwota/gwota/test/backend"
)

// pemKey encodes k as PKCS#8, SEC 1 ("EC") or PKCS#1 ("RSA").
func pemKey(t *testing.T, k crypto.Signer, form string) []byte {
	t.Helper()
	b, err := MarshalPrivateKeyPEM(k, form)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func needOpenSSL(t *testing.T) {
	t.Helper()
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Fatal("openssl is required here (Debian package openssl)")
	}
}

// opensslVerify checks sig over the file at path with openssl, the way a third party would.
func opensslVerify(t *testing.T, alg, pubPath, sigPath, path string) error {
	t.Helper()
	switch alg {
	case backend.SigSHA256ECDSA, backend.SigSHA256RSA:
		return openssl("dgst", "-sha256", "-verify", pubPath, "-signature", sigPath, path)
	case backend.SigSHA256RSAPSS:
		// saltlen:digest is strict: it also proves the salt length is 32.
		return openssl("dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:digest",
			"-verify", pubPath, "-signature", sigPath, path)
	case backend.SigSHA256Ed25519:
		// Pure Ed25519 over the 32-byte SHA-256 digest of the file.
		digest, _, err := FileDigest(t.Context(), path)
		if err != nil {
			t.Fatal(err)
		}
		dPath := sigPath + ".digest"
		if err := os.WriteFile(dPath, digest, 0o600); err != nil {
			t.Fatal(err)
		}
		return openssl("pkeyutl", "-verify", "-pubin", "-inkey", pubPath, "-rawin", "-in", dPath, "-sigfile", sigPath)
	}
	t.Fatalf("no openssl check for %s", alg)
	return nil
}

// writeFile writes n pseudo-random bytes to a new file.
func writeFile(t *testing.T, n int) string {
	t.Helper()
	data := make([]byte, n)
	rand.Read(data)
	p := filepath.Join(t.TempDir(), "image.bin")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

var (
	keysOnce       sync.Once
	ecKey, rsaKey  crypto.Signer
	edKey          ed25519.PrivateKey
	errGenerateKey error
)

func goKeys(t *testing.T) (ec, rk crypto.Signer, ed ed25519.PrivateKey) {
	t.Helper()
	keysOnce.Do(func() {
		var err1, err2, err3 error
		ecKey, err1 = ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
		rsaKey, err2 = rsa.GenerateKey(rand.Reader, 2048)
		_, edKey, err3 = ed25519.GenerateKey(rand.Reader)
		errGenerateKey = errors.Join(err1, err2, err3)
	})
	if errGenerateKey != nil {
		t.Fatal(errGenerateKey)
	}
	return ecKey, rsaKey, edKey
}

// Signatures made here verify with openssl, the way an operator would check them, whether the
// key was made by Go (in each PEM form) or by openssl; and a modified file does not verify.
func TestFileVerifiesWithOpenSSL(t *testing.T) {
	needOpenSSL(t)
	ec, rk, ed := goKeys(t)
	keyDir := t.TempDir()
	// opensslKey makes a key with `openssl genpkey` (PKCS#8 PEM) and returns it.
	opensslKey := func(name string, args ...string) []byte {
		p := filepath.Join(keyDir, name+".key")
		if err := openssl(append([]string{"genpkey", "-out", p}, args...)...); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	osslEC := opensslKey("ec", "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
	osslRSA := opensslKey("rsa", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048")
	osslEd := opensslKey("ed", "-algorithm", "ED25519")

	for _, tc := range []struct {
		name    string
		keyPEM  []byte
		alg     string // requested ("" = the key's default)
		wantAlg string
	}{
		{"ecdsa pkcs8 default", pemKey(t, ec, "pkcs8"), "", backend.SigSHA256ECDSA},
		{"ecdsa sec1", pemKey(t, ec, "sec1"), backend.SigSHA256ECDSA, backend.SigSHA256ECDSA},
		{"rsa pkcs1 default", pemKey(t, rk, "pkcs1"), "", backend.SigSHA256RSA},
		{"rsa pkcs8", pemKey(t, rk, "pkcs8"), backend.SigSHA256RSA, backend.SigSHA256RSA},
		{"rsa-pss", pemKey(t, rk, "pkcs8"), backend.SigSHA256RSAPSS, backend.SigSHA256RSAPSS},
		{"ed25519 default", pemKey(t, ed, "pkcs8"), "", backend.SigSHA256Ed25519},
		{"openssl ecdsa", osslEC, backend.SigSHA256ECDSA, backend.SigSHA256ECDSA},
		{"openssl rsa default", osslRSA, "", backend.SigSHA256RSA},
		{"openssl rsa-pss", osslRSA, backend.SigSHA256RSAPSS, backend.SigSHA256RSAPSS},
		{"openssl ed25519", osslEd, backend.SigSHA256Ed25519, backend.SigSHA256Ed25519},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := writeFile(t, 200_001) // not a multiple of any buffer size
			k, alg, err := Key(tc.keyPEM, tc.alg)
			if err != nil {
				t.Fatalf("Key: %v", err)
			}
			if alg != tc.wantAlg {
				t.Errorf("algorithm %q, want %q", alg, tc.wantAlg)
			}
			sig, err := File(t.Context(), img, tc.keyPEM, tc.alg)
			if err != nil {
				t.Fatalf("File: %v", err)
			}
			dir := t.TempDir()
			pubDER, err := x509.MarshalPKIXPublicKey(k.Public())
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

// The digest is openssl's, whatever the file size, and so is the byte count.
func TestFileDigestMatchesOpenSSL(t *testing.T) {
	needOpenSSL(t)
	for _, n := range []int{0, 1, 32*1024 - 1, 32 * 1024, 200_001} {
		img := writeFile(t, n)
		d, size, err := FileDigest(t.Context(), img)
		if err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("openssl", "dgst", "-sha256", "-binary", img).Output()
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(d, out) || size != int64(n) {
			t.Errorf("size %d: FileDigest = %x, %d; openssl says %x", n, d, size, out)
		}
	}
}

func TestErrors(t *testing.T) {
	ec, rk, ed := goKeys(t)
	img := writeFile(t, 10)
	// A PKCS#8 key under the wrong label is still read (the label is a hint).
	mislabelled := pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: mustPKCS8(t, rk)})
	canceled, cancel := context.WithCancel(t.Context())
	cancel()
	for _, tc := range []struct {
		name    string
		ctx     context.Context
		path    string
		keyPEM  []byte
		alg     string
		wantErr string // "" = signs
	}{
		{"junk key", t.Context(), img, []byte("junk"), "", "no PEM block"},
		{"public key", t.Context(), img, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: []byte{0x30, 0}}), "", "not a PKCS#8, EC or PKCS#1 private key"},
		{"EC key for RSA", t.Context(), img, pemKey(t, ec, "sec1"), backend.SigSHA256RSA, "cannot make sha256-rsa"},
		{"RSA key for ECDSA", t.Context(), img, pemKey(t, rk, "pkcs1"), backend.SigSHA256ECDSA, "cannot make sha256-ecdsa"},
		{"Ed25519 key for PSS", t.Context(), img, pemKey(t, ed, "pkcs8"), backend.SigSHA256RSAPSS, "cannot make sha256-rsa-pss"},
		{"EC key for Ed25519", t.Context(), img, pemKey(t, ec, "pkcs8"), backend.SigSHA256Ed25519, "cannot make sha256-ed25519"},
		{"unknown algorithm", t.Context(), img, pemKey(t, ec, "pkcs8"), "sha1-ecdsa", `cannot sign with algorithm "sha1-ecdsa"`},
		{"missing file", t.Context(), filepath.Join(t.TempDir(), "nope"), pemKey(t, ec, "pkcs8"), "", "no such file"},
		{"canceled", canceled, img, pemKey(t, ec, "pkcs8"), "", context.Canceled.Error()},
		{"mislabelled PKCS#8 RSA", t.Context(), img, mislabelled, "", ""},
	} {
		t.Run(tc.name, func(t *testing.T) {
			sig, err := File(tc.ctx, tc.path, tc.keyPEM, tc.alg)
			if tc.wantErr == "" {
				if err != nil || len(sig) == 0 {
					t.Fatalf("File = %x, %v; want a signature", sig, err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantErr) {
				t.Fatalf("File error %v, want %q", err, tc.wantErr)
			}
		})
	}
	if _, err := SignDigest(ec, backend.SigSHA256ECDSA, []byte("short")); err == nil {
		t.Error("SignDigest accepted a 5-byte digest")
	}
}

func mustPKCS8(t *testing.T, k crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return der
}

func TestDocKey(t *testing.T) {
	for alg, want := range map[string]string{
		backend.SigSHA256ECDSA:   "sig-sha256-ecdsa",
		backend.SigSHA256RSA:     "sig-sha256-rsa",
		backend.SigSHA256RSAPSS:  "sig-sha256-rsa-pss",
		backend.SigSHA256Ed25519: "sig-sha256-ed25519",
	} {
		if got := DocKey(alg); got != want {
			t.Errorf("DocKey(%q) = %q, want %q", alg, got, want)
		}
		if !Supported(alg) {
			t.Errorf("Supported(%q) = false", alg)
		}
	}
	for _, alg := range []string{"", "sha1-rsa", "SHA256-ECDSA"} {
		if Supported(alg) {
			t.Errorf("Supported(%q) = true", alg)
		}
	}
}
