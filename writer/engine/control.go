package engine

import (
	"context"
	"errors"
	"fmt"
	"time"

	"github.com/gwota/gwota/internal/crashpoint"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/journal"
)

// Activate implements api.Writer. Only a verified session is activated. A/B: the record
// names the update first (so a trial boot can name its job even after a crash right after
// the bootloader switch), then the boot backend tries the slot at the next boot. Plain file:
// atomic rename into place, no reboot.
func (e *Engine) Activate(ctx context.Context, sessionID string) (*otav1.ActivateResponse, error) {
	e.ctl.Lock()
	defer e.ctl.Unlock()
	s, err := e.lookup(sessionID)
	if err != nil {
		return nil, err
	}
	if err := s.lockIdle(ctx); err != nil {
		return nil, err
	}
	defer s.mu.Unlock()
	st, err := e.checkActivation(ctx, s)
	if err != nil {
		return nil, err
	}
	m := s.meta
	upd := &journal.Update{JobID: m.JobID, Target: m.Target, Slot: m.Slot, Version: m.Version, Time: time.Now().UTC()}
	if !s.tgt.IsAB() {
		return e.installFile(s, st, upd)
	}
	return e.activateSlot(ctx, s, upd)
}

// checkActivation refuses what may not be activated now: a closed or unverified session, a
// boot state in an update cycle, a version the policy refuses, and (for a session verified
// by an earlier process) an image the medium no longer holds. A session whose image can no
// longer be trusted is dropped. It returns the boot state. The caller holds s.mu.
func (e *Engine) checkActivation(ctx context.Context, s *session) (boot.State, error) {
	if s.dropped {
		return boot.State{}, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "session %s is closed", s.id)
	}
	if s.kind() == kindManifest {
		return boot.State{}, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "session %s is a manifest: activate the session of its chunks", s.id)
	}
	if s.state != otav1.SessionState_SESSION_STATE_VERIFIED {
		return boot.State{}, status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "session %s is %s: only a verified image is activated", s.id, s.state)
	}
	m := s.meta
	st, err := e.bootState(ctx)
	if err != nil {
		return st, err
	}
	if s.tgt.IsAB() {
		switch {
		case st.Trial || st.Pending != "" || st.Booted != st.Committed:
			return st, status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "boot state does not allow an activation now (running %s, committed %s, pending %q, trial %v)",
				st.Booted, st.Committed, st.Pending, st.Trial)
		case m.Slot != boot.Other(st.Booted):
			// The device booted the slot this session wrote: its image can no longer be trusted.
			e.drop(s, "slot became active")
			return st, status.Errorf(otav1.Reason_REASON_SESSION_LOST, "slot %s is running now; the image must be written again", m.Slot)
		}
	}
	if err := e.checkVersion(s.tgt, st.Booted, m.Version, s.kind() == kindChunks); err != nil {
		return st, err
	}
	if s.reloaded {
		// Verified by an earlier process: the medium may have changed since. Check again.
		if _, err := e.verifyMedium(ctx, s.medium, &m); err != nil {
			if !status.IsClass(err, status.ClassRetryable) {
				e.drop(s, "verification before activation failed")
			}
			return st, err
		}
		s.reloaded = false
	}
	return st, nil
}

// installFile puts a plain file in place (no reboot) and records it. The caller holds s.mu.
func (e *Engine) installFile(s *session, st boot.State, upd *journal.Update) (*otav1.ActivateResponse, error) {
	m := s.meta
	if err := s.tgt.Install(s.medium); err != nil {
		s.medium = nil
		e.drop(s, "install failed")
		return nil, err
	}
	s.medium = nil
	upd.Outcome = journal.OutcomeCommitted
	// A file update does not replace the record of an A/B update still in its cycle.
	keepAB := st.Pending != "" || st.Trial
	if err := e.updateRecord(func(r *journal.Record) {
		setVer(r, m.Target, m.Slot, m.Version)
		if !keepAB {
			r.LastUpdate = upd
		}
	}); err != nil {
		e.log.Error("record not saved after install", "error", err)
	}
	e.drop(s, "activated (installed)")
	return &otav1.ActivateResponse{RebootRequired: false, Target: m.Target, Slot: m.Slot}, nil
}

