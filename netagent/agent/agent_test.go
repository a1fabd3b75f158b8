package agent_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/base64"
	"encoding/json"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/go-hclog"
	"go.uber.org/goleak"

	"github.com/gwota/gwota/netagent/agent"
	"github.com/gwota/gwota/netagent/httpdl"
	"github.com/gwota/gwota/netagent/jobs"
	"github.com/gwota/gwota/netagent/mqttconn"
	"github.com/gwota/gwota/netagent/mqttconn/mqtttest"
	"github.com/gwota/gwota/netagent/stream"
	"github.com/gwota/gwota/netagent/writerlink"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/sign"
	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/engine"
	"github.com/gwota/gwota/writer/ext"
	"github.com/gwota/gwota/writer/selftest"
	"github.com/gwota/gwota/writer/server"
	"github.com/gwota/gwota/writer/writertest"

	"github.com/gwota/gwota/test/testenv"
)

func TestMain(m *testing.M) {
	opts := mqtttest.LeakOptions()
	code := m.Run()
	sign.RemoveShared()
	if code == 0 {
		if err := goleak.Find(opts...); err != nil {
			fmt.Fprintln(os.Stderr, "goleak:", err)
			code = 1
		}
	}
	os.Exit(code)
}

func logger(t *testing.T, name string) hclog.Logger {
	if os.Getenv("AGENT_DEBUG") == "" {
		return hclog.NewNullLogger()
	}
	return hclog.New(&hclog.LoggerOptions{Name: t.Name() + "." + name, Level: hclog.Debug})
}

// opensslSigner is an ECDSA P-256 key and certificate made with openssl, as a fleet operator
// does, once per test binary (sign.SharedOpenSSL: ec.key, signer.crt.pem).
func opensslSigner(t *testing.T) sign.OpenSSL {
	t.Helper()
	testenv.NeedTools(t, "openssl")
	o, err := sign.SharedOpenSSL()
	if err != nil {
		t.Fatal(err)
	}
	return o
}

// signer is the directory of the signer's files.
func signer(t *testing.T) string { return filepath.Dir(opensslSigner(t).Key) }

type image struct {
	path string
	data []byte
	sig  []byte
}

func newImage(t *testing.T, size int) image {
	t.Helper()
	data := make([]byte, size)
	_, _ = rand.Read(data)
	p := filepath.Join(t.TempDir(), "image.bin")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	sig, err := opensslSigner(t).SignFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return image{path: p, data: data, sig: sig}
}

// writerRig is a real writer (engine + gRPC server on a Unix socket) on temporary media: A/B
// target "rootfs" (fileType 0) and file target "app" (fileType 1), file boot backend.
type writerRig struct {
	t       *testing.T
	dir     string
	sock    string
	cfg     *config.Config
	slots   [2]string
	appPath string
	reboots chan struct{}
	// log, when set, gets the engine's and the server's logs.
	log hclog.Logger

	eng *engine.Engine
	srv *writertest.Server
}

const slotSize = 4 << 20

func newWriter(t *testing.T, check string, topLevel ...string) *writerRig {
	t.Helper()
	return newWriterExt(t, check, nil, topLevel...)
}

