package e2e

import (
	"context"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
	"github.com/gwota/gwota/test/testenv"
)

// Brokers the emulator runs on.
const (
	embedded  = "embedded"
	mosquitto = "mosquitto"
)

const thing = "gw-e2e"

// Expected steps.
var (
	receiving = harness.Step{Status: backend.StatusInProgress, SelfTest: "receiving"}
	ready     = harness.Step{Status: backend.StatusInProgress, SelfTest: "ready"}
	active    = harness.Step{Status: backend.StatusInProgress, SelfTest: "active"}
	accepted  = harness.Step{Status: backend.StatusSucceeded, SelfTest: "accepted"}
	happy     = []harness.Step{receiving, ready, active, accepted}
)

func failed(selfTest, reason, code string) harness.Step {
	return harness.Step{Status: backend.StatusFailed, SelfTest: selfTest, Reason: reason, ErrorCode: code}
}

// terminal are the statuses a wait for the end of a job accepts.
var terminal = []string{backend.StatusSucceeded, backend.StatusFailed, backend.StatusRejected,
	backend.StatusCanceled, backend.StatusTimedOut, backend.StatusRemoved}

// onBrokers runs fn as parallel subtests on the embedded broker and on mosquitto (skipped
// with the reason when mosquitto is not installed). Each subtest has its own broker, emulator
// and device, so nothing is shared.
func onBrokers(t *testing.T, fn func(t *testing.T, broker string)) {
	t.Parallel()
	for _, b := range []string{embedded, mosquitto} {
		t.Run(b, func(t *testing.T) {
			t.Parallel()
			if b == mosquitto {
				_, err := harness.FindMosquitto()
				testenv.Need(t, err)
			}
			fn(t, b)
		})
	}
}

// env is one test's world: a broker, the emulator, a signer and a device.
type env struct {
	t      *testing.T
	broker string
	dir    string
	cloud  *harness.Cloud
	mq     *harness.Mosquitto
	edge   *harness.Mosquitto // with newEnvEdge: the broker the device uses
	signer *harness.Signer
	dev    *harness.Device
	// ctx ends at the test's deadline or as soon as a device process dies unexpectedly.
	ctx context.Context
}

// newEnv starts the broker and the emulator and lays out the device (not started).
func newEnv(t *testing.T, broker string, mod func(*harness.DeviceOptions)) *env {
	t.Helper()
	return newEnvEdge(t, broker, false, mod)
}

// newEnvEdge is newEnv; with edge (mosquitto only) the device connects to a second,
// bridged mosquitto (env.edge) that a test can restart while the emulator stays connected to
// the first.
func newEnvEdge(t *testing.T, broker string, edge bool, mod func(*harness.DeviceOptions)) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 4*time.Minute)
	t.Cleanup(cancel)
	// Short: the writer's socket lives in it.
	dir, err := os.MkdirTemp("", "e2e")
	if err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, broker: broker, dir: dir}
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("E2E_KEEP") != "" {
			t.Logf("test directory kept: %s", dir)
			return
		}
		os.RemoveAll(dir)
	})
	opts := emulator.Options{Thing: thing}
	if broker == mosquitto {
		mq, err := harness.StartMosquitto(ctx, dir)
		if err != nil {
			t.Fatal(err)
		}
		e.mq = mq
		t.Cleanup(func() { stopBroker(mq) })
		opts.ExternalBrokerURL = mq.URL()
	}
	cloud, err := harness.StartCloud(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	e.cloud = cloud
	t.Cleanup(func() { _ = cloud.Close() })
	deviceBroker := cloud.BrokerURL()
	if edge && e.mq != nil {
		if e.edge, err = harness.StartMosquittoEdge(ctx, dir, e.mq); err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { stopBroker(e.edge) })
		deviceBroker = e.edge.URL()
	}
	if e.signer, err = harness.NewSigner("e2e-signer"); err != nil {
		t.Fatal(err)
	}
	o := harness.DeviceOptions{
		Dir:        filepath.Join(dir, "d"),
		Thing:      thing,
		BrokerURL:  deviceBroker,
		Trusted:    []*harness.Signer{e.signer},
		Extensions: map[string]string{"hardware_rev": "e2e"},
	}
	if err := os.Mkdir(o.Dir, 0o700); err != nil {
		t.Fatal(err)
	}
	if mod != nil {
		mod(&o)
	}
	binaries := bin
	if o.InProcess {
		if binaries, err = inprocBins(); err != nil {
			t.Fatal(err)
		}
	}
	if slices.ContainsFunc(o.Env, func(v string) bool { return strings.HasPrefix(v, "GWOTA_CRASHPOINT=") }) {
		// A test that arms a crash point needs binaries built with them.
		if binaries, err = crashBins(); err != nil {
			t.Fatal(err)
		}
	}
	e.dev, err = harness.NewDevice(binaries, o)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := e.dev.Close(true); err != nil {
			t.Errorf("closing the device: %v", err)
		}
		if r := e.dev.RaceReports(); len(r) > 0 {
			t.Errorf("data races reported by the binaries, see %v", r)
		}
		if t.Failed() {
			t.Logf("job updates: %v", harness.Steps(e.cloud.Updates(lastJob(e))))
			t.Log(e.dev.Logs())
		}
	})
	var dcancel context.CancelFunc
	e.ctx, dcancel = e.dev.Context(ctx)
	t.Cleanup(dcancel)
	return e
}

func lastJob(e *env) string {
	evs := e.cloud.Rec.Events()
	if len(evs) == 0 {
		return ""
	}
	return evs[len(evs)-1].JobID
}

