package systemdlive

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"time"

	"golang.org/x/sys/unix"
)

// nspawnRebootExit is systemd-nspawn's exit status when the container asked for a reboot;
// like systemd-nspawn@.service (RestartForceExitStatus=133), the supervisor boots it again
// on the same disk.
const nspawnRebootExit = 133

// container is a Debian root file system booted by systemd-nspawn with systemd as PID 1.
//
// Every option of the boot matters: without the unified cgroup hierarchy, CAP_BPF and the
// bpf system call, systemd inside cannot attach the BPF programs that enforce DeviceAllow=
// and IPAddressDeny=, and silently runs the services without them. --keep-unit and
// --register=no keep it off a host D-Bus and host systemd (CI has neither). The container
// joins a network namespace the test made (instead of --private-network), so the namespace
// and the emulator's sockets in it survive the container's reboots.
type container struct {
	Dir   string // root file system
	Name  string
	NetNS string // /run/netns/<name>
	Log   string // systemd-nspawn's output, all boots
	Binds []string
	// NoBPF boots without the unified hierarchy, CAP_BPF and the bpf system call: the
	// negative control for the settings systemd enforces with BPF programs.
	NoBPF bool

	mu       sync.Mutex
	cmd      *exec.Cmd
	pid1     int // host pid of the container's systemd; 0 while not booted
	boots    int
	bootCh   chan struct{} // closed and replaced on every completed boot
	exited   chan struct{} // closed when the supervisor stops for good
	exitErr  error
	stopping bool
	bootTime []time.Duration
}

func newContainer(dir, name, logPath string, binds []string) (*container, error) {
	c := &container{Dir: dir, Name: name, NetNS: "/run/netns/" + name, Log: logPath, Binds: binds,
		bootCh: make(chan struct{}), exited: make(chan struct{})}
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		return nil, fmt.Errorf("ip netns add: %w: %s", err, out)
	}
	// lo, and a veth pair whose one end holds a link-local address: ota-net's IP allow list
	// must refuse it (IPAddressDeny=), while the same connection outside the unit succeeds.
	for _, args := range [][]string{
		{"link", "set", "lo", "up"},
		{"link", "add", "gwv0", "type", "veth", "peer", "name", "gwv1"},
		{"addr", "add", linkLocalAddr + "/16", "dev", "gwv0"},
		{"link", "set", "gwv0", "up"},
		{"link", "set", "gwv1", "up"},
	} {
		if out, err := exec.Command("ip", append([]string{"-n", name}, args...)...).CombinedOutput(); err != nil {
			c.deleteNetNS()
			return nil, fmt.Errorf("ip -n %s %v: %w: %s", name, args, err, out)
		}
	}
	return c, nil
}

const linkLocalAddr = "169.254.77.1"

func (c *container) deleteNetNS() {
	_ = exec.Command("ip", "netns", "del", c.Name).Run()
}

func (c *container) nspawnArgs(boot bool, extra ...string) []string {
	a := []string{"-D", c.Dir, "--register=no", "--keep-unit", "-q"}
	if boot {
		a = append(a, "-b", "--network-namespace-path="+c.NetNS, "--console=pipe", "-M", c.Name)
		if !c.NoBPF {
			a = append(a, "--capability=CAP_BPF", "--system-call-filter=bpf")
		}
		for _, b := range c.Binds {
			a = append(a, "--bind="+b)
		}
	}
	return append(a, extra...)
}

// Run runs a command in the root file system without booting it (dpkg -i, useradd).
func (c *container) Run(ctx context.Context, argv ...string) (string, error) {
	cmd := exec.CommandContext(ctx, "systemd-nspawn", c.nspawnArgs(false, append([]string{"--pipe", "-E", "DEBIAN_FRONTEND=noninteractive"}, argv...)...)...)
	out, err := cmd.CombinedOutput()
	return string(out), err
}

// Boot starts the container and its supervisor, and returns once systemd inside reports the
// system running. A reboot the container asks for is performed by the supervisor.
func (c *container) Boot(ctx context.Context) error {
	if err := c.start(ctx); err != nil {
		return err
	}
	go c.supervise()
	return c.WaitBoots(ctx, 1)
}

