package engine

import (
	"bytes"
	"context"
	"crypto/rand"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"
	"go.uber.org/goleak"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/sign"
	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/target"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// opensslSigner is the key the tests' writers trust, made by the openssl command line once
// per test binary (sign.SharedOpenSSL: ec.key, and signer.crt.pem with CN "ota-signer").
func opensslSigner(t testing.TB) sign.OpenSSL {
	t.Helper()
	if _, err := exec.LookPath("openssl"); err != nil {
		t.Skip("openssl not installed")
	}
	o, err := sign.SharedOpenSSL()
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// signer returns the directory of the trusted key and certificate.
func signer(t testing.TB) string { return filepath.Dir(opensslSigner(t).Key) }

// signFile signs with `openssl dgst -sha256 -sign` (ECDSA P-256, DER), as a fleet operator does.
func signFile(t testing.TB, path string) []byte {
	b, err := opensslSigner(t).SignFile(path)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// image is a random image on disk with its openssl signature.
type image struct {
	path string
	data []byte
	sig  []byte
}

func newImage(t testing.TB, size int) image {
	data := make([]byte, size)
	rand.Read(data)
	p := filepath.Join(t.TempDir(), "image.bin")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return image{path: p, data: data, sig: signFile(t, p)}
}

// rig is a writer on temporary media: target "rootfs" (A/B, regular-file slots, file type 0)
// and "app" (plain file, file type 1), the file boot backend, a recording reboot function.
type rig struct {
	t        testing.TB
	dir      string
	cfg      *config.Config
	boot     *boot.File
	e        *Engine
	reboots  int
	rebootMu sync.Mutex
	slots    [2]string
	appPath  string
	selfTest SelfTester // given to every engine open starts (nil: none)
	// wrap, when set, wraps every medium the engines open (Deps.WrapMedium).
	wrap func(targetName string, m target.Medium) target.Medium
	toml string // the configuration before the test's edit
}

const slotSize = 4 << 20

func newRig(t testing.TB, edit func(*config.Config)) *rig {
	t.Helper()
	keys := signer(t)
	dir := t.TempDir()
	r := &rig{t: t, dir: dir}
	r.slots = [2]string{filepath.Join(dir, "slot-a.img"), filepath.Join(dir, "slot-b.img")}
	for _, p := range r.slots {
		if err := os.WriteFile(p, bytes.Repeat([]byte{0xEE}, slotSize), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	os.MkdirAll(filepath.Join(dir, "app"), 0o755)
	r.appPath = filepath.Join(dir, "app", "bundle.tar")
	toml := `
state_dir = "` + filepath.Join(dir, "state") + `"
trusted_keys = ["` + filepath.Join(keys, "signer.crt.pem") + `"]
reboot_command = ["/bin/false"]
[[target]]
name = "rootfs"
kind = "ab"
file_types = [0]
file_paths = ["/opt/fw/gateway.img"]
slots = ["` + r.slots[0] + `", "` + r.slots[1] + `"]
max_size = ` + "4194304" + `
[[target]]
name = "app"
kind = "file"
file_types = [1]
path = "` + r.appPath + `"
max_size = 1048576
`
	r.toml = toml
	cfg, err := config.Parse([]byte(toml))
	if err != nil {
		t.Fatal(err)
	}
	if edit != nil {
		edit(cfg)
		if err := cfg.Validate(); err != nil {
			t.Fatal(err)
		}
	}
	r.cfg = cfg
	os.MkdirAll(cfg.StateDir, 0o700)
	r.open()
	t.Cleanup(func() { r.e.Close() })
	return r
}

func testLog(t testing.TB) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Warn, Output: testWriter{t}})
}

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}

// open starts a (new) engine on the rig's state: what a restarted writer does.
func (r *rig) open() *Engine {
	r.t.Helper()
	fb, err := boot.NewFile(filepath.Join(r.cfg.StateDir, "boot.json"), r.cfg.Boot.BootLimit, hclog.NewNullLogger())
	if err != nil {
		r.t.Fatal(err)
	}
	r.boot = fb
	e, err := New(context.Background(), r.cfg, Deps{Boot: fb, Reboot: r.reboot, SelfTest: r.selfTest, WrapMedium: r.wrap}, testLog(r.t))
	if err != nil {
		r.t.Fatal(err)
	}
	r.e = e
	return e
}

func (r *rig) reboot(ctx context.Context) error {
	r.rebootMu.Lock()
	defer r.rebootMu.Unlock()
	r.reboots++
	return nil
}

func (r *rig) begin(img image, fileType int32, mod func(*otav1.BeginSessionRequest)) (*otav1.BeginSessionResponse, error) {
	req := &otav1.BeginSessionRequest{
		JobId: "job-1", FileType: &fileType, FilePath: "/opt/fw/gateway.img", FileSize: uint64(len(img.data)),
		BlockSize: 4096, SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: img.sig,
		CertName: "signer.crt.pem",
	}
	if fileType != 0 {
		req.FilePath = ""
	}
	if mod != nil {
		mod(req)
	}
	return r.e.Begin(context.Background(), req)
}

// blocks cuts data [from, to) blocks into Block messages.
func blocks(data []byte, bs, from, to int) []*otav1.Block {
	var out []*otav1.Block
	for k := from; k < to; k++ {
		off := k * bs
		if off >= len(data) {
			break
		}
		end := min(off+bs, len(data))
		out = append(out, &otav1.Block{Offset: uint64(off), Data: data[off:end]})
	}
	return out
}

func wantReason(t testing.TB, err error, want otav1.Reason) {
	t.Helper()
	if got := status.ReasonOf(err); got != want {
		t.Fatalf("got %v (%s), want %s", err, status.Name(got), status.Name(want))
	}
}

func must[T any](t testing.TB) func(T, error) T {
	return func(v T, err error) T {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
		return v
	}
}