// image writes a pseudo-random image of size bytes.
func (e *env) image(name string, size int64, seed uint64) string {
	e.t.Helper()
	p := filepath.Join(e.dir, name)
	if err := harness.WriteImage(p, size, seed); err != nil {
		e.t.Fatal(err)
	}
	return p
}

// alteredFile returns the job file of an image altered in its middle that carries the
// signature of the unaltered one: what a man in the middle or a bad medium delivers.
func (e *env) alteredFile() backend.FileSpec {
	e.t.Helper()
	good := e.image("good.img", smallImage, 3)
	bad := good + ".bad"
	if err := harness.CorruptCopy(good, bad, smallImage/2); err != nil {
		e.t.Fatal(err)
	}
	sig, err := e.signer.SignFile(good)
	if err != nil {
		e.t.Fatal(err)
	}
	f := e.signer.File(bad)
	f.SigningKeyPEM, f.Signature = nil, sig
	return f
}

func (e *env) start() {
	e.t.Helper()
	if err := e.dev.Start(e.ctx); err != nil {
		e.t.Fatal(err)
	}
}

func (e *env) createJob(jobID string, f backend.FileSpec, protocols ...string) {
	e.t.Helper()
	if len(protocols) == 0 {
		protocols = []string{backend.ProtocolMQTT}
	}
	if err := e.cloud.CreateJob(e.ctx, backend.JobSpec{JobID: jobID, Protocols: protocols, Files: []backend.FileSpec{f}}); err != nil {
		e.t.Fatal(err)
	}
}

// waitEnd waits until the job reaches a terminal status.
func (e *env) waitEnd(jobID string) backend.Execution {
	e.t.Helper()
	ex, err := e.cloud.WaitStatus(e.ctx, jobID, terminal...)
	if err != nil {
		e.t.Fatalf("job %s did not end: %v (cause: %v)", jobID, err, context.Cause(e.ctx))
	}
	return ex
}

// checkSteps compares the recorded steps of jobID with want, and returns the updates.
func checkSteps(t *testing.T, b backend.Backend, jobID string, want []harness.Step) []backend.Update {
	t.Helper()
	us := b.Updates(jobID)
	if diff := cmp.Diff(want, harness.Steps(us)); diff != "" {
		t.Errorf("job %s status sequence (-want +got):\n%s", jobID, diff)
	}
	return us
}

// checkProgress checks progress values: one total, never back (unless a restart allows it),
// ending at wantLast of total (wantLast < 0: at total).
func checkProgress(t *testing.T, us []backend.Update, allowDecrease bool, wantLast int64) {
	t.Helper()
	total, last, err := harness.CheckProgress(us, allowDecrease)
	if err != nil {
		t.Error(err)
		return
	}
	want := uint64(wantLast)
	if wantLast < 0 {
		want = total
	}
	if last != want {
		t.Errorf("last progress %d/%d, want %d/%d", last, total, want, total)
	}
}

// slots are the hashes of both slot files and the boot state.
type slots struct {
	A, B, Boot string
}

func (e *env) slots() slots {
	e.t.Helper()
	a, err := harness.FileSHA256(e.dev.SlotA)
	if err != nil {
		e.t.Fatal(err)
	}
	b, err := harness.FileSHA256(e.dev.SlotB)
	if err != nil {
		e.t.Fatal(err)
	}
	boot, err := e.dev.BootState()
	if err != nil {
		e.t.Fatal(err)
	}
	return slots{a, b, boot}
}

// checkInstalled checks the update is in place: slot b holds the image, the writer runs slot
// b committed, and the device rebooted wantReboots times.
func (e *env) checkInstalled(img string, wantReboots int) {
	e.t.Helper()
	want, err := harness.FileSHA256(img)
	if err != nil {
		e.t.Fatal(err)
	}
	fi, err := os.Stat(img)
	if err != nil {
		e.t.Fatal(err)
	}
	got, err := harness.FilePrefixSHA256(e.dev.SlotB, fi.Size())
	if err != nil || got != want {
		e.t.Errorf("slot b holds %s (%v), want the image %s", got, err, want)
	}
	st, err := e.dev.State(e.ctx)
	if err != nil {
		e.t.Fatal(err)
	}
	if st.GetImageState() != otav1.ImageState_IMAGE_STATE_NORMAL {
		e.t.Errorf("image state %v, want NORMAL (committed)", st.GetImageState())
	}
	for _, tg := range st.GetTargets() {
		if tg.GetName() == harness.TargetName && tg.GetActiveSlot() != "b" {
			e.t.Errorf("target %s runs slot %q, want b", tg.GetName(), tg.GetActiveSlot())
		}
	}
	if n := e.dev.Reboots(); n != wantReboots {
		e.t.Errorf("device rebooted %d times, want %d", n, wantReboots)
	}
}

// checkUntouched checks the running slot and the boot state did not change and nothing
// rebooted.
func (e *env) checkUntouched(before slots) {
	e.t.Helper()
	after := e.slots()
	if after.A != before.A {
		e.t.Errorf("running slot a changed: %s -> %s", before.A, after.A)
	}
	if after.Boot != before.Boot {
		e.t.Errorf("boot state changed:\n before %s\n after  %s", before.Boot, after.Boot)
	}
	if n := e.dev.Reboots(); n != 0 {
		e.t.Errorf("device rebooted %d times, want 0", n)
	}
}

// stopBroker stops a mosquitto at the end of a test (killed if it does not stop in time).
func stopBroker(m *harness.Mosquitto) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = m.Stop(ctx)
}
