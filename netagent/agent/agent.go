// Package agent is ota-net's state machine: it follows AWS IoT jobs one at a time and, for
// each afr_ota job, drives the writer through every file (begin or resume a session, download
// the missing blocks over MQTT streams or HTTP into it, verify), reports ready, activates and
// reboots; after a restart in a trial boot it runs the self test and commits or rolls back.
// Every failure ends as FAILED (or REJECTED when the job never started) with reason and
// error_code plus the writer's extension fields. A SIGTERM (context cancellation) stops
// without reporting or aborting anything, so the next start resumes. Writer sessions whose
// job is gone in the cloud (canceled while ota-net or the writer was down) are aborted at
// start-up, before each job and after an abort the writer missed (reconcile).
package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/internal/crashpoint"
	"github.com/gwota/gwota/netagent/blocksink"
	"github.com/gwota/gwota/netagent/httpdl"
	"github.com/gwota/gwota/netagent/jobdoc"
	"github.com/gwota/gwota/netagent/jobs"
	"github.com/gwota/gwota/netagent/pathselect"
	"github.com/gwota/gwota/netagent/report"
	"github.com/gwota/gwota/netagent/stream"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// statusDetails keys of a rollback: why the writer (or the bootloader) rolled back.
const (
	KeyRollbackReason = "rollback_reason"
	KeyRollbackCode   = "rollback_code"
)

// Defaults.
const (
	DefaultWriterWait      = 10 * time.Minute
	DefaultSelfTestTimeout = 10 * time.Minute
	// finalTimeout bounds reports and aborts made after a job's own context ended.
	finalTimeout = 30 * time.Second
)

// Config tunes the agent.
type Config struct {
	// BlockSize asked of the writer for new sessions (a resumed session keeps its own).
	BlockSize int
	// Protocol is the operator's choice when a file offers both protocols: pathselect.Auto
	// (by LinkBandwidth, else by the last measured download, against AWS's MQTT quota; the
	// other protocol is the fallback), OnlyMQTT or OnlyHTTP. "" is Auto, or OnlyHTTP with
	// PreferHTTP (the older setting).
	Protocol      pathselect.Mode
	PreferHTTP    bool
	LinkBandwidth int64  // bytes per second, 0: unknown
	BandwidthFile string // where the measured bandwidth is kept ("": memory only)
	// ReportInterval and ReportPercentStep rate-limit progress reports.
	ReportInterval    time.Duration
	ReportPercentStep int
	// WriterWait is how long an unreachable writer is waited for before the job fails with
	// writer_unavailable (default 10 min).
	WriterWait time.Duration
	// SelfTestTimeout is the deadline of the writer's SelfTest call (default 10 min); a
	// deadline hit is self_test_timeout.
	SelfTestTimeout time.Duration
	Logger          hclog.Logger
}

// Agent runs jobs. Create with New, run with Run.
type Agent struct {
	jobs   Jobs
	writer Writer
	stream StreamDownloader // nil: MQTT streams unavailable
	http   HTTPDownloader   // nil: HTTP unavailable
	cfg    Config
	log    hclog.Logger
	path   *pathselect.Selector

	// handled remembers what each job looked like when the agent last finished with it, so a
	// re-announcement of the same state (reconnect, duplicate) is not acted on twice.
	mu      sync.Mutex
	handled map[string]string
	// reconcileAgain: an abort or a reconciliation could not reach the writer or the cloud;
	// reconcile again when the agent is idle.
	reconcileAgain atomic.Bool
}

// New builds an agent. Either downloader may be nil (that protocol is then unusable).
func New(j Jobs, w Writer, sd StreamDownloader, hd HTTPDownloader, cfg Config) *Agent {
	if cfg.BlockSize <= 0 {
		cfg.BlockSize = stream.DefaultBlockSize
	}
	if cfg.WriterWait <= 0 {
		cfg.WriterWait = DefaultWriterWait
	}
	if cfg.SelfTestTimeout <= 0 {
		cfg.SelfTestTimeout = DefaultSelfTestTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	return &Agent{jobs: j, writer: w, stream: sd, http: hd, cfg: cfg, log: cfg.Logger, path: newSelector(cfg), handled: map[string]string{}}
}

// errShutdown is the cancellation cause of a job when the agent stops: nothing is reported,
// nothing aborted.
var errShutdown = errors.New("agent shutting down")

// gone is the cancellation cause of a job that is no longer the next one.
type gone struct{ next *jobs.Execution }

func (g *gone) Error() string {
	if g.next == nil {
		return "job canceled or removed (nothing pending)"
	}
	return "job replaced by " + g.next.JobID
}

type running struct {
	jobID  string
	cancel context.CancelCauseFunc
	done   chan struct{}
	// final is set once the job sends its terminal report: what follows (a reboot into the
	// previous image) must not be cut short because the job stopped being next.
	final *atomic.Bool
}

// Run follows jobs until ctx ends. It returns nil on a clean shutdown.
func (a *Agent) Run(ctx context.Context) error {
	if err := a.jobs.Start(ctx); err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("jobs: %w", err)
	}
	a.checkForeignTrial(ctx)
	a.reconcile(ctx, "", nil)

	var cur *running
	stop := func(cause error) {
		if cur == nil {
			return
		}
		if cause == errShutdown || !cur.final.Load() {
			cur.cancel(cause)
		}
		<-cur.done
		cur = nil
	}
	var curDone <-chan struct{}
	for {
		select {
		case <-ctx.Done():
			stop(errShutdown)
			return nil
		case <-curDone:
			cur, curDone = nil, nil
			if a.reconcileAgain.Load() {
				a.reconcile(ctx, "", nil)
			}
		case ex := <-a.jobs.Next():
			if cur != nil && a.stale(ctx, cur.jobID, ex) {
				continue
			}
			if cur != nil && (ex == nil || ex.JobID != cur.jobID) {
				a.log.Info("current job is no longer next", "job_id", cur.jobID, "next", nextID(ex))
				stop(&gone{next: ex})
				curDone = nil
			}
			if ex == nil || cur != nil || !a.shouldRun(ex) {
				continue
			}
			jctx, cancel := context.WithCancelCause(context.WithoutCancel(ctx))
			r := &running{jobID: ex.JobID, cancel: cancel, done: make(chan struct{}), final: new(atomic.Bool)}
			cur, curDone = r, r.done
			go func() {
				defer close(r.done)
				defer cancel(nil)
				a.runJob(jctx, ex, r.final)
			}()
		}
	}
}

