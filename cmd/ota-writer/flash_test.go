package main

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"os"
	"strings"
	"testing"

	"github.com/gwota/gwota/writer/writertest"
)

// `ota-writer flash` as a process: an openssl-signed image is written, verified and
// activated; a wrong signature fails with sig_check_failed/1001 and activates nothing.
func TestFlashCLI(t *testing.T) {
	b := newBench(t, "")
	img, sig := b.image(t, "img", 37*testMaxBlock+123)
	data, _ := os.ReadFile(img)

	t.Run("wrong signature", func(t *testing.T) {
		bad := bytes.Clone(sig)
		bad[len(bad)-2] ^= 0xff
		out, errOut, code := runCLI(t, "flash", "--config", b.cfg, "--target", "rootfs", "--image", img,
			"--sig", base64.StdEncoding.EncodeToString(bad), "--sig-alg", "ecdsa-p256-sha256", "--cert-name", "pub.pem")
		if code != exitFailed || !strings.Contains(errOut, "reason: sig_check_failed/1001") {
			t.Fatalf("exit %d, want 1 with sig_check_failed/1001\nstdout: %s\nstderr: %s", code, out, errOut)
		}
		if st := statusJSON(t, b); st != "IMAGE_STATE_NORMAL" {
			t.Errorf("image state %s after a failed flash, want normal", st)
		}
	})
	t.Run("unknown target", func(t *testing.T) {
		_, errOut, code := runCLI(t, "flash", "--config", b.cfg, "--target", "nope", "--image", img,
			"--sig-file", img+".sig", "--sig-alg", "ecdsa-p256-sha256", "--cert-name", "pub.pem")
		if code != exitFailed || !strings.Contains(errOut, "reason: target_unknown/3003") {
			t.Fatalf("exit %d, want 1 with target_unknown/3003\n%s", code, errOut)
		}
	})
	t.Run("usage", func(t *testing.T) {
		_, _, code := runCLI(t, "flash", "--config", b.cfg)
		if code != exitUsage {
			t.Fatalf("exit %d, want %d", code, exitUsage)
		}
	})
	t.Run("good signature, activate", func(t *testing.T) {
		out, errOut, code := runCLI(t, "flash", "--config", b.cfg, "--target", "rootfs", "--image", img,
			"--sig-file", img+".sig", "--sig-alg", "ecdsa-p256-sha256", "--cert-name", "pub.pem", "--activate")
		if code != 0 {
			t.Fatalf("exit %d\nstdout: %s\nstderr: %s", code, out, errOut)
		}
		if !strings.Contains(errOut, "flash: 100%") {
			t.Errorf("no plain progress lines on a non-terminal:\n%s", errOut)
		}
		onSlot, _ := os.ReadFile(b.slotB)
		if len(onSlot) < len(data) || !bytes.Equal(onSlot[:len(data)], data) {
			t.Error("slot b does not hold the image")
		}
		if st := statusJSON(t, b); st != "IMAGE_STATE_ACTIVATED" {
			t.Errorf("image state %s after flash --activate, want activated", st)
		}
		out, errOut, code = runCLI(t, "status", "--config", b.cfg)
		if code != 0 || !strings.Contains(out, "Image state:   activated") || !strings.Contains(out, "rootfs (ab)") {
			t.Errorf("human status: exit %d\n%s%s", code, out, errOut)
		}
	})
	t.Run("accept outside a trial", func(t *testing.T) {
		_, errOut, code := runCLI(t, "accept", "--config", b.cfg)
		if code != exitFailed || !strings.Contains(errOut, "reason: bad_image_state/1007") {
			t.Fatalf("exit %d, want 1 with bad_image_state/1007\n%s", code, errOut)
		}
	})
	t.Run("reject outside a trial", func(t *testing.T) {
		_, errOut, code := runCLI(t, "reject", "--config", b.cfg)
		if code != exitFailed || !strings.Contains(errOut, "reason: bad_image_state/1007") {
			t.Fatalf("exit %d, want 1 with bad_image_state/1007\n%s", code, errOut)
		}
	})
	t.Run("reject the trial", func(t *testing.T) {
		// A writer start is the file backend's simulated boot: the activated slot is tried.
		w := b.serve(t)
		writertest.Dial(t, b.sock).Close()
		w.stop(t)
		if st := statusJSON(t, b); st != "IMAGE_STATE_TRIAL" {
			t.Fatalf("image state %s after the simulated boot, want trial", st)
		}
		out, errOut, code := runCLI(t, "reject", "--config", b.cfg)
		if code != 0 {
			t.Fatalf("exit %d\n%s%s", code, out, errOut)
		}
		if st := statusJSON(t, b); st != "IMAGE_STATE_ROLLED_BACK" {
			t.Errorf("image state %s after reject, want rolled back", st)
		}
	})
	t.Run("no writer and no config", func(t *testing.T) {
		_, errOut, code := runCLI(t, "status", "--socket", b.dir+"/none.sock")
		if code != exitUnavailable || !strings.Contains(errOut, "reason: writer_unavailable/3001") {
			t.Fatalf("exit %d, want %d with writer_unavailable/3001\n%s", code, exitUnavailable, errOut)
		}
	})
}

// statusJSON runs `ota-writer status --json` in-process (no writer running).
func statusJSON(t *testing.T, b *bench) string {
	t.Helper()
	out, errOut, code := runCLI(t, "status", "--config", b.cfg, "--json")
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, errOut)
	}
	var js struct {
		Via   string `json:"via"`
		State struct {
			ImageState string `json:"image_state"`
		} `json:"state"`
	}
	if err := json.Unmarshal([]byte(out), &js); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if !strings.HasPrefix(js.Via, "in-process") {
		t.Errorf("status via %q, want in-process", js.Via)
	}
	return js.State.ImageState
}
