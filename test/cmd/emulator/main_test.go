package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
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

	"github.com/gwota/gwota/test/cmd/emulator/internal/cli"
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

// The command enforces AWS's quotas unless -no-quotas is given: a SUBSCRIBE with 9 filters
// closes the connection (quota exceeded) by default and is granted with the flag.
func TestCommandNoQuotasFlag(t *testing.T) {
	for _, tt := range []struct {
		args    []string
		granted bool
	}{{nil, false}, {[]string{"-no-quotas"}, true}} {
		ctx, stop := context.WithCancel(context.Background())
		pr, pw := io.Pipe()
		done := make(chan error, 1)
		go func() {
			done <- cli.Run(ctx, append([]string{"-listen", "127.0.0.1:0", "-http", "127.0.0.1:0"}, tt.args...), pw, io.Discard)
			pw.Close()
		}()
		sc := bufio.NewScanner(pr)
		if !sc.Scan() || !strings.HasPrefix(sc.Text(), "broker ") {
			t.Fatalf("%v: first line %q", tt.args, sc.Text())
		}
		go io.Copy(io.Discard, pr)
		u, _ := url.Parse(strings.TrimPrefix(sc.Text(), "broker "))
		conn, err := net.Dial("tcp", u.Host)
		if err != nil {
			t.Fatal(err)
		}
		gone := make(chan byte, 1)
		c := paho.NewClient(paho.ClientConfig{Conn: conn, OnServerDisconnect: func(d *paho.Disconnect) { gone <- d.ReasonCode }})
		cctx, cancel := context.WithTimeout(ctx, 10*time.Second)
		if _, err := c.Connect(cctx, &paho.Connect{ClientID: "gw-01", CleanStart: true, KeepAlive: 30}); err != nil {
			t.Fatal(err)
		}
		var subs []paho.SubscribeOptions
		for i := 0; i < 9; i++ {
			subs = append(subs, paho.SubscribeOptions{Topic: fmt.Sprintf("f/%d", i), QoS: 1})
		}
		subErr := make(chan error, 1)
		go func() { _, err := c.Subscribe(cctx, &paho.Subscribe{Subscriptions: subs}); subErr <- err }()
		if tt.granted {
			if err := <-subErr; err != nil {
				t.Errorf("%v: 9 filters: %v", tt.args, err)
			}
		} else {
			select {
			case code := <-gone:
				if code != 0x97 {
					t.Errorf("%v: disconnect reason %#x, want 0x97", tt.args, code)
				}
			case <-cctx.Done():
				t.Errorf("%v: 9 filters in one SUBSCRIBE did not close the connection", tt.args)
			}
		}
		cancel() // paho may keep waiting for the SUBACK of a refused SUBSCRIBE: not awaited
		c.Disconnect(&paho.Disconnect{})
		stop()
		if err := <-done; err != nil {
			t.Errorf("%v: Run: %v", tt.args, err)
		}
	}
}
