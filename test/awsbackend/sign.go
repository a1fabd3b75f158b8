package awsbackend

import (
	"fmt"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/sign"
)

// The signature scheme (shared with the emulator and the writer's verifier) is described in
// package test/sign.

// signFile returns the document signature key and value for f: it signs the file itself
// when f.SigningKeyPEM is set, otherwise passes f.Signature through. An unsigned file gives
// an empty key (tests use unsigned jobs to check that nothing unsigned is ever activated).
func signFile(f backend.FileSpec, digest []byte) (key string, sig []byte, err error) {
	if len(f.SigningKeyPEM) > 0 {
		k, alg, err := sign.Key(f.SigningKeyPEM, f.SigAlgorithm)
		if err != nil {
			return "", nil, err
		}
		sig, err := sign.SignDigest(k, alg, digest)
		if err != nil {
			return "", nil, err
		}
		return sign.DocKey(alg), sig, nil
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
	return sign.DocKey(alg), f.Signature, nil
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
