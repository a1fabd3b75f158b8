package engine

import (
	"context"
	"fmt"
	"os"
	"strings"
	"time"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/journal"
	"github.com/gwota/gwota/writer/target"
	"github.com/gwota/gwota/writer/verify"
)

// The writer's policy checks beyond the session mechanics: which A/B slot no session may
// write, which keys verify a target, what version runs now, whether a commit has a passed
// self test behind it, how large a growable medium may get.

// checkOneAB refuses a configuration with more than one A/B target: the boot backend has one
// switch, so activating slot b of one target would boot slot b of the other, verified or
// not. Config.Validate refuses it too; the engine does not rely on that.
func checkOneAB(cfg *config.Config) error {
	first := ""
	for _, t := range cfg.Targets {
		if t.Kind != config.KindAB {
			continue
		}
		if first != "" {
			return fmt.Errorf("engine: targets %q and %q are both A/B but share the only boot switch: keep one A/B target", first, t.Name)
		}
		first = t.Name
	}
	return nil
}

// fence is the boot state as the engine last read it: an A/B session may never write the
// running slot nor the slot activated for the next boot.
type fence struct {
	known           bool
	booted, pending string
	read            time.Time
}

// setFence records st; every boot state read of the engine goes through it.
func (e *Engine) setFence(st boot.State) {
	e.mu.Lock()
	e.fence = fence{known: true, booted: st.Booted, pending: st.Pending, read: time.Now()}
	e.mu.Unlock()
}

// fenceStale: the boot state was last read longer than sync_interval ago.
func (e *Engine) fenceStale() bool {
	e.mu.RLock()
	defer e.mu.RUnlock()
	return time.Since(e.fence.read) >= e.cfg.SyncInterval
}

// fencedLocked says why s may not write its slot now ("" when it may). The caller holds s.mu.
func (e *Engine) fencedLocked(s *session) string {
	if s.tgt == nil || !s.tgt.IsAB() {
		return ""
	}
	e.mu.RLock()
	f := e.fence
	e.mu.RUnlock()
	switch {
	case !f.known:
		return "the boot state is unknown"
	case s.meta.Slot == f.pending:
		return "it is activated for the next boot"
	case s.meta.Slot == f.booted:
		return "it is the running slot"
	}
	return ""
}

// refuseFencedLocked closes s and returns REASON_BAD_IMAGE_STATE when its slot is fenced.
// refresh reads the boot state first (at the points where blocks become durable or the image
// is verified), so a slot activated behind the engine's back is caught there at the latest.
func (e *Engine) refuseFencedLocked(ctx context.Context, s *session, refresh bool) error {
	if s.tgt == nil || !s.tgt.IsAB() { // a manifest session writes no slot
		return nil
	}
	if refresh {
		if _, err := e.bootState(ctx); err != nil {
			return err
		}
	}
	why := e.fencedLocked(s)
	if why == "" {
		return nil
	}
	e.log.Error("session refused: its slot may not be written", "session", s.id, "target", s.meta.Target, "slot", s.meta.Slot, "why", why)
	e.drop(s, "slot fenced: "+why)
	return status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "target %s slot %s may not be written: %s; the session is closed", s.meta.Target, s.meta.Slot, why).
		WithMeta("slot", s.meta.Slot)
}

// loadTrust builds the global trust store and one per target that names its own keys.
func loadTrust(cfg *config.Config) (*verify.Store, map[string]*verify.Store, error) {
	global, err := verify.Load(cfg.TrustedKeys, cfg.AllowSHA1)
	if err != nil {
		return nil, nil, err
	}
	per := map[string]*verify.Store{}
	for _, t := range cfg.Targets {
		if len(t.TrustedKeys) == 0 {
			continue
		}
		s, err := verify.Load(t.TrustedKeys, cfg.AllowSHA1)
		if err != nil {
			return nil, nil, fmt.Errorf("target %s: %w", t.Name, err)
		}
		per[t.Name] = s
	}
	return global, per, nil
}

