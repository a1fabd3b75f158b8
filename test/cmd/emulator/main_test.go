package main

import (
	"bufio"
	"context"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/gwota/gwota/test/sign"
)

// The real binary starts, creates a signed job from a file and prints each update a device
// makes, as it arrives.
func TestCommandPrintsUpdates(t *testing.T) {
	dir := t.TempDir()
	bin := filepath.Join(dir, "emulator")
	if out, err := exec.Command("go", "build", "-o", bin, ".").CombinedOutput(); err != nil {
		t.Fatalf("build: %v\n%s", err, out)
	}
	img := filepath.Join(dir, "fw v1.img")
	os.WriteFile(img, make([]byte, 5000), 0o600)
	id, err := sign.NewIdentity("ota-signer")
	if err != nil {
		t.Fatal(err)
	}
	keyPath := filepath.Join(dir, "signer.key")
	os.WriteFile(keyPath, id.KeyPEM, 0o600)

	cmd := exec.Command(bin, "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0", "--thing", "gw-07", "--job-file", img, "--key", keyPath)
	stdout, err := cmd.StdoutPipe()
	if err != nil {
		t.Fatal(err)
	}
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	exited := make(chan error, 1)
	lines := make(chan string, 100)
	go func() {
		sc := bufio.NewScanner(stdout)
		for sc.Scan() {
			lines <- sc.Text()
		}
		close(lines)
		exited <- cmd.Wait()
	}()
	t.Cleanup(func() { cmd.Process.Kill() })
	next := func(prefix string) string {
		t.Helper()
		timeout := time.After(10 * time.Second)
		for {
			select {
			case l, ok := <-lines:
				if !ok {
					t.Fatalf("command exited before printing %q", prefix)
				}
				if strings.HasPrefix(l, prefix) {
					return l
				}
			case <-timeout:
				t.Fatalf("no %q line within 10s", prefix)
			}
		}
	}
	broker := strings.TrimPrefix(next("broker "), "broker ")
	job := strings.Fields(strings.TrimPrefix(next("job "), "job "))[0]
	if job != "ota-1-fw_v1" {
		t.Errorf("job id %q", job)
	}

	u, _ := url.Parse(broker)
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	c := paho.NewClient(paho.ClientConfig{Conn: conn})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: "gw-07", CleanStart: true, KeepAlive: 30}); err != nil {
		t.Fatal(err)
	}
	defer c.Disconnect(&paho.Disconnect{})
	topic := "$aws/things/gw-07/jobs/" + job + "/update"
	for _, body := range []string{
		`{"status":"IN_PROGRESS","statusDetails":{"self_test":"receiving","progress":"1/20"}}`,
		`{"status":"FAILED","statusDetails":{"reason":"sig_check_failed","error_code":"1001"}}`,
	} {
		if _, err := c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: []byte(body)}); err != nil {
			t.Fatal(err)
		}
	}
	l := next("update ")
	if !strings.Contains(l, "job="+job) || !strings.Contains(l, "status=IN_PROGRESS") || !strings.Contains(l, `"progress":"1/20"`) {
		t.Errorf("first update line: %s", l)
	}
	l = next("update ")
	if !strings.Contains(l, "status=FAILED") || !strings.Contains(l, `"error_code":"1001"`) || !strings.Contains(l, "version=3") {
		t.Errorf("second update line: %s", l)
	}

	cmd.Process.Signal(syscall.SIGTERM)
	select {
	case err := <-exited:
		if err != nil {
			t.Errorf("exit after SIGTERM: %v", err)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("command did not stop on SIGTERM")
	}
}