// stale tells whether a next-job answer that does not name the current job is out of date.
// AWS does not order its answers and notifications: a $next/get asked before the current job
// existed (or while an earlier job was still open, at a reconnection) can be answered after
// the current job started. Only the cloud's answer about a job itself counts: "nothing
// pending" stops the current job only when the job is gone; another job replaces it only
// when that job is still open. Otherwise the job goes on (its own updates find it terminal
// if it is).
func (a *Agent) stale(ctx context.Context, current string, next *jobs.Execution) bool {
	switch {
	case next == nil && !a.gone(ctx, current):
		a.log.Info("the cloud says nothing is pending, but the current job is open: stale answer ignored", "job_id", current)
		return true
	case next != nil && next.JobID != current && a.gone(ctx, next.JobID) && !a.gone(ctx, current):
		a.log.Info("the cloud names a job that has ended as the next one: stale answer ignored", "job_id", current, "named", next.JobID)
		return true
	}
	return false
}

// gone asks the cloud about jobID itself (DescribeJobExecution): true only when the job is
// terminal or does not exist. A job the cloud cannot answer about is taken as open, so a
// running job goes on.
func (a *Agent) gone(ctx context.Context, jobID string) bool {
	ctx, cancel := context.WithTimeout(ctx, finalTimeout)
	defer cancel()
	ex, err := a.jobs.Describe(ctx, jobID)
	var te *jobs.TerminalError
	switch {
	case errors.As(err, &te), errors.Is(err, jobs.ErrNotFound):
		return true
	case err != nil:
		a.log.Warn("cannot ask the cloud about a job; taken as open", "job_id", jobID, "error", err)
		return false
	}
	return jobs.Terminal(ex.Status)
}

func nextID(ex *jobs.Execution) string {
	if ex == nil {
		return ""
	}
	return ex.JobID
}

func stateKey(ex *jobs.Execution) string {
	return ex.Status + "/" + ex.StatusDetails[status.KeySelfTest]
}

func (a *Agent) shouldRun(ex *jobs.Execution) bool {
	if jobs.Terminal(ex.Status) {
		return false
	}
	a.mu.Lock()
	defer a.mu.Unlock()
	last, seen := a.handled[ex.JobID]
	return !seen || (last != "*" && last != stateKey(ex))
}

// markHandled records the job as dealt with in state key ("*": never again in this process).
func (a *Agent) markHandled(jobID, key string) {
	a.mu.Lock()
	defer a.mu.Unlock()
	if len(a.handled) > 1024 {
		clear(a.handled)
	}
	a.handled[jobID] = key
}

// job is the state of one job run.
type job struct {
	a   *Agent
	ex  *jobs.Execution
	log hclog.Logger
	rep *report.Reporter
	// started: the job is IN_PROGRESS (failures are FAILED, not REJECTED).
	started  bool
	sessions []Session
	terminal atomic.Bool
	final    *atomic.Bool
}

func (a *Agent) runJob(ctx context.Context, ex *jobs.Execution, final *atomic.Bool) {
	j := &job{a: a, ex: ex, log: a.log.With("job_id", ex.JobID), started: ex.Status == jobs.StatusInProgress, final: final}
	j.rep = report.New(a.jobs, a.writer.Extensions, ex.JobID, report.Config{
		Interval: a.cfg.ReportInterval, PercentStep: a.cfg.ReportPercentStep, Logger: j.log,
		OnTerminal: func(_, st string) { j.terminal.Store(true) },
	})
	defer j.rep.Close()
	a.markHandled(ex.JobID, j.run(ctx))
}

