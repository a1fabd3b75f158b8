package emulator

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/gwota/gwota/test/backend"
)

func openssl(t *testing.T, args ...string) []byte {
	t.Helper()
	out, err := exec.Command("openssl", args...).CombinedOutput()
	if err != nil {
		t.Fatalf("openssl %v: %v\n%s", args, err, out)
	}
	return out
}

func docSignature(t *testing.T, doc []byte, key string) []byte {
	t.Helper()
	var d struct {
		AfrOTA struct {
			Files []map[string]any `json:"files"`
		} `json:"afr_ota"`
	}
	if err := json.Unmarshal(doc, &d); err != nil {
		t.Fatal(err)
	}
	s, ok := d.AfrOTA.Files[0][key].(string)
	if !ok {
		t.Fatalf("no %s in %s", key, doc)
	}
	sig, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return sig
}

// Signatures made by the emulator verify with openssl, the way an operator would check them.
func TestSignaturesVerifyWithOpenSSL(t *testing.T) {
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	e := startEmulator(t, Options{})
	dir := t.TempDir()
	img, _ := writeTestFile(t, 70000)
	digest := sha256.New()
	data, _ := os.ReadFile(img)
	digest.Write(data)
	digestPath := filepath.Join(dir, "digest.bin")
	os.WriteFile(digestPath, digest.Sum(nil), 0o600)

	tests := []struct {
		alg, key string
		genArgs  []string
		verify   func(pub, sig string) []string
	}{
		{backend.SigSHA256ECDSA, "sig-sha256-ecdsa", []string{"-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256"},
			func(pub, sig string) []string {
				return []string{"dgst", "-sha256", "-verify", pub, "-signature", sig, img}
			}},
		{backend.SigSHA256RSA, "sig-sha256-rsa", []string{"-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"},
			func(pub, sig string) []string {
				return []string{"dgst", "-sha256", "-verify", pub, "-signature", sig, img}
			}},
		{backend.SigSHA256RSAPSS, "sig-sha256-rsa-pss", []string{"-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:2048"},
			func(pub, sig string) []string {
				return []string{"dgst", "-sha256", "-sigopt", "rsa_padding_mode:pss", "-sigopt", "rsa_pss_saltlen:32", "-verify", pub, "-signature", sig, img}
			}},
		{backend.SigSHA256Ed25519, "sig-sha256-ed25519", []string{"-algorithm", "ED25519"},
			func(pub, sig string) []string {
				return []string{"pkeyutl", "-verify", "-pubin", "-inkey", pub, "-rawin", "-in", digestPath, "-sigfile", sig}
			}},
	}
	for i, tt := range tests {
		t.Run(tt.alg, func(t *testing.T) {
			keyPath := filepath.Join(dir, tt.alg+".key")
			pubPath := filepath.Join(dir, tt.alg+".pub")
			sigPath := filepath.Join(dir, tt.alg+".sig")
			openssl(t, append([]string{"genpkey", "-out", keyPath}, tt.genArgs...)...)
			openssl(t, "pkey", "-in", keyPath, "-pubout", "-out", pubPath)
			keyPEM, _ := os.ReadFile(keyPath)
			jobID := "sig-" + string(rune('a'+i))
			alg := tt.alg
			if alg == backend.SigSHA256RSA {
				alg = "" // the key type implies PKCS#1 v1.5
			}
			err := e.CreateJob(context.Background(), backend.JobSpec{JobID: jobID, Files: []backend.FileSpec{{LocalPath: img, SigningKeyPEM: keyPEM, SigAlgorithm: alg}}})
			if err != nil {
				t.Fatal(err)
			}
			doc, _ := e.JobDocument(jobID)
			os.WriteFile(sigPath, docSignature(t, doc, tt.key), 0o600)
			openssl(t, tt.verify(pubPath, sigPath)...)
		})
	}

	// A signature made elsewhere (openssl) is carried as is.
	keyPath := filepath.Join(dir, "ext.key")
	openssl(t, "genpkey", "-out", keyPath, "-algorithm", "EC", "-pkeyopt", "ec_paramgen_curve:P-256")
	ext := openssl(t, "dgst", "-sha256", "-sign", keyPath, img)
	if err := e.CreateJob(context.Background(), backend.JobSpec{JobID: "sig-ext", Files: []backend.FileSpec{{LocalPath: img, Signature: ext}}}); err != nil {
		t.Fatal(err)
	}
	doc, _ := e.JobDocument("sig-ext")
	if got := docSignature(t, doc, "sig-sha256-ecdsa"); string(got) != string(ext) {
		t.Error("external signature altered")
	}

	// A key that does not fit the algorithm is refused.
	keyPEM, _ := os.ReadFile(keyPath)
	if err := e.CreateJob(context.Background(), backend.JobSpec{JobID: "sig-bad", Files: []backend.FileSpec{{LocalPath: img, SigningKeyPEM: keyPEM, SigAlgorithm: backend.SigSHA256RSA}}}); err == nil {
		t.Error("EC key accepted for RSA")
	}
	if err := e.CreateJob(context.Background(), backend.JobSpec{JobID: "sig-bad", Files: []backend.FileSpec{{LocalPath: img, SigningKeyPEM: []byte("junk")}}}); err == nil {
		t.Error("junk key accepted")
	}
}
