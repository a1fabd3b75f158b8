package jobs_test

import (
	"bufio"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/gwota/gwota/netagent/jobs"
	"github.com/gwota/gwota/test/emulator"

	"github.com/gwota/gwota/test/testenv"
)

// startMosquitto runs mosquitto as a separate process on a free loopback port.
func startMosquitto(t *testing.T) string {
	t.Helper()
	bin, err := exec.LookPath("mosquitto")
	testenv.Need(t, err)
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	conf := filepath.Join(t.TempDir(), "mosquitto.conf")
	if err := os.WriteFile(conf, []byte(fmt.Sprintf("listener %d 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\nmax_queued_messages 10000\n", port)), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(bin, "-c", conf, "-v")
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		_ = cmd.Process.Kill()
		_ = cmd.Wait()
	})
	// Ready once it logs "mosquitto version ... running" (after its listeners are open).
	ready := make(chan struct{})
	go func() {
		sc := bufio.NewScanner(stderr)
		closed := false
		for sc.Scan() {
			if !closed && strings.Contains(sc.Text(), " running") {
				close(ready)
				closed = true
			}
		}
	}()
	select {
	case <-ready:
	case <-time.After(10 * time.Second):
		t.Fatal("mosquitto did not start")
	}
	return fmt.Sprintf("mqtt://127.0.0.1:%d", port)
}

// On an ordinary broker responses reach the device only because it subscribes to them.
func TestJobsThroughMosquitto(t *testing.T) {
	url := startMosquitto(t)
	ctx := ctxT(t)
	e, err := emulator.Start(ctx, emulator.Options{ExternalBrokerURL: url, Logger: logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	conn := connect(t, url, e.ThingName())
	c := newClient(t, conn, e.ThingName(), jobs.Options{})
	createJob(t, e, "job-mq")
	nextExec(t, c, isJob("job-mq"))
	if _, err := c.Update(ctx, "job-mq", jobs.Update{Status: jobs.StatusInProgress, StatusDetails: map[string]string{"self_test": "receiving"}}); err != nil {
		t.Fatal(err)
	}
	ex, err := c.Describe(ctx, "job-mq")
	if err != nil || ex.Status != jobs.StatusInProgress {
		t.Fatalf("%+v %v", ex, err)
	}
	if _, err := c.Update(ctx, "job-mq", jobs.Update{Status: jobs.StatusFailed, StatusDetails: map[string]string{"reason": "user_abort", "error_code": "2006"}}); err != nil {
		t.Fatal(err)
	}
	if got, _ := e.Describe(ctx, "job-mq"); got.Status != jobs.StatusFailed {
		t.Fatalf("%+v", got)
	}
}