// run runs the job and returns what the agent remembers of it (markHandled): "*" never
// again in this process, "" act on its next announcement, or the state it was left in.
func (j *job) run(ctx context.Context) string {
	doc, key := j.document(ctx)
	if doc == nil {
		return key
	}
	j.log.Info("OTA job", "status", j.ex.Status, "files", len(doc.Files), "protocols", doc.Protocols)
	a := j.a
	var st *otav1.DeviceState
	if err := a.call(ctx, "state", func(ctx context.Context) (err error) { st, err = a.writer.State(ctx); return err }); err != nil {
		j.fail(ctx, err, "")
		return "*"
	}
	if key, done := j.afterActivation(ctx, doc, st); done {
		return key
	}
	// A session left by a job that is gone would keep its target busy (session_busy).
	a.reconcile(ctx, j.ex.JobID, st)
	if j.install(ctx, doc) {
		return stateKey(&jobs.Execution{Status: jobs.StatusInProgress, StatusDetails: map[string]string{status.KeySelfTest: status.SelfTestReady}})
	}
	return "*"
}

// document reads and checks the job document (the whole execution when the notification
// came without it). A nil document ends the job; key is then what to remember of it.
func (j *job) document(ctx context.Context) (doc *jobdoc.Document, key string) {
	if len(j.ex.JobDocument) == 0 {
		full, err := j.a.jobs.Describe(ctx, j.ex.JobID)
		if err != nil {
			j.log.Warn("cannot read the job document", "error", err)
			if ctx.Err() == nil {
				return nil, "" // retried at the next announcement
			}
			return nil, "*"
		}
		j.ex = full
	}
	doc, err := jobdoc.Parse(j.ex.JobDocument)
	if errors.Is(err, jobdoc.ErrNotOTA) {
		j.log.Info("custom job (not afr_ota): left alone")
		return nil, "*"
	}
	if err != nil {
		j.log.Warn("job document refused", "error", err)
		j.fail(ctx, err, "")
		return nil, "*"
	}
	return doc, ""
}

// afterActivation deals with a job whose image went further than a download: a trial boot
// (this job's or another's), a rollback, an activation without its reboot, a commit whose
// answer was lost, or a job the cloud shows in self test on a platform that is not. done is
// false when the job is to be installed; key is what to remember of it otherwise.
func (j *job) afterActivation(ctx context.Context, doc *jobdoc.Document, st *otav1.DeviceState) (key string, done bool) {
	a, ex := j.a, j.ex
	selfTest := ex.Status == jobs.StatusInProgress &&
		(ex.StatusDetails[status.KeySelfTest] == status.SelfTestReady || ex.StatusDetails[status.KeySelfTest] == status.SelfTestActive)
	lu := st.GetLastUpdate()
	ours := lu.GetJobId() == ex.JobID
	switch img := st.GetImageState(); {
	case img == otav1.ImageState_IMAGE_STATE_TRIAL && ours && selfTest:
		j.carrySummary()
		j.selfTest(ctx, doc, lu)
	case img == otav1.ImageState_IMAGE_STATE_TRIAL && ours:
		// Platform in trial but the job is not in self test: reject and roll back.
		j.log.Warn("trial boot for a job that is not in self test: rolling back", "status", ex.Status)
		j.rejectTrial(ctx, otav1.Reason_REASON_STATE_MISMATCH)
	case img == otav1.ImageState_IMAGE_STATE_TRIAL:
		// Another job's trial is pending (checkForeignTrial deals with it); nothing can be
		// installed meanwhile.
		j.fail(ctx, status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "trial boot of job %s pending", lu.GetJobId()), "")
	case selfTest && img == otav1.ImageState_IMAGE_STATE_ROLLED_BACK && ours:
		j.log.Warn("new image was rolled back", "writer_reason", status.String(lu.GetReason()))
		var failure []status.Field
		if lu.GetReason() != otav1.Reason_REASON_UNSPECIFIED {
			failure = []status.Field{{Key: KeyRollbackReason, Value: status.Name(lu.GetReason())}, {Key: KeyRollbackCode, Value: status.Code(lu.GetReason())}}
		}
		j.final.Store(true)
		j.report(ctx, func(ctx context.Context) error {
			return j.rep.Failed(ctx, &status.Error{Reason: otav1.Reason_REASON_ROLLED_BACK}, status.SelfTestRejected, failure...)
		})
	case selfTest && img == otav1.ImageState_IMAGE_STATE_ACTIVATED && ours:
		j.log.Info("activated but not rebooted yet: rebooting")
		j.reboot(ctx)
		return stateKey(ex), true
	case selfTest && img == otav1.ImageState_IMAGE_STATE_NORMAL && ours && runs(st, lu.GetTarget(), lu.GetSlot()):
		// The writer committed this job's slot but the answer (or our report) was lost to a
		// crash: the writer confirms a repeated commit only in exactly that state.
		var cr *otav1.CommitResponse
		if err := a.call(ctx, "commit", func(ctx context.Context) (err error) { cr, err = a.writer.Commit(ctx, ex.JobID); return err }); err != nil {
			j.log.Warn("job says self test but the platform runs committed and the writer refuses the commit", "error", err)
			j.fail(ctx, status.Errorf(otav1.Reason_REASON_STATE_MISMATCH, "job in self test, platform %s", img), "")
			return "*", true
		}
		j.log.Info("new image committed (before a restart)", "version", cr.GetCommitted().GetVersion())
		j.final.Store(true)
		_ = j.report(ctx, j.rep.Succeeded)
	case selfTest && !hasFinishedSessions(st, ex.JobID):
		j.log.Warn("job says self test but the platform is not in a trial boot", "image_state", img.String())
		j.fail(ctx, status.Errorf(otav1.Reason_REASON_STATE_MISMATCH, "job in self test, platform %s", img), "")
	default:
		return "", false
	}
	return "*", true
}

