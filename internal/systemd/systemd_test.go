package systemd

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"

	"github.com/gwota/gwota/test/testenv"
)

func TestMain(m *testing.M) {
	if os.Getenv(helperEnv) != "" {
		os.Exit(helperMain())
	}
	goleak.VerifyTestMain(m)
}

// notifySocket plays the service manager's end of NOTIFY_SOCKET: a real
// unixgram socket whose datagrams the test reads.
func notifySocket(t *testing.T) *net.UnixConn {
	t.Helper()
	path := filepath.Join(t.TempDir(), "notify")
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	t.Setenv("NOTIFY_SOCKET", path)
	return c
}

// next reads one datagram; the deadline only bounds a broken test.
func next(t *testing.T, c *net.UnixConn) string {
	t.Helper()
	buf := make([]byte, 4096)
	c.SetReadDeadline(time.Now().Add(10 * time.Second))
	n, err := c.Read(buf)
	if err != nil {
		t.Fatalf("reading notify datagram: %v", err)
	}
	return string(buf[:n])
}

// nothingQueued asserts no datagram is waiting. Sends are synchronous, so a
// message sent before this call would already be queued.
func nothingQueued(t *testing.T, c *net.UnixConn) {
	t.Helper()
	c.SetReadDeadline(time.Now())
	buf := make([]byte, 4096)
	if n, err := c.Read(buf); err == nil {
		t.Fatalf("unexpected datagram %q", buf[:n])
	} else if !errors.Is(err, os.ErrDeadlineExceeded) {
		t.Fatal(err)
	}
}

func TestNotifications(t *testing.T) {
	c := notifySocket(t)
	steps := []struct {
		name string
		send func() error
		want string
	}{
		{"ready", Ready, "READY=1"},
		{"status", func() error { return Status("writing slot b\nblock 7") }, "STATUS=writing slot b block 7"},
		{"stopping", Stopping, "STOPPING=1"},
	}
	for _, s := range steps {
		if err := s.send(); err != nil {
			t.Fatalf("%s: %v", s.name, err)
		}
		if got := next(t, c); got != s.want {
			t.Errorf("%s: got %q, want %q", s.name, got, s.want)
		}
	}
	// NOTIFY_SOCKET stays set: the watchdog needs it after READY=1.
	if os.Getenv("NOTIFY_SOCKET") == "" {
		t.Error("Ready unset NOTIFY_SOCKET")
	}
}

func TestNotifyWithoutManager(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", "")
	if err := Ready(); err != nil {
		t.Fatalf("Ready without a service manager: %v", err)
	}
}

func TestNotifySocketGone(t *testing.T) {
	t.Setenv("NOTIFY_SOCKET", filepath.Join(t.TempDir(), "absent"))
	if err := Ready(); err == nil {
		t.Fatal("Ready to a missing socket: no error")
	}
}

func TestWatchdogDisabled(t *testing.T) {
	c := notifySocket(t)
	cases := []struct {
		name, usec, pid string
	}{
		{"unset", "", ""},
		{"other pid", "20000", strconv.Itoa(os.Getpid() + 1)},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			t.Setenv("WATCHDOG_USEC", tc.usec)
			t.Setenv("WATCHDOG_PID", tc.pid)
			if err := Watchdog(context.Background(), nil); err != nil {
				t.Fatal(err)
			}
			nothingQueued(t, c)
		})
	}
}

func TestWatchdogBadEnv(t *testing.T) {
	notifySocket(t)
	for _, usec := range []string{"soon", "-5", "0"} {
		t.Setenv("WATCHDOG_USEC", usec)
		t.Setenv("WATCHDOG_PID", "")
		if err := Watchdog(context.Background(), nil); err == nil {
			t.Errorf("WATCHDOG_USEC=%q: no error", usec)
		}
	}
}

