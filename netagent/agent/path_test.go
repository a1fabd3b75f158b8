package agent_test

import (
	"bytes"
	"encoding/json"
	"io"
	"net/http"
	"net/http/httptest"
	"os"
	"sync/atomic"
	"testing"

	"github.com/gwota/gwota/netagent/agent"
	"github.com/gwota/gwota/netagent/jobs"
	"github.com/gwota/gwota/netagent/pathselect"
	"github.com/gwota/gwota/test/emulator"
)

// Blocks of 4 KiB (startDevice's default).
const pathBlock = 4096

// brokenHTTP sits in front of the emulator's presigned-URL server: the first GET gets the
// first cut bytes of the emulator's answer and then its connection is closed; every later
// GET (the retry, each refreshed URL) is answered 403 like an S3 object that is gone.
type brokenHTTP struct {
	srv  *httptest.Server
	gets atomic.Int32
}

func breakHTTP(t *testing.T, e *emulator.Emulator, cut int64) *brokenHTTP {
	t.Helper()
	upstream := e.HTTPURL()
	b := &brokenHTTP{}
	b.srv = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if b.gets.Add(1) > 1 || cut == 0 {
			http.Error(w, "AccessDenied", http.StatusForbidden)
			return
		}
		req, _ := http.NewRequestWithContext(r.Context(), r.Method, upstream+r.URL.RequestURI(), nil)
		req.Header = r.Header.Clone()
		resp, err := http.DefaultClient.Do(req)
		if err != nil {
			http.Error(w, err.Error(), http.StatusBadGateway)
			return
		}
		defer resp.Body.Close()
		for k, v := range resp.Header {
			w.Header()[k] = v
		}
		w.WriteHeader(resp.StatusCode)
		_, _ = io.CopyN(w, resp.Body, cut)
		w.(http.Flusher).Flush()
		conn, _, err := w.(http.Hijacker).Hijack()
		if err == nil {
			_ = conn.Close()
		}
	}))
	t.Cleanup(b.srv.Close)
	e.SetHTTPURL(b.srv.URL)
	return b
}

// removeStream makes the job's document name a stream that does not exist (AWS answers
// GetStream with ResourceNotFound), while HTTP keeps working.
func removeStream(t *testing.T, e *emulator.Emulator, id string) {
	t.Helper()
	name := e.StreamName(id)
	if name == "" {
		t.Fatal("job has no stream")
	}
	if err := e.RewriteDocument(id, func(doc json.RawMessage) json.RawMessage {
		return bytes.ReplaceAll(doc, []byte(`"`+name+`"`), []byte(`"`+name+`-gone"`))
	}); err != nil {
		t.Fatal(err)
	}
}

func installed(t *testing.T, w *writerRig, img image) {
	t.Helper()
	if got, err := os.ReadFile(w.appPath); err != nil || !bytes.Equal(got, img.data) {
		t.Fatalf("installed file differs (%v)", err)
	}
}

// TestAutoChoosesByLinkBandwidth: with protocol auto and a job offering both, a configured
// link faster than AWS's MQTT quota (512 KiB/s) downloads over HTTP, one slower over MQTT;
// the updates say which.
func TestAutoChoosesByLinkBandwidth(t *testing.T) {
	tests := []struct {
		name string
		cfg  agent.Config
		want string
	}{
		{"20 Mbit/s link: HTTP", agent.Config{LinkBandwidth: 2_500_000}, "http"},
		{"2 Mbit/s link: MQTT", agent.Config{LinkBandwidth: 250_000}, "mqtt"},
		{"unknown link: MQTT", agent.Config{}, "mqtt"},
		{"explicit mqtt beats a fast link", agent.Config{Protocol: pathselect.OnlyMQTT, LinkBandwidth: 100 << 20}, "mqtt"},
		{"explicit http beats a slow link", agent.Config{Protocol: pathselect.OnlyHTTP, LinkBandwidth: 1000}, "http"},
		{"prefer_http is protocol http", agent.Config{PreferHTTP: true}, "http"},
	}
	img := newImage(t, 300*1024+17) // 76 blocks
	for i, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			e := startEmulator(t)
			w := newWriter(t, "/bin/true")
			startDevice(t, e, w, tt.cfg)
			id := "job-auto-" + string(rune('a'+i))
			createJob(t, e, id, []string{"MQTT", "HTTP"}, img, 1, nil)
			ex := waitStatus(t, e, id, jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected)
			if ex.Status != jobs.StatusSucceeded {
				t.Fatalf("job %+v", ex)
			}
			installed(t, w, img)
			blocks, httpBytes := e.BlocksServed(id), e.HTTPBytes(id)
			switch tt.want {
			case "http":
				if blocks != 0 || httpBytes != int64(len(img.data)) {
					t.Fatalf("want HTTP: %d stream blocks and %d HTTP bytes served", blocks, httpBytes)
				}
			case "mqtt":
				if blocks != 76 || httpBytes != 0 {
					t.Fatalf("want MQTT: %d stream blocks and %d HTTP bytes served", blocks, httpBytes)
				}
			}
			for _, u := range e.Updates(id) {
				if got := u.StatusDetails[agent.KeyProtocol]; got != tt.want {
					t.Fatalf("update %s %v: protocol %q, want %q", u.Status, u.StatusDetails, got, tt.want)
				}
			}
		})
	}
}