// activateSlot makes the boot backend try s's slot at the next boot: the slot is synced,
// the record names the update, then the bootloader switches (a failed switch restores the
// record). The caller holds s.mu.
func (e *Engine) activateSlot(ctx context.Context, s *session, upd *journal.Update) (*otav1.ActivateResponse, error) {
	m := s.meta
	if err := s.medium.Sync(); err != nil {
		return nil, saveErr(fmt.Errorf("sync slot: %w", err), otav1.Reason_REASON_FILE_CLOSE_FAILED)
	}
	var prev journal.Record
	upd.Outcome = journal.OutcomeActivated
	if err := e.updateRecord(func(r *journal.Record) {
		prev = *r
		setVer(r, m.Target, m.Slot, m.Version)
		r.LastUpdate = upd
	}); err != nil {
		return nil, err
	}
	crashpoint.Hit(crashpoint.WriterActivateBoot)
	if err := e.deps.Boot.Activate(ctx, m.Slot); err != nil {
		if rerr := e.updateRecord(func(r *journal.Record) { *r = prev }); rerr != nil {
			e.log.Error("record not restored after failed activation", "error", rerr)
		}
		e.log.Error("boot activation failed", "session", s.id, "slot", m.Slot, "error", err)
		return nil, typed(err, otav1.Reason_REASON_BOOT_CONTROL_FAILED, "activate slot "+m.Slot)
	}
	crashpoint.Hit(crashpoint.WriterActivateSaved)
	if _, err := e.bootState(ctx); err != nil {
		e.log.Warn("boot state after activation", "error", err)
	}
	e.recMu.Lock()
	e.rebootArmed = true
	e.recMu.Unlock()
	e.log.Info("slot activated for the next boot", "job", m.JobID, "target", m.Target, "slot", m.Slot, "version", m.Version)
	e.drop(s, "activated")
	return &otav1.ActivateResponse{RebootRequired: true, Target: m.Target, Slot: m.Slot}, nil
}

func setVer(r *journal.Record, targetName, slot, version string) {
	nv := map[string]string{}
	for k, v := range r.Versions[targetName] {
		nv[k] = v
	}
	nv[slot] = version
	if r.Versions == nil {
		r.Versions = map[string]map[string]string{}
	}
	r.Versions[targetName] = nv
}

// updateRecord changes the record and persists it; on a save failure the old record stays.
func (e *Engine) updateRecord(fn func(*journal.Record)) error {
	e.recMu.Lock()
	defer e.recMu.Unlock()
	old := e.record
	nr := *old
	nr.Versions = map[string]map[string]string{}
	for k, v := range old.Versions {
		nr.Versions[k] = v // inner maps are copied on write (setVer)
	}
	fn(&nr)
	e.record = &nr
	if err := e.saveRecordLocked(); err != nil {
		e.record = old
		return err
	}
	return nil
}

// Reboot implements api.Writer: only when an activation or rejection needs one.
func (e *Engine) Reboot(ctx context.Context) error {
	e.ctl.Lock()
	defer e.ctl.Unlock()
	st, err := e.bootState(ctx)
	if err != nil {
		return err
	}
	e.recMu.Lock()
	armed := e.rebootArmed
	e.recMu.Unlock()
	needed := st.Pending != "" || (st.RolledBack && st.Booted != st.Committed)
	if !armed && !needed {
		return status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "no activation or rollback waits for a reboot")
	}
	e.log.Info("rebooting", "pending", st.Pending, "booted", st.Booted, "committed", st.Committed)
	if err := e.reboot(ctx); err != nil {
		e.log.Error("reboot failed", "error", err)
		return typed(err, otav1.Reason_REASON_REBOOT_FAILED, "reboot")
	}
	e.recMu.Lock()
	e.rebootArmed = false
	e.recMu.Unlock()
	return nil
}

