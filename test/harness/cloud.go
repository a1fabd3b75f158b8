package harness

import (
	"context"
	"fmt"
	"strconv"
	"strings"
	"sync"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
)

// Recorder keeps the emulator's status changes in order and lets callers wait for one.
type Recorder struct {
	mu      sync.Mutex
	events  []emulator.UpdateEvent
	changed chan struct{} // closed and replaced on every event
	hooks   []func(emulator.UpdateEvent)
}

// NewRecorder returns an empty recorder; pass its Add as emulator.Options.OnUpdate.
func NewRecorder() *Recorder { return &Recorder{changed: make(chan struct{})} }

// Add records an event (emulator.Options.OnUpdate). The OnEvent hooks run first, so a Wait
// that returns an event returns after the hooks saw it.
func (r *Recorder) Add(ev emulator.UpdateEvent) {
	r.mu.Lock()
	hooks := r.hooks
	r.mu.Unlock()
	for _, h := range hooks {
		h(ev)
	}
	r.mu.Lock()
	r.events = append(r.events, ev)
	close(r.changed)
	r.changed = make(chan struct{})
	r.mu.Unlock()
}

// OnEvent calls fn for every later event, in order, on the emulator's goroutine.
func (r *Recorder) OnEvent(fn func(emulator.UpdateEvent)) {
	r.mu.Lock()
	r.hooks = append(r.hooks, fn)
	r.mu.Unlock()
}

// Events returns the events so far.
func (r *Recorder) Events() []emulator.UpdateEvent {
	r.mu.Lock()
	defer r.mu.Unlock()
	return append([]emulator.UpdateEvent(nil), r.events...)
}

// Wait returns the first event (from the start of the record) of jobID that match accepts.
func (r *Recorder) Wait(ctx context.Context, jobID string, match func(emulator.UpdateEvent) bool) (emulator.UpdateEvent, error) {
	next := 0
	for {
		r.mu.Lock()
		evs, ch := r.events[next:], r.changed
		next = len(r.events)
		r.mu.Unlock()
		for _, ev := range evs {
			if ev.JobID == jobID && match(ev) {
				return ev, nil
			}
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return emulator.UpdateEvent{}, fmt.Errorf("waiting for an update of job %s: %w", jobID, context.Cause(ctx))
		}
	}
}

// Cloud is the emulator with a recorder attached.
type Cloud struct {
	*emulator.Emulator
	Rec *Recorder
}

// StartCloud starts an emulator (opts.OnUpdate is chained after the recorder).
func StartCloud(ctx context.Context, opts emulator.Options) (*Cloud, error) {
	rec := NewRecorder()
	user := opts.OnUpdate
	opts.OnUpdate = func(ev emulator.UpdateEvent) {
		rec.Add(ev)
		if user != nil {
			user(ev)
		}
	}
	em, err := emulator.Start(ctx, opts)
	if err != nil {
		return nil, err
	}
	return &Cloud{Emulator: em, Rec: rec}, nil
}

// WaitSelfTest waits for an update of jobID with this status and self_test value.
func (c *Cloud) WaitSelfTest(ctx context.Context, jobID, status, selfTest string) (emulator.UpdateEvent, error) {
	return c.Rec.Wait(ctx, jobID, func(ev emulator.UpdateEvent) bool {
		return ev.Status == status && ev.StatusDetails["self_test"] == selfTest
	})
}

// WaitProgress waits for a receiving update of jobID with at least min blocks received.
func (c *Cloud) WaitProgress(ctx context.Context, jobID string, min uint64) (emulator.UpdateEvent, error) {
	return c.Rec.Wait(ctx, jobID, func(ev emulator.UpdateEvent) bool {
		got, _, ok := ParseProgress(ev.StatusDetails["progress"])
		return ok && ev.Status == backend.StatusInProgress && got >= min
	})
}

// Step is the part of a status update that tests compare exactly.
type Step struct {
	Status    string
	SelfTest  string
	Reason    string
	ErrorCode string
}

func (s Step) String() string {
	out := s.Status
	if s.SelfTest != "" {
		out += " " + s.SelfTest
	}
	if s.Reason != "" || s.ErrorCode != "" {
		out += " " + s.Reason + "/" + s.ErrorCode
	}
	return out
}

// StepOf extracts the compared fields of an update.
func StepOf(u backend.Update) Step {
	return Step{Status: u.Status, SelfTest: u.StatusDetails["self_test"], Reason: u.StatusDetails["reason"], ErrorCode: u.StatusDetails["error_code"]}
}

// Steps maps updates to steps, folding consecutive equal steps into one (progress updates of
// one phase differ only in their rate-limited progress values).
func Steps(us []backend.Update) []Step {
	var out []Step
	for _, u := range us {
		s := StepOf(u)
		if len(out) > 0 && out[len(out)-1] == s {
			continue
		}
		out = append(out, s)
	}
	return out
}

// ParseProgress reads "received/total".
func ParseProgress(s string) (received, total uint64, ok bool) {
	a, b, found := strings.Cut(s, "/")
	if !found {
		return 0, 0, false
	}
	r, err1 := strconv.ParseUint(a, 10, 64)
	t, err2 := strconv.ParseUint(b, 10, 64)
	if err1 != nil || err2 != nil || t == 0 || r > t {
		return 0, 0, false
	}
	return r, t, true
}

// CheckProgress checks the progress values of the updates that carry one: the same total
// everywhere, never decreasing within a run of receiving updates unless allowed (a restart
// from durable state may report less than an earlier, not yet durable, count), and the last
// value. It returns the total.
func CheckProgress(us []backend.Update, allowDecrease bool) (total uint64, last uint64, err error) {
	var prev uint64
	seen := false
	for i, u := range us {
		p, ok := u.StatusDetails["progress"]
		if !ok {
			continue
		}
		r, t, valid := ParseProgress(p)
		if !valid {
			return 0, 0, fmt.Errorf("update %d: invalid progress %q", i, p)
		}
		if seen && t != total {
			return 0, 0, fmt.Errorf("update %d: progress total %d, earlier %d", i, t, total)
		}
		if seen && r < prev && !allowDecrease {
			return 0, 0, fmt.Errorf("update %d: progress went back from %d to %d", i, prev, r)
		}
		total, prev, last, seen = t, r, r, true
	}
	if !seen {
		return 0, 0, fmt.Errorf("no update carries progress")
	}
	return total, last, nil
}