// TestHTTPBrokenFallsBackToMQTT: HTTP is chosen (fast link), its server closes the
// connection after 40 blocks and then refuses every URL (403, through every refresh): the
// download goes on over MQTT in the same writer session, which asks the stream only for the
// 36 blocks the writer does not hold, and the job succeeds saying MQTT delivered.
func TestHTTPBrokenFallsBackToMQTT(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	const viaHTTP = 40
	b := breakHTTP(t, e, viaHTTP*pathBlock)
	startDevice(t, e, w, agent.Config{LinkBandwidth: 10 << 20})
	img := newImage(t, 300*1024+17) // 76 blocks
	createJob(t, e, "job-fb-http", []string{"MQTT", "HTTP"}, img, 1, nil)
	ex := waitStatus(t, e, "job-fb-http", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected)
	if ex.Status != jobs.StatusSucceeded {
		t.Fatalf("job %+v", ex)
	}
	installed(t, w, img)
	if n := b.gets.Load(); n < 2 {
		t.Fatalf("HTTP server saw %d GETs: the broken path was not tried", n)
	}
	if got := e.BlocksServed("job-fb-http"); got != 76-viaHTTP {
		t.Fatalf("the stream served %d blocks; the writer held %d of 76 durably, so %d were due", got, viaHTTP, 76-viaHTTP)
	}
	ups := e.Updates("job-fb-http")
	if got := ups[0].StatusDetails[agent.KeyProtocol]; got != "http" {
		t.Errorf("first update names protocol %q, want http", got)
	}
	if got := ex.StatusDetails[agent.KeyProtocol]; got != "mqtt" {
		t.Errorf("final update names protocol %q, want mqtt (%v)", got, ex.StatusDetails)
	}
}

// TestMQTTStreamMissingFallsBackToHTTP: MQTT is chosen (slow link) but the job's stream does
// not exist (ResourceNotFound): HTTP delivers the file.
func TestMQTTStreamMissingFallsBackToHTTP(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	img := newImage(t, 300*1024+17)
	createJob(t, e, "job-fb-mqtt", []string{"MQTT", "HTTP"}, img, 1, nil)
	removeStream(t, e, "job-fb-mqtt")
	startDevice(t, e, w, agent.Config{LinkBandwidth: 100_000})
	ex := waitStatus(t, e, "job-fb-mqtt", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected)
	if ex.Status != jobs.StatusSucceeded {
		t.Fatalf("job %+v", ex)
	}
	installed(t, w, img)
	if got := e.Updates("job-fb-mqtt")[0].StatusDetails[agent.KeyProtocol]; got != "mqtt" {
		t.Fatalf("first update names protocol %q: MQTT was not tried first", got)
	}
	if got := e.HTTPBytes("job-fb-mqtt"); got != int64(len(img.data)) {
		t.Fatalf("HTTP served %d bytes of %d", got, len(img.data))
	}
	if got := ex.StatusDetails[agent.KeyProtocol]; got != "http" {
		t.Errorf("final update names protocol %q, want http", got)
	}
}

// TestBothBrokenFailsWithLastReason: both protocols fail; the job fails with the typed
// reason of the last one tried (MQTT's stream error), naming MQTT.
func TestBothBrokenFailsWithLastReason(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	img := newImage(t, 300*1024+17)
	createJob(t, e, "job-fb-both", []string{"MQTT", "HTTP"}, img, 1, nil)
	removeStream(t, e, "job-fb-both")
	breakHTTP(t, e, 0)
	startDevice(t, e, w, agent.Config{LinkBandwidth: 10 << 20})
	ex := waitStatus(t, e, "job-fb-both", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected)
	d := ex.StatusDetails
	if ex.Status != jobs.StatusFailed || d["reason"] != "download_failed" || d["stream_error"] != emulator.StreamResourceNotFound || d[agent.KeyProtocol] != "mqtt" {
		t.Fatalf("job %s %v: want FAILED download_failed, stream_error ResourceNotFound, protocol mqtt", ex.Status, d)
	}
	if _, ok := d["http_status"]; ok {
		t.Fatalf("the failure carries the first protocol's http_status: %v", d)
	}
}

// TestExplicitProtocolDoesNotFallBack: protocol = http is the only protocol used when the
// job offers it: a broken HTTP path fails the job (download_failed, http_status 403) and
// the stream is never asked.
func TestExplicitProtocolDoesNotFallBack(t *testing.T) {
	e := startEmulator(t)
	w := newWriter(t, "/bin/true")
	breakHTTP(t, e, 0)
	startDevice(t, e, w, agent.Config{Protocol: pathselect.OnlyHTTP})
	img := newImage(t, 300*1024+17)
	createJob(t, e, "job-only-http", []string{"MQTT", "HTTP"}, img, 1, nil)
	ex := waitStatus(t, e, "job-only-http", jobs.StatusSucceeded, jobs.StatusFailed, jobs.StatusRejected)
	d := ex.StatusDetails
	if ex.Status != jobs.StatusFailed || d["reason"] != "download_failed" || d["http_status"] != "403" || d[agent.KeyProtocol] != "http" {
		t.Fatalf("job %s %v", ex.Status, d)
	}
	if n := e.BlocksServed("job-only-http"); n != 0 || len(e.StreamRequests("job-only-http")) != 0 {
		t.Fatalf("the stream was asked (%d blocks) although protocol = http", n)
	}
}