// trustFor is the store that verifies the target called name: its own keys when it names
// any, else the global ones.
func (e *Engine) trustFor(name string) *verify.Store {
	if s := e.trustBy[name]; s != nil {
		return s
	}
	return e.trust
}

// checkSigner applies the certfile policy: a job that names no certificate is verified
// against every key of the target's store only when the configuration says so.
func (e *Engine) checkSigner(t *target.Target, certName string) error {
	if certName != "" || e.cfg.AllowAnyTrustedKey || t.Config().AllowAnyTrustedKey {
		return nil
	}
	return status.Errorf(otav1.Reason_REASON_UNTRUSTED_SIGNER,
		"the job names no signing certificate (certfile) and target %s does not accept any trusted key: name the certificate in the job, or set allow_any_trusted_key", t.Name())
}

// runningVersion is the version of what runs now on t, as the writer recorded it. This is the
// one place the version policy reads it from, so a signed source can replace the record
// without touching the policy. It fails closed: a corrupt record or a slot whose version was
// never recorded is REASON_VERSION_CHECK, with the repair in the message.
func (e *Engine) runningVersion(t *target.Target, booted string) (string, error) {
	slot := target.FileSlot
	if t.IsAB() {
		slot = booted
	}
	repair := fmt.Sprintf("record the version that runs now with `ota-writer set-version --config <writer.toml> --target %s --version <version>`", t.Name())
	e.recMu.Lock()
	defer e.recMu.Unlock()
	if e.recordErr != nil {
		return "", status.Errorf(otav1.Reason_REASON_VERSION_CHECK, "version policy %q: the version record is unreadable (%v); %s", e.cfg.VersionPolicy, e.recordErr, repair)
	}
	v := e.record.Versions[t.Name()][slot]
	if v == "" {
		return "", status.Errorf(otav1.Reason_REASON_VERSION_CHECK, "version policy %q: no version is recorded for target %s slot %s, so nothing can be compared; %s", e.cfg.VersionPolicy, t.Name(), slot, repair).
			WithMeta("slot", slot)
	}
	return v, nil
}

// SetRunningVersion records version as what runs now on the target called name (the booted
// slot of an A/B target): the factory provisioning of the version policy, and its repair when
// the record was lost or corrupt. It is a local operator command, not part of the gRPC API.
func (e *Engine) SetRunningVersion(ctx context.Context, name, version string) (slot string, err error) {
	e.ctl.Lock()
	defer e.ctl.Unlock()
	t := e.byName[name]
	if t == nil {
		return "", status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "no target %q configured", name)
	}
	if !versionRE.MatchString(version) {
		return "", status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "version %q is not 1..64 of [A-Za-z0-9._+~-]", trunc(version, 80))
	}
	slot = target.FileSlot
	if t.IsAB() {
		st, err := e.bootState(ctx)
		if err != nil {
			return "", err
		}
		if st.Pending != "" || st.Trial || st.Booted != st.Committed {
			return "", status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "an update is in its cycle (running %s, committed %s, pending %q, trial %v): finish it first",
				st.Booted, st.Committed, st.Pending, st.Trial)
		}
		slot = st.Booted
	}
	e.recMu.Lock()
	if e.recordErr != nil {
		// The unreadable record is replaced: the versions it held cannot be trusted anyway.
		e.log.Warn("replacing the unreadable update record", "error", e.recordErr)
		e.record = &journal.Record{Versions: map[string]map[string]string{}}
	}
	e.recMu.Unlock()
	if err := e.updateRecord(func(r *journal.Record) { setVer(r, name, slot, version) }); err != nil {
		return "", err
	}
	e.recMu.Lock()
	e.recordErr = nil
	e.recMu.Unlock()
	e.log.Info("running version recorded", "target", name, "slot", slot, "version", version)
	return slot, nil
}

// processBootID stands in when no boot id is readable: a self test then counts for this
// process only, which is still within this boot.
var processBootID = newID()

// currentBootID identifies this boot: the kernel's boot id, or the file the file boot
// backend is configured to take it from (boot.boot_id_file), so a simulated reboot is one
// for the self test too.
func (e *Engine) currentBootID() string {
	p := e.cfg.Boot.BootIDFile
	if p == "" {
		p = boot.DefaultBootIDFile
	}
	b, err := os.ReadFile(p)
	if id := strings.TrimSpace(string(b)); err == nil && id != "" {
		return id
	}
	return "process-" + processBootID
}

