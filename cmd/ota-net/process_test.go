package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"flag"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sync"
	"syscall"
	"testing"
	"time"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/sign"
	"github.com/gwota/gwota/writer/client"

	"github.com/gwota/gwota/test/testenv"
)

// The process tests build the real ota-net and ota-writer binaries and run them against the
// in-process emulator.
var binDir string

func TestMain(m *testing.M) {
	// A fuzz worker runs only the fuzz target: no binaries to build (each worker would
	// rebuild them).
	flag.Parse()
	if f := flag.Lookup("test.fuzzworker"); f != nil && f.Value.String() == "true" {
		os.Exit(m.Run())
	}
	dir, err := os.MkdirTemp("", "otanetbin")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	binDir = dir
	for _, pkg := range []string{".", "../ota-writer"} {
		name := "ota-net"
		if pkg != "." {
			name = "ota-writer"
		}
		if out, err := exec.Command("go", "build", "-o", filepath.Join(dir, name), pkg).CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "go build %s: %v\n%s", pkg, err, out)
			os.RemoveAll(dir)
			os.Exit(1)
		}
	}
	code := m.Run()
	os.RemoveAll(dir)
	os.Exit(code)
}

type syncBuf struct {
	mu sync.Mutex
	b  bytes.Buffer
}

func (s *syncBuf) Write(p []byte) (int, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.Write(p)
}

func (s *syncBuf) String() string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.b.String()
}

type proc struct {
	name string
	cmd  *exec.Cmd
	logs *syncBuf
	done chan error
}

func startProc(t *testing.T, name string, args ...string) *proc {
	t.Helper()
	cmd := exec.Command(filepath.Join(binDir, name), args...)
	p := &proc{name: name, cmd: cmd, logs: &syncBuf{}, done: make(chan error, 1)}
	cmd.Stdout, cmd.Stderr = p.logs, p.logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() { p.done <- cmd.Wait() }()
	t.Cleanup(func() {
		p.term(t)
		if t.Failed() {
			t.Logf("%s log:\n%s", name, p.logs.String())
		}
	})
	return p
}

// term sends SIGTERM and waits for the exit; it returns the exit error (nil: status 0).
func (p *proc) term(t *testing.T) error {
	if p.cmd.ProcessState != nil {
		return nil
	}
	_ = p.cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-p.done:
		return err
	case <-time.After(20 * time.Second):
		_ = p.cmd.Process.Kill()
		t.Errorf("%s did not stop on SIGTERM", p.name)
		return <-p.done
	}
}

func signedImage(t *testing.T, dir string, size int) (string, []byte) {
	t.Helper()
	o := sign.OpenSSL{Key: filepath.Join(dir, "ec.key"), Cert: filepath.Join(dir, "signer.crt.pem"), CN: "ota-signer"}
	if err := o.Make(); err != nil {
		t.Fatal(err)
	}
	data := make([]byte, size)
	_, _ = rand.Read(data)
	img := filepath.Join(dir, "image.bin")
	if err := os.WriteFile(img, data, 0o600); err != nil {
		t.Fatal(err)
	}
	sig, err := o.SignFile(img)
	if err != nil {
		t.Fatal(err)
	}
	return img, sig
}

