package privsplit

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"

	"github.com/gwota/gwota/test/testenv"
)

var (
	buildOnce sync.Once
	built     *harness.Binaries
	buildErr  error
)

// binaries builds ota-writer and ota-net once per test binary.
func binaries(t *testing.T) *harness.Binaries {
	t.Helper()
	buildOnce.Do(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Minute)
		defer cancel()
		built, buildErr = harness.Build(ctx, harness.BuildOptions{Race: harness.RaceEnabled})
	})
	if buildErr != nil {
		t.Fatal(buildErr)
	}
	return built
}

func TestMain(m *testing.M) {
	code := m.Run()
	if built != nil {
		os.RemoveAll(built.Dir)
	}
	os.Exit(code)
}

// notifyPending lists what a daemon does not send yet although its unit
// needs it (Type=notify needs READY=1 or the start times out; WatchdogSec=
// needs WATCHDOG=1 or systemd kills the daemon). The cure is in cmd/: call
// internal/systemd's Ready, Watchdog and Stopping. An entry that the daemon
// does send fails this test, so the list cannot outlive the gap.
var notifyPending = map[string][]string{}

// TestDaemonsNotifySystemd runs each daemon the way its unit does: the
// writer socket-activated by systemd's own systemd-socket-activate, both with
// NOTIFY_SOCKET and WATCHDOG_USEC set, and reads what they tell the service
// manager.
func TestDaemonsNotifySystemd(t *testing.T) {
	activate, err := exec.LookPath("systemd-socket-activate")
	testenv.Need(t, err)
	bin := binaries(t)
	ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "notify") // short: sockets live here
	if err != nil {
		t.Fatal(err)
	}
	defer os.RemoveAll(dir)

	cloud, err := harness.StartCloud(ctx, emulator.Options{Thing: thing})
	if err != nil {
		t.Fatal(err)
	}
	defer cloud.Close()

	sock := filepath.Join(dir, "w.sock")
	for _, d := range []string{"state", "net-state"} {
		if err := os.Mkdir(filepath.Join(dir, d), 0o700); err != nil {
			t.Fatal(err)
		}
	}
	for _, s := range []string{"a", "b"} {
		if err := os.WriteFile(filepath.Join(dir, "slot-"+s), nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	writerCfg := filepath.Join(dir, "writer.toml")
	write(t, writerCfg, fmt.Sprintf(`socket = %q
state_dir = %q
[boot]
backend = "file"
[[target]]
name = "rootfs"
kind = "ab"
file_types = [0]
slots = [%q, %q]
`, sock, filepath.Join(dir, "state"), filepath.Join(dir, "slot-a"), filepath.Join(dir, "slot-b")))
	netCfg := filepath.Join(dir, "net.toml")
	write(t, netCfg, fmt.Sprintf("broker = %q\nthing_name = %q\nwriter_socket = %q\nstate_dir = %q\n",
		cloud.BrokerURL(), thing, sock, filepath.Join(dir, "net-state")))

	const watchdog = 200 * time.Millisecond
	env := func(ns string) []string {
		return []string{"NOTIFY_SOCKET=" + ns, fmt.Sprintf("WATCHDOG_USEC=%d", watchdog.Microseconds())}
	}

	wn := listenNotify(t, filepath.Join(dir, "wn"))
	// As ota-writer.socket + ota-writer.service: the socket exists first, the
	// first connection starts the writer with it.
	wargs := []string{"-l", sock, "--fdname=ota-writer.socket"}
	for _, e := range env(wn.path) {
		wargs = append(wargs, "-E", e)
	}
	wargs = append(wargs, bin.Writer, "serve", "--config", writerCfg)
	writer, listening := startActivator(t, filepath.Join(dir, "writer.log"), activate, wargs...)
	defer stop(writer)
	select {
	case <-listening:
	case <-ctx.Done():
		t.Fatal("systemd-socket-activate did not listen")
	}
	// The first connection starts the writer; an answer proves it serves, so
	// a missing READY=1 below is the daemon's, not a failed start.
	if out, err := exec.CommandContext(ctx, bin.Writer, "status", "--socket", sock).CombinedOutput(); err != nil {
		t.Fatalf("socket-activated writer does not answer: %v\n%s", err, out)
	}

	nn := listenNotify(t, filepath.Join(dir, "nn"))
	netCmd := exec.Command(bin.Net, "--config", netCfg)
	netCmd.Env = append(os.Environ(), env(nn.path)...)
	netProc := startCmd(t, filepath.Join(dir, "net.log"), netCmd)
	defer stop(netProc)

	for _, d := range []struct {
		name string
		n    *notifyListener
		log  string
	}{{"ota-writer", wn, "writer.log"}, {"ota-net", nn, "net.log"}} {
		// Bounded: a daemon that is up sends READY=1 within seconds and then
		// pings every watchdog/2 = 100 ms.
		got := d.n.collect(10*time.Second, "READY=1", "WATCHDOG=1")
		for _, msg := range []string{"READY=1", "WATCHDOG=1"} {
			pending := contains(notifyPending[d.name], msg)
			switch {
			case got[msg] && pending:
				t.Errorf("%s sends %s now: remove it from notifyPending", d.name, msg)
			case !got[msg] && !pending:
				b, _ := os.ReadFile(filepath.Join(dir, d.log))
				t.Errorf("%s never sent %s to NOTIFY_SOCKET; its unit needs it. Log:\n%s", d.name, msg, b)
			case !got[msg]:
				t.Logf("GAP: %s does not send %s yet (its unit needs it: wire internal/systemd in cmd/%s)", d.name, msg, d.name)
			}
		}
	}
}

type notifyListener struct {
	path string
	c    *net.UnixConn
}

func listenNotify(t *testing.T, path string) *notifyListener {
	t.Helper()
	c, err := net.ListenUnixgram("unixgram", &net.UnixAddr{Name: path, Net: "unixgram"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return &notifyListener{path: path, c: c}
}

// collect reads datagrams until every wanted message was seen or the time is
// up, and says which were seen.
func (n *notifyListener) collect(limit time.Duration, want ...string) map[string]bool {
	seen := map[string]bool{}
	deadline := time.Now().Add(limit)
	buf := make([]byte, 4096)
	for len(seen) < len(want) {
		n.c.SetReadDeadline(deadline)
		k, err := n.c.Read(buf)
		if err != nil {
			break
		}
		for _, line := range strings.Split(string(buf[:k]), "\n") {
			if contains(want, line) {
				seen[line] = true
			}
		}
	}
	return seen
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

func write(t *testing.T, path, data string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(data), 0o600); err != nil {
		t.Fatal(err)
	}
}

func startCmd(t *testing.T, logPath string, cmd *exec.Cmd) *exec.Cmd {
	t.Helper()
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	cmd.Stdout, cmd.Stderr = f, f
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	return cmd
}

func stop(cmd *exec.Cmd) {
	cmd.Process.Signal(os.Interrupt)
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		cmd.Process.Kill()
		<-done
	}
}

// startActivator starts systemd-socket-activate and reports when it listens
// (its "Listening on" line), copying its output to logPath.
func startActivator(t *testing.T, logPath, name string, args ...string) (*exec.Cmd, <-chan struct{}) {
	t.Helper()
	f, err := os.Create(logPath)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { f.Close() })
	cmd := exec.Command(name, args...)
	pr, pw := io.Pipe()
	cmd.Stdout, cmd.Stderr = f, io.MultiWriter(f, pw)
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	listening := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(pr)
		for sc.Scan() {
			if strings.Contains(sc.Text(), "Listening on") {
				close(listening)
				break
			}
		}
		io.Copy(io.Discard, pr)
	}()
	// After stop's Wait, no more output comes: end the reader.
	t.Cleanup(func() { pw.Close() })
	return cmd, listening
}
