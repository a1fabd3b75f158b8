package proc

import (
	"context"
	"errors"
	"os"
	"strconv"
	"strings"
	"testing"
	"time"

	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// gone reports whether pid no longer runs (absent, or a zombie nobody reaped yet).
func gone(t *testing.T, pid int) bool {
	t.Helper()
	b, err := os.ReadFile("/proc/" + strconv.Itoa(pid) + "/stat")
	if err != nil {
		return true
	}
	s := string(b)
	i := strings.LastIndexByte(s, ')')
	return i >= 0 && len(s) > i+2 && (s[i+2] == 'Z' || s[i+2] == 'X')
}

func pids(t *testing.T, out []byte) []int {
	t.Helper()
	var ps []int
	for _, f := range strings.Fields(string(out)) {
		p, err := strconv.Atoi(f)
		if err != nil {
			t.Fatalf("output %q: %v", out, err)
		}
		ps = append(ps, p)
	}
	return ps
}

func TestRun(t *testing.T) {
	tests := []struct {
		name       string
		argv       []string
		opt        Options
		wantOut    string
		wantErr    bool
		wantKilled bool
		wantTrunc  bool
	}{
		{name: "ok", argv: []string{"sh", "-c", "echo a=1; echo oops >&2"}, wantOut: "a=1\n"},
		{name: "combined", argv: []string{"sh", "-c", "echo one; echo two >&2"}, opt: Options{Combined: true}, wantOut: "one\ntwo\n"},
		{name: "exit 1", argv: []string{"sh", "-c", "echo partial; exit 1"}, wantOut: "partial\n", wantErr: true},
		{name: "missing binary", argv: []string{"/nonexistent/tool"}, wantErr: true},
		{name: "empty argv", argv: nil, wantErr: true},
		{name: "head cap", argv: []string{"sh", "-c", "printf 0123456789"}, opt: Options{MaxOutput: 4}, wantOut: "0123", wantTrunc: true},
		{name: "tail cap", argv: []string{"sh", "-c", "i=0; while [ $i -lt 500 ]; do echo line$i; i=$((i+1)); done"}, opt: Options{MaxOutput: 16, Tail: true}, wantOut: "line498\nline499\n", wantTrunc: true},
		{name: "timeout", argv: []string{"sleep", "300"}, opt: Options{Timeout: 100 * time.Millisecond}, wantErr: true, wantKilled: true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			r := Run(context.Background(), tt.argv, tt.opt)
			if got := string(r.Stdout); got != tt.wantOut {
				t.Errorf("stdout %q, want %q", got, tt.wantOut)
			}
			if (r.Err != nil) != tt.wantErr || r.Killed != tt.wantKilled || r.Truncated != tt.wantTrunc {
				t.Errorf("err=%v killed=%t truncated=%t, want err=%t killed=%t truncated=%t", r.Err, r.Killed, r.Truncated, tt.wantErr, tt.wantKilled, tt.wantTrunc)
			}
		})
	}
}

// A timed-out command and everything it started are killed, not just the leader.
// The timeout must hit after the shell printed both pids, which a loaded machine does not
// promise within any fixed time: start at 100 ms and double, up to 12.8 s, while it did not.
func TestTimeoutKillsProcessGroup(t *testing.T) {
	var r Result
	for limit := 100 * time.Millisecond; ; limit *= 2 {
		r = Run(context.Background(), []string{"sh", "-c", "sleep 300 & echo $!; echo $$; wait"}, Options{Timeout: limit})
		if !r.Killed || !errors.Is(r.Err, context.DeadlineExceeded) {
			t.Fatalf("killed=%t err=%v, want killed by the deadline", r.Killed, r.Err)
		}
		if len(strings.Fields(string(r.Stdout))) == 2 || limit >= 12800*time.Millisecond {
			break
		}
		t.Logf("killed at %v before it printed both pids (%q); again with a longer timeout", limit, r.Stdout)
	}
	ps := pids(t, r.Stdout)
	if len(ps) != 2 {
		t.Fatalf("want two pids, got %q", r.Stdout)
	}
	for _, p := range ps {
		if !gone(t, p) {
			t.Errorf("pid %d still running after the timeout", p)
		}
	}
}

// A command that exits leaving a background child holding its stdout returns at once (the
// child dies with the group) instead of waiting for the pipe.
func TestLeftoverChildrenKilled(t *testing.T) {
	r := Run(context.Background(), []string{"sh", "-c", "sleep 300 & echo $!"}, Options{WaitDelay: time.Minute})
	if r.Err != nil || r.Killed {
		t.Fatalf("err=%v killed=%t", r.Err, r.Killed)
	}
	for _, p := range pids(t, r.Stdout) {
		if !gone(t, p) {
			t.Errorf("background pid %d outlived the command", p)
		}
	}
}

func TestCallerCancel(t *testing.T) {
	ctx, cancel := context.WithCancel(context.Background())
	cancel()
	r := Run(ctx, []string{"sleep", "300"}, Options{})
	if !r.Killed || !errors.Is(r.Err, context.Canceled) {
		t.Fatalf("killed=%t err=%v", r.Killed, r.Err)
	}
	ctx, cancel = context.WithCancel(context.Background())
	done := make(chan Result)
	go func() { done <- Run(ctx, []string{"sh", "-c", "echo $$; exec sleep 300"}, Options{}) }()
	cancel()
	r = <-done
	if !r.Killed || !errors.Is(r.Err, context.Canceled) {
		t.Fatalf("killed=%t err=%v", r.Killed, r.Err)
	}
}

func TestCapBuf(t *testing.T) {
	tests := []struct {
		tail   bool
		writes []string
		want   string
	}{
		{false, []string{"ab", "cd", "ef"}, "abc"},
		{true, []string{"ab", "cd", "ef"}, "def"},
		{true, []string{"abcdefgh"}, "fgh"},
		{true, []string{"a", "b"}, "ab"},
	}
	for _, tt := range tests {
		c := &capBuf{max: 3, tail: tt.tail}
		for _, w := range tt.writes {
			if n, err := c.Write([]byte(w)); n != len(w) || err != nil {
				t.Fatalf("Write %q: %d, %v", w, n, err)
			}
		}
		if got, _ := c.bytes(); string(got) != tt.want {
			t.Errorf("tail=%t %q: got %q, want %q", tt.tail, tt.writes, got, tt.want)
		}
	}
}
