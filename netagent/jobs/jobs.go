// Package jobs is the AWS IoT Jobs client of ota-net over MQTT: it follows the next pending
// execution (notify-next, and $next/get on start and after every reconnection), describes
// executions, and updates them with client tokens, QoS 1, waiting for accepted/rejected,
// retrying with backoff on RequestThrottled/InternalError, and refusing to leave a terminal
// state.
//
// It subscribes to the response topics itself (ordinary brokers deliver only what is
// subscribed); AWS also delivers responses without a subscription, so a response can arrive
// twice: responses are matched by client token and duplicates are dropped.
package jobs

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	mrand "math/rand/v2"
	"strings"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/internal/crashpoint"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// MQTT is what the client needs from the connection (mqttconn.Conn provides it).
type MQTT interface {
	Publish(ctx context.Context, topic string, qos byte, payload []byte) error
	Subscribe(ctx context.Context, filter string, qos byte, h func(topic string, payload []byte)) (unsubscribe func(context.Context) error, err error)
	// OnConnect runs f after every (re)connection once subscriptions are renewed.
	OnConnect(f func(ctx context.Context)) (remove func())
}

// Execution statuses.
const (
	StatusQueued     = "QUEUED"
	StatusInProgress = "IN_PROGRESS"
	StatusSucceeded  = "SUCCEEDED"
	StatusFailed     = "FAILED"
	StatusRejected   = "REJECTED"
	StatusTimedOut   = "TIMED_OUT"
	StatusRemoved    = "REMOVED"
	StatusCanceled   = "CANCELED"
)

// Terminal reports whether status can never change again.
func Terminal(status string) bool {
	switch status {
	case StatusSucceeded, StatusFailed, StatusRejected, StatusTimedOut, StatusRemoved, StatusCanceled:
		return true
	}
	return false
}

// Rejection codes of the Jobs API.
const (
	CodeInvalidTopic           = "InvalidTopic"
	CodeInvalidJSON            = "InvalidJson"
	CodeInvalidRequest         = "InvalidRequest"
	CodeInvalidStateTransition = "InvalidStateTransition"
	CodeResourceNotFound       = "ResourceNotFound"
	CodeVersionMismatch        = "VersionMismatch"
	CodeInternalError          = "InternalError"
	CodeRequestThrottled       = "RequestThrottled"
	CodeTerminalStateReached   = "TerminalStateReached"
)

// Execution is a job execution as the Jobs API sends it.
type Execution struct {
	JobID           string            `json:"jobId"`
	ThingName       string            `json:"thingName,omitempty"`
	JobDocument     json.RawMessage   `json:"jobDocument,omitempty"`
	Status          string            `json:"status"`
	StatusDetails   map[string]string `json:"statusDetails,omitempty"`
	QueuedAt        int64             `json:"queuedAt,omitempty"`
	StartedAt       int64             `json:"startedAt,omitempty"`
	LastUpdatedAt   int64             `json:"lastUpdatedAt,omitempty"`
	VersionNumber   int64             `json:"versionNumber,omitempty"`
	ExecutionNumber int64             `json:"executionNumber,omitempty"`
}

// ExecutionState is the short state in update responses and rejections.
type ExecutionState struct {
	Status        string            `json:"status"`
	StatusDetails map[string]string `json:"statusDetails,omitempty"`
	VersionNumber int64             `json:"versionNumber,omitempty"`
}

// RejectedError is a /rejected response.
type RejectedError struct {
	Op             string
	JobID          string
	Code           string          `json:"code"`
	Message        string          `json:"message"`
	ExecutionState *ExecutionState `json:"executionState,omitempty"`
}

func (e *RejectedError) Error() string {
	return fmt.Sprintf("jobs %s %s rejected: %s: %s", e.Op, e.JobID, e.Code, e.Message)
}

// Retryable reports whether the rejection is worth retrying (throttling, internal error).
func (e *RejectedError) Retryable() bool {
	return e.Code == CodeRequestThrottled || e.Code == CodeInternalError
}