func TestWatchdogPingsAtHalfInterval(t *testing.T) {
	c := notifySocket(t)
	const interval = 40 * time.Millisecond
	t.Setenv("WATCHDOG_USEC", strconv.Itoa(int(interval/time.Microsecond)))
	t.Setenv("WATCHDOG_PID", strconv.Itoa(os.Getpid()))
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	start := time.Now()
	go func() { done <- Watchdog(ctx, func() error { return nil }) }()

	var stamps []time.Time
	for range 4 {
		if got := next(t, c); got != "WATCHDOG=1" {
			t.Fatalf("got %q, want WATCHDOG=1", got)
		}
		stamps = append(stamps, time.Now())
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatalf("Watchdog returned %v after cancel", err)
	}
	// The first ping goes out at once; a ticker never fires early, so ping k
	// cannot arrive before k half-intervals have passed. Only this lower
	// bound is asserted: an upper bound would measure the machine's load.
	for k, at := range stamps {
		if min := time.Duration(k) * interval / 2; at.Sub(start) < min {
			t.Errorf("ping %d arrived %v after start, want at least %v", k, at.Sub(start), min)
		}
	}
}

func TestWatchdogWithholdsPingWhileUnhealthy(t *testing.T) {
	c := notifySocket(t)
	t.Setenv("WATCHDOG_USEC", "10000")
	t.Setenv("WATCHDOG_PID", "")
	var calls atomic.Int32
	healthy := func() error {
		switch calls.Add(1) {
		case 1:
			return errors.New("journal fsync stuck")
		case 2:
			panic("boom")
		default:
			return nil
		}
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error, 1)
	go func() { done <- Watchdog(ctx, healthy) }()
	var got []string
	for range 4 {
		got = append(got, next(t, c))
	}
	cancel()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	want := []string{
		"STATUS=unhealthy: journal fsync stuck",
		"STATUS=unhealthy: health check panicked: boom",
		"STATUS=healthy",
		"WATCHDOG=1",
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("datagrams (-want +got):\n%s", d)
	}
}

func TestListenerNotActivated(t *testing.T) {
	t.Setenv("LISTEN_FDS", "")
	t.Setenv("LISTEN_PID", "")
	l, ok, err := Listener("ota-writer.socket")
	if l != nil || ok || err != nil {
		t.Fatalf("got (%v, %v, %v), want (nil, false, nil)", l, ok, err)
	}
}

const (
	helperEnv     = "GWOTA_SYSTEMD_HELPER"
	helperNameEnv = "GWOTA_SYSTEMD_HELPER_NAME" // what the child asks Listener for
)

// helperMain runs in a child process that was handed sockets the way
// systemd hands them. It reports what Listener returned on stdout, then
// serves one connection on the listener, proving it is the passed socket.
func helperMain() int {
	l, ok, err := Listener(os.Getenv(helperNameEnv))
	leftover := os.Getenv("LISTEN_FDS") + os.Getenv("LISTEN_PID") + os.Getenv("LISTEN_FDNAMES")
	fmt.Printf("ok=%v err=%v leftover=%q\n", ok, err, leftover)
	if l == nil {
		return 0
	}
	defer l.Close()
	conn, err := l.Accept()
	if err != nil {
		fmt.Println("accept:", err)
		return 1
	}
	defer conn.Close()
	fmt.Fprintf(conn, "served by pid %d\n", os.Getpid())
	return 0
}

// passSocket starts the test binary as a socket-activated child: the
// listener is fd 3 and LISTEN_PID is the child's own pid, which only the
// child knows, so a shell sets it and execs (keeping the pid).
func passSocket(t *testing.T, f *os.File, env ...string) (*exec.Cmd, *bufio.Reader) {
	t.Helper()
	cmd := exec.Command("/bin/sh", "-c", `LISTEN_PID=$$ exec "$0" "$@"`, os.Args[0], "-test.run=^$")
	cmd.Env = append(append(os.Environ(), helperEnv+"=1"), env...)
	cmd.ExtraFiles = []*os.File{f}
	cmd.Stderr = os.Stderr
	out, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	// Only the child may hold the socket: if it does not serve, a dial
	// fails at once instead of waiting in the backlog.
	f.Close()
	return cmd, bufio.NewReader(out)
}

