package powercut

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/gwota/gwota/internal/bitmap"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/test/harness"
	"github.com/gwota/gwota/test/lazyfs"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/journal"
)

const (
	targetName = "rootfs"
	blockSize  = 4096
	// Blocks per WriteBatch, and every how many batches the client asks for a sync; the
	// writer also syncs by itself every syncBytes.
	batchBlocks = 2
	syncEvery   = 3
	syncBytes   = 16 << 10
	bootLimit   = 3
	factorySize = 48 << 10
)

// image is one update: written to slot, signed by the rig's signer, and committed after its
// trial boot or rejected.
type image struct {
	job, version, slot string
	commit             bool
	data, sig          []byte
}

// common is what every run shares: the writer binary, the signer, the images.
type common struct {
	bin     string
	signer  *harness.Signer
	keysDir string
	factory []byte
	// The scenario's phases: [0] goes to slot b and is committed, [1] to slot a and is
	// rejected, [2] to slot a again and is committed.
	imgs     []*image
	certPath string
}

func newCommon(t *testing.T) *common {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
	defer cancel()
	// Without -race even under `go test -race`: a run restarts the writer five to ten times,
	// and the race runtime's start-up cost would make the campaign several times slower. The
	// end-to-end suites run the race-built writer; this one is about what survives a cut.
	bins, err := harness.Build(ctx, harness.BuildOptions{Dir: t.TempDir(), Only: []string{"ota-writer"}})
	if err != nil {
		t.Fatal(err)
	}
	c := &common{bin: bins.Writer, keysDir: t.TempDir()}
	if c.signer, err = harness.NewSigner("powercut-signer"); err != nil {
		t.Fatal(err)
	}
	if c.certPath, err = c.signer.WriteCert(c.keysDir); err != nil {
		t.Fatal(err)
	}
	dir := t.TempDir()
	mk := func(name string, size int64, seed uint64) []byte {
		p := filepath.Join(dir, name)
		if err := harness.WriteImage(p, size, seed); err != nil {
			t.Fatal(err)
		}
		b, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		return b
	}
	c.factory = mk("factory", factorySize, 1)
	// Sizes not multiples of the block size: the last block is short.
	for i, spec := range []struct {
		job, version, slot string
		commit             bool
		size               int64
	}{
		{"job-commit-b", "1.0.0", "b", true, 15*blockSize + 123},
		{"job-reject-a", "2.0.0", "a", false, 10*blockSize + 7},
		{"job-commit-a", "3.0.0", "a", true, 9*blockSize + 2001},
	} {
		data := mk(spec.job, spec.size, uint64(10+i))
		sig, err := c.signer.SignFile(filepath.Join(dir, spec.job))
		if err != nil {
			t.Fatal(err)
		}
		c.imgs = append(c.imgs, &image{job: spec.job, version: spec.version, slot: spec.slot, commit: spec.commit, data: data, sig: sig})
	}
	return c
}

func (c *common) imageOf(job string) *image {
	for _, im := range c.imgs {
		if im.job == job {
			return im
		}
	}
	return nil
}

// errCut says the power was cut during the step: the driver starts over from the writer's
// state.
var errCut = errors.New("power cut")

// acked is what the writer acknowledged as durable to the client.
type acked struct {
	session string
	durable []bool // by block
	sent    []bool // written in a successful batch since the session's last durable ack
	// level of the current phase's image: 1 verified, 2 activated, 3 committed or rejected.
	level int
}

// rig is one run: a fresh lazy FS with the device's files, the writer process, a client.
type rig struct {
	t   *testing.T
	c   *common
	dir string
	fs  *lazyfs.FS
	mnt string

	cfgPath, sock, logPath string
	bootIDPath             string // the boot ID file: a new ID at every power-on
	boots                  int
	proc                   *exec.Cmd
	procDone               chan struct{}
	cl                     *client.Client

	fired  <-chan struct{} // the armed trigger; nil when none
	killed bool            // the writer was killed for the pending cut
	cuts   int
	// onCut is called after each cut (and its checks) to arm the next trigger.
	onCut func()

	phase int
	ack   acked
	// committed is the slot the last acknowledged commit made permanent (a: the factory).
	committed string
}