// Errors.
var (
	// ErrTerminal: the execution is in a terminal state; it cannot be updated any more.
	ErrTerminal = errors.New("job execution is in a terminal state")
	// ErrNotFound: the execution does not exist (removed, or never was).
	ErrNotFound = errors.New("job execution not found")
	// ErrNoResponse: no accepted/rejected within the response timeout, after all attempts.
	ErrNoResponse = errors.New("no response from the jobs service")
	ErrClosed     = errors.New("jobs client closed")
)

// TerminalError carries the status found when an update hit a terminal state.
type TerminalError struct {
	JobID  string
	Status string
}

func (e *TerminalError) Error() string {
	return fmt.Sprintf("job %s is %s (terminal)", e.JobID, e.Status)
}

func (e *TerminalError) Unwrap() error { return ErrTerminal }

// Options tune the client.
type Options struct {
	// ResponseTimeout bounds the wait for accepted/rejected per attempt (default 15 s).
	ResponseTimeout time.Duration
	// Attempts per request (default 8).
	Attempts int
	// BackoffMin/BackoffMax bound the exponential retry backoff with jitter
	// (defaults 500 ms and 30 s).
	BackoffMin, BackoffMax time.Duration
	Logger                 hclog.Logger
}

// Client is a Jobs client for one thing.
type Client struct {
	mq     MQTT
	thing  string
	prefix string
	opts   Options
	log    hclog.Logger

	next chan *Execution // latest next execution (nil: none pending); capacity 1, replaced

	mu       sync.Mutex
	pending  map[string]chan response
	known    map[string]string // jobId -> last status seen
	unsubs   []func(context.Context) error
	removeUp func()
	closed   bool
}

type response struct {
	accepted bool
	payload  []byte
}

// New makes a client for thing. Call Start to subscribe.
func New(mq MQTT, thing string, opts Options) (*Client, error) {
	if thing == "" || len(thing) > 128 || strings.ContainsFunc(thing, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == ':' || r == '_' || r == '-')
	}) {
		return nil, fmt.Errorf("invalid thing name %q", thing)
	}
	if opts.ResponseTimeout <= 0 {
		opts.ResponseTimeout = 15 * time.Second
	}
	if opts.Attempts <= 0 {
		opts.Attempts = 8
	}
	if opts.BackoffMin <= 0 {
		opts.BackoffMin = 500 * time.Millisecond
	}
	if opts.BackoffMax < opts.BackoffMin {
		opts.BackoffMax = max(30*time.Second, opts.BackoffMin)
	}
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	return &Client{
		mq:      mq,
		thing:   thing,
		prefix:  "$aws/things/" + thing + "/jobs/",
		opts:    opts,
		log:     opts.Logger,
		next:    make(chan *Execution, 1),
		pending: map[string]chan response{},
		known:   map[string]string{},
	}, nil
}

// ValidJobID reports whether id is 1..64 of [a-zA-Z0-9_-] (AWS's rule; it keeps job ids from
// injecting topic levels).
func ValidJobID(id string) bool {
	if id == "" || len(id) > 64 {
		return false
	}
	return !strings.ContainsFunc(id, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == '_' || r == '-')
	})
}

// Start subscribes to notify-next and the get/update responses and asks $next/get now and
// after every reconnection.
func (c *Client) Start(ctx context.Context) error {
	filters := []string{c.prefix + "notify-next", c.prefix + "+/get/+", c.prefix + "+/update/+"}
	for _, f := range filters {
		un, err := c.mq.Subscribe(ctx, f, 1, c.handle)
		if err != nil {
			c.stopSubs(ctx)
			return fmt.Errorf("jobs subscribe %s: %w", f, err)
		}
		c.mu.Lock()
		c.unsubs = append(c.unsubs, un)
		c.mu.Unlock()
	}
	remove := c.mq.OnConnect(func(ctx context.Context) {
		if err := c.AskNext(ctx); err != nil {
			c.log.Warn("$next/get after reconnect failed", "error", err)
		}
	})
	c.mu.Lock()
	c.removeUp = remove
	c.mu.Unlock()
	return c.AskNext(ctx)
}

