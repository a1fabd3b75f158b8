package verify

import (
	"bytes"
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/sha256"
	"crypto/x509"
	"encoding/pem"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

func openssl(t testing.TB, args ...string) {
	t.Helper()
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	out, err := exec.Command("openssl", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("openssl %v: %v\n%s", args, err, out)
	}
}

// keyset makes keys and self-signed certificates with the openssl command line.
type keyset struct{ dir string }

func newKeyset(t testing.TB) keyset {
	dir := t.TempDir()
	openssl(t, "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", filepath.Join(dir, "ec.key"))
	openssl(t, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048", "-out", filepath.Join(dir, "rsa.key"))
	openssl(t, "genpkey", "-algorithm", "ED25519", "-out", filepath.Join(dir, "ed.key"))
	for _, n := range []string{"ec", "rsa", "ed"} {
		openssl(t, "req", "-new", "-x509", "-key", filepath.Join(dir, n+".key"), "-subj", "/CN="+n+"-signer",
			"-days", "30", "-out", filepath.Join(dir, n+".crt.pem"))
	}
	openssl(t, "pkey", "-in", filepath.Join(dir, "ed.key"), "-pubout", "-out", filepath.Join(dir, "ed.pub.pem"))
	return keyset{dir}
}

func (k keyset) p(n string) string { return filepath.Join(k.dir, n) }

// sign signs file with the openssl command line the way a fleet operator would.
func (k keyset) sign(t testing.TB, alg otav1.SigAlgorithm, file string) []byte {
	sig := filepath.Join(t.TempDir(), "sig")
	switch alg {
	case otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256:
		openssl(t, "dgst", "-sha256", "-sign", k.p("ec.key"), "-out", sig, file)
	case otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1:
		openssl(t, "dgst", "-sha1", "-sign", k.p("ec.key"), "-out", sig, file)
	case otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256:
		openssl(t, "dgst", "-sha256", "-sign", k.p("rsa.key"), "-out", sig, file)
	case otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA1:
		openssl(t, "dgst", "-sha1", "-sign", k.p("rsa.key"), "-out", sig, file)
	case otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256:
		openssl(t, "dgst", "-sha256", "-sign", k.p("rsa.key"), "-sigopt", "rsa_padding_mode:pss",
			"-sigopt", "rsa_pss_saltlen:-1", "-out", sig, file)
	case otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256:
		d := sig + ".digest"
		openssl(t, "dgst", "-sha256", "-binary", "-out", d, file)
		openssl(t, "pkeyutl", "-sign", "-inkey", k.p("ed.key"), "-rawin", "-in", d, "-out", sig)
	default:
		t.Fatalf("no openssl recipe for %s", alg)
	}
	b, err := os.ReadFile(sig)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func writeImage(t testing.TB, size int) (string, *os.File) {
	p := filepath.Join(t.TempDir(), "image")
	data := make([]byte, size)
	rand.Read(data)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(p)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	return p, f
}

func reasonOf(err error) otav1.Reason { return status.ReasonOf(err) }

func TestOpenSSLSignatures(t *testing.T) {
	ks := newKeyset(t)
	path, f := writeImage(t, 300_001)
	want := sha256.Sum256(mustRead(t, path))
	for _, tc := range []struct {
		alg      otav1.SigAlgorithm
		certName string
	}{
		{otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, "ec.crt.pem"},
		{otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, "ec-signer"}, // by CN
		{otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, "/home/pi/certs/ec.crt.pem"},
		{otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, ""}, // any trusted key
		{otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256, "rsa.crt.pem"},
		{otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256, "rsa-signer"},
		{otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256, "ed.crt.pem"},
		{otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256, "ed.pub.pem"}, // bare public key
	} {
		t.Run(tc.alg.String()+"/"+tc.certName, func(t *testing.T) {
			s, err := Load([]string{ks.p("ec.crt.pem"), ks.p("rsa.crt.pem"), ks.p("ed.crt.pem"), ks.p("ed.pub.pem")}, false)
			if err != nil {
				t.Fatal(err)
			}
			sig := ks.sign(t, tc.alg, path)
			if err := s.Check(tc.alg, sig, tc.certName); err != nil {
				t.Fatalf("check: %v", err)
			}
			sum, err := s.Verify(context.Background(), f, 300_002, tc.alg, sig, tc.certName)
			if reasonOf(err) != otav1.Reason_REASON_FILE_CLOSE_FAILED {
				t.Errorf("reading past the end: got %v, want file_close_failed", err)
			}
			sum, err = s.Verify(context.Background(), f, 300_001, tc.alg, sig, tc.certName)
			if err != nil {
				t.Fatalf("verify: %v", err)
			}
			if !bytes.Equal(sum, want[:]) {
				t.Errorf("sha256 %x, want %x", sum, want)
			}
			// One byte less is another image: the signature must not verify.
			_, err = s.Verify(context.Background(), f, 300_000, tc.alg, sig, tc.certName)
			if reasonOf(err) != otav1.Reason_REASON_SIG_CHECK_FAILED {
				t.Errorf("truncated image: got %v, want sig_check_failed", err)
			}
			bad := append([]byte(nil), sig...)
			bad[len(bad)/2] ^= 1
			_, err = s.Verify(context.Background(), f, 300_001, tc.alg, bad, tc.certName)
			if reasonOf(err) != otav1.Reason_REASON_SIG_CHECK_FAILED {
				t.Errorf("flipped signature bit: got %v, want sig_check_failed", err)
			}
		})
	}
}

func TestCorruptedImage(t *testing.T) {
	ks := newKeyset(t)
	path, _ := writeImage(t, 70_000)
	sig := ks.sign(t, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, path)
	s, err := Load([]string{ks.p("ec.crt.pem")}, false)
	if err != nil {
		t.Fatal(err)
	}
	data := mustRead(t, path)
	data[65_536] ^= 0x80
	_, err = s.Verify(context.Background(), bytes.NewReader(data), int64(len(data)), otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, sig, "ec.crt.pem")
	if reasonOf(err) != otav1.Reason_REASON_SIG_CHECK_FAILED {
		t.Fatalf("got %v, want sig_check_failed", err)
	}
}

func TestSelection(t *testing.T) {
	ks := newKeyset(t)
	path, f := writeImage(t, 4096)
	ecSig := ks.sign(t, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, path)
	sha1Sig := ks.sign(t, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1, path)
	rsaSHA1Sig := ks.sign(t, otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA1, path)
	all := []string{ks.p("ec.crt.pem"), ks.p("rsa.crt.pem")}
	for _, tc := range []struct {
		name      string
		keys      []string
		allowSHA1 bool
		alg       otav1.SigAlgorithm
		sig       []byte
		certName  string
		want      otav1.Reason
	}{
		{"no key configured", nil, false, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, ecSig, "", otav1.Reason_REASON_UNTRUSTED_SIGNER},
		{"unknown cert name", all, false, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, ecSig, "attacker.crt.pem", otav1.Reason_REASON_UNTRUSTED_SIGNER},
		{"cert name selects wrong type", all, false, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, ecSig, "rsa.crt.pem", otav1.Reason_REASON_UNTRUSTED_SIGNER},
		{"other key named", []string{ks.p("ec.crt.pem"), ks.p("ed.crt.pem")}, false, otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256, ecSig, "ed.crt.pem", otav1.Reason_REASON_SIG_CHECK_FAILED},
		{"sha1 refused", all, false, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1, sha1Sig, "", otav1.Reason_REASON_UNSUPPORTED},
		{"sha1 allowed", all, true, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1, sha1Sig, "ec.crt.pem", otav1.Reason_REASON_UNSPECIFIED},
		{"rsa sha1 allowed", all, true, otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA1, rsaSHA1Sig, "rsa.crt.pem", otav1.Reason_REASON_UNSPECIFIED},
		{"sha1 sig as sha256", all, true, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, sha1Sig, "ec.crt.pem", otav1.Reason_REASON_SIG_CHECK_FAILED},
		{"unspecified algorithm", all, true, otav1.SigAlgorithm_SIG_ALGORITHM_UNSPECIFIED, ecSig, "", otav1.Reason_REASON_UNSUPPORTED},
		{"unknown algorithm", all, true, otav1.SigAlgorithm(99), ecSig, "", otav1.Reason_REASON_UNSUPPORTED},
		{"empty signature", all, false, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, nil, "", otav1.Reason_REASON_SIG_CHECK_FAILED},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s, err := Load(tc.keys, tc.allowSHA1)
			if err != nil {
				t.Fatal(err)
			}
			_, err = s.Verify(context.Background(), f, 4096, tc.alg, tc.sig, tc.certName)
			if got := reasonOf(err); got != tc.want {
				t.Fatalf("got %v (%s), want %s", err, got, tc.want)
			}
		})
	}
}

func TestGoSigners(t *testing.T) {
	// Keys made in Go, written as bare PUBLIC KEY PEM, to cover that form for each type.
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	rk, _ := rsa.GenerateKey(rand.Reader, 2048)
	_, ed, _ := ed25519.GenerateKey(rand.Reader)
	data := make([]byte, 1<<20+3)
	rand.Read(data)
	d := sha256.Sum256(data)
	ecSig, _ := ecdsa.SignASN1(rand.Reader, ec, d[:])
	rsaSig, _ := rsa.SignPKCS1v15(rand.Reader, rk, crypto.SHA256, d[:])
	pssSig, _ := rsa.SignPSS(rand.Reader, rk, crypto.SHA256, d[:], &rsa.PSSOptions{SaltLength: rsa.PSSSaltLengthEqualsHash})
	edSig := ed25519.Sign(ed, d[:])
	dir := t.TempDir()
	var paths []string
	for n, pub := range map[string]any{"ec": &ec.PublicKey, "rsa": &rk.PublicKey, "ed": ed.Public()} {
		der, err := x509.MarshalPKIXPublicKey(pub)
		if err != nil {
			t.Fatal(err)
		}
		p := filepath.Join(dir, n+".pem")
		os.WriteFile(p, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600)
		paths = append(paths, p)
	}
	s, err := Load(paths, false)
	if err != nil {
		t.Fatal(err)
	}
	for alg, sig := range map[otav1.SigAlgorithm][]byte{
		otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256:   ecSig,
		otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256: rsaSig,
		otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256:      pssSig,
		otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256:      edSig,
	} {
		if _, err := s.Verify(context.Background(), bytes.NewReader(data), int64(len(data)), alg, sig, ""); err != nil {
			t.Errorf("%s: %v", alg, err)
		}
	}
}

func TestLoadRefusesWeakOrForeignKeys(t *testing.T) {
	dir := t.TempDir()
	p384 := filepath.Join(dir, "p384.key")
	openssl(t, "ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out", p384)
	openssl(t, "ec", "-in", p384, "-pubout", "-out", p384+".pub")
	rsa1024 := filepath.Join(dir, "rsa1024.key")
	openssl(t, "genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:1024", "-out", rsa1024)
	openssl(t, "pkey", "-in", rsa1024, "-pubout", "-out", rsa1024+".pub")
	garbage := filepath.Join(dir, "garbage.pem")
	os.WriteFile(garbage, []byte("not pem"), 0o600)
	for _, p := range []string{p384 + ".pub", rsa1024 + ".pub", garbage, filepath.Join(dir, "missing.pem")} {
		if _, err := Load([]string{p}, false); err == nil {
			t.Errorf("%s: loaded, want an error", filepath.Base(p))
		}
	}
}

func TestVerifyCanceled(t *testing.T) {
	ks := newKeyset(t)
	path, f := writeImage(t, 1<<20)
	sig := ks.sign(t, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, path)
	s, _ := Load([]string{ks.p("ec.crt.pem")}, false)
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	if _, err := s.Verify(ctx, f, 1<<20, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, sig, ""); err == nil {
		t.Fatal("verified with a canceled context")
	}
}

// TestVerifyMemoryFlat verifies a 256 MiB image from a real (sparse) file and checks the heap
// does not grow with the image.
func TestVerifyMemoryFlat(t *testing.T) {
	if testing.Short() {
		t.Skip("short")
	}
	const size = 256 << 20
	p := filepath.Join(t.TempDir(), "big")
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("head"), 0)
	f.WriteAt([]byte("tail"), size-4)
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	der, _ := x509.MarshalPKIXPublicKey(&ec.PublicKey)
	kp := filepath.Join(t.TempDir(), "k.pem")
	os.WriteFile(kp, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600)
	s, _ := Load([]string{kp}, false)
	sum, _, err := Digest(context.Background(), f, size, crypto.SHA256)
	if err != nil {
		t.Fatal(err)
	}
	sig, _ := ecdsa.SignASN1(rand.Reader, ec, sum)

	var before, after runtime.MemStats
	runtime.GC()
	runtime.ReadMemStats(&before)
	if _, err := s.Verify(context.Background(), f, size, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, sig, ""); err != nil {
		t.Fatal(err)
	}
	runtime.ReadMemStats(&after)
	grew := int64(after.HeapAlloc) - int64(before.HeapAlloc)
	allocated := after.TotalAlloc - before.TotalAlloc
	t.Logf("256 MiB verify: heap grew %d bytes, allocated %d bytes in total", grew, allocated)
	// The read-back buffers may be new (the pool may have been emptied by the GC); anything
	// beyond them grows with the image.
	if allocated > 2*readBufs*readBuf {
		t.Fatalf("verifying 256 MiB allocated %d bytes: the image is being buffered", allocated)
	}
}