// runs says whether the device runs slot of target.
func runs(st *otav1.DeviceState, target, slot string) bool {
	for _, t := range st.GetTargets() {
		if t.GetName() == target {
			return slot != "" && t.GetActiveSlot() == slot
		}
	}
	return false
}

func hasFinishedSessions(st *otav1.DeviceState, jobID string) bool {
	for _, s := range st.GetSessions() {
		if s.GetJobId() == jobID && (s.GetState() == otav1.SessionState_SESSION_STATE_VERIFIED || s.GetState() == otav1.SessionState_SESSION_STATE_ACTIVATED) {
			return true
		}
	}
	return false
}

// install downloads, verifies and activates every file. It returns true when it left the job
// waiting for a reboot (ready reported, reboot asked).
func (j *job) install(ctx context.Context, doc *jobdoc.Document) bool {
	a := j.a
	plan, perr := planFiles(doc)
	if perr != nil {
		j.fail(ctx, perr, "")
		return false
	}
	var delta *otav1.DeltaInfo
	for _, pf := range plan {
		f := doc.Files[pf.index]
		protos, err := a.protocols(doc, f)
		if err != nil {
			j.fail(ctx, err, "")
			return false
		}
		req := &otav1.BeginSessionRequest{
			JobId: j.ex.JobID, FileIndex: uint32(f.Index), FileType: f.FileType, FilePath: f.Path,
			FileSize: f.Size, BlockSize: uint32(a.cfg.BlockSize), SigAlgorithm: f.SigAlgorithm,
			Signature: f.Signature, CertName: f.CertFile, Version: f.Version,
			Kind: pf.kind, ManifestFileIndex: uint32(pf.manifest),
		}
		var sess Session
		if err := a.call(ctx, "begin", func(ctx context.Context) (err error) { sess, err = a.writer.Begin(ctx, req); return err }); err != nil {
			j.fail(ctx, err, "")
			return false
		}
		j.sessions = append(j.sessions, sess)
		info := sess.Info()
		if pf.kind == otav1.SessionKind_SESSION_KIND_CHUNKS {
			delta = info.GetDelta()
		}
		if s := info.GetState(); s == otav1.SessionState_SESSION_STATE_VERIFIED || s == otav1.SessionState_SESSION_STATE_ACTIVATED {
			j.log.Info("file already verified", "file", f.Index, "kind", pf.kind)
			continue
		}
		// Progress counts what is still to download: blocks of the file, or for a chunk file
		// the stream blocks overlapping the chunks the writer lacks.
		dl, err := newDownload(a, f, sess, pf.kind)
		if err != nil {
			j.fail(ctx, err, "")
			return false
		}
		have, total := dl.have, dl.total
		j.log.Info("receiving file", "file", f.Index, "kind", pf.kind, "protocol", protos[0], "size", f.Size, "block_size", dl.blockSize,
			"have", have, "total", total, "resumed", have > 0, "chunks_missing", dl.chunksMissing, "delta", deltaLog(delta))
		// The IN_PROGRESS update goes out with the first requests instead of a round trip
		// before them; a job found terminal stops the download.
		dctx, stop := context.WithCancelCause(ctx)
		j.useProtocol(protos[0])
		reported := make(chan error, 1)
		go func() {
			err := j.report(ctx, func(ctx context.Context) error { return j.rep.Receiving(ctx, have, total) })
			if err != nil {
				stop(err)
			}
			reported <- err
		}()
		derr := j.fetch(dctx, doc, f, protos, sess, dl)
		rerr := <-reported
		stop(nil)
		if rerr != nil {
			j.fail(ctx, rerr, "")
			return false
		}
		j.started = true
		if derr != nil {
			j.fail(ctx, derr, "")
			return false
		}
		var fin *otav1.FinishSessionResponse
		if err := a.call(ctx, "finish", func(ctx context.Context) (err error) { fin, err = sess.Finish(ctx); return err }); err != nil {
			j.fail(ctx, err, "")
			return false
		}
		j.log.Info("file verified", "file", f.Index, "kind", pf.kind, "sha256", fin.GetSha256())
	}
	if delta != nil {
		// What the writer found locally: the final updates say how much was not downloaded.
		j.rep.SetSummary(status.Fields{{Key: KeyReused, Value: reused(delta)}})
	}
	// The trial boot's self test runs only for a job the cloud shows ready (or active). If the
	// cloud refused "ready" for good, activating would reboot into a trial that the next start
	// rolls back as state_mismatch, hiding the cause: the job fails with job_update_failed
	// instead, nothing is activated.
	err := j.rep.Ready(ctx)
	if status.ReasonOf(err) != otav1.Reason_REASON_JOB_UPDATE_FAILED {
		err = j.report(ctx, func(context.Context) error { return err })
	}
	if err != nil {
		j.fail(ctx, err, "")
		return false
	}
	reboot := false
	for _, sess := range j.sessions {
		if sess.Info().GetKind() == otav1.SessionKind_SESSION_KIND_MANIFEST {
			continue // a manifest is verified, never activated: its chunk file's session is
		}
		if sess.Info().GetState() == otav1.SessionState_SESSION_STATE_ACTIVATED {
			reboot = true // activated before a restart; the reboot did not happen
			continue
		}
		var resp *otav1.ActivateResponse
		if err := a.call(ctx, "activate", func(ctx context.Context) (err error) { resp, err = a.writer.Activate(ctx, sess.ID()); return err }); err != nil {
			if !j.activatedBefore(ctx, sess) {
				j.fail(ctx, err, "")
				return false
			}
			// The writer activated the slot and crashed before answering: its state says so.
			reboot = true
			continue
		}
		j.log.Info("activated", "target", resp.GetTarget(), "slot", resp.GetSlot(), "reboot_required", resp.GetRebootRequired())
		reboot = reboot || resp.GetRebootRequired()
	}
	if !reboot {
		// Plain-file targets are in place: no trial, no self test.
		j.final.Store(true)
		_ = j.report(ctx, j.rep.Succeeded)
		return false
	}
	return j.reboot(ctx)
}

