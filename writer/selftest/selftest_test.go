package selftest

import (
	"context"
	"errors"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/go-hclog"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/testing/protocmp"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func sh(name, script string, timeout time.Duration) Check {
	return Check{Name: name, Argv: []string{"sh", "-c", script}, Timeout: timeout}
}

func res(name string, passed bool, detail string) *otav1.CheckResult {
	return &otav1.CheckResult{Name: name, Passed: passed, Detail: detail}
}

const (
	failed  = otav1.Reason_REASON_SELF_TEST_FAILED
	timeout = otav1.Reason_REASON_SELF_TEST_TIMEOUT
)

func TestRun(t *testing.T) {
	long := strings.Repeat("x", 400)
	tests := []struct {
		name    string
		checks  []Check
		overall time.Duration
		want    *otav1.SelfTestResponse
	}{
		{"no checks pass", nil, 0, &otav1.SelfTestResponse{Passed: true}},
		{"all pass", []Check{
			sh("net", "echo probing; echo gateway reachable", 0),
			{Name: "true", Argv: []string{"true"}},
		}, time.Minute, &otav1.SelfTestResponse{Passed: true, Checks: []*otav1.CheckResult{
			res("net", true, "gateway reachable"), res("true", true, ""),
		}}},
		{"one fails, later checks still run", []Check{
			sh("disk", "echo checking; echo 'disk /data: read-only' >&2; exit 1", 0),
			sh("app", "echo app up", 0),
			sh("silent", "exit 7", 0),
		}, 0, &otav1.SelfTestResponse{Reason: failed, Checks: []*otav1.CheckResult{
			res("disk", false, "disk /data: read-only"), res("app", true, "app up"), res("silent", false, "exit status 7"),
		}}},
		{"missing binary fails", []Check{{Name: "gone", Argv: []string{"/nonexistent/check"}}},
			0, &otav1.SelfTestResponse{Reason: failed, Checks: []*otav1.CheckResult{
				res("gone", false, "fork/exec /nonexistent/check: no such file or directory"),
			}}},
		{"first failure's reason wins", []Check{
			sh("fails", "exit 1", 0),
			sh("hang", "exec sleep 300", 100*time.Millisecond),
		}, 0, &otav1.SelfTestResponse{Reason: failed, Checks: []*otav1.CheckResult{
			res("fails", false, "exit status 1"), res("hang", false, "timed out after 100ms"),
		}}},
		{"overall deadline", []Check{
			sh("slow", "exec sleep 300", time.Hour),
			sh("never", "echo ran", 0),
		}, 200 * time.Millisecond, &otav1.SelfTestResponse{Reason: timeout, Checks: []*otav1.CheckResult{
			res("slow", false, "killed at the overall self-test deadline of 200ms"),
			res("never", false, "not run: overall self-test deadline of 200ms passed"),
		}}},
		{"detail cleaned and truncated", []Check{
			sh("noisy", "printf 'first\\nbad\\033[31m colour\\t\\001end\\n\\n  \\n'", 0),
			sh("long", "echo "+long, 0),
		}, 0, &otav1.SelfTestResponse{Passed: true, Checks: []*otav1.CheckResult{
			res("noisy", true, "bad [31m colour  end"), res("long", true, strings.Repeat("x", MaxDetail-1)+"…"),
		}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := New(tt.checks, tt.overall, hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Warn}))
			got, err := r.Run(context.Background())
			if err != nil {
				t.Fatal(err)
			}
			if d := cmp.Diff(tt.want, got, protocmp.Transform(), protocmp.IgnoreFields(&otav1.CheckResult{}, "duration_ms")); d != "" {
				t.Errorf("(-want +got):\n%s", d)
			}
		})
	}
}

// running reports whether pid still runs (a zombie awaiting its reaper does not count).
func running(pid int) bool {
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return false
	}
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	return len(f) > 0 && f[0] != "Z" && f[0] != "X"
}

// A per-check timeout must end a check only after its shell got going, which a loaded
// machine does not promise within any fixed time. longerTimeouts yields 100 ms, 200 ms, ...
// up to 12.8 s: a test starts over with the next one while its check was killed too early.
func longerTimeouts(yield func(time.Duration) bool) {
	for d := 100 * time.Millisecond; d <= 12800*time.Millisecond; d *= 2 {
		if !yield(d) {
			return
		}
	}
}

