package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/harness"

	"github.com/gwota/gwota/test/testenv"
)

// The proxy tests run ota-net in a fence (harness.Fence): a network namespace whose only way
// out is the veth address tinyproxy listens on. The emulator's broker and file server listen
// on the machine's loopback, which ota-net cannot reach from there, so an update that
// completes went through the proxy; TestProxyFenceHolds shows that without the proxy ota-net
// reaches nothing.

// needProxyRig skips (fails under CI=true) when fences or tinyproxy are not available.
func needProxyRig(t *testing.T) {
	t.Helper()
	err := harness.CanFence()
	if err == nil {
		_, err = harness.FindTinyproxy()
	}
	testenv.Need(t, err)
}

// proxyRig is an env whose ota-net runs fenced, with tinyproxy as its only way out.
type proxyRig struct {
	*env
	fence *harness.Fence
	px    *harness.WebProxy
	logs  *logWatch
}

// newProxyRig starts the emulator (embedded broker), a fence and tinyproxy on the fence's
// host address; netTOML is appended to ota-net's configuration ("" leaves it without proxy).
func newProxyRig(t *testing.T, popts harness.WebProxyOptions, netTOML func(px *harness.WebProxy) string, mod func(*harness.DeviceOptions)) *proxyRig {
	t.Helper()
	needProxyRig(t)
	fence, err := harness.NewFence()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(fence.Close)
	popts.Listen = fence.HostIP
	pdir := t.TempDir()
	ctx, cancel := context.WithTimeout(context.Background(), time.Minute)
	defer cancel()
	px, err := harness.StartWebProxy(ctx, pdir, popts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			b, _ := os.ReadFile(px.Log)
			t.Logf("tinyproxy log:\n%s", b)
		}
		px.Stop()
	})
	logs := &logWatch{}
	e := newEnv(t, embedded, func(o *harness.DeviceOptions) {
		o.NetPrefix = fence.Prefix()
		o.LogTee = logs
		if netTOML != nil {
			o.NetConfigExtra = netTOML(px)
		}
		if mod != nil {
			mod(o)
		}
	})
	return &proxyRig{env: e, fence: fence, px: px, logs: logs}
}

// proxyTOML is the [proxy] table naming px.
func proxyTOML(px *harness.WebProxy) string {
	s := fmt.Sprintf("\n[proxy]\nurl = %q\n", px.URL())
	if px.CAFile != "" {
		s += fmt.Sprintf("ca_file = %q\n", px.CAFile)
	}
	return s
}

// hostPort is the host:port of a URL.
func hostPort(t *testing.T, raw string) string {
	t.Helper()
	u, err := url.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	return u.Host
}

// logWatch receives both processes' output and lets a test wait for a line.
type logWatch struct {
	mu      sync.Mutex
	buf     bytes.Buffer
	changed chan struct{}
}

func (w *logWatch) Write(p []byte) (int, error) {
	w.mu.Lock()
	defer w.mu.Unlock()
	w.buf.Write(p)
	if w.changed != nil {
		close(w.changed)
		w.changed = nil
	}
	return len(p), nil
}

func (w *logWatch) String() string {
	w.mu.Lock()
	defer w.mu.Unlock()
	return w.buf.String()
}

// wait returns the first line holding every one of substrs, once n such lines were logged.
func (w *logWatch) wait(ctx context.Context, n int, substrs ...string) (string, error) {
	for {
		w.mu.Lock()
		var found []string
		for _, l := range strings.Split(w.buf.String(), "\n") {
			all := true
			for _, s := range substrs {
				all = all && strings.Contains(l, s)
			}
			if all {
				found = append(found, l)
			}
		}
		if len(found) >= n {
			w.mu.Unlock()
			return found[0], nil
		}
		if w.changed == nil {
			w.changed = make(chan struct{})
		}
		ch := w.changed
		w.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return "", fmt.Errorf("no %d log lines with %q: %w", n, substrs, context.Cause(ctx))
		}
	}
}

// TestProxyFenceHolds is the negative control of every proxy test: the same fenced ota-net
// without a proxy cannot reach the broker, so it never starts the job.
func TestProxyFenceHolds(t *testing.T) {
	t.Parallel()
	r := newProxyRig(t, harness.WebProxyOptions{}, nil, nil)
	img := r.image("v2.img", smallImage, 21)
	r.start()
	r.createJob("fenced", r.signer.File(img))
	if _, err := r.logs.wait(r.ctx, 2, "mqtt connect failed", "connection refused"); err != nil {
		t.Fatal(err)
	}
	if strings.Contains(r.logs.String(), "mqtt connected") {
		t.Fatal("ota-net reached the broker from inside the fence without the proxy: the proxy tests prove nothing")
	}
	if us := r.cloud.Updates("fenced"); len(us) != 0 {
		t.Fatalf("the fenced ota-net updated the job: %v", harness.Steps(us))
	}
}

