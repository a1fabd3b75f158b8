// Package netfaults runs whole updates through bad links: toxiproxy (embedded) between
// ota-net and the broker and between ota-net and the presigned-URL server, plus the
// emulator's own faults. Each case must end SUCCEEDED with the image in slot b, without
// starting the download again (a bounded amount fetched twice), within a stated time.
//
// GWOTA_BLACKOUT sets the length of the link blackouts (default 10s; the long report uses
// 60s). GWOTA_FAULTS_OUT names a directory that receives netfaults.json.
package netfaults

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
)

const (
	thing     = "gw-net"
	imageSize = 1 << 20
	blockSize = 4096
	total     = imageSize / blockSize
)

var terminal = []string{backend.StatusSucceeded, backend.StatusFailed, backend.StatusRejected,
	backend.StatusCanceled, backend.StatusTimedOut, backend.StatusRemoved}

// world is one case's setup: emulator, proxies, device.
type world struct {
	t      *testing.T
	ctx    context.Context
	cloud  *harness.Cloud
	mqtt   *toxiproxy.Proxy
	http   *toxiproxy.Proxy
	dev    *harness.Device
	signer *harness.Signer
	jobID  string
}

// toxic adds a toxic to p, e.g. toxic(p, "lat", "latency", "downstream", `{"latency":25}`).
func (w *world) toxic(p *toxiproxy.Proxy, name, typ, stream, attrs string) {
	w.t.Helper()
	js := fmt.Sprintf(`{"name":%q,"type":%q,"stream":%q,"toxicity":1,"attributes":%s}`, name, typ, stream, attrs)
	if _, err := p.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
		w.t.Fatalf("toxic %s: %v", name, err)
	}
}

// blackout takes the link down (listener closed, connections cut) for d, then up again.
func (w *world) blackout(p *toxiproxy.Proxy, d time.Duration) {
	w.t.Helper()
	p.Stop()
	w.t.Logf("link %s down for %v", p.Name, d)
	select {
	case <-time.After(d): // the fault itself is a length of time
	case <-w.ctx.Done():
		return
	}
	if err := p.Start(); err != nil {
		w.t.Fatalf("link %s up again: %v", p.Name, err)
	}
}

// third waits until a third of the image is reported received.
func (w *world) third() {
	w.t.Helper()
	if _, err := w.cloud.WaitProgress(w.ctx, w.jobID, total/3); err != nil {
		w.t.Fatal(err)
	}
}

type tcase struct {
	name     string
	protocol string
	// before runs before the job exists (toxics, emulator faults); during runs once a third
	// of the image is in.
	before, during func(w *world)
	// wantExpired: some GET must meet an expired presigned URL.
	wantExpired bool
	// limit bounds the time from job creation to SUCCEEDED.
	limit func(blackout time.Duration) time.Duration
}

type result struct {
	Name      string  `json:"name"`
	Seconds   float64 `json:"seconds"`
	Limit     float64 `json:"limit_seconds"`
	Refetched int64   `json:"bytes_fetched_again"` // HTTP: bytes the server wrote beyond the image
	Failure   string  `json:"failure,omitempty"`
}

