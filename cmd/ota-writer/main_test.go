package main

import (
	"bytes"
	"crypto/rand"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	"go.uber.org/goleak"

	"github.com/gwota/gwota/internal/bitmap"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/sign"
)

// binary is ota-writer built once for the process tests.
var binary string

func TestMain(m *testing.M) {
	dir, err := os.MkdirTemp("", "otawbin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	os.Chmod(dir, 0o755) // a test runs the binary under another uid
	binary = filepath.Join(dir, "ota-writer")
	out, err := exec.Command("go", "build", "-o", binary, ".").CombinedOutput()
	if err != nil {
		fmt.Fprintf(os.Stderr, "go build: %v\n%s", err, out)
		os.RemoveAll(dir)
		os.Exit(1)
	}
	code := m.Run()
	if code == 0 {
		if err := goleak.Find(); err != nil {
			fmt.Fprintf(os.Stderr, "goleak: %v\n", err)
			code = 1
		}
	}
	os.RemoveAll(dir)
	os.Exit(code)
}

// bench is a writer configuration with file-backed A/B slots, an openssl-made P-256 key and
// the file boot backend, all under one short temporary directory.
type bench struct {
	dir, cfg, sock, key, pub string
	slotA, slotB             string
	bootID                   string // the file backend's boot_id_file
	boots                    int
}

// reboot starts a new simulated boot: the next writer start takes the bootloader step.
func (b *bench) reboot(t *testing.T) {
	t.Helper()
	b.boots++
	if err := os.WriteFile(b.bootID, []byte(fmt.Sprintf("boot-%d\n", b.boots)), 0o600); err != nil {
		t.Fatal(err)
	}
}

const testMaxBlock = 4096

func newBench(t *testing.T, extra string) *bench {
	t.Helper()
	dir, err := os.MkdirTemp("", "otw") // short: the socket path must fit sun_path
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	b := &bench{dir: dir, cfg: filepath.Join(dir, "writer.toml"), sock: filepath.Join(dir, "w.sock"),
		key: filepath.Join(dir, "key.pem"), pub: filepath.Join(dir, "pub.pem"),
		slotA: filepath.Join(dir, "slot_a"), slotB: filepath.Join(dir, "slot_b"), bootID: filepath.Join(dir, "boot_id")}
	b.reboot(t)
	if err := b.signer().Make(); err != nil {
		t.Fatal(err)
	}
	for _, s := range []string{b.slotA, b.slotB} {
		if err := os.WriteFile(s, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	cfg := fmt.Sprintf(`socket = %q
state_dir = %q
trusted_keys = [%q]
max_block_size = %d
log_level = "debug"
sync_bytes = 1048576
[boot]
backend = "file"
boot_id_file = %q
[[target]]
name = "rootfs"
kind = "ab"
file_types = [0]
file_paths = ["/opt/fw/gateway.img"]
slots = [%q, %q]
max_size = 1048576
%s`, b.sock, filepath.Join(dir, "state"), b.pub, testMaxBlock, b.bootID, b.slotA, b.slotB, extra)
	if err := os.WriteFile(b.cfg, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	return b
}

// signer is the bench's openssl key; the writer trusts its bare public key (pub.pem).
func (b *bench) signer() sign.OpenSSL { return sign.OpenSSL{Key: b.key, Pub: b.pub} }

// image writes n random bytes and their openssl signature; returns image path and signature.
func (b *bench) image(t *testing.T, name string, n int) (string, []byte) {
	t.Helper()
	data := make([]byte, n)
	rand.Read(data)
	p := filepath.Join(b.dir, name)
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	sig, err := b.signer().SignFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return p, sig
}

// writerProc is a running `ota-writer serve`.
type writerProc struct {
	cmd  *exec.Cmd
	logs *bytes.Buffer
	done chan error
}

func (b *bench) serve(t *testing.T) *writerProc {
	t.Helper()
	cmd := exec.Command(binary, "serve", "--config", b.cfg)
	logs := &bytes.Buffer{}
	cmd.Stdout, cmd.Stderr = logs, logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	p := &writerProc{cmd: cmd, logs: logs, done: make(chan error, 1)}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		p.stop(t)
		if t.Failed() {
			t.Logf("writer log:\n%s", logs.String())
		}
	})
	return p
}

// stop sends SIGTERM and waits for a graceful exit (no-op if already gone).
func (p *writerProc) stop(t *testing.T) {
	select {
	case <-p.done:
		p.done <- nil
		return
	default:
	}
	p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		p.done <- err
		if err != nil {
			t.Errorf("writer exit after SIGTERM: %v", err)
		}
	case <-time.After(15 * time.Second):
		p.cmd.Process.Kill()
		t.Error("writer did not stop within 15s of SIGTERM")
	}
}

func (p *writerProc) kill9() {
	p.cmd.Process.Signal(syscall.SIGKILL)
	err := <-p.done
	p.done <- err
}

// runCLI runs ota-writer with args and returns stdout, stderr and the exit status.
func runCLI(t *testing.T, args ...string) (string, string, int) {
	t.Helper()
	cmd := exec.Command(binary, args...)
	var out, errb bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &errb
	err := cmd.Run()
	code := 0
	if ee, ok := err.(*exec.ExitError); ok {
		code = ee.ExitCode()
	} else if err != nil {
		t.Fatalf("run %v: %v", args, err)
	}
	return out.String(), errb.String(), code
}

func blocksOf(img []byte, bs int, from, to int) []*otav1.Block {
	var out []*otav1.Block
	for k := from; k < to; k++ {
		off := k * bs
		out = append(out, &otav1.Block{Offset: uint64(off), Data: img[off:min(off+bs, len(img))]})
	}
	return out
}

func missingBit(m []byte, k int) bool { return bitmap.Bitmap(m).Has(k) }

func reasonIs(t *testing.T, err error, want otav1.Reason) {
	t.Helper()
	if got := status.ReasonOf(err); got != want {
		t.Errorf("reason %s, want %s (err %v)", status.String(got), status.String(want), err)
	}
}

// cliAs prepares ota-writer with args to run under uid (and the same gid).
func cliAs(uid uint32, args ...string) *exec.Cmd {
	cmd := exec.Command(binary, args...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: uid, Gid: uid}}
	return cmd
}
