package harness_test

import (
	"context"
	"os"
	"path/filepath"
	"syscall"
	"testing"
	"time"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/test/harness"

	"github.com/gwota/gwota/test/testenv"
)

func ctxT(t *testing.T, d time.Duration) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), d)
	t.Cleanup(cancel)
	return ctx
}

// TestWriterUpdateCycle drives the real ota-writer process through the harness the way
// ota-net would (begin, blocks, finish, activate, reboot), so the harness's reboot machinery is
// tested without ota-net: the reboot command reaches the harness through the FIFO, the writer
// is restarted, its file boot backend takes the trial boot, and a commit makes slot b the
// committed slot.
func TestWriterUpdateCycle(t *testing.T) {
	ctx := ctxT(t, 3*time.Minute)
	bin, err := harness.Build(ctx, harness.BuildOptions{Dir: t.TempDir(), Race: harness.RaceEnabled, Only: []string{"ota-writer"}})
	if err != nil {
		t.Fatal(err)
	}
	signer, err := harness.NewSigner("harness-test-signer")
	if err != nil {
		t.Fatal(err)
	}
	rebooted := make(chan error, 1)
	dev, err := harness.NewDevice(bin, harness.DeviceOptions{
		Thing: "gw-h", BrokerURL: "mqtt://127.0.0.1:1", Trusted: []*harness.Signer{signer},
		OnReboot: func(n int, done bool, err error) {
			if done {
				rebooted <- err
			}
		},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(dev.Logs())
		}
		if err := dev.Close(false); err != nil {
			t.Error(err)
		}
	})
	dctx, cancel := dev.Context(ctx)
	defer cancel()
	if err := dev.StartWriter(dctx); err != nil {
		t.Fatal(err)
	}

	img := filepath.Join(t.TempDir(), "img")
	const size = 256<<10 + 100
	if err := harness.WriteImage(img, size, 7); err != nil {
		t.Fatal(err)
	}
	sig, err := signer.SignFile(img)
	if err != nil {
		t.Fatal(err)
	}
	c, err := dev.WriterClient(dctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if _, err := c.Handshake(dctx, nil); err != nil {
		t.Fatal(err)
	}
	ft := int32(0)
	const bs = 16 << 10
	begin, err := c.Begin(dctx, &otav1.BeginSessionRequest{JobId: "job-h", FileType: &ft, FilePath: harness.DevicePath,
		FileSize: size, BlockSize: bs, SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: sig, CertName: signer.CertName})
	if err != nil {
		t.Fatal(err)
	}
	sid := begin.GetSession().GetSessionId()
	data, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	var blocks []*otav1.Block
	for off := 0; off < len(data); off += bs {
		blocks = append(blocks, &otav1.Block{Offset: uint64(off), Data: data[off:min(off+bs, len(data))]})
	}
	for i := 0; i < len(blocks); i += 8 {
		if _, err := c.WriteBatch(dctx, sid, uint64(i+1), blocks[i:min(i+8, len(blocks))], i+8 >= len(blocks)); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Finish(dctx, sid); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Activate(dctx, sid); err != nil {
		t.Fatal(err)
	}
	if err := c.Reboot(dctx); err != nil {
		t.Fatal(err)
	}
	select {
	case err := <-rebooted:
		if err != nil {
			t.Fatal(err)
		}
	case <-dctx.Done():
		t.Fatal(context.Cause(dctx))
	}
	if n := dev.Reboots(); n != 1 {
		t.Fatalf("reboots = %d, want 1", n)
	}
	st, err := dev.State(dctx)
	if err != nil {
		t.Fatal(err)
	}
	if st.GetImageState() != otav1.ImageState_IMAGE_STATE_TRIAL {
		t.Fatalf("after the reboot image state = %v, want TRIAL", st.GetImageState())
	}
	c2, err := dev.WriterClient(dctx)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close()
	if _, err := c2.Commit(dctx, "job-h"); err != nil {
		t.Fatal(err)
	}
	want, _ := harness.FileSHA256(img)
	got, err := harness.FilePrefixSHA256(dev.SlotB, size)
	if err != nil || got != want {
		t.Fatalf("slot b = %s (%v), want the image %s", got, err, want)
	}

	// An exit the harness did not ask for fails the device, and the device context says why.
	if err := syscall.Kill(dev.Writer().Pid, syscall.SIGKILL); err != nil {
		t.Fatal(err)
	}
	select {
	case <-dev.Failed():
	case <-ctx.Done():
		t.Fatal("an unexpected writer exit did not fail the device")
	}
	<-dctx.Done()
	if cause := context.Cause(dctx); cause == nil || dev.Err() == nil {
		t.Fatalf("device context cause = %v, Err = %v", cause, dev.Err())
	}
	if r := dev.RaceReports(); len(r) > 0 {
		t.Fatalf("data races reported in %v", r)
	}
}

// TestMosquittoRestart starts the broker as a process and restarts it on the same port.
func TestMosquittoRestart(t *testing.T) {
	_, err := harness.FindMosquitto()
	testenv.Need(t, err)
	ctx := ctxT(t, time.Minute)
	m, err := harness.StartMosquitto(ctx, t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = m.Stop(context.Background()) })
	port := m.Port
	if err := m.Restart(ctx); err != nil {
		t.Fatal(err)
	}
	if m.Port != port {
		t.Fatalf("port changed %d -> %d", port, m.Port)
	}
}

func TestProgressAndSteps(t *testing.T) {
	for _, tc := range []struct {
		in       string
		r, total uint64
		ok       bool
	}{
		{"3/10", 3, 10, true}, {"10/10", 10, 10, true}, {"11/10", 0, 0, false}, {"1/0", 0, 0, false}, {"x/1", 0, 0, false}, {"5", 0, 0, false},
	} {
		r, tot, ok := harness.ParseProgress(tc.in)
		if r != tc.r || tot != tc.total || ok != tc.ok {
			t.Errorf("ParseProgress(%q) = %d, %d, %v", tc.in, r, tot, ok)
		}
	}
}