func newRig(t *testing.T, c *common) *rig {
	t.Helper()
	// Short: the socket path is limited to 108 bytes.
	dir, err := os.MkdirTemp("", "pc")
	if err != nil {
		t.Fatal(err)
	}
	r := &rig{t: t, c: c, dir: dir, committed: "a", mnt: filepath.Join(dir, "m"), sock: filepath.Join(dir, "w.sock"),
		cfgPath: filepath.Join(dir, "writer.toml"), logPath: filepath.Join(dir, "writer.log"), bootIDPath: filepath.Join(dir, "boot_id")}
	if err := r.powerOn(); err != nil {
		t.Fatal(err)
	}
	if r.fs, err = lazyfs.New(filepath.Join(dir, "fs"), r.mnt); err != nil {
		t.Fatal(err)
	}
	live := r.fs.Live()
	if err := os.WriteFile(filepath.Join(live, "slot-a.img"), c.factory, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(live, "slot-b.img"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	// No state directory: the writer creates it (and must do so durably).
	if err := r.fs.Mount(); err != nil {
		t.Fatal(err)
	}
	cfg := map[string]any{
		"socket":         r.sock,
		"state_dir":      filepath.Join(r.mnt, "state"),
		"peer_uids":      []int{os.Getuid()},
		"trusted_keys":   []string{c.certPath},
		"reboot_command": []string{"/bin/true"},
		"sync_bytes":     syncBytes,
		// Time never triggers a sync: the boundaries are the same in every run.
		"sync_interval":  "1h",
		"version_policy": "any",
		"log_level":      "debug",
		"boot":           map[string]any{"backend": "file", "boot_limit": bootLimit, "boot_id_file": r.bootIDPath},
		"target": []map[string]any{{
			"name": targetName, "kind": "ab", "file_types": []int{0},
			"slots": []string{filepath.Join(r.mnt, "slot-a.img"), filepath.Join(r.mnt, "slot-b.img")},
		}},
	}
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(cfg); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(r.cfgPath, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	if r.cl, err = client.Dial(context.Background(), r.sock, client.Options{Name: "powercut"}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(r.close)
	// A run takes seconds; one that hangs shows where.
	wd := time.AfterFunc(45*time.Second, func() {
		buf := make([]byte, 1<<20)
		n := runtime.Stack(buf, true)
		r.t.Logf("run still going after 45s (fs %+v); goroutines:\n%s", r.fs.Counts(), buf[:n])
	})
	t.Cleanup(func() { wd.Stop() })
	return r
}

func (r *rig) close() {
	r.cl.Close()
	r.killWriter()
	r.fs.Release()
	if err := r.fs.Unmount(); err != nil {
		r.t.Error(err)
	}
	if r.t.Failed() {
		r.t.Logf("writer log (%s):\n%s", r.logPath, tail(r.logPath, 60))
		return
	}
	os.RemoveAll(r.dir)
}

func tail(p string, n int) string {
	b, _ := os.ReadFile(p)
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}

func (r *rig) path(rel string) string { return filepath.Join(r.mnt, rel) }

// powerOn starts a new boot: a new boot ID (like /proc/sys/kernel/random/boot_id), so the
// writer's next start takes the file backend's bootloader step.
func (r *rig) powerOn() error {
	r.boots++
	return os.WriteFile(r.bootIDPath, []byte(fmt.Sprintf("boot-%d\n", r.boots)), 0o644)
}

// spawn starts ota-writer serve.
func (r *rig) spawn() error {
	logf, err := os.OpenFile(r.logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	fmt.Fprintf(logf, "=== start (cuts so far %d, fs %+v)\n", r.cuts, r.fs.Counts())
	cmd := exec.Command(r.c.bin, "serve", "--config", r.cfgPath)
	cmd.Stdout, cmd.Stderr = logf, logf
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return err
	}
	done := make(chan struct{})
	go func() {
		cmd.Wait()
		logf.Close()
		close(done)
	}()
	r.proc, r.procDone = cmd, done
	return nil
}

func (r *rig) running() bool {
	if r.proc == nil {
		return false
	}
	select {
	case <-r.procDone:
		return false
	default:
		return true
	}
}

// killWriter is the instant of the power cut for the process: SIGKILL to its group, the
// frozen FS releases its blocked requests (failing them), and the exit is awaited.
func (r *rig) killWriter() {
	if r.proc == nil {
		return
	}
	syscall.Kill(-r.proc.Process.Pid, syscall.SIGKILL)
	r.fs.Release()
	<-r.procDone
	r.proc = nil
}

// stopWriter is a clean shutdown (SIGTERM), as at a reboot.
func (r *rig) stopWriter() error {
	if r.proc == nil {
		return nil
	}
	syscall.Kill(r.proc.Process.Pid, syscall.SIGTERM)
	select {
	case <-r.procDone:
	case <-r.firedCh():
		r.killWriter()
		return errCut
	case <-time.After(30 * time.Second):
		return errors.New("writer did not stop on SIGTERM")
	}
	r.proc = nil
	return nil
}

func (r *rig) firedCh() <-chan struct{} {
	if r.fired == nil {
		return nil
	}
	return r.fired
}

func (r *rig) isFired() bool {
	select {
	case <-r.firedCh():
		return true
	default:
		return false
	}
}

// rpc runs fn against the writer. If the FS freezes meanwhile (the armed cut point was
// reached), the writer is killed and fn's result is returned once it ends: it may still be a
// success, the writer answered before the kill, and then it is a real acknowledgement.
func (r *rig) rpc(fn func(ctx context.Context) error) error {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	errc := make(chan error, 1)
	go func() { errc <- fn(ctx) }()
	t0 := time.Now()
	defer func() {
		if d := time.Since(t0); d > 5*time.Second {
			r.t.Logf("a writer call took %s (fs %+v)", d, r.fs.Counts())
		}
	}()
	select {
	case err := <-errc:
		return err
	case <-r.firedCh():
		r.killWriter()
		return <-errc
	}
}

// settle performs the pending cut, if the trigger fired: kill (if not yet), throw away what
// is not durable, check the durable state, start the writer again. It returns errCut when it
// cut, so the driver starts over from the writer's state.
func (r *rig) settle() error {
	if !r.isFired() {
		return nil
	}
	r.killWriter()
	r.fired = nil
	if err := r.fs.Cut(); err != nil {
		return err
	}
	r.cuts++
	if err := r.powerOn(); err != nil {
		return err
	}
	r.t.Logf("cut %d: after fs operations %+v", r.cuts, r.fs.Counts())
	if err := r.checkDurable(); err != nil {
		return fmt.Errorf("after cut %d: %w", r.cuts, err)
	}
	if r.onCut != nil {
		r.onCut()
	}
	if err := r.start(); err != nil && !errors.Is(err, errCut) {
		return err
	}
	return errCut
}

// start starts the writer and waits until it serves, then checks its view of the session.
// A cut during the start is handled here (start again).
func (r *rig) start() error {
	for {
		err := r.startOnce()
		if err == nil {
			return nil
		}
		if !r.isFired() {
			return err
		}
		if err := r.settle(); err != nil && !errors.Is(err, errCut) {
			return err
		}
		return errCut
	}
}

func (r *rig) startOnce() error {
	if err := r.spawn(); err != nil {
		return err
	}
	done := r.procDone
	err := r.rpc(func(ctx context.Context) error {
		wctx, cancel := context.WithCancelCause(ctx)
		defer cancel(nil)
		go func() {
			select {
			case <-done:
				cancel(errors.New("ota-writer exited during start"))
			case <-wctx.Done():
			}
		}()
		if err := r.cl.WaitReady(wctx); err != nil {
			if c := context.Cause(wctx); c != nil {
				return c
			}
			return err
		}
		return nil
	})
	if err != nil {
		return fmt.Errorf("start: %w\n%s", err, tail(r.logPath, 30))
	}
	return r.checkResumed()
}

// checkResumed compares the writer's own view after a start with what it acknowledged.
func (r *rig) checkResumed() error {
	var st *otav1.DeviceState
	if err := r.rpc(func(ctx context.Context) (err error) { st, err = r.cl.State(ctx); return err }); err != nil {
		return err
	}
	for _, s := range st.GetSessions() {
		if s.GetSessionId() != r.ack.session {
			continue
		}
		for k, d := range r.ack.durable {
			if d && missing(s.GetMissing(), k) {
				return fmt.Errorf("writer resumed session %s with block %d missing, acknowledged durable before", s.GetSessionId(), k)
			}
		}
	}
	return nil
}

func missing(bm []byte, k int) bool { return bitmap.Bitmap(bm).Has(k) }

// bootFile mirrors the file boot backend's state file.
type bootFile struct {
	Version    int    `json:"version"`
	Booted     string `json:"booted"`
	Committed  string `json:"committed"`
	Pending    string `json:"pending"`
	Trial      bool   `json:"trial"`
	RolledBack bool   `json:"rolled_back"`
	BootCount  int    `json:"boot_count"`
}

func (r *rig) readSlot(slot string) ([]byte, error) {
	return os.ReadFile(r.path("slot-" + slot + ".img"))
}

// holds reports whether slot holds exactly want (a slot may be longer than an image).
func (r *rig) holds(slot string, want []byte) bool {
	b, err := r.readSlot(slot)
	return err == nil && len(b) >= len(want) && bytes.Equal(b[:len(want)], want)
}

// committable: what a committed slot may hold: the factory image (slot a, what the device
// shipped with) or, whole, an image written there that is committed in its phase.
func (r *rig) committable(slot string) bool {
	for _, im := range r.c.imgs {
		if im.slot == slot && im.commit && r.holds(slot, im.data) {
			return true
		}
	}
	return slot == "a" && r.holds("a", r.c.factory)
}

// checkDurable checks what survived the cut, with the writer dead, from the files.
func (r *rig) checkDurable() error {
	var bf bootFile
	b, err := os.ReadFile(r.path("state/boot-state.json"))
	switch {
	case errors.Is(err, os.ErrNotExist):
		bf = bootFile{Booted: "a", Committed: "a"} // the writer creates this state
	case err != nil:
		return err
	default:
		if err := json.Unmarshal(b, &bf); err != nil {
			return fmt.Errorf("boot state unreadable after the cut: %v: %q", err, b)
		}
	}
	cur := r.c.imgs[min(r.phase, len(r.c.imgs)-1)]
	// The boot state names only bootable, verified slots: the committed slot holds a
	// committed (or the factory) image, and a slot activated or on trial holds the verified
	// image of this phase, whole.
	if !r.committable(bf.Committed) {
		return fmt.Errorf("boot state %+v: committed slot %s does not hold a verified image", bf, bf.Committed)
	}
	if bf.Pending != "" && (bf.Pending != cur.slot || !r.holds(bf.Pending, cur.data)) {
		return fmt.Errorf("boot state %+v: activated slot %s does not hold the verified image of %s (unverified activation)", bf, bf.Pending, cur.job)
	}
	if (bf.Trial || bf.Booted != bf.Committed) && (bf.Booted != cur.slot || !r.holds(bf.Booted, cur.data)) {
		return fmt.Errorf("boot state %+v: running slot %s does not hold the verified image of %s", bf, bf.Booted, cur.job)
	}
	// The committed slot is the one the last acknowledged commit chose, or this phase's slot
	// when its commit was made and the cut came before the answer.
	if bf.Committed != r.committed && !(cur.commit && bf.Committed == cur.slot) {
		return fmt.Errorf("boot state %+v: committed slot changed from %s without a commit", bf, r.committed)
	}

	// Acknowledged boot transitions of this phase stay.
	tried := bf.Pending == cur.slot || (bf.Trial && bf.Booted == cur.slot)
	limitRollback := bf.RolledBack && bf.Committed != cur.slot && bf.BootCount > bootLimit
	lv := 0
	switch {
	case cur.commit && bf.Committed == cur.slot:
		lv = 3
	case !cur.commit && bf.RolledBack && !tried && bf.Committed != cur.slot:
		lv = 3
	case tried:
		lv = 2
	}
	if cur.commit && limitRollback && r.ack.level == 2 {
		// Rolled back by the boot limit: the cuts during the trial were failed boots. The
		// driver writes the image again.
		r.ack = acked{}
	}
	if r.ack.level >= 2 && lv < r.ack.level {
		return fmt.Errorf("boot state %+v lost the acknowledged %s of %s", bf, levelName(r.ack.level), cur.job)
	}

	// The journal is never ahead of the data.
	var js journal.Session
	err = journal.ReadFile(r.path("state/sessions/"+targetName+".session"), &js)
	haveSession := err == nil
	switch {
	case errors.Is(err, os.ErrNotExist):
	case err != nil:
		return fmt.Errorf("session journal unreadable after the cut: %w", err)
	default:
		im := r.c.imageOf(js.JobID)
		if im == nil || js.Slot != im.slot {
			return fmt.Errorf("journal names job %q slot %q", js.JobID, js.Slot)
		}
		slot, err := r.readSlot(js.Slot)
		if err != nil {
			return err
		}
		for k := 0; k*blockSize < len(im.data); k++ {
			if !js.Durable.Has(k) {
				continue
			}
			end := min((k+1)*blockSize, len(im.data))
			if len(slot) < end || !bytes.Equal(slot[k*blockSize:end], im.data[k*blockSize:end]) {
				return fmt.Errorf("journal says block %d of %s is durable, slot %s does not hold it", k, im.job, js.Slot)
			}
		}
		if js.State == int32(otav1.SessionState_SESSION_STATE_VERIFIED) && !r.holds(js.Slot, im.data) {
			return fmt.Errorf("journal says %s is verified, slot %s does not hold it", im.job, js.Slot)
		}
	}

	// No acknowledged durable block is lost: the session is still there with every acked
	// block, or its image went on to be activated.
	if r.ack.session != "" {
		activated := lv >= 2
		n := 0
		for _, d := range r.ack.durable {
			if d {
				n++
			}
		}
		switch {
		case haveSession && js.ID == r.ack.session:
			for k, d := range r.ack.durable {
				if d && !js.Durable.Has(k) {
					return fmt.Errorf("block %d was acknowledged durable, the journal lost it", k)
				}
			}
			if r.ack.level == 1 && js.State != int32(otav1.SessionState_SESSION_STATE_VERIFIED) {
				return fmt.Errorf("session %s was acknowledged verified, the journal says state %d", js.ID, js.State)
			}
		case activated:
		case n > 0 || r.ack.level == 1:
			return fmt.Errorf("session %s with %d blocks acknowledged durable is gone (journal has %q)", r.ack.session, n, js.ID)
		}
	}

	// The record's versions name what the slots hold.
	var rec journal.Record
	if err := journal.ReadFile(r.path("state/record"), &rec); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("record unreadable after the cut: %w", err)
	}
	for slot, v := range rec.Versions[targetName] {
		if v == "" {
			continue
		}
		ok := false
		for _, im := range r.c.imgs {
			ok = ok || (im.slot == slot && im.version == v && r.holds(slot, im.data))
		}
		if !ok {
			return fmt.Errorf("record says slot %s holds version %s, it does not", slot, v)
		}
	}
	return nil
}

func levelName(l int) string {
	return [...]string{"nothing", "verification", "activation", "commit or rejection"}[l]
}

// run drives the whole scenario to its end: image 0 written, activated, tried, committed;
// image 1 written, activated, tried, rejected, rolled back; image 2 written, activated,
// tried, committed.
func (r *rig) run() error {
	if err := r.start(); err != nil && !errors.Is(err, errCut) {
		return err
	}
	for i := 0; i < 500; i++ {
		done, err := r.step()
		switch {
		case errors.Is(err, errCut):
			continue
		case err != nil:
			return err
		case done:
			return r.checkFinal()
		}
	}
	return errors.New("scenario did not end in 500 steps")
}

// call runs one writer call and then the pending cut, if any.
func (r *rig) call(what string, fn func(ctx context.Context) error) error {
	err := r.rpc(fn)
	if serr := r.settle(); serr != nil {
		return serr
	}
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

// callAck is call for a call whose success is an acknowledgement: record runs on success
// before the cut's checks.
func (r *rig) callAck(what string, fn func(ctx context.Context) error, record func()) error {
	err := r.rpc(fn)
	if err == nil {
		record()
	}
	if serr := r.settle(); serr != nil {
		return serr
	}
	if err != nil {
		return fmt.Errorf("%s: %w", what, err)
	}
	return nil
}

func (r *rig) step() (bool, error) {
	var st *otav1.DeviceState
	if err := r.call("state", func(ctx context.Context) (err error) { st, err = r.cl.State(ctx); return err }); err != nil {
		return false, err
	}
	if len(st.GetTargets()) != 1 {
		return false, fmt.Errorf("state names %d targets", len(st.GetTargets()))
	}
	booted := st.GetTargets()[0].GetActiveSlot()
	im := r.c.imgs[r.phase]
	switch st.GetImageState() {
	case otav1.ImageState_IMAGE_STATE_ACTIVATED:
		return false, r.reboot()
	case otav1.ImageState_IMAGE_STATE_TRIAL:
		if booted != im.slot {
			return false, fmt.Errorf("trial of slot %s in phase %d", booted, r.phase)
		}
		if im.commit {
			var res *otav1.SelfTestResponse
			if err := r.call("self test", func(ctx context.Context) (err error) { res, err = r.cl.SelfTest(ctx, im.job); return err }); err != nil {
				return false, err
			}
			if !res.GetPassed() {
				return false, fmt.Errorf("self test failed: %v", res)
			}
			return false, r.callAck("commit", func(ctx context.Context) error { _, err := r.cl.Commit(ctx, im.job); return err },
				func() { r.ack.level = 3 })
		}
		if err := r.callAck("reject", func(ctx context.Context) error {
			_, err := r.cl.Reject(ctx, im.job, otav1.Reason_REASON_SELF_TEST_FAILED)
			return err
		}, func() { r.ack.level = 3 }); err != nil {
			return false, err
		}
		return false, r.reboot()
	case otav1.ImageState_IMAGE_STATE_ROLLED_BACK:
		switch {
		case booted == im.slot:
			return false, r.reboot() // rejected, still running it: reboot into the committed slot
		case !im.commit && r.sawActivation(st):
			return r.nextPhase(), nil
		}
		// Before this phase's activation (the rollback is the previous phase's), or a
		// commit phase rolled back by the boot limit: write the image.
		return false, r.update(im)
	case otav1.ImageState_IMAGE_STATE_NORMAL:
		if im.commit && booted == im.slot {
			for _, sl := range st.GetTargets()[0].GetSlots() {
				if sl.GetName() == im.slot && sl.GetVersion() == im.version {
					return r.nextPhase(), nil
				}
			}
		}
		return false, r.update(im)
	}
	return false, fmt.Errorf("image state %s", st.GetImageState())
}

// sawActivation: in a reject phase, a rollback is this phase's once its image was activated;
// the record names the activated version in the slot from then on.
func (r *rig) sawActivation(st *otav1.DeviceState) bool {
	im := r.c.imgs[r.phase]
	for _, sl := range st.GetTargets()[0].GetSlots() {
		if sl.GetName() == im.slot && sl.GetVersion() == im.version {
			return true
		}
	}
	return false
}

// nextPhase moves on; it reports whether the scenario is over.
func (r *rig) nextPhase() bool {
	if im := r.c.imgs[r.phase]; im.commit {
		r.committed = im.slot
	}
	r.ack = acked{}
	r.phase++
	return r.phase == len(r.c.imgs)
}

// reboot asks the writer to reboot, then simulates it: a clean shutdown (the file system is
// synced, as at any orderly reboot) and a start, which takes the file backend's boot.
func (r *rig) reboot() error {
	if err := r.call("reboot", func(ctx context.Context) error { return r.cl.Reboot(ctx) }); err != nil {
		return err
	}
	if err := r.stopWriter(); err != nil {
		if errors.Is(err, errCut) {
			return r.settle()
		}
		return err
	}
	if r.isFired() {
		return r.settle()
	}
	if err := r.fs.Sync(); err != nil {
		return err
	}
	if err := r.powerOn(); err != nil {
		return err
	}
	return r.start()
}

// update writes im (resuming the writer's session), verifies and activates it, and reboots.
func (r *rig) update(im *image) error {
	var resp *otav1.BeginSessionResponse
	ft := int32(0)
	req := &otav1.BeginSessionRequest{JobId: im.job, FileType: &ft, FileSize: uint64(len(im.data)), BlockSize: blockSize,
		SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: im.sig, CertName: r.c.signer.CertName, Version: im.version}
	if err := r.call("begin", func(ctx context.Context) (err error) { resp, err = r.cl.Begin(ctx, req); return err }); err != nil {
		return err
	}
	s := resp.GetSession()
	total := int(s.GetTotalBlocks())
	if s.GetSessionId() != r.ack.session {
		// A new attempt at this image (the first, or after a rollback by the boot limit).
		r.ack = acked{session: s.GetSessionId(), durable: make([]bool, total), sent: make([]bool, total)}
	}
	// What the writer reports durable is acknowledged too.
	for k := 0; k < total; k++ {
		if !missing(s.GetMissing(), k) {
			r.ack.durable[k] = true
		} else if r.ack.durable[k] {
			return fmt.Errorf("writer reports block %d missing, acknowledged durable before", k)
		}
	}
	if s.GetState() != otav1.SessionState_SESSION_STATE_VERIFIED {
		var todo []int
		for k := 0; k < total; k++ {
			if missing(s.GetMissing(), k) {
				todo = append(todo, k)
			}
		}
		for i, seq := 0, uint64(1); i < len(todo); i, seq = i+batchBlocks, seq+1 {
			batch := todo[i:min(i+batchBlocks, len(todo))]
			var blocks []*otav1.Block
			for _, k := range batch {
				end := min((k+1)*blockSize, len(im.data))
				blocks = append(blocks, &otav1.Block{Offset: uint64(k * blockSize), Data: im.data[k*blockSize : end]})
			}
			sync := int(seq)%syncEvery == 0 || i+batchBlocks >= len(todo)
			var ack *otav1.WriteAck
			if err := r.callAck("write", func(ctx context.Context) (err error) {
				ack, err = r.cl.WriteBatch(ctx, s.GetSessionId(), seq, blocks, sync)
				return err
			}, func() {
				for _, k := range batch {
					r.ack.sent[k] = true
				}
				if ack.GetDurableSeq() == seq {
					for k, v := range r.ack.sent {
						r.ack.durable[k] = r.ack.durable[k] || v
					}
				}
			}); err != nil {
				return err
			}
		}
		if err := r.callAck("finish", func(ctx context.Context) error { _, err := r.cl.Finish(ctx, s.GetSessionId()); return err },
			func() {
				r.ack.level = 1
				for k := range r.ack.durable {
					r.ack.durable[k] = true
				}
			}); err != nil {
			return err
		}
	}
	if err := r.callAck("activate", func(ctx context.Context) error { _, err := r.cl.Activate(ctx, s.GetSessionId()); return err },
		func() { r.ack.level = 2 }); err != nil {
		return err
	}
	return r.reboot()
}

// checkFinal: the scenario's end state, from the writer and from the files.
func (r *rig) checkFinal() error {
	var st *otav1.DeviceState
	if err := r.call("state", func(ctx context.Context) (err error) { st, err = r.cl.State(ctx); return err }); err != nil {
		return err
	}
	tg := st.GetTargets()[0]
	if st.GetImageState() != otav1.ImageState_IMAGE_STATE_NORMAL || tg.GetActiveSlot() != "a" {
		return fmt.Errorf("end state %s running %s, want normal running a", st.GetImageState(), tg.GetActiveSlot())
	}
	if len(st.GetSessions()) != 0 {
		return fmt.Errorf("sessions left: %v", st.GetSessions())
	}
	vers := map[string]string{}
	for _, sl := range tg.GetSlots() {
		vers[sl.GetName()] = sl.GetVersion()
	}
	if vers["a"] != r.c.imgs[2].version || vers["b"] != r.c.imgs[0].version {
		return fmt.Errorf("versions %v", vers)
	}
	if !r.holds("b", r.c.imgs[0].data) || !r.holds("a", r.c.imgs[2].data) {
		return errors.New("slots do not hold the images committed to them")
	}
	b, err := os.ReadFile(r.path("state/boot-state.json"))
	if err != nil {
		return err
	}
	var bf bootFile
	if err := json.Unmarshal(b, &bf); err != nil {
		return err
	}
	if bf.Committed != "a" || bf.Booted != "a" || bf.Pending != "" || bf.Trial || bf.RolledBack {
		return fmt.Errorf("final boot state %+v", bf)
	}
	// Nothing left behind by interrupted saves.
	var left []string
	for _, d := range []string{"state", "state/sessions"} {
		ents, err := os.ReadDir(r.path(d))
		if err != nil {
			return err
		}
		for _, e := range ents {
			switch filepath.Join(d, e.Name()) {
			case "state/boot-state.json", "state/record", "state/sessions":
			default:
				left = append(left, filepath.Join(d, e.Name()))
			}
		}
	}
	if len(left) > 0 {
		return fmt.Errorf("files left in the state directory: %v", left)
	}
	return nil
}