// newWriterExt is newWriter with extra [extensions] lines (static status fields, in order).
func newWriterExt(t *testing.T, check string, extLines []string, topLevel ...string) *writerRig {
	t.Helper()
	keys := signer(t)
	dir := t.TempDir()
	w := &writerRig{t: t, dir: dir, reboots: make(chan struct{}, 10)}
	w.slots = [2]string{filepath.Join(dir, "slot-a.img"), filepath.Join(dir, "slot-b.img")}
	for _, p := range w.slots {
		if err := os.WriteFile(p, bytes.Repeat([]byte{0xEE}, slotSize), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	_ = os.MkdirAll(filepath.Join(dir, "app"), 0o755)
	w.appPath = filepath.Join(dir, "app", "bundle.tar")
	toml := `
state_dir = "` + filepath.Join(dir, "state") + `"
trusted_keys = ["` + filepath.Join(keys, "signer.crt.pem") + `"]
reboot_command = ["/bin/false"]
self_test_timeout = "20s"
` + strings.Join(topLevel, "\n") + `
[[target]]
name = "rootfs"
kind = "ab"
file_types = [0]
compatible = "acme,gw-1"
slots = ["` + w.slots[0] + `", "` + w.slots[1] + `"]
[[target]]
name = "app"
kind = "file"
file_types = [1]
path = "` + w.appPath + `"
[[check]]
name = "health"
command = ["` + check + `"]
[extensions]
hardware_rev = "C2"
` + strings.Join(extLines, "\n") + "\n"
	cfg, err := config.Parse([]byte(toml))
	if err != nil {
		t.Fatal(err)
	}
	w.cfg = cfg
	_ = os.MkdirAll(cfg.StateDir, 0o700)
	w.start(false)
	t.Cleanup(w.stop)
	return w
}

// start opens the engine and serves it; boot simulates a power-on first (trial logic).
func (w *writerRig) start(bootNow bool) {
	w.t.Helper()
	fb, err := boot.NewFile(filepath.Join(w.cfg.StateDir, "boot.json"), w.cfg.Boot.BootLimit, hclog.NewNullLogger())
	if err != nil {
		w.t.Fatal(err)
	}
	if bootNow {
		if err := fb.Boot(context.Background(), ""); err != nil {
			w.t.Fatal(err)
		}
	}
	var checks []selftest.Check
	for _, c := range w.cfg.Checks {
		checks = append(checks, selftest.Check{Name: c.Name, Argv: c.Command, Timeout: c.Timeout})
	}
	eng, err := engine.New(context.Background(), w.cfg, engine.Deps{
		Boot:       fb,
		SelfTest:   selftest.New(checks, w.cfg.SelfTestTimeout, hclog.NewNullLogger()),
		Extensions: ext.New(ext.Config{Static: w.cfg.StaticExtensions(), StateDir: w.cfg.StateDir}, hclog.NewNullLogger()),
		Reboot: func(context.Context) error {
			w.reboots <- struct{}{}
			return nil
		},
	}, w.logger())
	if err != nil {
		w.t.Fatal(err)
	}
	w.eng = eng
	if w.srv == nil {
		w.srv = writertest.Serve(w.t, eng, server.Options{}, server.ListenConfig{}, w.logger())
		w.sock = w.srv.Sock
		return
	}
	w.srv.SetLogger(w.logger())
	w.srv.Restart(eng)
}

func (w *writerRig) logger() hclog.Logger {
	if w.log == nil {
		return hclog.NewNullLogger()
	}
	return w.log
}

// stop kills the writer: connections cut, the engine closed.
func (w *writerRig) stop() {
	if w.eng == nil {
		return
	}
	w.srv.Kill()
	_ = w.eng.Close()
	w.eng = nil
}

// device is one ota-net: MQTT connection, jobs client, downloaders, writer link, agent.
type device struct {
	cancel context.CancelFunc
	done   chan error
	conn   *mqttconn.Conn
	jobs   *jobs.Client
	link   *writerlink.Link
}

func startDevice(t *testing.T, e *emulator.Emulator, w *writerRig, cfg agent.Config) *device {
	t.Helper()
	return startDeviceWith(t, e, w, cfg, nil)
}

// startDeviceWith starts a device whose agent sees the jobs client through wrap (nil: as is).
func startDeviceWith(t *testing.T, e *emulator.Emulator, w *writerRig, cfg agent.Config, wrap func(agent.Jobs) agent.Jobs) *device {
	t.Helper()
	ctx, cancel := context.WithCancel(context.Background())
	conn, err := mqttconn.Dial(ctx, mqttconn.Config{BrokerURL: e.BrokerURL(), ClientID: e.ThingName(), StateDir: t.TempDir(),
		BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond, Logger: logger(t, "mqtt")})
	if err != nil {
		t.Fatal(err)
	}
	jc, err := jobs.New(conn, e.ThingName(), jobs.Options{Logger: logger(t, "jobs"), BackoffMin: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	sd, err := stream.New(conn, stream.Config{Thing: e.ThingName(), QuietPeriod: 300 * time.Millisecond, Logger: logger(t, "stream")})
	if err != nil {
		t.Fatal(err)
	}
	hd, err := httpdl.New(httpdl.Config{Logger: logger(t, "http")})
	if err != nil {
		t.Fatal(err)
	}
	lctx, lcancel := context.WithTimeout(ctx, 10*time.Second)
	defer lcancel()
	link, err := writerlink.Dial(lctx, writerlink.Config{SocketPath: w.sock, Name: "ota-net test", ReconnectTimeout: 5 * time.Second, Logger: logger(t, "link")})
	if err != nil {
		t.Fatal(err)
	}
	if cfg.Logger == nil {
		cfg.Logger = logger(t, "agent")
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = 4096
	}
	if cfg.ReportInterval == 0 {
		cfg.ReportInterval = 50 * time.Millisecond
	}
	var aj agent.Jobs = jc
	if wrap != nil {
		aj = wrap(jc)
	}
	a := agent.New(aj, agent.LinkWriter(link), sd, hd, cfg)
	d := &device{cancel: cancel, done: make(chan error, 1), conn: conn, jobs: jc, link: link}
	go func() { d.done <- a.Run(ctx) }()
	t.Cleanup(func() { d.stop(t) })
	return d
}

func (d *device) stop(t *testing.T) {
	if d.cancel == nil {
		return
	}
	d.cancel()
	if err := <-d.done; err != nil {
		t.Errorf("agent Run: %v", err)
	}
	_ = d.jobs.Close(context.Background())
	_ = d.link.Close()
	_ = d.conn.Close(context.Background())
	d.cancel = nil
}

func startEmulator(t *testing.T) *emulator.Emulator {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e, err := emulator.Start(ctx, emulator.Options{Logger: logger(t, "emulator")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	return e
}

func createJob(t *testing.T, e *emulator.Emulator, id string, protocols []string, img image, fileType int, mod func(*backend.FileSpec)) {
	t.Helper()
	fs := backend.FileSpec{LocalPath: img.path, DevicePath: "/opt/fw/x.img", FileType: fileType, CertName: "signer.crt.pem",
		Signature: img.sig, SigAlgorithm: backend.SigSHA256ECDSA}
	if mod != nil {
		mod(&fs)
	}
	if err := e.CreateJob(context.Background(), backend.JobSpec{JobID: id, Protocols: protocols, Files: []backend.FileSpec{fs}}); err != nil {
		t.Fatal(err)
	}
}

func waitStatus(t *testing.T, e *emulator.Emulator, id string, statuses ...string) backend.Execution {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	ex, err := e.WaitStatus(ctx, id, statuses...)
	if err != nil {
		t.Fatalf("job %s: waiting for %v: %v (updates %+v)", id, statuses, err, e.Updates(id))
	}
	return ex
}

func selfTests(e *emulator.Emulator, id string) []string {
	var out []string
	for _, u := range e.Updates(id) {
		s := u.Status + ":" + u.StatusDetails["self_test"]
		if len(out) == 0 || out[len(out)-1] != s {
			out = append(out, s)
		}
	}
	return out
}

func waitReboot(t *testing.T, w *writerRig) {
	t.Helper()
	select {
	case <-w.reboots:
	case <-time.After(60 * time.Second):
		t.Fatal("no reboot")
	}
}

func TestFileTargetOverMQTT(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	startDevice(t, e, w, agent.Config{})
	img := newImage(t, 300*1024+17)
	createJob(t, e, "job-file", []string{"MQTT"}, img, 1, nil)
	ex := waitStatus(t, e, "job-file", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected)
	if ex.Status != jobs.StatusSucceeded {
		t.Fatalf("job %+v", ex)
	}
	got, err := os.ReadFile(w.appPath)
	if err != nil || !bytes.Equal(got, img.data) {
		t.Fatalf("installed file differs (%v)", err)
	}
	want := []string{"IN_PROGRESS:receiving", "IN_PROGRESS:ready", "SUCCEEDED:accepted"}
	if got := selfTests(e, "job-file"); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("updates %v, want %v", got, want)
	}
	if ex.StatusDetails["boot_slot"] == "" {
		t.Fatalf("writer extensions missing: %v", ex.StatusDetails)
	}
}

func TestABOverHTTPWithTrialAndCommit(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	d := startDevice(t, e, w, agent.Config{PreferHTTP: true})
	img := newImage(t, 200*1024)
	createJob(t, e, "job-ab", []string{"MQTT", "HTTP"}, img, 0, nil)
	waitReboot(t, w)
	ex := waitStatus(t, e, "job-ab", jobs.StatusInProgress)
	if ex.StatusDetails["self_test"] != "ready" {
		t.Fatalf("before reboot: %+v", ex)
	}
	if e.BlocksServed("job-ab") != 0 {
		t.Fatalf("PreferHTTP, yet %d stream blocks served", e.BlocksServed("job-ab"))
	}
	// "Reboot": both processes stop, the bootloader tries the new slot, both start again.
	d.stop(t)
	w.stop()
	w.start(true)
	startDevice(t, e, w, agent.Config{})
	ex = waitStatus(t, e, "job-ab", jobs.StatusSucceeded, jobs.StatusFailed)
	if ex.Status != jobs.StatusSucceeded {
		t.Fatalf("job %+v", ex)
	}
	want := []string{"IN_PROGRESS:receiving", "IN_PROGRESS:ready", "IN_PROGRESS:active", "SUCCEEDED:accepted"}
	if got := selfTests(e, "job-ab"); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("updates %v, want %v", got, want)
	}
	slot, err := os.ReadFile(w.slots[1])
	if err != nil || !bytes.Equal(slot[:len(img.data)], img.data) {
		t.Fatalf("slot b does not hold the image (%v)", err)
	}
}

func TestSelfTestFailsRollsBack(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/false")
	d := startDevice(t, e, w, agent.Config{})
	img := newImage(t, 50*1024)
	createJob(t, e, "job-st", []string{"MQTT"}, img, 0, nil)
	waitReboot(t, w)
	waitStatus(t, e, "job-st", jobs.StatusInProgress)
	d.stop(t)
	w.stop()
	w.start(true)
	startDevice(t, e, w, agent.Config{})
	ex := waitStatus(t, e, "job-st", jobs.StatusSucceeded, jobs.StatusFailed)
	if ex.Status != jobs.StatusFailed || ex.StatusDetails["reason"] != "self_test_failed" || ex.StatusDetails["error_code"] != "3005" || ex.StatusDetails["self_test"] != "rejected" {
		t.Fatalf("job %+v", ex)
	}
	waitReboot(t, w) // back to the previous image
}

// A refused image: the job fails with sig_check_failed and the writer's evidence, the sha256
// it read back from the medium, reaches statusDetails. The session the writer dropped when it
// refused the image is not aborted noisily afterwards, and the end of the block stream is not
// a failed call in the writer's log: the only failed call is FinishSession.
func TestBadSignatureFails(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	wlog, alog := &logLines{}, &logLines{}
	w.stop()
	w.log = hclog.New(&hclog.LoggerOptions{Name: "writer", Level: hclog.Debug, Output: wlog})
	w.start(false)
	startDevice(t, e, w, agent.Config{Logger: hclog.New(&hclog.LoggerOptions{Name: "agent", Level: hclog.Debug, Output: alog})})
	img := newImage(t, 40*1024)
	other := newImage(t, 40*1024)
	createJob(t, e, "job-sig", []string{"MQTT"}, img, 1, func(fs *backend.FileSpec) { fs.Signature = other.sig })
	ex := waitStatus(t, e, "job-sig", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected)
	if ex.Status != jobs.StatusFailed || ex.StatusDetails["reason"] != "sig_check_failed" || ex.StatusDetails["error_code"] != "1001" ||
		ex.StatusDetails["progress"] != "10/10" {
		t.Fatalf("job %+v", ex)
	}
	if want := fmt.Sprintf("%x", sha256.Sum256(img.data)); ex.StatusDetails["sha256"] != want {
		t.Errorf("statusDetails sha256 = %q, want the read-back digest %s (details %v)", ex.StatusDetails["sha256"], want, ex.StatusDetails)
	}
	if _, err := os.Stat(w.appPath); !os.IsNotExist(err) {
		t.Fatalf("unverified file installed: %v", err)
	}
	var failed []string
	for _, l := range wlog.lines() {
		if strings.Contains(l, "call failed") {
			failed = append(failed, l)
		}
	}
	if len(failed) != 1 || !strings.Contains(failed[0], "FinishSession") || !strings.Contains(failed[0], "sig_check_failed/1001") {
		t.Errorf("writer's failed calls: want only FinishSession sig_check_failed, got:\n%s", strings.Join(failed, "\n"))
	}
	for _, l := range alog.lines() {
		if strings.Contains(l, "abort session failed") || strings.Contains(l, "[WARN]") && strings.Contains(l, "bad_file_handle") {
			t.Errorf("ota-net warns about the session the writer dropped: %s", l)
		}
	}
}

// logLines is a log output that keeps every line.
type logLines struct {
	mu sync.Mutex
	ls []string
}

func (l *logLines) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	l.ls = append(l.ls, strings.Split(strings.TrimRight(string(p), "\n"), "\n")...)
	return len(p), nil
}

func (l *logLines) lines() []string {
	l.mu.Lock()
	defer l.mu.Unlock()
	return slices.Clone(l.ls)
}

// A job created right after ota-net started: ota-net's $next/get at start-up is answered
// "nothing pending" (the job did not exist yet), but that answer reaches ota-net only after
// the notify-next of the new job, while the job runs. The stale answer must not kill the
// job: only the cloud's answer about the job itself (DescribeJobExecution of its id) says it
// is gone. Before the fix the job was reported FAILED user_abort.
func TestStaleNothingPendingKeepsNewJob(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	held, release := e.HoldNext()
	defer release()
	startDevice(t, e, w, agent.Config{})
	select {
	case <-held: // the start-up $next/get is answered "nothing pending", and held back
	case <-time.After(30 * time.Second):
		t.Fatal("ota-net asked no $next/get at start")
	}
	img := newImage(t, 256*1024)
	createJob(t, e, "job-new", []string{"MQTT"}, img, 1, nil)
	// Slow blocks keep the job running when the stale answer arrives.
	e.SetFaults(e.StreamName("job-new"), emulator.Faults{Delay: 100 * time.Millisecond})
	waitStatus(t, e, "job-new", jobs.StatusInProgress)
	release()
	ex := waitStatus(t, e, "job-new", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected, jobs.StatusCanceled)
	if ex.Status != jobs.StatusSucceeded {
		t.Fatalf("job %s %v after a stale \"nothing pending\", want SUCCEEDED (updates %v)", ex.Status, ex.StatusDetails, selfTests(e, "job-new"))
	}
	got, err := os.ReadFile(w.appPath)
	if err != nil || !bytes.Equal(got, img.data) {
		t.Fatalf("installed file: %v (equal %v)", err, bytes.Equal(got, img.data))
	}
}

// The same race one job later: at a reconnection while job A runs, ota-net asks $next/get
// and the cloud answers "A". That answer arrives only after A succeeded and job B started.
// B is not replaced by a job that has ended: before the fix B was reported FAILED newer_job.
func TestStaleNextNamingEndedJobKeepsJob(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	startDevice(t, e, w, agent.Config{})
	imgA, imgB := newImage(t, 64*1024), newImage(t, 256*1024)
	createJob(t, e, "job-a", []string{"MQTT"}, imgA, 1, nil)
	e.SetFaults(e.StreamName("job-a"), emulator.Faults{Delay: 100 * time.Millisecond})
	waitStatus(t, e, "job-a", jobs.StatusInProgress)
	held, release := e.HoldNext()
	defer release()
	if !e.DisconnectClient(e.ThingName()) {
		t.Fatal("device not connected")
	}
	select {
	case <-held: // asked at the reconnection, answered "job-a", held back
	case <-time.After(30 * time.Second):
		t.Fatal("ota-net asked no $next/get after reconnecting")
	}
	if ex := waitStatus(t, e, "job-a", jobs.StatusSucceeded, jobs.StatusFailed); ex.Status != jobs.StatusSucceeded {
		t.Fatalf("job-a %+v", ex)
	}
	createJob(t, e, "job-b", []string{"MQTT"}, imgB, 1, nil)
	e.SetFaults(e.StreamName("job-b"), emulator.Faults{Delay: 100 * time.Millisecond})
	waitStatus(t, e, "job-b", jobs.StatusInProgress)
	release()
	ex := waitStatus(t, e, "job-b", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected, jobs.StatusCanceled)
	if ex.Status != jobs.StatusSucceeded {
		t.Fatalf("job-b %s %v after a stale answer naming job-a, want SUCCEEDED (updates %v)", ex.Status, ex.StatusDetails, selfTests(e, "job-b"))
	}
}

func TestUnknownTargetRejected(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	startDevice(t, e, w, agent.Config{})
	img := newImage(t, 10*1024)
	createJob(t, e, "job-tgt", []string{"MQTT"}, img, 7, func(fs *backend.FileSpec) { fs.DevicePath = "/nowhere" })
	ex := waitStatus(t, e, "job-tgt", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected)
	if ex.Status != jobs.StatusRejected || ex.StatusDetails["reason"] != "target_unknown" || ex.StatusDetails["error_code"] != "3003" {
		t.Fatalf("job %+v", ex)
	}
	// The writer's refusal names what selected no target.
	if ex.StatusDetails["file_type"] != "7" || ex.StatusDetails["file_path"] != "/nowhere" {
		t.Errorf("statusDetails %v lack the writer's file_type and file_path", ex.StatusDetails)
	}
	// The agent moves on to the next job.
	createJob(t, e, "job-next", []string{"MQTT"}, img, 1, nil)
	if ex := waitStatus(t, e, "job-next", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected); ex.Status != jobs.StatusSucceeded {
		t.Fatalf("next job %+v", ex)
	}
}

func TestCancelAbortsSession(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	d := startDevice(t, e, w, agent.Config{})
	img := newImage(t, 1<<20)
	createJob(t, e, "job-c", []string{"MQTT"}, img, 0, nil)
	e.SetFaults(e.StreamName("job-c"), emulator.Faults{Delay: 200 * time.Millisecond})
	waitStatus(t, e, "job-c", jobs.StatusInProgress)
	if err := e.CancelJob(context.Background(), "job-c", true); err != nil {
		t.Fatal(err)
	}
	// The writer session goes away promptly (aborted, user_abort).
	deadline := time.Now().Add(20 * time.Second)
	for {
		st, err := d.link.State(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if len(st.GetSessions()) == 0 {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("session not aborted: %+v", st.GetSessions())
		}
		time.Sleep(20 * time.Millisecond)
	}
	if ex := waitStatus(t, e, "job-c", jobs.StatusCanceled); ex.Status != jobs.StatusCanceled {
		t.Fatal(ex)
	}
}

// A job canceled while the writer is away: ota-net's abort cannot reach it and the writer
// keeps the session in its journal. Once the writer is back, ota-net aborts the orphan (the
// job is gone in the cloud), and the next job on the same target is not refused session_busy.
func TestCancelWhileWriterDownAbortsOnReconnect(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	// The writer comes back only once ota-net's own abort has failed.
	abortFailed := &lineWaiter{want: "abort session failed", seen: make(chan struct{})}
	startDevice(t, e, w, agent.Config{Logger: hclog.New(&hclog.LoggerOptions{Name: "agent", Level: hclog.Debug, Output: abortFailed})})
	img := newImage(t, 1<<20)
	createJob(t, e, "job-wd", []string{"MQTT"}, img, 0, nil)
	e.SetFaults(e.StreamName("job-wd"), emulator.Faults{Delay: 200 * time.Millisecond})
	waitStatus(t, e, "job-wd", jobs.StatusInProgress)
	w.stop()
	if err := e.CancelJob(context.Background(), "job-wd", true); err != nil {
		t.Fatal(err)
	}
	waitStatus(t, e, "job-wd", jobs.StatusCanceled)
	select {
	case <-abortFailed.seen:
	case <-time.After(60 * time.Second):
		t.Fatal("ota-net's abort did not fail with the writer away")
	}
	w.start(false)
	if st, err := w.eng.State(context.Background()); err != nil || len(st.GetSessions()) != 1 {
		t.Fatalf("the writer came back with %v (%v), want the canceled job's session", st.GetSessions(), err)
	}
	next := newImage(t, 30*1024)
	createJob(t, e, "job-next", []string{"MQTT"}, next, 0, nil)
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	refused := make(chan backend.Execution, 1)
	go func() {
		if ex, err := e.WaitStatus(ctx, "job-next", jobs.StatusRejected, jobs.StatusFailed); err == nil {
			refused <- ex
		}
	}()
	select {
	case <-w.reboots: // installed, activated: the target was free
	case ex := <-refused:
		t.Fatalf("next job refused: %+v", ex)
	case <-ctx.Done():
		t.Fatal("next job: no reboot")
	}
	if ex := waitStatus(t, e, "job-next", jobs.StatusInProgress); ex.StatusDetails["self_test"] != "ready" {
		t.Fatalf("next job %+v", ex)
	}
}

// A network that goes quiet is when the downloader asks the writer to make the blocks it
// holds durable: a writer crash during a long stall then costs nothing already received.
// The agent used to wrap the writer link's sink in a type that hid Sync (and Durable) from
// the downloader, so the writer kept those blocks unsynced for as long as the stall lasted.
func TestQuietNetworkMakesBlocksDurable(t *testing.T) {
	e := startEmulator(t)
	// The writer syncs only when asked: no byte count or interval of its own triggers it.
	w := newWriter(t, "/bin/true", `sync_bytes = 1073741824`, `sync_interval = "1h"`)
	const served = 20 // blocks before the network stalls
	e.SetFaults("job-quiet", emulator.Faults{StallAfterBlocks: served})
	startDevice(t, e, w, agent.Config{})
	img := newImage(t, 300*1024+17) // 76 blocks of 4 KiB
	createJob(t, e, "job-quiet", []string{"MQTT"}, img, 1, nil)
	st := waitWriter(t, w, func(st *otav1.DeviceState) bool {
		ss := st.GetSessions()
		return len(ss) == 1 && ss[0].GetDurableBlocks() >= served
	})
	if d := st.GetSessions()[0].GetDurableBlocks(); d != served {
		t.Fatalf("%d blocks durable, the network served %d", d, served)
	}
	e.ClearFaults("job-quiet")
	if ex := waitStatus(t, e, "job-quiet", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected); ex.Status != jobs.StatusSucceeded {
		t.Fatalf("job %+v", ex)
	}
	if got, err := os.ReadFile(w.appPath); err != nil || !bytes.Equal(got, img.data) {
		t.Fatalf("installed file differs (%v)", err)
	}
}

// waitWriter polls the writer's state until ok accepts it (30 s at most).
func waitWriter(t *testing.T, w *writerRig, ok func(*otav1.DeviceState) bool) *otav1.DeviceState {
	t.Helper()
	deadline := time.Now().Add(30 * time.Second)
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		st, err := w.eng.State(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if ok(st) {
			return st
		}
		if time.Now().After(deadline) {
			t.Fatalf("writer state never as wanted: %v", st.GetSessions())
		}
		<-tick.C
	}
}

// lineWaiter is a log output that closes seen once a line contains want.
type lineWaiter struct {
	want string
	mu   sync.Mutex
	seen chan struct{}
	done bool
}

func (l *lineWaiter) Write(p []byte) (int, error) {
	l.mu.Lock()
	defer l.mu.Unlock()
	if !l.done && strings.Contains(string(p), l.want) {
		l.done = true
		close(l.seen)
	}
	return len(p), nil
}

func TestWriterUnavailableFailsJob(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	startDevice(t, e, w, agent.Config{WriterWait: 300 * time.Millisecond})
	w.stop()
	img := newImage(t, 10*1024)
	createJob(t, e, "job-w", []string{"MQTT"}, img, 1, nil)
	ex := waitStatus(t, e, "job-w", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected)
	if ex.StatusDetails["reason"] != "writer_unavailable" || ex.StatusDetails["error_code"] != "3001" {
		t.Fatalf("job %+v", ex)
	}
	_ = otav1.Reason_REASON_WRITER_UNAVAILABLE
}

// readyAndStop runs a job on an A/B target up to the reboot and stops the device.
func readyAndStop(t *testing.T, e *emulator.Emulator, w *writerRig, id string) {
	t.Helper()
	d := startDevice(t, e, w, agent.Config{})
	img := newImage(t, 30*1024)
	createJob(t, e, id, []string{"MQTT"}, img, 0, nil)
	waitReboot(t, w)
	if ex := waitStatus(t, e, id, jobs.StatusInProgress); ex.StatusDetails["self_test"] != "ready" {
		t.Fatalf("%+v", ex)
	}
	d.stop(t)
	w.stop()
}

func TestBootloaderRolledBack(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	readyAndStop(t, e, w, "job-rb")
	// The new slot never came up: the bootloader tries it boot_limit times, then falls back.
	for range 3 {
		w.start(true)
		w.stop()
	}
	w.start(true)
	startDevice(t, e, w, agent.Config{})
	ex := waitStatus(t, e, "job-rb", jobs.StatusSucceeded, jobs.StatusFailed)
	if ex.Status != jobs.StatusFailed || ex.StatusDetails["reason"] != "rolled_back" || ex.StatusDetails["error_code"] != "3007" {
		t.Fatalf("job %+v", ex)
	}
}

// The statusDetails budget: with many static extension fields configured, a rollback's
// reason, error_code, rollback_reason and rollback_code still reach the cloud, and the static
// fields take what is left in the order of the configuration (k11 first), not in key order.
func TestRollbackReasonWinsOverStaticExtensions(t *testing.T) {
	e := startEmulator(t)
	var lines []string
	for i := 11; i >= 0; i-- {
		lines = append(lines, fmt.Sprintf("k%02d = \"v%d\"", i, i))
	}
	w := newWriterExt(t, "/bin/true", lines)
	readyAndStop(t, e, w, "job-budget")
	for range 3 { // the new slot never comes up; the bootloader falls back
		w.start(true)
		w.stop()
	}
	w.start(true)
	startDevice(t, e, w, agent.Config{})
	ex := waitStatus(t, e, "job-budget", jobs.StatusSucceeded, jobs.StatusFailed)
	want := map[string]string{
		"self_test": "rejected", "reason": "rolled_back", "error_code": "3007",
		"rollback_reason": "rolled_back", "rollback_code": "3007",
		"hardware_rev": "C2", "k11": "v11", "k10": "v10", "k09": "v9", "k08": "v8",
	}
	if ex.Status != jobs.StatusFailed {
		t.Fatalf("job %+v", ex)
	}
	if d := cmp.Diff(want, ex.StatusDetails); d != "" {
		t.Errorf("statusDetails (-want +got):\n%s", d)
	}
}

func TestActivatedNotRebootedRebootsAgain(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	readyAndStop(t, e, w, "job-ar")
	w.start(false) // the writer restarted, the machine did not
	startDevice(t, e, w, agent.Config{})
	waitReboot(t, w)
}

func TestTrialOfCanceledJobRollsBack(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	readyAndStop(t, e, w, "job-gone")
	if err := e.CancelJob(context.Background(), "job-gone", true); err != nil {
		t.Fatal(err)
	}
	w.start(true)
	d := startDevice(t, e, w, agent.Config{})
	waitReboot(t, w)
	st, err := d.link.State(context.Background())
	if err != nil {
		t.Fatal(err)
	}
	if st.GetImageState() == otav1.ImageState_IMAGE_STATE_TRIAL {
		t.Fatalf("still in trial: %+v", st)
	}
	if r := st.GetLastUpdate().GetReason(); r != otav1.Reason_REASON_STATE_MISMATCH {
		t.Fatalf("last update reason %v", r)
	}
}

func TestSelfTestTimeout(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	readyAndStop(t, e, w, "job-to")
	w.cfg.Checks[0].Command = []string{"/bin/sleep", "30"}
	w.start(true)
	startDevice(t, e, w, agent.Config{SelfTestTimeout: 500 * time.Millisecond})
	ex := waitStatus(t, e, "job-to", jobs.StatusSucceeded, jobs.StatusFailed)
	if ex.Status != jobs.StatusFailed || ex.StatusDetails["reason"] != "self_test_timeout" || ex.StatusDetails["error_code"] != "3006" {
		t.Fatalf("job %+v", ex)
	}
	waitReboot(t, w)
}

// Custom jobs are left alone; an invalid afr_ota document is REJECTED with its reason. The
// cloud side is played by hand on a plain broker to send documents the emulator would not.
func TestCustomAndInvalidDocuments(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	w := newWriter(t, "/bin/true")
	const thing = "gw-doc"
	prefix := "$aws/things/" + thing + "/jobs/"
	updates := make(chan string, 10)
	if err := b.Subscribe(prefix+"+/update", 1, func(topic string, p []byte, _ string) {
		var req struct {
			ClientToken   string            `json:"clientToken"`
			Status        string            `json:"status"`
			StatusDetails map[string]string `json:"statusDetails"`
		}
		_ = json.Unmarshal(p, &req)
		resp, _ := json.Marshal(map[string]any{"clientToken": req.ClientToken, "executionState": map[string]any{"status": req.Status}})
		_ = b.Publish(topic+"/accepted", resp, 1)
		jobID := strings.TrimSuffix(strings.TrimPrefix(topic, prefix), "/update")
		updates <- jobID + " " + req.Status + " " + req.StatusDetails["reason"] + " " + req.StatusDetails["error_code"]
	}); err != nil {
		t.Fatal(err)
	}
	asked := make(chan struct{}, 10)
	if err := b.Subscribe(prefix+"$next/get", 2, func(string, []byte, string) { asked <- struct{}{} }); err != nil {
		t.Fatal(err)
	}
	// DescribeJobExecution of a job announced without its document.
	if err := b.Subscribe(prefix+"+/get", 3, func(topic string, p []byte, _ string) {
		jobID := strings.TrimSuffix(strings.TrimPrefix(topic, prefix), "/get")
		if jobID == "$next" {
			return
		}
		var req struct {
			ClientToken string `json:"clientToken"`
		}
		_ = json.Unmarshal(p, &req)
		resp := `{"clientToken":"` + req.ClientToken + `","execution":{"jobId":"` + jobID + `","status":"QUEUED","jobDocument":{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"fileid":0}]}}}}`
		_ = b.Publish(topic+"/accepted", []byte(resp), 1)
	}); err != nil {
		t.Fatal(err)
	}
	runHandAgent(t, b, thing, dialLink(t, w), jobs.Options{}, nil, agent.Config{Logger: logger(t, "agent")})
	// The agent asks $next/get once its subscriptions are in place.
	select {
	case <-asked:
	case <-time.After(20 * time.Second):
		t.Fatal("agent never asked $next/get")
	}
	notify := func(id, doc string) {
		t.Helper()
		m := `{"execution":{"jobId":"` + id + `","status":"QUEUED","jobDocument":` + doc + `},"timestamp":1}`
		if err := b.Publish(prefix+"notify-next", []byte(m), 1); err != nil {
			t.Fatal(err)
		}
	}
	notify("custom-1", `{"operation":"reboot"}`)
	notify("bad-1", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":"-3","fileid":0}]}}`)
	select {
	case u := <-updates:
		if u != "bad-1 REJECTED job_document_invalid 3009" {
			t.Fatalf("first update %q (the custom job must be left alone)", u)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no update")
	}
	// Announced without its document: the agent describes the execution and judges that.
	if err := b.Publish(prefix+"notify-next", []byte(`{"execution":{"jobId":"nodoc-1","status":"QUEUED"},"timestamp":2}`), 1); err != nil {
		t.Fatal(err)
	}
	select {
	case u := <-updates:
		if u != "nodoc-1 REJECTED job_document_invalid 3009" {
			t.Fatalf("update %q", u)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no update")
	}
	// A document whose protocols this agent cannot use (no downloader wired): invalid_protocol.
	notify("http-1", `{"afr_ota":{"protocols":["HTTP"],"files":[{"filesize":10,"fileid":0,"fileType":1,"update_data_url":"https://h/x"}]}}`)
	select {
	case u := <-updates:
		if u != "http-1 REJECTED invalid_protocol 2005" {
			t.Fatalf("update %q", u)
		}
	case <-time.After(20 * time.Second):
		t.Fatal("no update")
	}
}

// dialLink connects to w's writer for the rest of the test.
func dialLink(t *testing.T, w *writerRig) *writerlink.Link {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	link, err := writerlink.Dial(ctx, writerlink.Config{SocketPath: w.sock})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { link.Close() })
	return link
}

// runHandAgent runs an agent as thing on the plain broker b, writing through link, until the
// test ends (stopped before link closes), and returns the context it runs in.
func runHandAgent(t *testing.T, b *mqtttest.Broker, thing string, link *writerlink.Link, jo jobs.Options, hd agent.HTTPDownloader, cfg agent.Config) context.Context {
	t.Helper()
	ctx, cancel := context.WithCancel(t.Context())
	conn, err := mqttconn.Dial(ctx, mqttconn.Config{BrokerURL: b.URL(), ClientID: thing, BackoffMin: 20 * time.Millisecond})
	if err != nil {
		cancel()
		t.Fatal(err)
	}
	jc, err := jobs.New(conn, thing, jo)
	if err != nil {
		cancel()
		conn.Close(context.Background())
		t.Fatal(err)
	}
	a := agent.New(jc, agent.LinkWriter(link), nil, hd, cfg)
	done := make(chan error, 1)
	go func() { done <- a.Run(ctx) }()
	t.Cleanup(func() {
		cancel()
		<-done
		jc.Close(context.Background())
		conn.Close(context.Background())
	})
	return ctx
}

// handCloud plays the Jobs service by hand on a plain broker: every update is accepted and
// recorded; DescribeJobExecution answers with the last recorded status.
type handCloud struct {
	b       *mqtttest.Broker
	prefix  string
	updates chan string
	asked   chan struct{}
	mu      sync.Mutex
	status  map[string]string
}

func newHandCloud(t *testing.T, b *mqtttest.Broker, thing string) *handCloud {
	h := &handCloud{b: b, prefix: "$aws/things/" + thing + "/jobs/", updates: make(chan string, 20), asked: make(chan struct{}, 10), status: map[string]string{}}
	must := func(err error) {
		if err != nil {
			t.Fatal(err)
		}
	}
	must(b.Subscribe(h.prefix+"+/update", 1, func(topic string, p []byte, _ string) {
		var req struct {
			ClientToken   string            `json:"clientToken"`
			Status        string            `json:"status"`
			StatusDetails map[string]string `json:"statusDetails"`
		}
		_ = json.Unmarshal(p, &req)
		jobID := strings.TrimSuffix(strings.TrimPrefix(topic, h.prefix), "/update")
		h.mu.Lock()
		h.status[jobID] = req.Status
		h.mu.Unlock()
		resp, _ := json.Marshal(map[string]any{"clientToken": req.ClientToken, "executionState": map[string]any{"status": req.Status}})
		_ = b.Publish(topic+"/accepted", resp, 1)
		h.updates <- jobID + " " + req.Status + " " + req.StatusDetails["reason"] + " " + req.StatusDetails["error_code"]
	}))
	must(b.Subscribe(h.prefix+"+/get", 2, func(topic string, p []byte, _ string) {
		jobID := strings.TrimSuffix(strings.TrimPrefix(topic, h.prefix), "/get")
		if jobID == "$next" {
			h.asked <- struct{}{}
			return
		}
		var req struct {
			ClientToken string `json:"clientToken"`
		}
		_ = json.Unmarshal(p, &req)
		h.mu.Lock()
		st := h.status[jobID]
		h.mu.Unlock()
		if st == "" {
			st = "QUEUED"
		}
		resp, _ := json.Marshal(map[string]any{"clientToken": req.ClientToken, "execution": map[string]any{"jobId": jobID, "status": st}})
		_ = b.Publish(topic+"/accepted", resp, 1)
	}))
	return h
}

func (h *handCloud) notify(t *testing.T, id, doc string) {
	t.Helper()
	m := `{"execution":{"jobId":"` + id + `","status":"QUEUED","jobDocument":` + doc + `},"timestamp":1}`
	if err := h.b.Publish(h.prefix+"notify-next", []byte(m), 1); err != nil {
		t.Fatal(err)
	}
}

func (h *handCloud) expect(t *testing.T, want string) {
	t.Helper()
	select {
	case u := <-h.updates:
		if u != want {
			t.Fatalf("update %q, want %q", u, want)
		}
	case <-time.After(20 * time.Second):
		t.Fatalf("no update (want %q)", want)
	}
}

// A job replaced by a newer one while downloading: the writer session is aborted and the
// job reported FAILED newer_job; the newer job runs next.
func TestReplacedByNewerJob(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	w := newWriter(t, "/bin/true")
	const thing = "gw-new"
	cloud := newHandCloud(t, b, thing)
	// An HTTP server that never finishes a body: the download is under way until canceled.
	stuck := make(chan struct{}, 1)
	srv := httptest.NewServer(http.HandlerFunc(func(rw http.ResponseWriter, r *http.Request) {
		if rg := r.Header.Get("Range"); rg == "" {
			rw.Header().Set("Content-Length", "100000")
			rw.WriteHeader(http.StatusOK)
		} else {
			a, b, ok := strings.Cut(strings.TrimPrefix(rg, "bytes="), "-")
			from, err1 := strconv.Atoi(a)
			to, err2 := strconv.Atoi(b)
			if !ok || err1 != nil || err2 != nil {
				http.Error(rw, "bad range", http.StatusBadRequest)
				return
			}
			rw.Header().Set("Content-Range", fmt.Sprintf("bytes %d-%d/100000", from, to))
			rw.Header().Set("Content-Length", fmt.Sprint(to-from+1))
			rw.WriteHeader(http.StatusPartialContent)
		}
		rw.(http.Flusher).Flush()
		select {
		case stuck <- struct{}{}:
		default:
		}
		<-r.Context().Done()
	}))
	defer srv.Close()

	hd, err := httpdl.New(httpdl.Config{})
	if err != nil {
		t.Fatal(err)
	}
	link := dialLink(t, w)
	ctx := runHandAgent(t, b, thing, link, jobs.Options{}, hd, agent.Config{BlockSize: 4096, Logger: logger(t, "agent")})
	select {
	case <-cloud.asked:
	case <-time.After(20 * time.Second):
		t.Fatal("agent never asked $next/get")
	}
	sig := base64.StdEncoding.EncodeToString(newImage(t, 10).sig)
	cloud.notify(t, "job-old", `{"afr_ota":{"protocols":["HTTP"],"files":[{"filesize":100000,"fileid":0,"fileType":1,"certfile":"signer.crt.pem","sig-sha256-ecdsa":"`+sig+`","update_data_url":"`+srv.URL+`/old"}]}}`)
	cloud.expect(t, "job-old IN_PROGRESS  ")
	select {
	case <-stuck:
	case <-time.After(20 * time.Second):
		t.Fatal("download never started")
	}
	st, err := link.State(ctx)
	if err != nil || len(st.GetSessions()) != 1 {
		t.Fatalf("sessions %+v %v", st.GetSessions(), err)
	}
	cloud.notify(t, "job-new", `{"afr_ota":{"protocols":["HTTP"],"files":[{"filesize":"0x0","fileid":0}]}}`)
	cloud.expect(t, "job-old FAILED newer_job 2001")
	cloud.expect(t, "job-new REJECTED job_document_invalid 3009")
	if st, err = link.State(ctx); err != nil || len(st.GetSessions()) != 0 {
		t.Fatalf("session of the replaced job not aborted: %+v %v", st.GetSessions(), err)
	}
}

// The writer's version policy refuses the image before anything is downloaded: REJECTED
// version_check while the job is still QUEUED.
func TestVersionPolicyRejects(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true", `version_policy = "newer"`)
	startDevice(t, e, w, agent.Config{})
	img := newImage(t, 10*1024)
	createJob(t, e, "job-ver", []string{"MQTT"}, img, 1, nil)
	ex := waitStatus(t, e, "job-ver", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected)
	if ex.Status != jobs.StatusRejected || ex.StatusDetails["reason"] != "version_check" || ex.StatusDetails["error_code"] != "1009" {
		t.Fatalf("job %+v", ex)
	}
	if n := e.BlocksServed("job-ver"); n != 0 {
		t.Fatalf("%d blocks downloaded for a refused image", n)
	}
}

// Reconciliation at start-up decides by the cloud's word on each session's job: a session
// of a job still open (here QUEUED, not the next one as far as the agent can tell) is kept
// for resuming; a session of a canceled job is aborted.
func TestReconcileKeepsOpenAbortsGone(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	w := newWriter(t, "/bin/true")
	const thing = "gw-rec"
	cloud := newHandCloud(t, b, thing)
	cloud.mu.Lock()
	cloud.status["gone-1"] = jobs.StatusCanceled
	cloud.mu.Unlock()

	ctx := t.Context()
	link := dialLink(t, w)
	// Sessions a previous ota-net left: job open-1 on rootfs, job gone-1 on app.
	img := newImage(t, 64*1024)
	for _, s := range []struct {
		job string
		ft  int32
	}{{"open-1", 0}, {"gone-1", 1}} {
		ft := s.ft
		if _, err := link.Begin(ctx, &otav1.BeginSessionRequest{JobId: s.job, FileType: &ft, FileSize: uint64(len(img.data)), BlockSize: 4096,
			SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: img.sig, CertName: "signer.crt.pem"}); err != nil {
			t.Fatal(err)
		}
	}

	// The hand cloud never answers $next/get: the agent cannot learn the next job and must
	// decide by each job's own execution.
	runHandAgent(t, b, thing, link, jobs.Options{ResponseTimeout: 200 * time.Millisecond, Attempts: 1}, nil, agent.Config{Logger: logger(t, "agent")})

	deadline := time.Now().Add(30 * time.Second)
	for {
		st, err := link.State(ctx)
		if err != nil {
			t.Fatal(err)
		}
		var jobsLeft []string
		for _, s := range st.GetSessions() {
			jobsLeft = append(jobsLeft, s.GetJobId())
		}
		if len(jobsLeft) == 1 && jobsLeft[0] == "open-1" {
			break // rootfs (open-1) is decided before app (gone-1): kept, not just not yet seen
		}
		if len(jobsLeft) == 0 || time.Now().After(deadline) {
			t.Fatalf("sessions left: %v, want only open-1's", jobsLeft)
		}
		time.Sleep(20 * time.Millisecond)
	}
	select {
	case u := <-cloud.updates:
		t.Errorf("reconciliation reported %q; it must only abort", u)
	default:
	}
}

// The cloud refuses "ready" for good: nothing is activated (a reboot would lead into a trial
// the next start rolls back as state_mismatch), the session is dropped and the job FAILED
// job_update_failed, which the cloud does accept.
func TestReadyRefusedFailsWithoutActivating(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	e.SetFaults("job-ready", emulator.Faults{RejectUpdate: func(_ string, d map[string]string) string {
		if d["self_test"] == "ready" {
			return jobs.CodeInvalidRequest
		}
		return ""
	}})
	d := startDevice(t, e, w, agent.Config{})
	img := newImage(t, 50*1024)
	createJob(t, e, "job-ready", []string{"MQTT"}, img, 0, nil)
	ex := waitStatus(t, e, "job-ready", jobs.StatusSucceeded, jobs.StatusFailed)
	if ex.Status != jobs.StatusFailed || ex.StatusDetails["reason"] != "job_update_failed" || ex.StatusDetails["error_code"] != "3016" {
		t.Fatalf("job %+v", ex)
	}
	st, err := d.link.State(context.Background())
	if err != nil || st.GetImageState() != otav1.ImageState_IMAGE_STATE_NORMAL || len(st.GetSessions()) != 0 {
		t.Fatalf("writer after the refused ready: %v %v, want nothing activated and no session", st, err)
	}
	select {
	case <-w.reboots:
		t.Fatal("the device rebooted although the cloud never saw ready")
	default:
	}
}

// holdReceiving holds the first IN_PROGRESS receiving update of a job until the emulator has
// seen a stream request of that job (or 20 s pass), and records which came first.
type holdReceiving struct {
	agent.Jobs
	e    *emulator.Emulator
	once sync.Once
	// streamFirst: a GetStream reached the cloud while the update waited.
	streamFirst atomic.Bool
}

func (h *holdReceiving) Update(ctx context.Context, jobID string, u jobs.Update) (*jobs.ExecutionState, error) {
	if u.Status == jobs.StatusInProgress && u.StatusDetails["self_test"] == "receiving" {
		h.once.Do(func() {
			deadline := time.Now().Add(20 * time.Second)
			for time.Now().Before(deadline) && ctx.Err() == nil {
				if len(h.e.StreamRequests(jobID)) > 0 {
					h.streamFirst.Store(true)
					return
				}
				time.Sleep(5 * time.Millisecond) // polls the emulator's record, no timing assumed
			}
		})
	}
	return h.Jobs.Update(ctx, jobID, u)
}

// The download does not wait for the IN_PROGRESS update's answer: the first stream request
// goes out while the update is still on its way (on a long link that saves a round trip).
func TestDownloadStartsBeforeReceivingAcknowledged(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	h := &holdReceiving{e: e}
	startDeviceWith(t, e, w, agent.Config{}, func(j agent.Jobs) agent.Jobs { h.Jobs = j; return h })
	img := newImage(t, 100*1024+3)
	createJob(t, e, "job-early", []string{"MQTT"}, img, 1, nil)
	ex := waitStatus(t, e, "job-early", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected)
	if ex.Status != jobs.StatusSucceeded {
		t.Fatalf("job %+v", ex)
	}
	if !h.streamFirst.Load() {
		t.Fatal("no stream request while the IN_PROGRESS update was held: the download waited for it")
	}
	want := []string{"IN_PROGRESS:receiving", "IN_PROGRESS:ready", "SUCCEEDED:accepted"}
	if got := selfTests(e, "job-early"); strings.Join(got, ",") != strings.Join(want, ",") {
		t.Fatalf("updates %v, want %v", got, want)
	}
}