// TestProxyUpdate: whole updates through tinyproxy from the fence, over MQTT streams and over
// the presigned URL, with the proxy reached over plain TCP and over TLS.
func TestProxyUpdate(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name     string
		tls      bool
		protocol string
	}{
		{"mqtt", false, backend.ProtocolMQTT},
		{"http", false, backend.ProtocolHTTP},
		{"mqtt-https-proxy", true, backend.ProtocolMQTT},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			r := newProxyRig(t, harness.WebProxyOptions{TLS: tc.tls}, proxyTOML, nil)
			img := r.image("v2.img", midImage, 22)
			r.start()
			r.createJob("viaproxy", r.signer.File(img), tc.protocol)
			r.waitEnd("viaproxy")
			us := checkSteps(t, r.cloud, "viaproxy", happy)
			checkProgress(t, us[:len(us)-2], false, -1)
			r.checkInstalled(img, 1)
			broker := hostPort(t, r.cloud.BrokerURL())
			// ota-net ran twice (before and after the reboot), each time through the proxy.
			if n := r.px.Tunnels(broker); n < 2 {
				t.Errorf("tinyproxy opened %d tunnels to the broker %s, want one per ota-net run (2)", n, broker)
			}
			if tc.protocol == backend.ProtocolHTTP {
				files := hostPort(t, r.cloud.HTTPURL())
				if n := r.px.Tunnels(files); n == 0 {
					t.Errorf("no tunnel to the file server %s", files)
				}
				if n := len(r.cloud.StreamRequests("viaproxy")); n != 0 {
					t.Errorf("an HTTP job saw %d stream requests", n)
				}
			}
			if l, err := r.logs.wait(r.ctx, 1, "using a web proxy"); err != nil {
				t.Error(err)
			} else if !strings.Contains(l, r.px.URL()) {
				t.Errorf("the start-up line does not name the proxy %s: %s", r.px.URL(), l)
			}
		})
	}
}

// TestProxyBasicAuth: a proxy that requires Basic authentication. With the user and the
// password file (from CREDENTIALS_DIRECTORY, as LoadCredential= passes it) the update
// completes; with a wrong password ota-net logs that the proxy refused the credentials
// (tinyproxy answers CONNECT with 401, others with 407) and never the password.
func TestProxyBasicAuth(t *testing.T) {
	t.Parallel()
	const user, password = "gateway", "pr0xy-s3cret-pw"
	for _, tc := range []struct {
		name, given string
		ok          bool
	}{
		{"right", password, true},
		{"wrong", "not-the-password", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			creds := t.TempDir()
			if err := os.WriteFile(filepath.Join(creds, "proxy-password"), []byte(tc.given+"\n"), 0o400); err != nil {
				t.Fatal(err)
			}
			r := newProxyRig(t, harness.WebProxyOptions{User: user, Password: password}, func(px *harness.WebProxy) string {
				return proxyTOML(px) + fmt.Sprintf("user = %q\npassword_file = \"proxy-password\"\n", user)
			}, func(o *harness.DeviceOptions) {
				o.Env = append(o.Env, "CREDENTIALS_DIRECTORY="+creds)
			})
			img := r.image("v2.img", smallImage, 23)
			r.start()
			r.createJob("auth", r.signer.File(img))
			if tc.ok {
				r.waitEnd("auth")
				checkSteps(t, r.cloud, "auth", happy)
				r.checkInstalled(img, 1)
			} else {
				l, err := r.logs.wait(r.ctx, 2, "mqtt connect failed at the web proxy", "proxy authentication required")
				if err != nil {
					t.Fatal(err)
				}
				if !strings.Contains(l, "refused the configured credentials") {
					t.Errorf("the log line does not say the credentials were refused: %s", l)
				}
				if us := r.cloud.Updates("auth"); len(us) != 0 {
					t.Errorf("job updated without a connection: %v", harness.Steps(us))
				}
			}
			if all := r.logs.String(); strings.Contains(all, tc.given) || strings.Contains(all, password) {
				t.Errorf("a password appears in the logs")
			}
		})
	}
}