// trialFor checks that the device runs a trial boot and that jobID (when given) names the
// recorded update.
func (e *Engine) trialFor(ctx context.Context, op, jobID string) (boot.State, *journal.Update, error) {
	st, err := e.bootState(ctx)
	if err != nil {
		return st, nil, err
	}
	if !st.Trial || st.Pending != "" {
		return st, nil, status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "%s: not in a trial boot (image state %s)", op, st.ImageState()).
			WithMeta("image_state", st.ImageState().String())
	}
	e.recMu.Lock()
	u := e.record.LastUpdate
	e.recMu.Unlock()
	if jobID != "" && (u == nil || u.JobID != jobID) {
		rec := ""
		if u != nil {
			rec = u.JobID
		}
		return st, u, status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "%s: job %s is not the update on trial (%q)", op, trunc(jobID, 64), rec).
			WithMeta("trial_job_id", rec)
	}
	return st, u, nil
}

// SelfTest implements api.Writer: the configured health checks, in a trial boot only, within
// self_test_timeout.
func (e *Engine) SelfTest(ctx context.Context, jobID string) (*otav1.SelfTestResponse, error) {
	st, u, err := e.trialFor(ctx, "self test", jobID)
	if err != nil {
		return nil, err
	}
	if e.deps.SelfTest == nil {
		return &otav1.SelfTestResponse{Passed: true}, nil
	}
	crashpoint.Hit(crashpoint.WriterSelfTest)
	tctx, cancel := context.WithTimeout(ctx, e.cfg.SelfTestTimeout)
	defer cancel()
	res, err := e.deps.SelfTest.Run(tctx)
	if err != nil {
		if errors.Is(err, context.DeadlineExceeded) || tctx.Err() == context.DeadlineExceeded {
			res := &otav1.SelfTestResponse{Passed: false, Reason: otav1.Reason_REASON_SELF_TEST_TIMEOUT}
			e.recordSelfTest(st, u, res)
			return res, nil
		}
		return nil, typed(err, otav1.Reason_REASON_OTHER, "self test")
	}
	if res == nil {
		return nil, status.Errorf(otav1.Reason_REASON_OTHER, "self test returned no result")
	}
	if !res.GetPassed() && res.GetReason() == otav1.Reason_REASON_UNSPECIFIED {
		res.Reason = otav1.Reason_REASON_SELF_TEST_FAILED
	}
	e.recordSelfTest(st, u, res)
	e.log.Info("self test", "job", jobID, "passed", res.GetPassed(), "reason", status.Name(res.GetReason()))
	if res.GetPassed() {
		crashpoint.Hit(crashpoint.WriterSelfTested)
	}
	return res, nil
}

// Commit implements api.Writer.
func (e *Engine) Commit(ctx context.Context, jobID string) (*otav1.CommitResponse, error) {
	e.ctl.Lock()
	defer e.ctl.Unlock()
	st, u, err := e.trialFor(ctx, "commit", jobID)
	if err != nil {
		if done, derr := e.committedAlready(ctx, jobID); derr == nil && done != nil {
			return &otav1.CommitResponse{Committed: done}, nil
		}
		return nil, err
	}
	if err := e.checkSelfTestPassed(st, u); err != nil {
		return nil, err
	}
	crashpoint.Hit(crashpoint.WriterCommitBoot)
	if err := e.deps.Boot.Commit(ctx); err != nil {
		e.log.Error("commit failed", "slot", st.Booted, "error", err)
		var se *status.Error
		if errors.As(err, &se) && (se.Reason == otav1.Reason_REASON_BAD_IMAGE_STATE || se.Reason == otav1.Reason_REASON_STORAGE_FULL) {
			return nil, err // not allowed now / free space: more telling than commit_failed
		}
		return nil, status.Errorf(otav1.Reason_REASON_COMMIT_FAILED, "commit slot %s: %w", st.Booted, err)
	}
	crashpoint.Hit(crashpoint.WriterCommitSaved)
	info := &otav1.UpdateInfo{Slot: st.Booted}
	if u != nil {
		info = &otav1.UpdateInfo{JobId: u.JobID, Target: u.Target, Slot: u.Slot, Version: u.Version}
		if err := e.updateRecord(func(r *journal.Record) {
			nu := *u
			nu.Outcome, nu.Time = journal.OutcomeCommitted, time.Now().UTC()
			r.LastUpdate = &nu
		}); err != nil {
			e.log.Error("record not saved after commit", "error", err)
		}
	}
	e.log.Info("trial slot committed", "slot", st.Booted, "job", info.JobId)
	return &otav1.CommitResponse{Committed: info}, nil
}