// selfTestRequired: a commit needs a self test that passed in this boot when checks are
// configured.
func (e *Engine) selfTestRequired() bool { return len(e.cfg.Checks) > 0 }

// recordSelfTest stores the outcome of the self test run in this boot of the trial slot.
func (e *Engine) recordSelfTest(st boot.State, u *journal.Update, res *otav1.SelfTestResponse) {
	run := &journal.SelfTestRun{
		BootID: e.currentBootID(), Slot: st.Booted, BootCount: st.BootCount,
		Passed: res.GetPassed(), Reason: int32(res.GetReason()), Time: time.Now().UTC(),
	}
	if u != nil {
		run.JobID = u.JobID
	}
	if err := e.updateRecord(func(r *journal.Record) { r.SelfTest = run }); err != nil {
		// The outcome is still true for this process, which runs in this boot: keep it in
		// memory, so a commit that follows meets its own failure (commit_failed, storage_full)
		// instead of "no self test". A restarted writer finds no record and asks for the
		// self test again: fail closed.
		e.log.Error("self test outcome not recorded; kept for this process only", "error", err)
		e.recMu.Lock()
		e.record.SelfTest = run
		e.recMu.Unlock()
	}
}

// checkSelfTestPassed refuses a commit without a self test that passed in this boot of the
// trial slot: REASON_BAD_IMAGE_STATE when none ran (the caller skipped a step; running the
// self test fixes it), REASON_SELF_TEST_FAILED when the last one failed (reject instead).
func (e *Engine) checkSelfTestPassed(st boot.State, u *journal.Update) error {
	if !e.selfTestRequired() {
		return nil
	}
	e.recMu.Lock()
	run := e.record.SelfTest
	e.recMu.Unlock()
	job := ""
	if u != nil {
		job = u.JobID
	}
	if run == nil || run.BootID != e.currentBootID() || run.Slot != st.Booted || run.BootCount != st.BootCount || run.JobID != job {
		return status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "commit: no self test has run in this boot of slot %s: run the self test first", st.Booted)
	}
	if !run.Passed {
		r := otav1.Reason(run.Reason)
		if r == otav1.Reason_REASON_UNSPECIFIED {
			r = otav1.Reason_REASON_SELF_TEST_FAILED
		}
		return status.Errorf(otav1.Reason_REASON_SELF_TEST_FAILED, "commit: the self test of this boot failed (%s): reject the trial instead", status.Name(r)).
			WithMeta("self_test_reason", status.Name(r))
	}
	return nil
}

// checkRoom bounds an image on a medium that grows (a regular-file slot or a file target's
// temporary file): it must fit in what the file holds plus the free space of its filesystem
// minus free_space_reserve. Block devices are bounded by their capacity in target.Open.
func (e *Engine) checkRoom(t *target.Target, slot string, size uint64) error {
	room, grows, err := t.Room(slot, e.cfg.Reserve())
	if err != nil {
		return target.IOError(err, "free space for target %s", t.Name())
	}
	if grows && size > room {
		// A filesystem already down to its reserve is full: freeing space is the repair.
		// Otherwise the image is larger than what the target may take.
		if free, ferr := t.FreeSpace(slot); ferr == nil && free <= e.cfg.Reserve() {
			return status.Errorf(otav1.Reason_REASON_STORAGE_FULL, "image of %d bytes: the filesystem of target %s is full (%d bytes free, free_space_reserve %d)",
				size, t.Name(), free, e.cfg.Reserve()).WithMeta("available", fmt.Sprint(room))
		}
		return status.Errorf(otav1.Reason_REASON_FILE_TOO_LARGE, "image of %d bytes does not fit target %s: %d bytes available (free space minus free_space_reserve %d)",
			size, t.Name(), room, e.cfg.Reserve()).WithMeta("available", fmt.Sprint(room))
	}
	return nil
}