func (c *Client) stopSubs(ctx context.Context) {
	c.mu.Lock()
	unsubs := c.unsubs
	c.unsubs = nil
	c.mu.Unlock()
	for _, un := range unsubs {
		_ = un(ctx)
	}
}

// Close unsubscribes; pending requests fail with ErrClosed.
func (c *Client) Close(ctx context.Context) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	if c.removeUp != nil {
		c.removeUp()
	}
	c.mu.Unlock()
	c.stopSubs(ctx)
	return nil
}

// Next delivers the next pending execution whenever it is (re)announced: from notify-next and
// from $next/get responses. nil means nothing is pending. Only the latest value is kept, and
// the same execution can be announced more than once.
func (c *Client) Next() <-chan *Execution { return c.next }

// AskNext publishes $next/get (the answer arrives on Next).
func (c *Client) AskNext(ctx context.Context) error {
	body, _ := json.Marshal(map[string]any{"clientToken": token(), "includeJobDocument": true})
	return c.mq.Publish(ctx, c.prefix+"$next/get", 1, body)
}

func (c *Client) pushNext(e *Execution) {
	if e != nil {
		c.noteStatus(e.JobID, e.Status)
	}
	// Keep only the latest: the handler must never block the receive loop.
	for {
		select {
		case c.next <- e:
			return
		default:
		}
		select {
		case <-c.next:
		default:
		}
	}
}

func (c *Client) noteStatus(jobID, status string) {
	if jobID == "" || status == "" {
		return
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	if len(c.known) > 1024 {
		clear(c.known) // bounded: only a cache of what the service told us
	}
	c.known[jobID] = status
}

// KnownStatus is the last status the service reported for jobID ("" if unknown).
func (c *Client) KnownStatus(jobID string) string {
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.known[jobID]
}

type nextMsg struct {
	Execution   *Execution `json:"execution"`
	ClientToken string     `json:"clientToken"`
}

// handle runs on the MQTT receive goroutine: decode, route, never block.
func (c *Client) handle(topic string, payload []byte) {
	rest, ok := strings.CutPrefix(topic, c.prefix)
	if !ok {
		return
	}
	if rest == "notify-next" {
		var m nextMsg
		if err := json.Unmarshal(payload, &m); err != nil {
			c.log.Warn("bad notify-next", "error", err)
			return
		}
		if m.Execution != nil && !ValidJobID(m.Execution.JobID) {
			c.log.Warn("notify-next with invalid job id", "job_id", m.Execution.JobID)
			return
		}
		c.pushNext(m.Execution)
		return
	}
	parts := strings.Split(rest, "/")
	if len(parts) != 3 || (parts[1] != "get" && parts[1] != "update") || (parts[2] != "accepted" && parts[2] != "rejected") {
		return
	}
	jobID, op, result := parts[0], parts[1], parts[2]
	var tok struct {
		ClientToken    string          `json:"clientToken"`
		Execution      *Execution      `json:"execution"`
		ExecutionState *ExecutionState `json:"executionState"`
	}
	if err := json.Unmarshal(payload, &tok); err != nil {
		c.log.Warn("bad jobs response", "topic", topic, "error", err)
		return
	}
	if jobID == "$next" && op == "get" && result == "accepted" {
		if tok.Execution != nil && !ValidJobID(tok.Execution.JobID) {
			return
		}
		c.pushNext(tok.Execution)
	}
	if tok.Execution != nil {
		c.noteStatus(tok.Execution.JobID, tok.Execution.Status)
	} else if tok.ExecutionState != nil && jobID != "$next" {
		c.noteStatus(jobID, tok.ExecutionState.Status)
	}
	c.mu.Lock()
	ch := c.pending[tok.ClientToken]
	delete(c.pending, tok.ClientToken) // duplicates (AWS unsubscribed + subscribed) find nothing
	c.mu.Unlock()
	if ch != nil {
		ch <- response{accepted: result == "accepted", payload: payload}
	}
}

func token() string {
	var b [12]byte
	_, _ = rand.Read(b[:])
	return hex.EncodeToString(b[:])
}

// request publishes body (with a fresh clientToken) to topic and waits for the response.
func (c *Client) request(ctx context.Context, op, jobID string, body map[string]any) (response, error) {
	tok := token()
	body["clientToken"] = tok
	payload, err := json.Marshal(body)
	if err != nil {
		return response{}, err
	}
	ch := make(chan response, 1)
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return response{}, ErrClosed
	}
	c.pending[tok] = ch
	c.mu.Unlock()
	defer func() {
		c.mu.Lock()
		delete(c.pending, tok)
		c.mu.Unlock()
	}()
	rctx, cancel := context.WithTimeout(ctx, c.opts.ResponseTimeout)
	defer cancel()
	if err := c.mq.Publish(rctx, c.prefix+jobID+"/"+op, 1, payload); err != nil {
		if ctx.Err() != nil {
			return response{}, ctx.Err()
		}
		return response{}, fmt.Errorf("jobs %s %s: %w", op, jobID, err)
	}
	if op == "update" {
		crashpoint.Hit(crashpoint.NetReported)
	}
	select {
	case r := <-ch:
		return r, nil
	case <-rctx.Done():
		if ctx.Err() != nil {
			return response{}, ctx.Err()
		}
		return response{}, fmt.Errorf("jobs %s %s: %w", op, jobID, ErrNoResponse)
	}
}

