package emulator

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/testenv"
)

// runWholeJob plays a device written directly against the topics: describe $next, fetch every
// block with bitmaps, report IN_PROGRESS then SUCCEEDED. With subscribe it subscribes to the
// response topics it needs (required on an ordinary broker); without, it relies on AWS-style
// delivery to the requester.
func runWholeJob(t *testing.T, e *Emulator, brokerURL string, subscribe bool) {
	path, sum := writeTestFile(t, 300*1024+123)
	createJob(t, e, "whole-1", path, backend.ProtocolMQTT)

	jobs := thingPrefix + "jobs/"
	var subs []string
	if subscribe {
		subs = []string{jobs + "+/get/accepted", jobs + "+/get/rejected", jobs + "+/update/accepted", jobs + "+/update/rejected",
			thingPrefix + "streams/+/data/cbor", thingPrefix + "streams/+/rejected/cbor"}
	}
	d := connectDevice(t, brokerURL, "gw-01", subs...)

	d.publishJSON(jobs+"$next/get", map[string]any{"clientToken": "d1", "includeJobDocument": true})
	var desc struct {
		Execution struct {
			JobID       string `json:"jobId"`
			JobDocument struct {
				AfrOTA struct {
					Protocols  []string `json:"protocols"`
					StreamName string   `json:"streamname"`
					Files      []struct {
						FileSize int `json:"filesize"`
						FileID   int `json:"fileid"`
					} `json:"files"`
				} `json:"afr_ota"`
			} `json:"jobDocument"`
			VersionNumber int `json:"versionNumber"`
		} `json:"execution"`
	}
	if err := json.Unmarshal(d.next(jobs+"$next/get/accepted").Payload, &desc); err != nil {
		t.Fatal(err)
	}
	ota := desc.Execution.JobDocument.AfrOTA
	if desc.Execution.JobID != "whole-1" || ota.StreamName == "" || len(ota.Files) != 1 {
		t.Fatalf("describe: %+v", desc)
	}
	size := ota.Files[0].FileSize
	upd := jobs + desc.Execution.JobID + "/update"
	blocks := (size + 4095) / 4096
	d.publishJSON(upd, map[string]any{"status": "IN_PROGRESS", "expectedVersion": desc.Execution.VersionNumber,
		"statusDetails": map[string]string{"self_test": "receiving", "progress": fmt.Sprintf("0/%d", blocks)}})
	d.next(upd + "/accepted")

	prefix := thingPrefix + "streams/" + ota.StreamName + "/"
	got, _ := fetchAll(t, nil, "", d, prefix, size, 4096)
	if sha256.Sum256(got) != sum {
		t.Fatal("downloaded file differs")
	}
	d.publishJSON(upd, map[string]any{"status": "SUCCEEDED", "statusDetails": map[string]string{"self_test": "accepted"}})
	d.next(upd + "/accepted")

	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := e.WaitStatus(ctx, "whole-1", backend.StatusSucceeded); err != nil {
		t.Fatal(err)
	}
	if u := e.Updates("whole-1"); len(u) != 2 || u[0].Status != "IN_PROGRESS" || u[1].Status != "SUCCEEDED" {
		t.Errorf("updates = %+v", u)
	}
	// Under load a late block can make the device re-request it after its quiet period, so
	// more may be served than the file has; never fewer.
	if n := e.BlocksServed("whole-1"); n < blocks {
		t.Errorf("served %d blocks for %d", n, blocks)
	}
}

func TestWholeJobEmbeddedBroker(t *testing.T) {
	e := startEmulator(t, Options{})
	runWholeJob(t, e, e.BrokerURL(), false)
}

func TestWholeJobMosquitto(t *testing.T) {
	url := startMosquitto(t)
	e := startEmulator(t, Options{ExternalBrokerURL: url})
	if e.BrokerURL() != url {
		t.Fatalf("BrokerURL = %s", e.BrokerURL())
	}
	runWholeJob(t, e, url, true)
}

// startMosquitto runs mosquitto as a separate process on a free loopback port.
func startMosquitto(t *testing.T) string {
	t.Helper()
	const bin = "/usr/sbin/mosquitto"
	if _, err := os.Stat(bin); err != nil {
		testenv.Need(t, fmt.Errorf("mosquitto not installed (Debian package mosquitto): %w", err))
	}
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	port := ln.Addr().(*net.TCPAddr).Port
	ln.Close()
	conf := filepath.Join(t.TempDir(), "mosquitto.conf")
	os.WriteFile(conf, []byte(fmt.Sprintf(`listener %d 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
max_queued_messages 100000
max_inflight_messages 100
persistence false
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
`, port)), 0o600)
	cmd := exec.Command(bin, "-c", conf)
	stderr, err := cmd.StderrPipe()
	if err != nil {
		t.Fatal(err)
	}
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan struct{})
	t.Cleanup(func() {
		cmd.Process.Kill()
		<-done
	})
	ready := make(chan struct{})
	go func() {
		defer close(done)
		sc := bufio.NewScanner(stderr)
		signalled := false
		for sc.Scan() {
			if !signalled && strings.Contains(sc.Text(), "running") {
				close(ready)
				signalled = true
			}
		}
		cmd.Wait()
	}()
	select {
	case <-ready:
	case <-done:
		t.Fatal("mosquitto exited before it was running")
	case <-time.After(10 * time.Second):
		t.Fatal("mosquitto not running after 10s")
	}
	return fmt.Sprintf("mqtt://127.0.0.1:%d", port)
}