// TestProxyRefusesPort: a proxy that allows CONNECT only to some ports (tinyproxy's
// ConnectPort). Refusing the broker's port: ota-net logs the 403 at every attempt. Allowing
// the broker but refusing the file server's port: the HTTP download fails at once with
// proxy_failed/3019, and nothing is activated.
func TestProxyRefusesPort(t *testing.T) {
	t.Parallel()
	t.Run("broker", func(t *testing.T) {
		t.Parallel()
		r := newProxyRig(t, harness.WebProxyOptions{ConnectPorts: []int{443}}, proxyTOML, nil)
		r.start()
		l, err := r.logs.wait(r.ctx, 2, "mqtt connect failed at the web proxy", "proxy_status=403")
		if err != nil {
			t.Fatal(err)
		}
		if !strings.Contains(l, "proxy refused the tunnel") {
			t.Errorf("log line: %s", l)
		}
	})
	t.Run("files", func(t *testing.T) {
		t.Parallel()
		proxyRefusesFiles(t, otav1.Reason_REASON_PROXY_FAILED)
	})
}

// proxyRefusesFiles: the proxy allows CONNECT to the broker's port only, so the presigned
// URL's tunnel gets 403: the job fails with want, and nothing is activated (also the
// proxy_failed row of TestEveryReason).
func proxyRefusesFiles(t *testing.T, want otav1.Reason) {
	r := newProxyRig(t, harness.WebProxyOptions{}, proxyTOML, nil)
	u, err := url.Parse(r.cloud.BrokerURL())
	if err != nil {
		t.Fatal(err)
	}
	port, err := strconv.Atoi(u.Port())
	if err != nil {
		t.Fatal(err)
	}
	if err := r.px.SetConnectPorts(r.ctx, port); err != nil {
		t.Fatal(err)
	}
	img := r.image("v2.img", smallImage, 24)
	r.start()
	before := r.slots()
	r.createJob("refused", r.signer.File(img), backend.ProtocolHTTP)
	ex := r.waitEnd("refused")
	checkSteps(t, r.cloud, "refused", []harness.Step{receiving, failed("aborted", status.Name(want), status.Code(want))})
	if got := ex.StatusDetails["proxy_status"]; got != "403" {
		t.Errorf("statusDetails proxy_status = %q, want the proxy's 403 (details %v)", got, ex.StatusDetails)
	}
	r.checkUntouched(before)
	if _, err := r.logs.wait(r.ctx, 1, "http download failed at the web proxy", "proxy_status=403"); err != nil {
		t.Error(err)
	}
}

// TestProxyRestartMidDownload: tinyproxy is killed (SIGKILL) while a paced stream download
// runs through it and started again on the same port; ota-net reconnects through it and the
// download continues where it was: no block it held is asked for again.
func TestProxyRestartMidDownload(t *testing.T) {
	t.Parallel()
	r := newProxyRig(t, harness.WebProxyOptions{}, proxyTOML, paced)
	img := r.image("v2.img", midImage, 25)
	r.start()
	r.createJob("pxrestart", r.signer.File(img))
	slow(r.env, "pxrestart")
	ev, err := r.cloud.WaitProgress(r.ctx, "pxrestart", midBlocks)
	if err != nil {
		t.Fatal(err)
	}
	held, total, ok := harness.ParseProgress(ev.StatusDetails["progress"])
	if !ok {
		t.Fatalf("progress %q", ev.StatusDetails["progress"])
	}
	if err := r.px.Kill(r.ctx); err != nil {
		t.Fatal(err)
	}
	killedAt := time.Now()
	if _, err := r.logs.wait(r.ctx, 1, "mqtt connection lost"); err != nil {
		t.Fatal(err)
	}
	if err := r.px.Start(r.ctx); err != nil {
		t.Fatal(err)
	}
	r.cloud.ClearFaults(r.cloud.StreamName("pxrestart"))
	r.waitEnd("pxrestart")
	us := checkSteps(t, r.cloud, "pxrestart", happy)
	checkProgress(t, us[:len(us)-2], false, -1)
	r.checkInstalled(img, 1)

	after := requestedAfter(r.cloud, "pxrestart", killedAt)
	if len(after) == 0 {
		t.Fatal("no stream request after the proxy restart")
	}
	// Paced (one block per request, one request in flight): the blocks held are 0..held-1.
	for _, b := range after {
		if b < int(held) {
			t.Errorf("after the proxy restart block %d was requested again (%d of %d were held)", b, held, total)
			break
		}
	}
	served := r.cloud.BlocksServed("pxrestart")
	if served > int(total)+2 {
		t.Errorf("%d blocks served for a %d-block image: the download restarted", served, total)
	}
	t.Logf("%d of %d blocks held at the kill; %d blocks requested after it; %d served in all", held, total, len(after), served)
}
