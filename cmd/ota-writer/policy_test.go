package main

import (
	"os"
	"path/filepath"
	"strings"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/writertest"
)

// `ota-writer accept` runs the self test and commits only when it passed: with a failing
// check the trial stays open (self_test_failed), once the check passes it commits.
func TestAcceptRunsSelfTest(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "healthy")
	b := newBench(t, "[[check]]\nname = \"healthy\"\ncommand = [\"test\", \"-e\", \""+marker+"\"]\ntimeout = \"10s\"\n")
	img, _ := b.image(t, "img", 5*testMaxBlock)
	if out, errOut, code := runCLI(t, "flash", "--config", b.cfg, "--target", "rootfs", "--image", img,
		"--sig-file", img+".sig", "--sig-alg", "ecdsa-p256-sha256", "--cert-name", "pub.pem", "--activate"); code != 0 {
		t.Fatalf("flash: exit %d\n%s%s", code, out, errOut)
	}
	b.reboot(t)
	b.serve(t) // the file backend's simulated boot: slot b on trial
	writertest.Dial(t, b.sock).Close()
	out, errOut, code := runCLI(t, "accept", "--socket", b.sock)
	if code != exitFailed || !strings.Contains(errOut, "reason: self_test_failed/") || !strings.Contains(out, "check healthy: passed false") {
		t.Fatalf("accept with a failing check: exit %d\n%s%s", code, out, errOut)
	}
	imageState := func() otav1.ImageState {
		st, err := writertest.Dial(t, b.sock).State(t.Context())
		if err != nil {
			t.Fatal(err)
		}
		return st.GetImageState()
	}
	if st := imageState(); st != otav1.ImageState_IMAGE_STATE_TRIAL {
		t.Fatalf("image state %s after a refused accept, want trial", st)
	}
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if out, errOut, code := runCLI(t, "accept", "--socket", b.sock); code != 0 || !strings.Contains(out, "committed: target rootfs slot b") {
		t.Fatalf("accept with a passing check: exit %d\n%s%s", code, out, errOut)
	}
	if st := imageState(); st != otav1.ImageState_IMAGE_STATE_NORMAL {
		t.Fatalf("image state %s after accept, want normal", st)
	}
}

// `ota-writer set-version` gives the version policy the running version: before it every
// versioned job is refused (version_check), after it an older one is refused and a newer one
// begins. It refuses to run beside a serving writer, whose record it would race.
func TestSetVersionCLI(t *testing.T) {
	b := newBench(t, "")
	cfg, err := os.ReadFile(b.cfg)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(b.cfg, append([]byte("version_policy = \"newer\"\naccept_unsigned_versions = true\n"), cfg...), 0o600); err != nil {
		t.Fatal(err)
	}
	_, sig := b.image(t, "img", 3*testMaxBlock)
	begin := func(version string) error {
		req := beginReq(3*testMaxBlock, sig)
		req.Version = version
		res, err := writertest.Dial(t, b.sock).Begin(t.Context(), req)
		if err == nil {
			writertest.Dial(t, b.sock).Abort(t.Context(), res.GetSession().GetSessionId(), otav1.Reason_REASON_USER_ABORT)
		}
		return err
	}
	w := b.serve(t)
	reasonIs(t, begin("1.1"), otav1.Reason_REASON_VERSION_CHECK)
	if _, errOut, code := runCLI(t, "set-version", "--config", b.cfg, "--target", "rootfs", "--version", "1.0.0"); code != exitFailed || !strings.Contains(errOut, "session_busy/3012") {
		t.Fatalf("set-version beside a serving writer: exit %d\n%s", code, errOut)
	}
	w.stop(t)
	out, errOut, code := runCLI(t, "set-version", "--config", b.cfg, "--target", "rootfs", "--version", "1.0.0")
	if code != 0 || !strings.Contains(out, "recorded: target rootfs slot a runs version 1.0.0") {
		t.Fatalf("set-version: exit %d\n%s%s", code, out, errOut)
	}
	b.serve(t)
	reasonIs(t, begin("0.9"), otav1.Reason_REASON_VERSION_CHECK)
	reasonIs(t, begin("1.1"), otav1.Reason_REASON_UNSPECIFIED)
}