// activatedBefore asks the writer whether sess's slot is activated for this job already (a
// writer that crashed after switching the boot slot and before answering drops the session
// when it restarts, so the repeated Activate fails although the activation happened).
func (j *job) activatedBefore(ctx context.Context, sess Session) bool {
	var st *otav1.DeviceState
	if err := j.a.call(ctx, "state", func(ctx context.Context) (err error) { st, err = j.a.writer.State(ctx); return err }); err != nil {
		return false
	}
	lu := st.GetLastUpdate()
	ok := st.GetImageState() == otav1.ImageState_IMAGE_STATE_ACTIVATED && lu.GetJobId() == j.ex.JobID &&
		lu.GetTarget() == sess.Info().GetTarget() && lu.GetSlot() == sess.Info().GetSlot()
	if ok {
		j.log.Info("activation happened before the writer restarted", "target", lu.GetTarget(), "slot", lu.GetSlot())
	}
	return ok
}

func (j *job) reboot(ctx context.Context) bool {
	j.log.Info("rebooting into the new image")
	if err := j.a.call(ctx, "reboot", j.a.writer.Reboot); err != nil {
		j.fail(ctx, err, "")
		return false
	}
	return true
}

// download fetches the blocks of f that missing marks into sink over proto, in blocks of
// dl.blockSize. The downloader tells the reporter its progress; the sink goes to it with all
// of the writer link's behaviour (Sync in a quiet network, Durable in progress, the
// resumed-session error), through a chunk sink for a chunk file (fetch).
func (j *job) download(ctx context.Context, doc *jobdoc.Document, f jobdoc.File, proto string, dl *fileDownload, sink blocksink.Sink, missing bitmap.Bitmap) error {
	a := j.a
	progress := func(p blocksink.Progress) { j.rep.Progress(uint64(p.Received), uint64(p.Total)) }
	if dl.kind == otav1.SessionKind_SESSION_KIND_CHUNKS {
		base := uint64(dl.base)
		progress = func(p blocksink.Progress) {
			got := max(uint64(p.Received), base) - base
			j.rep.Progress(min(got, uint64(dl.total)), uint64(dl.total))
		}
	}
	switch proto {
	case jobdoc.ProtocolHTTP:
		refresh := func(ctx context.Context) (string, error) {
			ex, err := a.jobs.Describe(ctx, j.ex.JobID)
			if err != nil {
				return "", err
			}
			d, err := jobdoc.Parse(ex.JobDocument)
			if err != nil {
				return "", err
			}
			if f.Index >= len(d.Files) || d.Files[f.Index].UpdateDataURL == "" {
				return "", status.Errorf(otav1.Reason_REASON_JOB_DOCUMENT_INVALID, "refreshed document has no URL for file %d", f.Index)
			}
			return d.Files[f.Index].UpdateDataURL, nil
		}
		hf := httpdl.File{URL: f.UpdateDataURL, Size: int64(f.Size), BlockSize: dl.blockSize, OnProgress: progress}
		st, err := a.http.Download(ctx, hf, missing, sink, refresh)
		j.log.Debug("http download", "stats", fmt.Sprintf("%+v", st), "durable", sink.Durable(), "error", err)
		return err
	default:
		sf := stream.File{StreamName: doc.StreamName, FileID: int(f.FileID), Size: int64(f.Size), BlockSize: dl.blockSize, RequestBytes: dl.requestBytes, OnProgress: progress}
		st, err := a.stream.Download(ctx, sf, missing, sink)
		j.log.Debug("stream download", "stats", fmt.Sprintf("%+v", st), "durable", sink.Durable(), "error", err)
		return err
	}
}

