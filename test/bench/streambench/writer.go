package main

import (
	"context"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"time"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/sign"
)

// otaWriter is a real ota-writer serving on a socket, with an A/B target of two slot files
// and its own trust store (one ECDSA P-256 key made here).
type otaWriter struct {
	sock string
	id   *sign.Identity
	cmd  *exec.Cmd
}

func startWriter(ctx context.Context, bin, dir string, maxBlock int) (*otaWriter, error) {
	wd := filepath.Join(dir, "writer")
	if err := os.MkdirAll(wd, 0o700); err != nil {
		return nil, err
	}
	id, err := sign.NewIdentity("bench-signer")
	if err != nil {
		return nil, err
	}
	pub := filepath.Join(wd, "pub.pem")
	if err := id.WritePublicKey(pub); err != nil {
		return nil, err
	}
	for _, s := range []string{"slot_a", "slot_b"} {
		if err := os.WriteFile(filepath.Join(wd, s), nil, 0o600); err != nil {
			return nil, err
		}
	}
	w := &otaWriter{sock: filepath.Join(wd, "w.sock"), id: id}
	conf := fmt.Sprintf(`socket = %q
state_dir = %q
trusted_keys = [%q]
# streamdl's jobs name no certificate: the bench writer's one key verifies them.
allow_any_trusted_key = true
max_block_size = %d
log_level = "warn"
[boot]
backend = "file"
[[target]]
name = "rootfs"
kind = "ab"
file_paths = ["/img"]
slots = [%q, %q]
`, w.sock, filepath.Join(wd, "state"), pub, max(maxBlock, 1<<20), filepath.Join(wd, "slot_a"), filepath.Join(wd, "slot_b"))
	cfg := filepath.Join(wd, "writer.toml")
	if err := os.WriteFile(cfg, []byte(conf), 0o600); err != nil {
		return nil, err
	}
	w.cmd = exec.CommandContext(ctx, bin, "serve", "--config", cfg)
	w.cmd.Stderr = os.Stderr
	if err := w.cmd.Start(); err != nil {
		return nil, err
	}
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", w.sock)
		if err == nil {
			c.Close()
			return w, nil
		}
		if time.Now().After(deadline) {
			w.stop()
			return nil, fmt.Errorf("no socket at %s: %w", w.sock, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func (w *otaWriter) stop() {
	w.cmd.Process.Signal(syscall.SIGTERM)
	w.cmd.Wait()
}

// signImage writes img.sig: the ASN.1 DER ECDSA signature of the image's SHA-256, hashed as
// a stream.
func signImage(w *otaWriter, img string) error {
	sig, err := sign.File(context.Background(), img, w.id.KeyPEM, backend.SigSHA256ECDSA)
	if err != nil {
		return err
	}
	return os.WriteFile(img+".sig", sig, 0o600)
}

func fileExists(p string) bool {
	_, err := os.Stat(p)
	return err == nil
}