func (c *container) start(ctx context.Context) error {
	logf, err := os.OpenFile(c.Log, os.O_CREATE|os.O_WRONLY|os.O_APPEND, 0o644)
	if err != nil {
		return err
	}
	defer logf.Close()
	begin := time.Now()
	cmd := exec.Command("systemd-nspawn", c.nspawnArgs(true)...)
	cmd.Env = os.Environ()
	if !c.NoBPF {
		cmd.Env = append(cmd.Env, "SYSTEMD_NSPAWN_UNIFIED_HIERARCHY=1")
	}
	cmd.Stdout, cmd.Stderr = logf, logf
	// A test binary killed by its timeout still halts the container.
	cmd.SysProcAttr = &syscall.SysProcAttr{Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return err
	}
	c.mu.Lock()
	c.cmd = cmd
	c.mu.Unlock()
	pid1, err := findPID1(ctx, cmd.Process.Pid)
	if err != nil {
		_ = cmd.Process.Kill()
		return err
	}
	// systemctl answers once PID 1 has its private bus; --wait then blocks until boot ends.
	for {
		out, err := exec.CommandContext(ctx, "nsenter", "-t", strconv.Itoa(pid1), "-a", "systemctl", "is-system-running", "--wait").Output()
		state := strings.TrimSpace(string(out))
		if state == "running" || state == "degraded" {
			break
		}
		if ctx.Err() != nil {
			_ = cmd.Process.Kill()
			return fmt.Errorf("container did not finish booting (last: %q %v): %w\n%s", state, err, ctx.Err(), c.logTail())
		}
		if !alive(cmd.Process.Pid) {
			return fmt.Errorf("systemd-nspawn exited during boot:\n%s", c.logTail())
		}
		time.Sleep(20 * time.Millisecond)
	}
	c.mu.Lock()
	c.pid1 = pid1
	c.boots++
	c.bootTime = append(c.bootTime, time.Since(begin))
	close(c.bootCh)
	c.bootCh = make(chan struct{})
	c.mu.Unlock()
	return nil
}

// supervise waits for systemd-nspawn; a reboot exit boots the same disk again.
func (c *container) supervise() {
	for {
		c.mu.Lock()
		cmd := c.cmd
		c.mu.Unlock()
		err := cmd.Wait()
		c.mu.Lock()
		c.pid1 = 0
		stopping := c.stopping
		c.mu.Unlock()
		var ee *exec.ExitError
		if !stopping && errors.As(err, &ee) && ee.ExitCode() == nspawnRebootExit {
			ctx, cancel := context.WithTimeout(context.Background(), 2*time.Minute)
			err = c.start(ctx)
			cancel()
			if err == nil {
				continue
			}
		} else if !stopping {
			err = fmt.Errorf("systemd-nspawn exited unexpectedly (%v):\n%s", err, c.logTail())
		} else {
			err = nil
		}
		c.mu.Lock()
		c.exitErr = err
		c.mu.Unlock()
		close(c.exited)
		return
	}
}

// WaitBoots waits until the container has completed n boots.
func (c *container) WaitBoots(ctx context.Context, n int) error {
	for {
		c.mu.Lock()
		boots, ch := c.boots, c.bootCh
		c.mu.Unlock()
		if boots >= n {
			return nil
		}
		select {
		case <-ch:
		case <-c.exited:
			c.mu.Lock()
			defer c.mu.Unlock()
			return fmt.Errorf("container gone while waiting for boot %d: %v", n, c.exitErr)
		case <-ctx.Done():
			return fmt.Errorf("waiting for boot %d (%d done): %w", n, boots, ctx.Err())
		}
	}
}

func (c *container) Boots() int { c.mu.Lock(); defer c.mu.Unlock(); return c.boots }

func (c *container) BootTimes() []time.Duration {
	c.mu.Lock()
	defer c.mu.Unlock()
	return append([]time.Duration(nil), c.bootTime...)
}

// PID1 is the host pid of the running container's systemd (0 during a reboot).
func (c *container) PID1() int { c.mu.Lock(); defer c.mu.Unlock(); return c.pid1 }