// selfTest runs in a trial boot of this job: active, self test, commit or reject. lu is the
// writer's record of the update on trial.
func (j *job) selfTest(ctx context.Context, doc *jobdoc.Document, lu *otav1.UpdateInfo) {
	a := j.a
	if err := j.report(ctx, j.rep.Active); err != nil {
		return
	}
	// The version check of a trial boot: when the job names versions, the image on trial
	// must be one of them. A writer whose record says otherwise (another image was written
	// under this job id, or its state was restored) is not running what the job delivers.
	var versions []string
	for _, f := range doc.Files {
		if f.Version != "" {
			versions = append(versions, f.Version)
		}
	}
	if len(versions) > 0 && !slices.Contains(versions, lu.GetVersion()) {
		j.log.Warn("the trial runs a version the job does not name: rolling back", "running", lu.GetVersion(), "job_versions", versions)
		j.rejectTrial(ctx, otav1.Reason_REASON_SELF_TEST_VERSION_CHECK)
		return
	}
	var res *otav1.SelfTestResponse
	started := time.Now()
	err := a.call(ctx, "self test", func(ctx context.Context) (err error) {
		tctx, cancel := context.WithTimeout(ctx, a.cfg.SelfTestTimeout)
		defer cancel()
		res, err = a.writer.SelfTest(tctx, j.ex.JobID)
		if err != nil && tctx.Err() == context.DeadlineExceeded && ctx.Err() == nil {
			return status.Errorf(otav1.Reason_REASON_SELF_TEST_TIMEOUT, "self test: no answer within %v", a.cfg.SelfTestTimeout)
		}
		return err
	})
	if err != nil && ctx.Err() != nil {
		return
	}
	var reason otav1.Reason
	switch {
	case err != nil:
		// A self test that could not run (writer away, unknown failure) did not pass.
		e := status.FromError(err)
		reason = e.Reason
		if e.Class() == status.ClassUnavailable || reason == otav1.Reason_REASON_OTHER {
			reason = otav1.Reason_REASON_SELF_TEST_FAILED
		}
	case !res.GetPassed():
		reason = res.GetReason()
		if reason != otav1.Reason_REASON_SELF_TEST_TIMEOUT && reason != otav1.Reason_REASON_VERSION_CHECK && reason != otav1.Reason_REASON_SELF_TEST_VERSION_CHECK {
			reason = otav1.Reason_REASON_SELF_TEST_FAILED
		}
		for _, c := range res.GetChecks() {
			j.log.Warn("self test check", "name", c.GetName(), "passed", c.GetPassed(), "detail", c.GetDetail())
		}
	}
	if reason == otav1.Reason_REASON_SELF_TEST_FAILED && time.Since(started) >= a.cfg.SelfTestTimeout {
		// A check cut off by our deadline reads as failed on the writer's side.
		reason = otav1.Reason_REASON_SELF_TEST_TIMEOUT
	}
	if reason != otav1.Reason_REASON_UNSPECIFIED {
		j.log.Warn("self test failed: rolling back", "reason", status.String(reason))
		j.rejectTrial(ctx, reason)
		return
	}
	crashpoint.Hit(crashpoint.NetTested)
	var cr *otav1.CommitResponse
	if err := a.call(ctx, "commit", func(ctx context.Context) (err error) { cr, err = a.writer.Commit(ctx, j.ex.JobID); return err }); err != nil {
		if ctx.Err() != nil {
			return
		}
		j.log.Error("commit failed: rolling back", "error", err)
		reason := status.ReasonOf(err)
		if reason == otav1.Reason_REASON_OTHER {
			reason = otav1.Reason_REASON_COMMIT_FAILED
		}
		j.rejectTrial(ctx, reason)
		return
	}
	j.log.Info("new image committed", "version", cr.GetCommitted().GetVersion())
	j.final.Store(true)
	_ = j.report(ctx, j.rep.Succeeded)
}

// rejectTrial rolls the trial back, reports FAILED rejected with reason, and reboots if the
// rollback needs it.
func (j *job) rejectTrial(ctx context.Context, reason otav1.Reason) {
	a := j.a
	var rr *otav1.RejectResponse
	if err := a.call(ctx, "reject", func(ctx context.Context) (err error) { rr, err = a.writer.Reject(ctx, j.ex.JobID, reason); return err }); err != nil {
		if ctx.Err() != nil {
			return
		}
		j.log.Error("reject failed", "error", err)
	}
	j.final.Store(true)
	if err := j.report(ctx, func(ctx context.Context) error {
		return j.rep.Failed(ctx, &status.Error{Reason: reason}, status.SelfTestRejected)
	}); err != nil {
		return
	}
	if rr.GetRebootRequired() {
		j.log.Info("rebooting into the previous image")
		if err := a.call(ctx, "reboot", a.writer.Reboot); err != nil {
			j.log.Error("reboot after reject failed", "error", err)
		}
	}
}