// committedAlready answers a Commit repeated after a crash that came between the bootloader's
// commit and the answer (or the record): the boot state runs jobID's slot committed, with no
// trial and nothing pending, and the record names jobID's update of that slot. The record is
// completed and the commit reported again; anything else is nil (not this case).
func (e *Engine) committedAlready(ctx context.Context, jobID string) (*otav1.UpdateInfo, error) {
	if jobID == "" {
		return nil, nil
	}
	st, err := e.bootState(ctx)
	if err != nil {
		return nil, err
	}
	e.recMu.Lock()
	u := e.record.LastUpdate
	e.recMu.Unlock()
	if u == nil || u.JobID != jobID || st.Trial || st.Pending != "" || st.RolledBack ||
		st.Booted != st.Committed || st.Committed != u.Slot ||
		(u.Outcome != journal.OutcomeActivated && u.Outcome != journal.OutcomeCommitted) {
		return nil, nil
	}
	if u.Outcome != journal.OutcomeCommitted {
		if err := e.updateRecord(func(r *journal.Record) {
			nu := *u
			nu.Outcome, nu.Time = journal.OutcomeCommitted, time.Now().UTC()
			r.LastUpdate = &nu
		}); err != nil {
			e.log.Error("record not saved after commit", "error", err)
		}
	}
	e.log.Info("commit repeated: the slot is committed already", "slot", st.Committed, "job", jobID)
	return &otav1.UpdateInfo{JobId: u.JobID, Target: u.Target, Slot: u.Slot, Version: u.Version}, nil
}

// Reject implements api.Writer: roll back from a trial boot; the device must reboot into the
// committed slot.
func (e *Engine) Reject(ctx context.Context, jobID string, reason otav1.Reason) (*otav1.RejectResponse, error) {
	e.ctl.Lock()
	defer e.ctl.Unlock()
	st, u, err := e.trialFor(ctx, "reject", jobID)
	if err != nil {
		return nil, err
	}
	if reason == otav1.Reason_REASON_UNSPECIFIED {
		reason = otav1.Reason_REASON_ROLLED_BACK
	}
	if err := e.deps.Boot.Reject(ctx); err != nil {
		e.log.Error("reject failed", "slot", st.Booted, "error", err)
		return nil, typed(err, otav1.Reason_REASON_BOOT_CONTROL_FAILED, "reject")
	}
	if u != nil {
		if err := e.updateRecord(func(r *journal.Record) {
			nu := *u
			nu.Outcome, nu.Reason, nu.Time = journal.OutcomeRejected, int32(reason), time.Now().UTC()
			r.LastUpdate = &nu
		}); err != nil {
			e.log.Error("record not saved after reject", "error", err)
		}
	}
	e.recMu.Lock()
	e.rebootArmed = true
	e.recMu.Unlock()
	e.log.Warn("trial slot rejected", "slot", st.Booted, "reason", status.Name(reason))
	return &otav1.RejectResponse{RebootRequired: true}, nil
}
