package harness

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"strings"
	"sync"
	"syscall"
	"time"
)

// Proc is one run of a command, its output appended to a log file shared by every run of the
// same program on a device (so a test failure shows the whole history, restarts included).
type Proc struct {
	Name string
	Args []string
	Pid  int

	cmd  *exec.Cmd
	done chan struct{}
	err  error // exit error, valid after done

	mu       sync.Mutex
	stopping bool // the harness is stopping it: the exit is expected
}

// startProc starts argv with its stdout and stderr appended to logPath (and copied to tee
// when not nil). onExit runs once the process has exited, with expected telling whether the
// harness asked for it.
func startProc(name string, argv []string, env []string, logPath string, tee io.Writer, onExit func(p *Proc, expected bool)) (*Proc, error) {
	logf, err := os.OpenFile(logPath, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return nil, err
	}
	fmt.Fprintf(logf, "=== %s start %s: %v\n", time.Now().Format(time.RFC3339Nano), name, argv)
	var out io.Writer = logf
	if tee != nil {
		out = io.MultiWriter(logf, tee)
	}
	cmd := exec.Command(argv[0], argv[1:]...)
	cmd.Env = append(withoutProxyEnv(os.Environ()), env...)
	cmd.Stdout, cmd.Stderr = out, out
	// Its own process group, so a kill reaches whatever it spawned (reboot/check commands).
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := cmd.Start(); err != nil {
		logf.Close()
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	p := &Proc{Name: name, Args: argv, Pid: cmd.Process.Pid, cmd: cmd, done: make(chan struct{})}
	go func() {
		p.err = cmd.Wait()
		fmt.Fprintf(logf, "=== %s exit %s: %v\n", time.Now().Format(time.RFC3339Nano), name, exitText(p.err))
		logf.Close()
		p.mu.Lock()
		expected := p.stopping
		p.mu.Unlock()
		close(p.done)
		if onExit != nil {
			onExit(p, expected)
		}
	}()
	return p, nil
}

func exitText(err error) string {
	if err == nil {
		return "exit status 0"
	}
	return err.Error()
}

// Done is closed when the process has exited.
func (p *Proc) Done() <-chan struct{} { return p.done }

// Err is the exit error once Done is closed (nil for exit status 0).
func (p *Proc) Err() error {
	select {
	case <-p.done:
		return p.err
	default:
		return errors.New("still running")
	}
}

// Running reports whether the process has not exited yet.
func (p *Proc) Running() bool {
	select {
	case <-p.done:
		return false
	default:
		return true
	}
}

// Signal sends sig to the process and marks its exit as expected.
func (p *Proc) Signal(sig syscall.Signal) error {
	p.mu.Lock()
	p.stopping = true
	p.mu.Unlock()
	if !p.Running() {
		return nil
	}
	if err := p.cmd.Process.Signal(sig); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return err
	}
	return nil
}

// Crash sends SIGKILL to the process group without waiting and without telling the harness:
// the exit counts as unexpected (a supervised device restarts the process).
func (p *Proc) Crash() error {
	if !p.Running() {
		return nil
	}
	if err := syscall.Kill(-p.Pid, syscall.SIGKILL); err != nil && !errors.Is(err, syscall.ESRCH) {
		return err
	}
	return nil
}

// Kill sends SIGKILL to the process group (a crash: nothing gets to clean up) and waits for
// the exit.
func (p *Proc) Kill(ctx context.Context) error {
	p.mu.Lock()
	p.stopping = true
	p.mu.Unlock()
	if p.Running() {
		_ = syscall.Kill(-p.Pid, syscall.SIGKILL)
	}
	return p.Wait(ctx)
}

// Stop sends SIGTERM and waits for the exit; if ctx ends first the group is killed.
func (p *Proc) Stop(ctx context.Context) error {
	if err := p.Signal(syscall.SIGTERM); err != nil {
		return err
	}
	if err := p.Wait(ctx); err != nil {
		_ = syscall.Kill(-p.Pid, syscall.SIGKILL)
		<-p.done
		return fmt.Errorf("%s did not stop on SIGTERM: %w", p.Name, err)
	}
	return nil
}

// Wait blocks until the process has exited or ctx ends.
func (p *Proc) Wait(ctx context.Context) error {
	select {
	case <-p.done:
		return nil
	case <-ctx.Done():
		return context.Cause(ctx)
	}
}

// withoutProxyEnv drops the web proxy variables of the machine running the tests: ota-net
// follows them, and a test that wants a proxy says so itself.
func withoutProxyEnv(env []string) []string {
	out := env[:0:0]
	for _, kv := range env {
		k, _, _ := strings.Cut(kv, "=")
		switch strings.ToUpper(k) {
		case "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY":
			continue
		}
		out = append(out, kv)
	}
	return out
}