// report sends one update with the job's context. It returns an error only when the job must
// stop: the job is terminal in the cloud (its sessions are aborted) or the job's context
// ended. Other failures (the cloud unreachable after the jobs client's retries) are logged
// and the update goes on: the device's work is not lost for a missed progress report.
func (j *job) report(ctx context.Context, f func(context.Context) error) error {
	err := f(ctx)
	var te *jobs.TerminalError
	switch {
	case err == nil:
		return nil
	case errors.As(err, &te):
		j.log.Info("job is terminal", "status", te.Status)
		j.terminal.Store(true)
		j.abortSessions(otav1.Reason_REASON_USER_ABORT)
		return err
	case ctx.Err() != nil:
		return err
	case status.ReasonOf(err) == otav1.Reason_REASON_JOB_UPDATE_FAILED:
		// A refused progress or phase update leaves nothing behind (the next update replaces
		// the statusDetails); the device's work goes on.
		j.log.Error("the cloud refused a job update; continuing", "reason", status.String(otav1.Reason_REASON_JOB_UPDATE_FAILED), "error", err)
		return nil
	}
	j.log.Warn("status report failed; continuing", "error", err)
	return nil
}

// fail ends the job after err: on a shutdown nothing happens; on cancel/replace the sessions
// are aborted (user_abort or newer_job); otherwise sessions are aborted and the job reported
// FAILED (REJECTED if it never started) with err's typed reason and its metadata: the
// *status.Error that the writer (or ota-net's own code) raised goes to the report as it is.
func (j *job) fail(ctx context.Context, err error, selfTest string) {
	cause := context.Cause(ctx)
	if ctx.Err() != nil && errors.Is(cause, errShutdown) {
		j.log.Info("stopped for shutdown; the job resumes at the next start")
		return
	}
	var g *gone
	if ctx.Err() != nil && errors.As(cause, &g) {
		j.canceled(g)
		return
	}
	e := status.FromError(err)
	if e == nil || e.Reason == otav1.Reason_REASON_UNSPECIFIED {
		e = &status.Error{Reason: otav1.Reason_REASON_OTHER, Err: err}
	}
	if j.terminal.Load() {
		e = &status.Error{Reason: otav1.Reason_REASON_USER_ABORT, Err: err}
	}
	reason := e.Reason
	j.log.Warn("job failed", "reason", status.String(reason), "error", err)
	j.abortSessions(reason)
	if j.terminal.Load() {
		return
	}
	j.final.Store(true)
	fctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), finalTimeout)
	defer cancel()
	var rerr error
	if !j.started && j.ex.Status == jobs.StatusQueued {
		rerr = j.rep.Rejected(fctx, e)
	} else {
		rerr = j.rep.Failed(fctx, e, selfTest)
	}
	if rerr != nil {
		// Nothing more can reach the cloud about this job: it keeps its last status until
		// its timeout. The log is where the operator finds both reasons.
		j.log.Error("final job update not delivered; the cloud keeps the job's last status", "reason", status.String(reason), "error", rerr)
	}
}

// canceled handles a job that stopped being the next one: canceled or removed in the cloud
// (user_abort, nothing to report), or replaced by a newer job while still open (newer_job,
// reported FAILED).
func (j *job) canceled(g *gone) {
	ctx, cancel := context.WithTimeout(context.Background(), finalTimeout)
	defer cancel()
	reason := otav1.Reason_REASON_USER_ABORT
	ex, err := j.a.jobs.Describe(ctx, j.ex.JobID)
	open := err == nil && !jobs.Terminal(ex.Status)
	if open && g.next != nil {
		reason = otav1.Reason_REASON_NEWER_JOB
	}
	j.log.Info("job canceled", "reason", status.String(reason), "next", nextID(g.next))
	j.abortSessions(reason)
	if open {
		_ = j.rep.Failed(ctx, &status.Error{Reason: reason}, "")
	}
}

func (j *job) abortSessions(reason otav1.Reason) {
	ctx, cancel := context.WithTimeout(context.Background(), finalTimeout)
	defer cancel()
	for _, s := range j.sessions {
		if s.Info().GetState() == otav1.SessionState_SESSION_STATE_ACTIVATED {
			continue
		}
		switch err := s.Abort(ctx, reason); {
		case err == nil:
		case status.IsClass(err, status.ClassGone):
			// The writer dropped it already (a refused image, a lost slot): nothing to do.
			j.log.Debug("session already closed by the writer", "session", s.ID())
		case status.IsClass(err, status.ClassUnavailable):
			// The writer keeps the session in its journal: abort it once it is back.
			j.log.Warn("abort session failed; aborting it once the writer is back", "session", s.ID(), "error", err)
			j.a.reconcileAgain.Store(true)
		default:
			j.log.Warn("abort session failed", "session", s.ID(), "error", err)
		}
	}
	j.sessions = nil
}

// call runs a writer call, waiting (with backoff) while the writer is unreachable, up to
// WriterWait; then the error is writer_unavailable.
func (a *Agent) call(ctx context.Context, what string, f func(context.Context) error) error {
	var since time.Time
	backoff := 100 * time.Millisecond
	for {
		err := f(ctx)
		if err == nil || ctx.Err() != nil || !status.IsClass(err, status.ClassUnavailable) {
			return err
		}
		if since.IsZero() {
			since = time.Now()
		}
		if time.Since(since) >= a.cfg.WriterWait {
			return status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "%s: writer unreachable for %v: %w", what, a.cfg.WriterWait, err)
		}
		a.log.Warn("writer unreachable; waiting", "call", what, "error", err)
		t := time.NewTimer(min(backoff, a.cfg.WriterWait-time.Since(since)+time.Millisecond))
		select {
		case <-ctx.Done():
			t.Stop()
			return err
		case <-t.C:
		}
		backoff = min(2*backoff, 5*time.Second)
	}
}