// A check killed by its own timeout keeps its last line of output, and later checks run.
func TestPerCheckTimeout(t *testing.T) {
	for limit := range longerTimeouts {
		r := New([]Check{
			sh("hang", "echo waiting for service; exec sleep 300", limit),
			sh("after", "echo fine", 0),
		}, 0, hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Warn}))
		got, err := r.Run(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		killed := "timed out after " + limit.String()
		if len(got.GetChecks()) > 0 && got.Checks[0].Detail == killed && limit < 12800*time.Millisecond {
			t.Logf("killed at %v before its first line of output; again with a longer timeout", limit)
			continue
		}
		want := &otav1.SelfTestResponse{Reason: timeout, Checks: []*otav1.CheckResult{
			res("hang", false, killed+": waiting for service"), res("after", true, "fine"),
		}}
		if d := cmp.Diff(want, got, protocmp.Transform(), protocmp.IgnoreFields(&otav1.CheckResult{}, "duration_ms")); d != "" {
			t.Errorf("(-want +got):\n%s", d)
		}
		return
	}
}

// A check killed by its deadline is really gone, and so is what it started.
func TestTimedOutCheckIsKilled(t *testing.T) {
	for limit := range longerTimeouts {
		pids := filepath.Join(t.TempDir(), "pids")
		r := New([]Check{sh("hang", "sleep 300 & echo $! > "+pids+"; echo $$ >> "+pids+"; wait", limit)}, 0, nil)
		got, err := r.Run(context.Background())
		if err != nil {
			t.Fatal(err)
		}
		if got.Passed || got.Reason != timeout {
			t.Fatalf("passed=%t reason=%v, want a timeout", got.Passed, got.Reason)
		}
		b, err := os.ReadFile(pids)
		if err != nil && !errors.Is(err, os.ErrNotExist) {
			t.Fatal(err)
		}
		fields := strings.Fields(string(b))
		if len(fields) != 2 && limit < 12800*time.Millisecond {
			t.Logf("killed at %v before it wrote both pids (%q); again with a longer timeout", limit, b)
			continue
		}
		if len(fields) != 2 {
			t.Fatalf("pid file %q", b)
		}
		for _, f := range fields {
			pid, _ := strconv.Atoi(f)
			if running(pid) {
				t.Errorf("pid %d still running after the check timed out", pid)
			}
		}
		if got.Checks[0].DurationMs < uint64(limit.Milliseconds()) {
			t.Errorf("duration %d ms, want at least the %v timeout", got.Checks[0].DurationMs, limit)
		}
		return
	}
}

// The caller's deadline (the engine's self_test_timeout) ends the run like the overall one:
// a result with the checks so far, not an error.
func TestCallerDeadline(t *testing.T) {
	// The deadline passes once "slow" runs, so "ok" has finished whatever the machine's load.
	started := filepath.Join(t.TempDir(), "started")
	if err := syscall.Mkfifo(started, 0o600); err != nil {
		t.Fatal(err)
	}
	ctx := newDeadlineCtx()
	waited := make(chan struct{})
	go func() {
		defer close(waited)
		f, err := os.Open(started) // returns when "slow" opens it for writing
		if err != nil {
			t.Error(err)
		} else {
			f.Close()
		}
		ctx.expire()
	}()
	t.Cleanup(func() {
		// Unblock the open above if "slow" never started.
		if f, err := os.OpenFile(started, os.O_WRONLY|syscall.O_NONBLOCK, 0); err == nil {
			f.Close()
		}
		<-waited
	})
	r := New([]Check{sh("ok", "echo up", 0), sh("slow", ": > "+started+"; exec sleep 300", time.Hour), sh("never", "true", 0)}, time.Hour, nil)
	got, err := r.Run(ctx)
	if err != nil {
		t.Fatal(err)
	}
	want := &otav1.SelfTestResponse{Reason: timeout, Checks: []*otav1.CheckResult{
		res("ok", true, "up"),
		res("slow", false, "killed at the self-test deadline"),
		res("never", false, "not run: self-test deadline passed"),
	}}
	if d := cmp.Diff(want, got, protocmp.Transform(), protocmp.IgnoreFields(&otav1.CheckResult{}, "duration_ms")); d != "" {
		t.Errorf("(-want +got):\n%s", d)
	}
}

// deadlineCtx is a caller's context whose deadline passes when the test says so.
type deadlineCtx struct {
	context.Context
	done chan struct{}
	once sync.Once
}

func newDeadlineCtx() *deadlineCtx {
	return &deadlineCtx{Context: context.Background(), done: make(chan struct{})}
}

func (c *deadlineCtx) expire()                     { c.once.Do(func() { close(c.done) }) }
func (c *deadlineCtx) Deadline() (time.Time, bool) { return time.Time{}, false }
func (c *deadlineCtx) Done() <-chan struct{}       { return c.done }

func (c *deadlineCtx) Err() error {
	select {
	case <-c.done:
		return context.DeadlineExceeded
	default:
		return nil
	}
}

func TestCallerCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r := New([]Check{sh("x", "true", 0)}, 0, nil)
	if got, err := r.Run(ctx); got != nil || !errors.Is(err, context.Canceled) {
		t.Fatalf("Run on a canceled ctx: %v, %v", got, err)
	}
}