func TestNetworkFaults(t *testing.T) {
	blackout := 10 * time.Second
	if d, err := time.ParseDuration(os.Getenv("GWOTA_BLACKOUT")); err == nil && d > 0 {
		blackout = d
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	bin, err := harness.Build(ctx, harness.BuildOptions{Dir: t.TempDir(), Race: harness.RaceEnabled})
	if err != nil {
		t.Fatal(err)
	}
	quick := func(time.Duration) time.Duration { return 60 * time.Second }
	cases := []tcase{
		{name: "mqtt reset every 256 KiB", protocol: backend.ProtocolMQTT, limit: quick,
			before: func(w *world) { w.toxic(w.mqtt, "cut", "limit_data", "downstream", `{"bytes":262144}`) }},
		{name: "mqtt blackout", protocol: backend.ProtocolMQTT,
			limit:  func(b time.Duration) time.Duration { return b + 60*time.Second },
			before: func(w *world) { w.cloud.SetFaults(w.jobID, emulator.Faults{Delay: 5 * time.Millisecond}) },
			during: func(w *world) { w.blackout(w.mqtt, blackout) }},
		{name: "mqtt LTE latency, jitter and 20 Mbit/s", protocol: backend.ProtocolMQTT, limit: quick,
			before: func(w *world) {
				w.toxic(w.mqtt, "down", "latency", "downstream", `{"latency":25,"jitter":5}`)
				w.toxic(w.mqtt, "up", "latency", "upstream", `{"latency":25,"jitter":5}`)
				w.toxic(w.mqtt, "bw", "bandwidth", "downstream", `{"rate":2500}`)
			}},
		{name: "job updates throttled", protocol: backend.ProtocolMQTT, limit: quick,
			before: func(w *world) { w.cloud.SetFaults(w.jobID, emulator.Faults{ThrottleUpdates: 4}) }},
		{name: "stream rejections (InternalError)", protocol: backend.ProtocolMQTT, limit: quick,
			before: func(w *world) { w.cloud.SetFaults(w.jobID, emulator.Faults{Delay: 5 * time.Millisecond}) },
			during: func(w *world) {
				stream := w.cloud.StreamName(w.jobID)
				w.cloud.SetFaults(stream, emulator.Faults{RejectCode: "InternalError"})
				w.waitRequests(stream, 3, func(r emulator.StreamRequest) bool { return r.Rejected != "" })
				w.cloud.ClearFaults(stream)
			}},
		{name: "http reset every 256 KiB", protocol: backend.ProtocolHTTP, limit: quick,
			before: func(w *world) { w.toxic(w.http, "cut", "limit_data", "downstream", `{"bytes":262144}`) }},
		{name: "http presigned URL expires mid-download", protocol: backend.ProtocolHTTP, limit: quick, wantExpired: true,
			before: func(w *world) {
				// About 5 s of download at 200 KB/s, the connection cut every 256 KiB, each URL
				// valid 2 s: the later GETs meet an expired URL (403) and need a fresh one.
				w.toxic(w.http, "bw", "bandwidth", "downstream", `{"rate":200}`)
				w.toxic(w.http, "cut", "limit_data", "downstream", `{"bytes":262144}`)
				w.cloud.SetFaults(w.jobID, emulator.Faults{ExpireURLAfter: 2 * time.Second})
			}},
		{name: "http blackout", protocol: backend.ProtocolHTTP,
			limit: func(b time.Duration) time.Duration { return b + 60*time.Second },
			before: func(w *world) {
				w.toxic(w.http, "bw", "bandwidth", "downstream", `{"rate":300}`)
			},
			during: func(w *world) { w.blackout(w.http, blackout) }},
	}
	var results []result
	failures := 0
	for _, c := range cases {
		r := runCase(t, ctx, bin, c, blackout)
		if r.Seconds == 0 && r.Failure == "" {
			continue // not selected by -run
		}
		results = append(results, r)
		if r.Failure != "" {
			failures++
			t.Errorf("%s: %s", c.name, r.Failure)
		} else {
			t.Logf("%-45s SUCCEEDED in %5.1f s (limit %3.0f s), %d bytes fetched again", c.name, r.Seconds, r.Limit, r.Refetched)
		}
	}
	if dir := os.Getenv("GWOTA_FAULTS_OUT"); dir != "" {
		cases := map[string]string{}
		for _, r := range results {
			v := fmt.Sprintf("%.1f s of %.0f s allowed, %d bytes fetched again", r.Seconds, r.Limit, r.Refetched)
			if r.Failure != "" {
				v = "FAILED: " + r.Failure
			}
			cases[r.Name] = v
		}
		b, _ := json.MarshalIndent(map[string]any{"cases": cases, "failures": failures, "blackout": blackout.String(),
			"image_size": imageSize, "block_size": blockSize}, "", "  ")
		if err := os.WriteFile(filepath.Join(dir, "netfaults.json"), b, 0o644); err != nil {
			t.Error(err)
		}
	}
}

// waitRequests waits until n stream requests of stream match.
func (w *world) waitRequests(stream string, n int, match func(emulator.StreamRequest) bool) {
	w.t.Helper()
	tick := time.NewTicker(20 * time.Millisecond)
	defer tick.Stop()
	for {
		got := 0
		for _, r := range w.cloud.StreamRequests(stream) {
			if match(r) {
				got++
			}
		}
		if got >= n {
			return
		}
		select {
		case <-tick.C:
		case <-w.ctx.Done():
			w.t.Fatalf("waiting for %d matching stream requests (have %d): %v", n, got, context.Cause(w.ctx))
		}
	}
}

func runCase(t *testing.T, parent context.Context, bin *harness.Binaries, c tcase, blackout time.Duration) (r result) {
	r.Name = c.name
	limit := c.limit(blackout)
	r.Limit = limit.Seconds()
	t.Run(c.name, func(t *testing.T) {
		defer func() {
			if t.Failed() && r.Failure == "" {
				r.Failure = "see the test log"
			}
		}()
		ctx, cancel := context.WithTimeout(parent, limit+2*time.Minute)
		defer cancel()
		dir, err := os.MkdirTemp("", "netf")
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() {
			if t.Failed() {
				t.Logf("directory kept: %s", dir)
				return
			}
			os.RemoveAll(dir)
		})
		cloud, err := harness.StartCloud(ctx, emulator.Options{Thing: thing})
		if err != nil {
			t.Fatal(err)
		}
		defer cloud.Close()
		srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
		w := &world{t: t, cloud: cloud, jobID: "netfault"}
		w.mqtt = toxiproxy.NewProxy(srv, "mqtt", "127.0.0.1:0", strings.TrimPrefix(cloud.BrokerURL(), "mqtt://"))
		w.http = toxiproxy.NewProxy(srv, "http", "127.0.0.1:0", strings.TrimPrefix(cloud.HTTPURL(), "http://"))
		for _, p := range []*toxiproxy.Proxy{w.mqtt, w.http} {
			if err := p.Start(); err != nil {
				t.Fatal(err)
			}
			defer p.Stop()
		}
		cloud.SetHTTPURL("http://" + w.http.Listen)
		if w.signer, err = harness.NewSigner("netfaults-signer"); err != nil {
			t.Fatal(err)
		}
		img := filepath.Join(dir, "v2.img")
		if err := harness.WriteImage(img, imageSize, 5); err != nil {
			t.Fatal(err)
		}
		opts := harness.DeviceOptions{
			Dir:       filepath.Join(dir, "d"),
			Thing:     thing,
			BrokerURL: "mqtt://" + w.mqtt.Listen,
			Trusted:   []*harness.Signer{w.signer},
			BlockSize: blockSize,
			LogLevel:  "info",
		}
		if err := os.Mkdir(opts.Dir, 0o700); err != nil {
			t.Fatal(err)
		}
		if w.dev, err = harness.NewDevice(bin, opts); err != nil {
			t.Fatal(err)
		}
		defer func() {
			if err := w.dev.Close(true); err != nil {
				t.Errorf("closing the device: %v", err)
			}
			if rr := w.dev.RaceReports(); len(rr) > 0 {
				t.Errorf("data races reported by the binaries, see %v", rr)
			}
			if t.Failed() {
				t.Logf("updates: %v", harness.Steps(cloud.Updates(w.jobID)))
				t.Log(w.dev.Logs())
			}
		}()
		dctx, dcancel := w.dev.Context(ctx)
		defer dcancel()
		w.ctx = dctx
		if c.before != nil {
			c.before(w)
		}
		if err := w.dev.Start(dctx); err != nil {
			t.Fatal(err)
		}
		start := time.Now()
		if err := cloud.CreateJob(dctx, backend.JobSpec{JobID: w.jobID, Protocols: []string{c.protocol}, Files: []backend.FileSpec{w.signer.File(img)}}); err != nil {
			t.Fatal(err)
		}
		if c.during != nil {
			w.third()
			c.during(w)
		}
		ex, err := cloud.WaitStatus(dctx, w.jobID, terminal...)
		if err != nil {
			t.Fatalf("job did not end: %v (cause %v)", err, context.Cause(dctx))
		}
		r.Seconds = time.Since(start).Seconds()
		if ex.Status != backend.StatusSucceeded {
			r.Failure = fmt.Sprintf("job ended %s %v", ex.Status, ex.StatusDetails)
			t.Fatal(r.Failure)
		}
		want, _ := harness.FileSHA256(img)
		if got, err := harness.FilePrefixSHA256(w.dev.SlotB, imageSize); err != nil || got != want {
			t.Fatalf("slot b holds %s (%v), want %s", got, err, want)
		}
		if c.protocol == backend.ProtocolHTTP {
			// What the server wrote, the link's losses included (an upper bound of what
			// ota-net received twice). The download must never start over: only the first
			// GET may ask for the start of the file.
			r.Refetched = cloud.HTTPBytes(w.jobID) - imageSize
			ranges := cloud.HTTPRanges(w.jobID)
			for i, rg := range ranges {
				if i > 0 && (rg == "" || strings.HasPrefix(rg, "bytes=0-")) {
					r.Failure = fmt.Sprintf("GET %d of %d asked for the start of the file again (%q): the download started over; ranges %q", i+1, len(ranges), rg, ranges)
					t.Fatal(r.Failure)
				}
			}
			t.Logf("%d GETs: %q", len(ranges), ranges)
			if c.wantExpired && !slices.Contains(ranges, "expired") {
				r.Failure = "no GET met an expired URL: the case did not test what it claims"
				t.Fatal(r.Failure)
			}
		} else {
			sent := 0
			for _, q := range cloud.StreamRequests(w.jobID) {
				sent += len(q.Sent)
			}
			r.Refetched = int64(sent-total) * blockSize
		}
		// Never the whole image again over MQTT: at most a quarter of it fetched twice.
		if c.protocol == backend.ProtocolMQTT && r.Refetched > imageSize/4 {
			r.Failure = fmt.Sprintf("%d bytes fetched again (more than a quarter of the image: the download started over)", r.Refetched)
			t.Error(r.Failure)
		}
		if time.Duration(r.Seconds*float64(time.Second)) > limit {
			r.Failure = fmt.Sprintf("took %.1f s, limit %v", r.Seconds, limit)
			t.Error(r.Failure)
		}
	})
	return r
}