// A whole job through the real binaries, with a SIGTERM in the middle of the download: ota-net
// exits 0 and the next start resumes from the writer's durable blocks.
func TestProcessesJobWithRestart(t *testing.T) {
	testenv.NeedTools(t, "openssl")
	dir := t.TempDir()
	sockDir, err := os.MkdirTemp("/tmp", "otn")
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(sockDir)
	img, sig := signedImage(t, dir, 2<<20)
	appPath := filepath.Join(dir, "app.bin")
	wcfg := filepath.Join(dir, "writer.toml")
	sock := filepath.Join(sockDir, "writer.sock")
	if err := os.WriteFile(wcfg, []byte(`
socket = "`+sock+`"
state_dir = "`+filepath.Join(dir, "wstate")+`"
trusted_keys = ["`+filepath.Join(dir, "signer.crt.pem")+`"]
reboot_command = ["/bin/true"]
sync_bytes = 65536
[[target]]
name = "app"
kind = "file"
file_types = [1]
path = "`+appPath+`"
`), 0o600); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 90*time.Second)
	defer cancel()
	e, err := emulator.Start(ctx, emulator.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer e.Close()

	ncfg := filepath.Join(dir, "net.toml")
	if err := os.WriteFile(ncfg, []byte(`
broker = "`+e.BrokerURL()+`"
thing_name = "`+e.ThingName()+`"
writer_socket = "/nonexistent/overridden.sock"
state_dir = "`+filepath.Join(dir, "nstate")+`"
block_size = 4096
blocks_per_request = 4
requests_in_flight = 2
quiet_period = "300ms"
report_interval = "100ms"
log_level = "debug"
`), 0o600); err != nil {
		t.Fatal(err)
	}
	startProc(t, "ota-writer", "serve", "--config", wcfg)
	net1 := startProc(t, "ota-net", "--config", ncfg, "--writer-socket", sock)

	// Slow the stream so the SIGTERM lands mid-download.
	if err := e.CreateJob(ctx, backend.JobSpec{JobID: "job-p", Files: []backend.FileSpec{{
		LocalPath: img, FileType: 1, CertName: "signer.crt.pem", Signature: sig, SigAlgorithm: backend.SigSHA256ECDSA,
	}}}); err != nil {
		t.Fatal(err)
	}
	e.SetFaults(e.StreamName("job-p"), emulator.Faults{Delay: 20 * time.Millisecond})
	// SIGTERM once the writer holds blocks durably. Reported progress is not enough: it counts
	// blocks handed to ota-net's writer link, which batches them (up to 32 here) before they
	// reach the writer, so a SIGTERM right after the first report could leave nothing durable.
	waitDurable(ctx, t, sock, "job-p")
	if err := net1.term(t); err != nil {
		t.Fatalf("ota-net exit after SIGTERM: %v\n%s", err, net1.logs.String())
	}
	served, requests := e.BlocksServed("job-p"), len(e.StreamRequests("job-p"))
	// What the writer holds durably now; with ota-net stopped it can only grow (a late sync).
	held := map[int]bool{}
	missing := emulator.BitmapBlocks(0, waitDurable(ctx, t, sock, "job-p").GetMissing())
	for b := 0; b < 512; b++ {
		held[b] = true
	}
	for _, b := range missing {
		delete(held, b)
	}
	e.ClearFaults(e.StreamName("job-p"))

	startProc(t, "ota-net", "--config", ncfg, "--writer-socket", sock)
	ex, err := e.WaitStatus(ctx, "job-p", backend.StatusSucceeded, backend.StatusFailed, backend.StatusRejected)
	if err != nil || ex.Status != backend.StatusSucceeded {
		t.Fatalf("job %+v %v (updates %+v)", ex, err, e.Updates("job-p"))
	}
	got, err := os.ReadFile(appPath)
	want, _ := os.ReadFile(img)
	if err != nil || !bytes.Equal(got, want) {
		t.Fatalf("installed file differs (%v)", err)
	}
	total := e.BlocksServed("job-p")
	t.Logf("blocks served before SIGTERM %d (%d durable), in total %d (file has 512)", served, len(held), total)
	// The restart asks only for what the writer lacked: never again for a block it held.
	// (Requests still queued from the first ota-net are for blocks it lacked too.) Counting
	// blocks served instead would also count re-requests after a quiet period under load.
	after := e.StreamRequests("job-p")[requests:]
	if len(after) == 0 {
		t.Fatal("no stream request after the restart")
	}
	for _, r := range after {
		for _, b := range r.Wanted {
			if held[b] {
				t.Fatalf("after the restart block %d was requested again, but the writer held it durably (%d of 512 held)", b, len(held))
			}
		}
	}
}

// waitDurable waits until the writer behind sock reports durable blocks in the session of
// jobID and returns the session. The writer has no change feed, so its state is polled.
func waitDurable(ctx context.Context, t *testing.T, sock, jobID string) *otav1.SessionInfo {
	t.Helper()
	c, err := client.Dial(ctx, sock, client.Options{Name: "process test"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	if err := c.WaitReady(ctx); err != nil {
		t.Fatalf("writer not ready: %v", err)
	}
	tick := time.NewTicker(10 * time.Millisecond)
	defer tick.Stop()
	for {
		st, err := c.State(ctx)
		if err != nil {
			t.Fatalf("writer state: %v", err)
		}
		for _, s := range st.GetSessions() {
			if s.GetJobId() == jobID && s.GetDurableBlocks() > 0 {
				return s
			}
		}
		select {
		case <-tick.C:
		case <-ctx.Done():
			t.Fatalf("the writer holds no block of %s durably: %v", jobID, st.GetSessions())
		}
	}
}