// Exec runs argv inside the booted container (all its namespaces), outside any unit.
func (c *container) Exec(ctx context.Context, argv ...string) (string, error) {
	pid := c.PID1()
	if pid == 0 {
		return "", errors.New("container not running")
	}
	cmd := exec.CommandContext(ctx, "nsenter", append([]string{"-t", strconv.Itoa(pid), "-a"}, argv...)...)
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	err := cmd.Run()
	if err != nil {
		return out.String(), fmt.Errorf("%v: %w: %s", argv, err, strings.TrimSpace(out.String()))
	}
	return out.String(), nil
}

// Stop halts the container cleanly (SIGTERM to systemd-nspawn) and removes the namespace.
func (c *container) Stop() error {
	c.mu.Lock()
	c.stopping = true
	cmd := c.cmd
	c.mu.Unlock()
	defer c.deleteNetNS()
	if cmd == nil || cmd.Process == nil {
		return nil
	}
	_ = cmd.Process.Signal(unix.SIGTERM)
	select {
	case <-c.exited:
	case <-time.After(60 * time.Second):
		_ = cmd.Process.Kill()
		<-c.exited
		return errors.New("container did not halt within 60s of SIGTERM")
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	return c.exitErr
}

func (c *container) logTail() string {
	b, _ := os.ReadFile(c.Log)
	return tail(string(b), 40)
}

// findPID1 finds the container's init: the descendant of systemd-nspawn that is pid 1 in its
// own pid namespace.
func findPID1(ctx context.Context, nspawn int) (int, error) {
	for {
		if pid := pid1Below(nspawn, 3); pid != 0 {
			return pid, nil
		}
		if !alive(nspawn) {
			return 0, errors.New("systemd-nspawn exited before the container started")
		}
		select {
		case <-ctx.Done():
			return 0, fmt.Errorf("container init not found: %w", ctx.Err())
		case <-time.After(10 * time.Millisecond):
		}
	}
}

func pid1Below(pid, depth int) int {
	if depth == 0 {
		return 0
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/task/%d/children", pid, pid))
	if err != nil {
		return 0
	}
	for _, f := range strings.Fields(string(b)) {
		child, err := strconv.Atoi(f)
		if err != nil {
			continue
		}
		st, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", child))
		if err != nil {
			continue
		}
		for _, l := range strings.Split(string(st), "\n") {
			if ns, ok := strings.CutPrefix(l, "NSpid:"); ok {
				f := strings.Fields(ns)
				if len(f) > 1 && f[len(f)-1] == "1" {
					return child
				}
			}
		}
		if p := pid1Below(child, depth-1); p != 0 {
			return p
		}
	}
	return 0
}

func alive(pid int) bool {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return false
	}
	// A zombie has exited (its parent, this process, has not reaped it yet).
	s := string(b)
	if i := strings.LastIndexByte(s, ')'); i >= 0 && len(s) > i+2 {
		return s[i+2] != 'Z'
	}
	return true
}

// inNetNS runs fn on an OS thread that has entered the network namespace at path: sockets
// fn creates (listeners) belong to that namespace and keep working from any thread. If the
// thread cannot return to its own namespace it is left locked, so the runtime discards it.
func inNetNS(path string, fn func() error) error {
	errc := make(chan error, 1)
	go func() {
		runtime.LockOSThread()
		own, err := os.Open("/proc/thread-self/ns/net")
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer own.Close()
		target, err := os.Open(path)
		if err != nil {
			runtime.UnlockOSThread()
			errc <- err
			return
		}
		defer target.Close()
		if err := unix.Setns(int(target.Fd()), unix.CLONE_NEWNET); err != nil {
			runtime.UnlockOSThread()
			errc <- fmt.Errorf("setns %s: %w", path, err)
			return
		}
		ferr := fn()
		if err := unix.Setns(int(own.Fd()), unix.CLONE_NEWNET); err != nil {
			errc <- errors.Join(ferr, fmt.Errorf("back to own network namespace: %w", err))
			return // thread stays locked and dies with this goroutine
		}
		runtime.UnlockOSThread()
		errc <- ferr
	}()
	return <-errc
}

// hostPath maps a path inside the container to the root file system on the host.
func (c *container) hostPath(p string) string { return filepath.Join(c.Dir, p) }