func BenchmarkVerify(b *testing.B) {
	const size = 64 << 20
	p := filepath.Join(b.TempDir(), "img")
	data := make([]byte, size)
	rand.Read(data)
	os.WriteFile(p, data, 0o600)
	f, _ := os.Open(p)
	defer f.Close()
	ec, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	d := sha256.Sum256(data)
	data = nil
	sig, _ := ecdsa.SignASN1(rand.Reader, ec, d[:])
	der, _ := x509.MarshalPKIXPublicKey(&ec.PublicKey)
	kp := filepath.Join(b.TempDir(), "k.pem")
	os.WriteFile(kp, pem.EncodeToMemory(&pem.Block{Type: "PUBLIC KEY", Bytes: der}), 0o600)
	s, _ := Load([]string{kp}, false)
	b.SetBytes(size)
	b.ReportAllocs()
	b.ResetTimer()
	for b.Loop() {
		if _, err := s.Verify(context.Background(), f, size, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, sig, ""); err != nil {
			b.Fatal(err)
		}
	}
}

// BenchmarkSHA256Baseline is the in-memory hash rate: verification's ceiling in the same run.
func BenchmarkSHA256Baseline(b *testing.B) {
	data := make([]byte, readBuf)
	rand.Read(data)
	b.SetBytes(int64(len(data)))
	for b.Loop() {
		sha256.Sum256(data)
	}
}

func mustRead(t testing.TB, p string) []byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}