func unixListenerFile(t *testing.T) (string, *os.File) {
	t.Helper()
	path := filepath.Join(t.TempDir(), "writer.sock")
	l, err := net.ListenUnix("unix", &net.UnixAddr{Name: path, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	l.SetUnlinkOnClose(false) // the child owns it now
	f, err := l.File()
	if err != nil {
		t.Fatal(err)
	}
	l.Close()
	t.Cleanup(func() { f.Close() })
	return path, f
}

func TestListenerPassedFD(t *testing.T) {
	cases := []struct {
		name     string
		want     string // the name the daemon asks for
		fdnames  string
		wantLine string
		serves   bool
	}{
		{"by name", "ota-writer.socket", "ota-writer.socket", `ok=true err=<nil> leftover=""`, true},
		{"first socket", "", "", `ok=true err=<nil> leftover=""`, true},
		{"name mismatch", "ota-writer.socket", "other.socket", `ok=false err=socket activation: no passed socket named "ota-writer.socket" leftover=""`, false},
	}
	for _, tc := range cases {
		t.Run(tc.name, func(t *testing.T) {
			path, f := unixListenerFile(t)
			env := []string{helperNameEnv + "=" + tc.want, "LISTEN_FDS=1"}
			if tc.fdnames != "" {
				env = append(env, "LISTEN_FDNAMES="+tc.fdnames)
			}
			cmd, out := passSocket(t, f, env...)
			line, err := out.ReadString('\n')
			if err != nil {
				t.Fatalf("child said nothing: %v", err)
			}
			if got := strings.TrimSpace(line); got != strings.TrimSpace(tc.wantLine) {
				t.Errorf("child: %q, want %q", got, tc.wantLine)
			}
			if tc.serves {
				conn, err := net.Dial("unix", path)
				if err != nil {
					t.Fatal(err)
				}
				reply, err := io.ReadAll(conn)
				conn.Close()
				if err != nil {
					t.Fatal(err)
				}
				if want := fmt.Sprintf("served by pid %d\n", cmd.Process.Pid); string(reply) != want {
					t.Errorf("reply %q, want %q", reply, want)
				}
			}
			if err := cmd.Wait(); err != nil {
				t.Fatalf("child: %v", err)
			}
		})
	}
}

func TestListenerOtherPID(t *testing.T) {
	_, f := unixListenerFile(t)
	// LISTEN_PID names another process: the fds are not meant for us.
	cmd := exec.Command(os.Args[0], "-test.run=^$")
	cmd.Env = append(os.Environ(), helperEnv+"=1", helperNameEnv+"=ota-writer.socket", "LISTEN_FDS=1", "LISTEN_PID=1")
	cmd.ExtraFiles = []*os.File{f}
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.TrimSpace(string(out)), `ok=false err=<nil> leftover=""`; got != want {
		t.Errorf("child: %q, want %q", got, want)
	}
}

func TestListenerRejectsTCP(t *testing.T) {
	tl, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	f, err := tl.(*net.TCPListener).File()
	tl.Close()
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	cmd, out := passSocket(t, f, helperNameEnv+"=ota-writer.socket", "LISTEN_FDS=1", "LISTEN_FDNAMES=ota-writer.socket")
	line, _ := out.ReadString('\n')
	if !strings.Contains(line, ErrNotUnix.Error()) || !strings.HasPrefix(line, "ok=false") {
		t.Errorf("child: %q, want ok=false and %q", line, ErrNotUnix)
	}
	if err := cmd.Wait(); err != nil {
		t.Fatal(err)
	}
}

// TestListenerSystemdSocketActivate uses systemd's own activation tool, so
// the environment is exactly what systemd sets, not our reading of it.
func TestListenerSystemdSocketActivate(t *testing.T) {
	tool, err := exec.LookPath("systemd-socket-activate")
	testenv.Need(t, err)
	path := filepath.Join(t.TempDir(), "writer.sock")
	cmd := exec.Command(tool, "-l", path, "--fdname=ota-writer.socket",
		"-E", helperEnv+"=1", "-E", helperNameEnv+"=ota-writer.socket", os.Args[0], "-test.run=^$")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	defer func() {
		cmd.Process.Kill()
		cmd.Wait()
	}()
	// It prints "Listening on ..." once the socket exists.
	sc := bufio.NewScanner(stderr)
	for sc.Scan() && !strings.Contains(sc.Text(), "Listening on") {
	}
	go io.Copy(io.Discard, stderr)
	conn, err := net.Dial("unix", path)
	if err != nil {
		t.Fatal(err)
	}
	reply, err := io.ReadAll(conn)
	conn.Close()
	if err != nil {
		t.Fatal(err)
	}
	if !strings.HasPrefix(string(reply), "served by pid ") {
		t.Errorf("reply %q", reply)
	}
}
