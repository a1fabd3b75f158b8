// Package proc runs the writer's configured helper commands, for both of their users: the
// status extension providers (writer/ext) and the self-test checks (writer/selftest). Internal
// to writer/: nothing outside the privileged writer runs them. A command runs under a
// deadline, in its own process group, with capped output, and with the whole group killed on
// timeout and after the command exits, so nothing it started outlives the call.
package proc

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// Options for Run.
type Options struct {
	// Timeout bounds the run (none when zero; the caller's ctx still applies).
	Timeout time.Duration
	// MaxOutput caps the bytes kept of each stream (default 4096). The command is never
	// blocked by the cap: the excess is read and dropped.
	MaxOutput int
	// Tail keeps the last MaxOutput bytes instead of the first.
	Tail bool
	// Combined sends stderr into Stdout (interleaved as written).
	Combined bool
	// WaitDelay bounds the wait for output pipes held open by a descendant that left the
	// process group (default 1s).
	WaitDelay time.Duration
}

// Result of a run. Err is nil only when the command exited 0 in time.
type Result struct {
	Stdout, Stderr []byte
	// Truncated: Stdout had more than MaxOutput bytes; StderrTruncated likewise.
	Truncated, StderrTruncated bool
	// Killed: the deadline or the caller's ctx ended the run; Err wraps ctx's error.
	Killed   bool
	Duration time.Duration
	Err      error
}

// Run starts argv and waits for it. See the package comment.
func Run(ctx context.Context, argv []string, o Options) Result {
	start := time.Now()
	if len(argv) == 0 || argv[0] == "" {
		return Result{Err: errors.New("empty command")}
	}
	if o.MaxOutput <= 0 {
		o.MaxOutput = 4096
	}
	if o.WaitDelay <= 0 {
		o.WaitDelay = time.Second
	}
	if o.Timeout > 0 {
		var cancel context.CancelFunc
		ctx, cancel = context.WithTimeout(ctx, o.Timeout)
		defer cancel()
	}
	if err := ctx.Err(); err != nil {
		return Result{Killed: true, Err: fmt.Errorf("not started: %w", err)}
	}

	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	stdout := &capBuf{max: o.MaxOutput, tail: o.Tail}
	stderr := stdout
	if !o.Combined {
		stderr = &capBuf{max: o.MaxOutput, tail: o.Tail}
	}
	cmd.Stdout, cmd.Stderr = stdout, stderr
	cmd.WaitDelay = o.WaitDelay
	if err := cmd.Start(); err != nil {
		return Result{Duration: time.Since(start), Err: err}
	}
	pid := cmd.Process.Pid

	exited := make(chan struct{})
	go func() {
		defer close(exited)
		waitNoReap(pid)
	}()
	killed := false
	select {
	case <-exited:
	case <-ctx.Done():
		killed = true
		killGroup(pid)
		<-exited
	}
	// The leader has exited but is not reaped yet, so its pid (the group id) cannot be reused:
	// killing the group now reaches only what the command left behind, and waiting for those
	// members means nothing of the command runs once Run returns.
	killGroup(pid)
	waitGroupGone(pid, o.WaitDelay)
	err := cmd.Wait()

	r := Result{Killed: killed, Duration: time.Since(start)}
	r.Stdout, r.Truncated = stdout.bytes()
	if !o.Combined {
		r.Stderr, r.StderrTruncated = stderr.bytes()
	}
	switch {
	case killed:
		r.Err = fmt.Errorf("killed after %v: %w", r.Duration.Round(time.Millisecond), context.Cause(ctx))
	case err != nil:
		r.Err = err
	}
	return r
}

// waitNoReap blocks until pid has exited, leaving it a zombie for cmd.Wait to reap.
func waitNoReap(pid int) {
	for {
		var info unix.Siginfo
		err := unix.Waitid(unix.P_PID, pid, &info, unix.WEXITED|unix.WNOWAIT, nil)
		if err != unix.EINTR {
			return
		}
	}
}

func killGroup(pid int) { _ = syscall.Kill(-pid, syscall.SIGKILL) }

// waitGroupGone waits, up to limit, until every member of process group pgid other than its
// (zombie) leader has exited. The members are not our children, so they are found in /proc
// and waited for through pidfds, which become readable when the process exits.
func waitGroupGone(pgid int, limit time.Duration) {
	var fds []unix.PollFd
	defer func() {
		for _, p := range fds {
			unix.Close(int(p.Fd))
		}
	}()
	for _, pid := range groupMembers(pgid) {
		if pid == pgid {
			continue
		}
		fd, err := unix.PidfdOpen(pid, 0)
		if err != nil {
			continue // already gone
		}
		fds = append(fds, unix.PollFd{Fd: int32(fd), Events: unix.POLLIN})
	}
	deadline := time.Now().Add(limit)
	for len(fds) > 0 {
		left := time.Until(deadline)
		if left <= 0 {
			return
		}
		n, err := unix.Poll(fds, int(left.Milliseconds())+1)
		if err == unix.EINTR {
			continue
		}
		if err != nil || n == 0 {
			return
		}
		rest := fds[:0]
		for _, p := range fds {
			if p.Revents != 0 {
				unix.Close(int(p.Fd))
				continue
			}
			rest = append(rest, p)
		}
		fds = rest
	}
}

// groupMembers lists the pids in process group pgid (from /proc/<pid>/stat, field 5).
func groupMembers(pgid int) []int {
	ents, err := os.ReadDir("/proc")
	if err != nil {
		return nil
	}
	var pids []int
	for _, e := range ents {
		pid, err := strconv.Atoi(e.Name())
		if err != nil {
			continue
		}
		b, err := os.ReadFile("/proc/" + e.Name() + "/stat")
		if err != nil {
			continue
		}
		// "pid (comm) state ppid pgrp ...": comm may hold spaces and parentheses.
		s := string(b)
		i := strings.LastIndexByte(s, ')')
		if i < 0 {
			continue
		}
		f := strings.Fields(s[i+1:])
		if len(f) >= 3 && f[2] == strconv.Itoa(pgid) {
			pids = append(pids, pid)
		}
	}
	return pids
}

// capBuf keeps the first (or last) max bytes written and counts the rest.
type capBuf struct {
	mu    sync.Mutex
	max   int
	tail  bool
	buf   []byte
	total int
}

func (c *capBuf) Write(p []byte) (int, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	c.total += len(p)
	if !c.tail {
		if room := c.max - len(c.buf); room > 0 {
			c.buf = append(c.buf, p[:min(room, len(p))]...)
		}
		return len(p), nil
	}
	if len(p) >= c.max {
		c.buf = append(c.buf[:0], p[len(p)-c.max:]...)
		return len(p), nil
	}
	if over := len(c.buf) + len(p) - c.max; over > 0 {
		c.buf = append(c.buf[:0], c.buf[over:]...)
	}
	c.buf = append(c.buf, p...)
	return len(p), nil
}

func (c *capBuf) bytes() ([]byte, bool) {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]byte(nil), c.buf...), c.total > len(c.buf)
}
