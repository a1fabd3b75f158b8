package emulator

import (
	"context"
	"crypto"
	"crypto/ecdsa"
	"crypto/ed25519"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/rsa"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"testing"

	"github.com/gwota/gwota/test/backend"
)

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

func pkcs8PEM(t *testing.T, k crypto.Signer) []byte {
	t.Helper()
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// The job document carries each file's signature under the afr_ota key of its algorithm, over
// the file's SHA-256 digest. (The signatures themselves are checked against openssl in
// test/sign; here the check is that the emulator puts the right one in the right place.)
func TestDocumentSignatures(t *testing.T) {
	e := startEmulator(t, Options{})
	img, digest := writeTestFile(t, 70000)
	ec, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	rk, err := rsa.GenerateKey(rand.Reader, 2048)
	if err != nil {
		t.Fatal(err)
	}
	edPub, ed, err := ed25519.GenerateKey(rand.Reader)
	if err != nil {
		t.Fatal(err)
	}

	tests := []struct {
		name, alg, key string
		signer         crypto.Signer
		verify         func(sig []byte) bool
	}{
		{"ecdsa default", "", "sig-sha256-ecdsa", ec, func(sig []byte) bool { return ecdsa.VerifyASN1(&ec.PublicKey, digest[:], sig) }},
		{"rsa default", "", "sig-sha256-rsa", rk, func(sig []byte) bool {
			return rsa.VerifyPKCS1v15(&rk.PublicKey, crypto.SHA256, digest[:], sig) == nil
		}},
		{"rsa-pss", backend.SigSHA256RSAPSS, "sig-sha256-rsa-pss", rk, func(sig []byte) bool {
			return rsa.VerifyPSS(&rk.PublicKey, crypto.SHA256, digest[:], sig, &rsa.PSSOptions{SaltLength: 32}) == nil
		}},
		{"ed25519", backend.SigSHA256Ed25519, "sig-sha256-ed25519", ed, func(sig []byte) bool { return ed25519.Verify(edPub, digest[:], sig) }},
	}
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			jobID := "sig-" + string(rune('a'+i))
			err := e.CreateJob(context.Background(), backend.JobSpec{JobID: jobID, Files: []backend.FileSpec{{LocalPath: img, SigningKeyPEM: pkcs8PEM(t, tt.signer), SigAlgorithm: tt.alg}}})
			if err != nil {
				t.Fatal(err)
			}
			doc, _ := e.JobDocument(jobID)
			if !tt.verify(docSignature(t, doc, tt.key)) {
				t.Errorf("%s in the document does not verify over the file's digest", tt.key)
			}
		})
	}

	// A signature made elsewhere is carried as is.
	ext := []byte("signature made elsewhere")
	if err := e.CreateJob(context.Background(), backend.JobSpec{JobID: "sig-ext", Files: []backend.FileSpec{{LocalPath: img, Signature: ext}}}); err != nil {
		t.Fatal(err)
	}
	doc, _ := e.JobDocument("sig-ext")
	if got := docSignature(t, doc, "sig-sha256-ecdsa"); string(got) != string(ext) {
		t.Error("external signature altered")
	}

	// A key that does not fit the algorithm, a junk key, and an unknown algorithm are refused.
	for _, fs := range []backend.FileSpec{
		{LocalPath: img, SigningKeyPEM: pkcs8PEM(t, ec), SigAlgorithm: backend.SigSHA256RSA},
		{LocalPath: img, SigningKeyPEM: []byte("junk")},
		{LocalPath: img, Signature: ext, SigAlgorithm: "sha1-rsa"},
	} {
		if err := e.CreateJob(context.Background(), backend.JobSpec{JobID: "sig-bad", Files: []backend.FileSpec{fs}}); err == nil {
			t.Errorf("CreateJob accepted %+v", fs)
		}
	}
}