// checkForeignTrial handles a trial boot whose job is not in self test any more (canceled,
// removed, or never reported ready): the platform must not stay on an unconfirmed image, so
// it is rejected (state_mismatch) and rolled back.
func (a *Agent) checkForeignTrial(ctx context.Context) {
	var st *otav1.DeviceState
	if err := a.call(ctx, "state", func(ctx context.Context) (err error) { st, err = a.writer.State(ctx); return err }); err != nil {
		a.log.Warn("writer state unavailable at start", "error", err)
		return
	}
	if st.GetImageState() != otav1.ImageState_IMAGE_STATE_TRIAL {
		return
	}
	jobID := st.GetLastUpdate().GetJobId()
	ex, err := a.jobs.Describe(ctx, jobID)
	var te *jobs.TerminalError
	switch {
	case err == nil && ex.Status == jobs.StatusInProgress:
		return // runJob decides when the job is announced (self test, or state_mismatch)
	case err != nil && !errors.As(err, &te) && !errors.Is(err, jobs.ErrNotFound):
		a.log.Warn("cannot describe the trial's job; deciding when it is announced", "job_id", jobID, "error", err)
		return
	}
	a.log.Warn("trial boot for a job that is gone: rolling back", "job_id", jobID)
	rr, err := a.writer.Reject(ctx, jobID, otav1.Reason_REASON_STATE_MISMATCH)
	if err != nil {
		a.log.Error("reject failed", "error", err)
		return
	}
	a.markHandled(jobID, "*")
	if rr.GetRebootRequired() {
		if err := a.writer.Reboot(ctx); err != nil {
			a.log.Error("reboot after reject failed", "error", err)
		}
	}
}

// reconcile aborts the writer's sessions whose job is no longer the device's job: gone in
// the cloud (canceled, removed, timed out, or ended) as DescribeJobExecution says. Such a
// session is an orphan (the job was canceled while ota-net was down, or while the writer was
// away so the abort did not reach it) and would keep its target busy for every later job.
// current is the job the agent runs now ("" for none). A session of the current job is
// resumed by the job, never aborted here; a session of a job still open in the cloud
// (queued, in progress, in self test) is left alone, and so is an activated one. Only the
// cloud's answer about the session's own job decides, never the absence of that job from a
// "next job" answer, which can be stale (asked before the job was created, answered after).
// st is the writer's state when the caller has it. When the writer or the cloud cannot
// answer, nothing is aborted and reconciliation runs again when the agent is idle.
func (a *Agent) reconcile(ctx context.Context, current string, st *otav1.DeviceState) {
	a.reconcileAgain.Store(false)
	if st == nil {
		if err := a.call(ctx, "state", func(ctx context.Context) (err error) { st, err = a.writer.State(ctx); return err }); err != nil {
			if ctx.Err() == nil {
				a.log.Warn("reconcile: writer state unavailable", "error", err)
				a.reconcileAgain.Store(true)
			}
			return
		}
	}
	var todo []*otav1.SessionInfo
	for _, s := range st.GetSessions() {
		if s.GetJobId() != current && s.GetState() != otav1.SessionState_SESSION_STATE_ACTIVATED {
			todo = append(todo, s)
		}
	}
	if len(todo) == 0 {
		return
	}
	gone := map[string]bool{}
	for _, s := range todo {
		jobID := s.GetJobId()
		log := a.log.With("job_id", jobID, "target", s.GetTarget(), "session", s.GetSessionId())
		if jobID == current {
			log.Info("reconcile: session of the current job is kept for resuming")
			continue
		}
		isGone, known := gone[jobID]
		if !known {
			ex, err := a.jobs.Describe(ctx, jobID)
			var te *jobs.TerminalError
			switch {
			case errors.As(err, &te), errors.Is(err, jobs.ErrNotFound):
				isGone = true
			case err == nil:
				isGone = jobs.Terminal(ex.Status)
			default:
				if ctx.Err() != nil {
					return
				}
				log.Warn("reconcile: cannot tell whether the session's job is gone; kept", "error", err)
				a.reconcileAgain.Store(true)
				continue
			}
			gone[jobID] = isGone
		}
		if !isGone {
			log.Info("reconcile: the session's job is still open in the cloud; kept")
			continue
		}
		log.Warn("reconcile: the session's job is gone in the cloud: aborting the orphaned session",
			"durable_blocks", s.GetDurableBlocks(), "total_blocks", s.GetTotalBlocks())
		err := a.writer.Abort(ctx, s.GetSessionId(), otav1.Reason_REASON_USER_ABORT)
		switch {
		case err == nil, status.IsClass(err, status.ClassGone): // gone already
		case status.IsClass(err, status.ClassUnavailable):
			log.Warn("reconcile: writer unavailable; aborting later", "error", err)
			a.reconcileAgain.Store(true)
		default:
			log.Error("reconcile: abort failed", "error", err)
		}
	}
}