func (c *Client) backoff(attempt int) time.Duration {
	d := c.opts.BackoffMin << min(attempt, 16)
	d = min(d, c.opts.BackoffMax)
	// Full jitter over the upper half keeps retries spread but bounded below.
	return d/2 + time.Duration(mrand.Int64N(int64(d/2)+1))
}

func sleep(ctx context.Context, d time.Duration) error {
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}

// do runs one request with retries on no response, throttling and internal errors.
func (c *Client) do(ctx context.Context, op, jobID string, body func() map[string]any) (response, error) {
	var last error
	for attempt := 0; attempt < c.opts.Attempts; attempt++ {
		if attempt > 0 {
			if err := sleep(ctx, c.backoff(attempt-1)); err != nil {
				return response{}, err
			}
		}
		r, err := c.request(ctx, op, jobID, body())
		if err != nil {
			if ctx.Err() != nil || errors.Is(err, ErrClosed) {
				return response{}, err
			}
			last = err
			c.log.Debug("jobs request failed; retrying", "op", op, "job_id", jobID, "error", err)
			continue
		}
		if r.accepted {
			return r, nil
		}
		rej := &RejectedError{Op: op, JobID: jobID}
		if err := json.Unmarshal(r.payload, rej); err != nil {
			rej.Code, rej.Message = CodeInternalError, "unparsable rejection"
		}
		if !rej.Retryable() {
			return r, rej
		}
		last = rej
		c.log.Debug("jobs request throttled; retrying", "op", op, "job_id", jobID, "code", rej.Code)
	}
	return response{}, last
}

// Describe returns the execution of jobID with its job document (DescribeJobExecution).
// A terminal execution is a *TerminalError (AWS answers TerminalStateReached); a missing one
// ErrNotFound.
func (c *Client) Describe(ctx context.Context, jobID string) (*Execution, error) {
	if !ValidJobID(jobID) && jobID != "$next" {
		return nil, fmt.Errorf("invalid job id %q", jobID)
	}
	r, err := c.do(ctx, "get", jobID, func() map[string]any {
		return map[string]any{"includeJobDocument": true}
	})
	var rej *RejectedError
	if errors.As(err, &rej) {
		switch rej.Code {
		case CodeResourceNotFound:
			return nil, fmt.Errorf("%w: %w", ErrNotFound, err)
		case CodeTerminalStateReached:
			// AWS does not describe terminal executions; say which state if it told us.
			status := "TERMINAL"
			if rej.ExecutionState != nil && Terminal(rej.ExecutionState.Status) {
				status = rej.ExecutionState.Status
			}
			return nil, &TerminalError{JobID: jobID, Status: status}
		}
	}
	if err != nil {
		return nil, err
	}
	var m nextMsg
	if err := json.Unmarshal(r.payload, &m); err != nil {
		return nil, fmt.Errorf("describe %s: %w", jobID, err)
	}
	if m.Execution == nil {
		return nil, fmt.Errorf("describe %s: %w", jobID, ErrNotFound)
	}
	return m.Execution, nil
}