func TestBrokerRestartKeepsJobs(t *testing.T) {
	e := startEmulator(t, Options{})
	path, _ := writeTestFile(t, 1000)
	createJob(t, e, "job-rs", path)
	// job-rs's own notify-next goes out before the device has a session: were it pushed
	// after the device subscribed and still unacknowledged at StopBroker, mochi would send it
	// again after the restart (seen under load).
	waitPushed(t, e)
	d, _ := connectSession(t, e.BrokerURL(), "gw-01", 3600, thingPrefix+"jobs/notify-next")
	d.publishJSON(thingPrefix+"jobs/job-rs/update", map[string]any{"status": "IN_PROGRESS"})
	d.next(thingPrefix + "jobs/job-rs/update/accepted")
	before := e.BrokerURL()

	if err := e.StopBroker(); err != nil {
		t.Fatal(err)
	}
	select {
	case <-d.c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("client still connected after StopBroker")
	}
	if _, err := net.Dial("tcp", strings.TrimPrefix(before, "mqtt://")); err == nil {
		t.Fatal("stopped broker still accepts connections")
	}
	// While the device is away its job is canceled: the QoS 1 notify-next waits in its session.
	if err := e.CancelJob(context.Background(), "job-rs", true); err != nil {
		t.Fatal(err)
	}
	createJob(t, e, "job-rs2", path)
	// Both notifications must be in the broker's session store before the device comes back:
	// a publish racing mochi's session takeover can land on the old client and be lost.
	waitPushed(t, e)
	if err := e.StartBroker(); err != nil {
		t.Fatal(err)
	}
	if e.BrokerURL() != before {
		t.Fatalf("broker moved from %s to %s", before, e.BrokerURL())
	}
	d2, present := connectSession(t, e.BrokerURL(), "gw-01", 3600)
	if !present {
		t.Fatal("persistent session lost over a broker restart")
	}
	// Both notifications made while it was away arrive: nothing pending, and job-rs2. mochi
	// resends stored messages sorted by creation second only, so their order is not kept.
	seen := map[string]bool{}
	for k := 0; k < 2; k++ {
		m := decodeJSONMap(t, d2.next(thingPrefix+"jobs/notify-next").Payload)
		id := ""
		if ex, ok := m["execution"].(map[string]any); ok {
			id, _ = ex["jobId"].(string)
		}
		seen[id] = true
	}
	if !seen[""] || !seen["job-rs2"] {
		t.Fatalf("queued notify-next messages: %v", seen)
	}
	d2.publishJSON(thingPrefix+"jobs/$next/get", map[string]any{})
	m := decodeJSONMap(t, d2.next(thingPrefix+"jobs/$next/get/accepted").Payload)
	if ex := m["execution"].(map[string]any); ex["jobId"] != "job-rs2" || ex["status"] != "QUEUED" || ex["versionNumber"] != 1.0 {
		t.Fatalf("after restart: %v", m)
	}
	if x, _ := e.Describe(context.Background(), "job-rs"); x.Status != backend.StatusCanceled || x.VersionNumber != 3 {
		t.Fatalf("job-rs after restart: %+v", x)
	}
	if err := e.RestartBroker(); err != nil {
		t.Fatal(err)
	}
}

// On an ordinary broker a response reaches only subscribers: a device that did not subscribe
// never sees it, unlike on AWS IoT and the embedded broker.
func TestExternalBrokerNeedsSubscription(t *testing.T) {
	url := startMosquitto(t)
	startEmulator(t, Options{ExternalBrokerURL: url})
	jobs := thingPrefix + "jobs/"
	observer := connectDevice(t, url, "observer", jobs+"$next/get/accepted")
	d := connectDevice(t, url, "gw-01")
	d.publishJSON(jobs+"$next/get", map[string]any{"clientToken": "unsubscribed"})
	// The answer went out (the observer has it) while the device was not subscribed.
	if m := decodeJSONMap(t, observer.next(jobs+"$next/get/accepted").Payload); m["clientToken"] != "unsubscribed" {
		t.Fatalf("observer saw %v", m)
	}
	// Subscribe, ask again: the emulator answers in order over one connection, so once the
	// second answer is here the first would have been too.
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := d.c.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: jobs + "$next/get/accepted", QoS: 1}}}); err != nil {
		t.Fatal(err)
	}
	d.publishJSON(jobs+"$next/get", map[string]any{"clientToken": "subscribed"})
	m := decodeJSONMap(t, d.next(jobs+"$next/get/accepted").Payload)
	if m["clientToken"] != "subscribed" {
		t.Fatalf("first answer seen = %v; the unsubscribed request's answer was delivered", m)
	}
	if rest := d.drain(jobs + "$next/get/accepted"); len(rest) != 0 {
		t.Fatalf("extra answers: %d", len(rest))
	}
}
