// Package report turns the agent's view of an update into job execution updates: IN_PROGRESS
// receiving with progress (rate-limited), ready, active; SUCCEEDED accepted; FAILED (or
// REJECTED before the job started) with reason and error_code. Every update carries the
// writer's extension fields merged through status.Build, so it always fits AWS's limits.
package report

import (
	"context"
	"errors"
	"slices"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/netagent/jobs"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// Updater publishes job execution updates (jobs.Client provides it).
type Updater interface {
	Update(ctx context.Context, jobID string, u jobs.Update) (*jobs.ExecutionState, error)
}

// ExtensionsFunc returns the writer's status extension fields (writer GetExtensions) in the
// order they take the statusDetails budget. It may fail (writer away): the last good values
// are used then.
type ExtensionsFunc func(ctx context.Context) (status.Fields, error)

// Defaults.
const (
	DefaultInterval    = 5 * time.Second
	DefaultPercentStep = 5
	// extTimeout bounds the extension fetch so a slow provider never delays a report much.
	extTimeout = 2 * time.Second
)

// Config tunes a Reporter.
type Config struct {
	// Interval and PercentStep rate-limit progress: a progress update goes out only when both
	// at least Interval passed and progress moved by at least PercentStep percent since the
	// last one (whichever is rarer). Completion (received == total) needs only Interval.
	Interval    time.Duration
	PercentStep int
	Logger      hclog.Logger
	// OnTerminal is called (from the progress goroutine) when an update finds the job in a
	// terminal state (canceled, removed, timed out): the agent aborts the job.
	OnTerminal func(jobID, status string)
}

// Limiter decides when progress is worth reporting.
type Limiter struct {
	Interval    time.Duration
	PercentStep int

	sent    bool
	lastAt  time.Time
	lastPct int
}

// Allow reports whether progress received/total may be sent at now; if not, wait is how long
// until time alone would allow it (0 when waiting for more progress is what is needed).
func (l *Limiter) Allow(now time.Time, received, total uint64) (ok bool, wait time.Duration) {
	if total == 0 {
		return false, 0
	}
	pct := int(received * 100 / total)
	if !l.sent {
		return true, 0
	}
	if pct < l.lastPct+l.PercentStep && received < total {
		return false, 0
	}
	if d := l.lastAt.Add(l.Interval).Sub(now); d > 0 {
		return false, d
	}
	return true, 0
}

// Sent records that progress was reported at now.
func (l *Limiter) Sent(now time.Time, received, total uint64) {
	l.sent = true
	l.lastAt = now
	if total > 0 {
		l.lastPct = int(received * 100 / total)
	}
}

// Reporter reports for one job execution.
type Reporter struct {
	upd   Updater
	ext   ExtensionsFunc
	cfg   Config
	log   hclog.Logger
	jobID string

	extMu   sync.Mutex
	lastExt status.Fields

	mu       sync.Mutex
	fields   status.Fields
	summary  status.Fields
	received uint64
	total    uint64
	kick     chan struct{}
	stopProg context.CancelFunc
	progDone chan struct{}
}

// New returns a reporter for jobID.
func New(upd Updater, ext ExtensionsFunc, jobID string, cfg Config) *Reporter {
	if cfg.Interval <= 0 {
		cfg.Interval = DefaultInterval
	}
	if cfg.PercentStep <= 0 {
		cfg.PercentStep = DefaultPercentStep
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	return &Reporter{upd: upd, ext: ext, cfg: cfg, log: cfg.Logger.With("job_id", jobID), jobID: jobID, kick: make(chan struct{}, 1)}
}

func (r *Reporter) extensions(ctx context.Context) status.Fields {
	r.extMu.Lock()
	defer r.extMu.Unlock()
	if r.ext != nil {
		ectx, cancel := context.WithTimeout(ctx, extTimeout)
		m, err := r.ext(ectx)
		cancel()
		if err == nil {
			r.lastExt = slices.Clone(m)
		} else {
			r.log.Debug("writer extensions unavailable; using the last known", "error", err)
		}
	}
	return r.lastExt
}

// Details builds the statusDetails for b with the current extensions (status.Build: base
// keys, then b.Failure, then the extensions in the writer's order, within the budget).
func (r *Reporter) Details(ctx context.Context, b status.Base) map[string]string {
	return status.Build(b, r.extensions(ctx))
}

// SetFields sets pairs that every later update carries after the failure's own fields and
// before the writer's extensions (the protocol a file is downloaded with).
func (r *Reporter) SetFields(fs status.Fields) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.fields = slices.Clone(fs)
}

func (r *Reporter) send(ctx context.Context, st string, b status.Base) error {
	r.mu.Lock()
	b.Failure = append(slices.Clip(b.Failure), r.fields...)
	r.mu.Unlock()
	d := r.Details(ctx, b)
	_, err := r.upd.Update(ctx, r.jobID, jobs.Update{Status: st, StatusDetails: d})
	if err != nil {
		r.log.Warn("job update failed", "status", st, "self_test", b.SelfTest, "error", err)
		return err
	}
	r.log.Debug("job updated", "status", st, "details", d)
	return nil
}

// Start reports IN_PROGRESS receiving with 0/total (or received/total on a resume) at once and
// starts the rate-limited progress reporting. A job that is already terminal returns a
// *jobs.TerminalError.
func (r *Reporter) Start(ctx context.Context, received, total uint64) error {
	r.mu.Lock()
	r.received, r.total = received, total
	r.mu.Unlock()
	if err := r.send(ctx, jobs.StatusInProgress, status.Base{SelfTest: status.SelfTestReceiving, Received: received, Total: total}); err != nil {
		return err
	}
	lim := &Limiter{Interval: r.cfg.Interval, PercentStep: r.cfg.PercentStep}
	lim.Sent(time.Now(), received, total)
	pctx, cancel := context.WithCancel(ctx)
	done := make(chan struct{})
	r.mu.Lock()
	r.stopProg, r.progDone = cancel, done
	r.mu.Unlock()
	go func() {
		defer close(done)
		r.progressLoop(pctx, lim)
	}()
	return nil
}

// Progress records progress; it never blocks (safe in a downloader's OnProgress).
func (r *Reporter) Progress(received, total uint64) {
	r.mu.Lock()
	r.received, r.total = received, total
	r.mu.Unlock()
	select {
	case r.kick <- struct{}{}:
	default:
	}
}

func (r *Reporter) progressLoop(ctx context.Context, lim *Limiter) {
	var timer *time.Timer
	var timerC <-chan time.Time
	defer func() {
		if timer != nil {
			timer.Stop()
		}
	}()
	for {
		select {
		case <-ctx.Done():
			return
		case <-r.kick:
		case <-timerC:
			timerC = nil
		}
		r.mu.Lock()
		rec, tot := r.received, r.total
		r.mu.Unlock()
		now := time.Now()
		ok, wait := lim.Allow(now, rec, tot)
		if !ok {
			if wait > 0 && timerC == nil {
				if timer == nil {
					timer = time.NewTimer(wait)
				} else {
					timer.Reset(wait)
				}
				timerC = timer.C
			}
			continue
		}
		err := r.send(ctx, jobs.StatusInProgress, status.Base{SelfTest: status.SelfTestReceiving, Received: rec, Total: tot})
		var te *jobs.TerminalError
		if errors.As(err, &te) {
			if r.cfg.OnTerminal != nil {
				r.cfg.OnTerminal(r.jobID, te.Status)
			}
			return
		}
		if err == nil {
			lim.Sent(now, rec, tot)
		}
	}
}

// stopProgress ends progress reporting and waits for an update in flight, so nothing stale
// follows a final report.
func (r *Reporter) stopProgress() {
	r.mu.Lock()
	cancel, done := r.stopProg, r.progDone
	r.stopProg, r.progDone = nil, nil
	r.mu.Unlock()
	if cancel != nil {
		cancel()
		<-done
	}
}

// Close stops progress reporting.
func (r *Reporter) Close() { r.stopProgress() }

func (r *Reporter) progress() (uint64, uint64) {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.received, r.total
}

// SetSummary sets fields that the ready, active and succeeded reports carry right after the
// base keys, before the writer's extension fields (within the 10-pair budget): a delta update's
// "reused".
func (r *Reporter) SetSummary(f status.Fields) {
	r.mu.Lock()
	defer r.mu.Unlock()
	r.summary = slices.Clone(f)
}

func (r *Reporter) summaryFields() status.Fields {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.summary
}

// Ready reports IN_PROGRESS ready (file verified, about to activate).
func (r *Reporter) Ready(ctx context.Context) error {
	r.stopProgress()
	_, tot := r.progress()
	return r.send(ctx, jobs.StatusInProgress, status.Base{SelfTest: status.SelfTestReady, Received: tot, Total: tot, Failure: r.summaryFields()})
}

// Receiving reports IN_PROGRESS receiving now, without rate limit (next file of a job).
func (r *Reporter) Receiving(ctx context.Context, received, total uint64) error {
	r.stopProgress()
	return r.Start(ctx, received, total)
}

// Active reports IN_PROGRESS active (running the new image, self test under way).
func (r *Reporter) Active(ctx context.Context) error {
	r.stopProgress()
	return r.send(ctx, jobs.StatusInProgress, status.Base{SelfTest: status.SelfTestActive, Failure: r.summaryFields()})
}

// Succeeded reports SUCCEEDED accepted.
func (r *Reporter) Succeeded(ctx context.Context) error {
	r.stopProgress()
	return r.send(ctx, jobs.StatusSucceeded, status.Base{SelfTest: status.SelfTestAccepted, Failure: r.summaryFields()})
}

// Failed reports FAILED with err's reason. selfTest is status.SelfTestRejected when the new
// image was rejected in its trial, else aborted. Progress is included when known. The
// failure's own fields come right after the base keys, before any extension field: first
// failure (such as the writer's rollback reason), then err's metadata (the read-back sha256,
// the refused cert_name, the stream_error, ...). A nil err or an unspecified reason is
// reported as other.
func (r *Reporter) Failed(ctx context.Context, err *status.Error, selfTest string, failure ...status.Field) error {
	r.stopProgress()
	if selfTest == "" {
		selfTest = status.SelfTestAborted
	}
	rec, tot := r.progress()
	return r.send(ctx, jobs.StatusFailed, status.Base{SelfTest: selfTest, Received: rec, Total: tot, Reason: reasonOf(err), Failure: append(slices.Clip(failure), err.Fields()...)})
}

// Rejected reports REJECTED with err's reason and metadata: a job that cannot run at all,
// still QUEUED.
func (r *Reporter) Rejected(ctx context.Context, err *status.Error) error {
	r.stopProgress()
	return r.send(ctx, jobs.StatusRejected, status.Base{Reason: reasonOf(err), Failure: err.Fields()})
}

func reasonOf(err *status.Error) otav1.Reason {
	if err == nil || err.Reason == otav1.Reason_REASON_UNSPECIFIED {
		return otav1.Reason_REASON_OTHER
	}
	return err.Reason
}
