package emulator

import (
	"github.com/gwota/gwota/test/testenv"

	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"
)

// mosquittoProc is a mosquitto process that can be stopped and started again on the same port,
// as when the broker next to the emulator restarts.
type mosquittoProc struct {
	t    *testing.T
	conf string
	port int
	cmd  *exec.Cmd
	done chan struct{}
}

func newMosquitto(t *testing.T) *mosquittoProc {
	t.Helper()
	const bin = "/usr/sbin/mosquitto"
	if _, err := os.Stat(bin); err != nil {
		testenv.Need(t, fmt.Errorf("mosquitto not installed (Debian package mosquitto): %w", err))
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	m := &mosquittoProc{t: t, port: ln.Addr().(*net.TCPAddr).Port, conf: filepath.Join(t.TempDir(), "mosquitto.conf")}
	ln.Close()
	err = os.WriteFile(m.conf, []byte(fmt.Sprintf(`listener %d 127.0.0.1
allow_anonymous true
persistence false
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
`, m.port)), 0o600)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(m.stop)
	m.start()
	return m
}

func (m *mosquittoProc) url() string { return fmt.Sprintf("mqtt://127.0.0.1:%d", m.port) }

// start runs mosquitto and returns once it logs that it is running.
func (m *mosquittoProc) start() {
	m.t.Helper()
	cmd := exec.Command("/usr/sbin/mosquitto", "-c", m.conf)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		m.t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		m.t.Fatal(err)
	}
	m.cmd, m.done = cmd, make(chan struct{})
	ready, done := make(chan struct{}), m.done
	var log strings.Builder
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		signalled := false
		for sc.Scan() {
			if !signalled {
				log.WriteString(sc.Text() + "\n")
				if strings.Contains(sc.Text(), "running") {
					close(ready)
					signalled = true
				}
			}
		}
		cmd.Wait()
	}()
	select {
	case <-ready:
	case <-done:
		m.t.Fatalf("mosquitto exited before it was running:\n%s", log.String())
	case <-time.After(10 * time.Second):
		m.t.Fatal("mosquitto not running after 10s")
	}
}

// stop kills mosquitto and waits until it has exited (its port is then free again).
func (m *mosquittoProc) stop() {
	if m.cmd == nil {
		return
	}
	m.cmd.Process.Kill()
	<-m.done
	m.cmd = nil
}

// A restart of the external broker cuts the emulator's connection; it reconnects, subscribes
// again, and answers requests and runs a whole job as before.
func TestExternalBrokerRestart(t *testing.T) {
	m := newMosquitto(t)
	e := startEmulator(t, Options{ExternalBrokerURL: m.url()})
	jobs := thingPrefix + "jobs/"
	answered := func(d *device, token string) bool {
		d.publishJSON(jobs+"$next/get", map[string]any{"clientToken": token})
		return d.wait(2*time.Second, jobs+"$next/get/accepted") != nil
	}
	d := connectDevice(t, m.url(), "gw-probe", jobs+"$next/get/accepted")
	if !answered(d, "before") {
		t.Fatal("no answer before the restart")
	}

	m.stop()
	select {
	case <-d.c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("device still connected after mosquitto was killed")
	}
	m.start()

	// The emulator's requests sent before it has resubscribed are lost (the broker keeps no
	// state), so the device asks again until it gets an answer, as a device does on timeout.
	d = connectDevice(t, m.url(), "gw-probe", jobs+"$next/get/accepted")
	deadline := time.Now().Add(20 * time.Second)
	for i := 0; !answered(d, fmt.Sprint("after-", i)); i++ {
		if time.Now().After(deadline) {
			t.Fatal("the emulator answers no request after the broker restarted")
		}
	}
	runWholeJob(t, e, m.url(), true)
}

// Closing the emulator while its external broker is down ends the reconnect loop at once
// (TestMain's goleak check sees any goroutine left behind).
func TestExternalBrokerCloseWhileDown(t *testing.T) {
	m := newMosquitto(t)
	e := startEmulator(t, Options{ExternalBrokerURL: m.url()})
	m.stop()
	closed := make(chan error, 1)
	go func() { closed <- e.Close() }()
	select {
	case <-closed:
	case <-time.After(10 * time.Second):
		t.Fatal("Close hangs while the broker is down")
	}
}
