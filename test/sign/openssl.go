package sign

import (
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// OpenSSL makes a signing identity and signatures with the openssl command line, as a fleet
// operator does: an ECDSA P-256 key, and optionally a self-signed certificate and the bare
// public key, at the paths given.
type OpenSSL struct {
	// Key is the private key file (SEC 1 PEM) Make creates and SignFile signs with.
	Key string
	// Cert, when set, is a self-signed certificate Make creates, with common name CN.
	Cert string
	CN   string
	// Pub, when set, is the public key file (PKIX PEM) Make creates.
	Pub string
}

// Make creates the key, and the certificate and public key asked for.
func (o OpenSSL) Make() error {
	steps := [][]string{{"ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", o.Key}}
	if o.Cert != "" {
		steps = append(steps, []string{"req", "-new", "-x509", "-key", o.Key, "-subj", "/CN=" + o.CN, "-days", "30", "-out", o.Cert})
	}
	if o.Pub != "" {
		steps = append(steps, []string{"ec", "-in", o.Key, "-pubout", "-out", o.Pub})
	}
	for _, args := range steps {
		if err := openssl(args...); err != nil {
			return err
		}
	}
	return nil
}

// SignFile signs the file at path with `openssl dgst -sha256 -sign` (ECDSA, DER), writes the
// signature next to it as path+".sig" and returns it.
func (o OpenSSL) SignFile(path string) ([]byte, error) {
	if err := openssl("dgst", "-sha256", "-sign", o.Key, "-out", path+".sig", path); err != nil {
		return nil, err
	}
	return os.ReadFile(path + ".sig")
}

func openssl(args ...string) error {
	if out, err := exec.Command("openssl", args...).CombinedOutput(); err != nil {
		return fmt.Errorf("openssl %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return nil
}

var shared struct {
	once sync.Once
	o    OpenSSL
	err  error
}

// SharedOpenSSL is one openssl identity per test process, made on first use in a temporary
// directory: ec.key, and signer.crt.pem with common name "ota-signer". Every writer of a
// test binary can trust it, and openssl runs once.
func SharedOpenSSL() (OpenSSL, error) {
	shared.once.Do(func() {
		dir, err := os.MkdirTemp("", "openssl-signer")
		if err != nil {
			shared.err = err
			return
		}
		shared.o = OpenSSL{Key: filepath.Join(dir, "ec.key"), Cert: filepath.Join(dir, "signer.crt.pem"), CN: "ota-signer"}
		shared.err = shared.o.Make()
	})
	return shared.o, shared.err
}

// RemoveShared removes SharedOpenSSL's directory, if it was made (at the end of TestMain).
func RemoveShared() {
	if shared.o.Key != "" {
		os.RemoveAll(filepath.Dir(shared.o.Key))
	}
}