// Update is an UpdateJobExecution request.
type Update struct {
	Status        string
	StatusDetails map[string]string
	// StepTimeoutInMinutes, when non-zero: 1..10080, or -1 to clear.
	StepTimeoutInMinutes int
}

// Update changes the execution's status. It refuses to leave a terminal state (ErrTerminal,
// as a *TerminalError), retries throttling and internal errors with backoff, and treats a
// repeated terminal update whose first attempt was lost as done. It returns the execution
// state the service reported. An update the service refused for good (a rejection that is
// not worth retrying, or throttling that outlasted every attempt) is a *status.Error with
// REASON_JOB_UPDATE_FAILED around the *RejectedError.
func (c *Client) Update(ctx context.Context, jobID string, u Update) (*ExecutionState, error) {
	if !ValidJobID(jobID) {
		return nil, fmt.Errorf("invalid job id %q", jobID)
	}
	switch u.Status {
	case StatusInProgress, StatusSucceeded, StatusFailed, StatusRejected:
	default:
		return nil, fmt.Errorf("a device cannot set status %q", u.Status)
	}
	if known := c.KnownStatus(jobID); Terminal(known) {
		if known == u.Status {
			return &ExecutionState{Status: known}, nil
		}
		return nil, &TerminalError{JobID: jobID, Status: known}
	}
	for mismatches := 0; ; mismatches++ {
		r, err := c.do(ctx, "update", jobID, func() map[string]any {
			b := map[string]any{"status": u.Status, "includeJobExecutionState": true}
			if len(u.StatusDetails) > 0 {
				b["statusDetails"] = u.StatusDetails
			}
			if u.StepTimeoutInMinutes != 0 {
				b["stepTimeoutInMinutes"] = u.StepTimeoutInMinutes
			}
			return b
		})
		if err == nil {
			var acc struct {
				ExecutionState *ExecutionState `json:"executionState"`
			}
			_ = json.Unmarshal(r.payload, &acc)
			st := acc.ExecutionState
			if st == nil {
				st = &ExecutionState{Status: u.Status}
			}
			c.noteStatus(jobID, st.Status)
			return st, nil
		}
		var rej *RejectedError
		if !errors.As(err, &rej) {
			return nil, err
		}
		switch rej.Code {
		case CodeTerminalStateReached, CodeInvalidStateTransition, CodeVersionMismatch:
			// Find out where the execution really is: maybe our own earlier attempt got
			// through (lost response), maybe the cloud canceled it.
			st := rej.ExecutionState
			if st == nil || st.Status == "" {
				ex, derr := c.Describe(ctx, jobID)
				var dte *TerminalError
				switch {
				case errors.As(derr, &dte):
					return nil, dte
				case derr != nil:
					return nil, fmt.Errorf("%w (describe: %v)", err, derr)
				}
				st = &ExecutionState{Status: ex.Status, StatusDetails: ex.StatusDetails, VersionNumber: ex.VersionNumber}
			}
			c.noteStatus(jobID, st.Status)
			if st.Status == u.Status && Terminal(st.Status) {
				return st, nil
			}
			if Terminal(st.Status) {
				return nil, &TerminalError{JobID: jobID, Status: st.Status}
			}
			if rej.Code == CodeVersionMismatch && mismatches < 3 {
				continue // our view was stale; the update carries no expectedVersion, so retry
			}
			return nil, refused(err)
		case CodeResourceNotFound:
			return nil, &TerminalError{JobID: jobID, Status: StatusRemoved}
		}
		return nil, refused(err)
	}
}

// refused types an update the service refused for good.
func refused(err error) error {
	return status.Errorf(otav1.Reason_REASON_JOB_UPDATE_FAILED, "%w", err)
}
