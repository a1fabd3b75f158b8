// Package selftest runs the configured health checks of a trial boot. The verdict decides
// whether the new slot is committed or rolled back, so every check is bounded: each runs in
// its own process group under its own timeout and the run as a whole under an overall
// deadline; whatever a check started is killed with it.
package selftest

import (
	"context"
	"errors"
	"fmt"
	"strconv"
	"strings"
	"time"
	"unicode/utf8"

	"github.com/hashicorp/go-hclog"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/internal/proc"
)

// DefaultCheckTimeout applies to a check configured without a timeout.
const DefaultCheckTimeout = time.Minute

// MaxDetail is the length, in characters, of the output line kept per check.
const MaxDetail = 256

// Check is one health check: a command that exits 0 when healthy. Its last output line
// (stdout and stderr together) is reported as the check's detail.
type Check struct {
	Name    string
	Argv    []string
	Timeout time.Duration // default DefaultCheckTimeout
}

// Runner runs the checks in order.
type Runner struct {
	checks  []Check
	overall time.Duration
	log     hclog.Logger
}

// New returns a runner. overall bounds the whole run (no bound when zero; each check's own
// timeout still applies).
//
// With no checks configured the self test passes: the trial boot reaching the writer at all
// is then the only health signal, as with the bootloader-only schemes of other agents. A
// deployment that wants a stricter policy configures at least one check.
func New(checks []Check, overall time.Duration, log hclog.Logger) *Runner {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	log = log.Named("selftest")
	cs := make([]Check, len(checks))
	for i, c := range checks {
		if c.Name == "" {
			c.Name = "check-" + strconv.Itoa(i)
		}
		if c.Timeout <= 0 {
			c.Timeout = DefaultCheckTimeout
		}
		cs[i] = c
	}
	return &Runner{checks: cs, overall: overall, log: log}
}

// Run runs every check in order and reports each one. The result passes only if all checks
// passed. Otherwise its reason is that of the first check that did not pass:
// REASON_SELF_TEST_TIMEOUT when it was killed by its timeout or by the deadline (the overall
// one, or ctx's; checks after it are reported as not run), REASON_SELF_TEST_FAILED when it
// exited non-zero or could not be started. A failing check does not stop the later ones, so
// the operator sees the whole picture. The error is non-nil only when ctx was canceled.
func (r *Runner) Run(ctx context.Context) (*otav1.SelfTestResponse, error) {
	runCtx := ctx
	if r.overall > 0 {
		var cancel context.CancelFunc
		runCtx, cancel = context.WithTimeoutCause(ctx, r.overall, errOverall)
		defer cancel()
	}
	resp := &otav1.SelfTestResponse{Passed: true}
	fail := func(reason otav1.Reason) {
		if resp.Passed {
			resp.Passed, resp.Reason = false, reason
		}
	}
	for _, c := range r.checks {
		if errors.Is(ctx.Err(), context.Canceled) {
			return nil, fmt.Errorf("self test interrupted: %w", ctx.Err())
		}
		if runCtx.Err() != nil {
			resp.Checks = append(resp.Checks, &otav1.CheckResult{Name: c.Name, Detail: "not run: " + r.deadlineText(runCtx) + " passed"})
			fail(otav1.Reason_REASON_SELF_TEST_TIMEOUT)
			r.log.Warn("self-test check not run: deadline passed", "check", c.Name)
			continue
		}
		res := proc.Run(runCtx, c.Argv, proc.Options{Timeout: c.Timeout, Combined: true, Tail: true, MaxOutput: 4096})
		if errors.Is(ctx.Err(), context.Canceled) {
			return nil, fmt.Errorf("self test interrupted during %s: %w", c.Name, ctx.Err())
		}
		var why string
		switch {
		case res.Killed && runCtx.Err() != nil:
			why = "killed at the " + r.deadlineText(runCtx)
		case res.Killed:
			why = "timed out after " + c.Timeout.String()
		case res.Err != nil:
			why = res.Err.Error()
		}
		cr := &otav1.CheckResult{
			Name:       c.Name,
			Passed:     res.Err == nil,
			Detail:     detail(lastLine(string(res.Stdout)), why),
			DurationMs: uint64(res.Duration.Milliseconds()),
		}
		resp.Checks = append(resp.Checks, cr)
		switch {
		case cr.Passed:
			r.log.Info("self-test check passed", "check", c.Name, "duration", res.Duration)
		case res.Killed:
			fail(otav1.Reason_REASON_SELF_TEST_TIMEOUT)
			r.log.Warn("self-test check timed out", "check", c.Name, "detail", cr.Detail, "duration", res.Duration)
		default:
			fail(otav1.Reason_REASON_SELF_TEST_FAILED)
			r.log.Warn("self-test check failed", "check", c.Name, "detail", cr.Detail, "error", res.Err)
		}
	}
	if resp.Passed {
		r.log.Info("self test passed", "checks", len(r.checks))
	} else {
		r.log.Warn("self test did not pass", "reason", status.Name(resp.Reason))
	}
	return resp, nil
}

// deadlineText names the deadline that ended runCtx.
func (r *Runner) deadlineText(runCtx context.Context) string {
	if errors.Is(context.Cause(runCtx), errOverall) {
		return "overall self-test deadline of " + r.overall.String()
	}
	return "self-test deadline"
}

var errOverall = errors.New("overall self-test deadline")

// detail is the check's last output line, prefixed with why it did not pass when it was
// stopped or could not run (an exit status alone adds nothing to a line of output).
func detail(line, why string) string {
	switch {
	case why == "":
		return truncate(line)
	case line == "":
		return truncate(why)
	case strings.HasPrefix(why, "exit status"):
		return truncate(line)
	default:
		return truncate(why + ": " + line)
	}
}

func lastLine(s string) string {
	lines := strings.Split(s, "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		if v, ok := status.CleanValue(lines[i]); ok {
			return v
		}
	}
	return ""
}

func truncate(s string) string {
	if utf8.RuneCountInString(s) <= MaxDetail {
		return s
	}
	return string([]rune(s)[:MaxDetail-1]) + "…"
}
