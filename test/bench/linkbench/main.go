// Command linkbench measures time to ready of a whole update over MQTT streams through a
// shaped link: the real ota-net and ota-writer (test/harness), the emulator as the cloud,
// and toxiproxy (embedded) between ota-net and the broker for latency, jitter and bandwidth.
// Stream messages are dropped by the emulator's fault injection (toxiproxy cannot drop one
// MQTT message). Time to ready runs from creating the job to the device's IN_PROGRESS ready
// update reaching the cloud (ota-net connected and settled before the job is created);
// fraction of link is image bytes over that time and the link's
// rate. Each case prints one line; ratios compare runs made in the same invocation.
//
//	go run ./test/bench/linkbench -cases fast,fast-loss25,lte-loss5,sat
//
// GWOTA_HARNESS_OTA_NET=/path/to/ota-net runs another build of ota-net (e.g. main's) in the
// same setup, for before/after figures.
package main

import (
	"context"
	"flag"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
)

// profile is a link: one-way latency and jitter (ms) and rate (KB/s, 1000 bytes; 0: none).
type profile struct {
	name            string
	latency, jitter int
	rateKB          int
	drop            float64
	sizeMiB         int
}

var profiles = map[string]profile{
	"fast":        {name: "fast", sizeMiB: 4},
	"fast-loss25": {name: "fast-loss25", sizeMiB: 4, drop: 0.25},
	"lte":         {name: "lte", latency: 25, jitter: 5, rateKB: 2500, sizeMiB: 16},
	"lte-loss5":   {name: "lte-loss5", latency: 25, jitter: 5, rateKB: 2500, sizeMiB: 16, drop: 0.05},
	"sat":         {name: "sat", latency: 300, rateKB: 625, sizeMiB: 16},
}

func main() {
	cases := flag.String("cases", "fast,fast-loss25,lte,lte-loss5,sat", "profiles to run, in order: "+names())
	reps := flag.Int("reps", 1, "repetitions of each case (the median is printed)")
	blockSize := flag.Int("bs", 0, "ota-net block size (0: its default)")
	flag.BoolVar(&debugLog, "debug", false, "both processes log at debug level to stderr")
	flag.BoolVar(&quotas, "quotas", false, "the emulator enforces AWS IoT Core's per-connection quotas (512 KiB/s each way, 100 publishes/s); off: the link alone limits")
	flag.Parse()
	if err := run(strings.Split(*cases, ","), *reps, *blockSize); err != nil {
		fmt.Fprintln(os.Stderr, "linkbench:", err)
		os.Exit(1)
	}
}

var debugLog, quotas bool

func names() string {
	var n []string
	for k := range profiles {
		n = append(n, k)
	}
	sort.Strings(n)
	return strings.Join(n, ",")
}

func run(cases []string, reps, bs int) error {
	ctx := context.Background()
	dir, err := os.MkdirTemp("", "linkbench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	if err := os.Mkdir(filepath.Join(dir, "bin"), 0o755); err != nil {
		return err
	}
	bin, err := harness.Build(ctx, harness.BuildOptions{Dir: filepath.Join(dir, "bin")})
	if err != nil {
		return err
	}
	net := "ota-net of this tree"
	if p := os.Getenv(harness.EnvPrebuiltNet); p != "" {
		net = p
	}
	fmt.Printf("linkbench: %s, time to ready (job created -> IN_PROGRESS ready at the cloud), median of %d, AWS quotas %v\n", net, reps, quotas)
	signer, err := harness.NewSigner("linkbench-signer")
	if err != nil {
		return err
	}
	for _, name := range cases {
		p, ok := profiles[name]
		if !ok {
			return fmt.Errorf("unknown case %q (%s)", name, names())
		}
		var ts []time.Duration
		for r := 0; r < reps; r++ {
			d, err := once(ctx, dir, bin, signer, p, bs, r)
			if err != nil {
				return fmt.Errorf("%s: %w", name, err)
			}
			ts = append(ts, d)
		}
		sort.Slice(ts, func(a, b int) bool { return ts[a] < ts[b] })
		t := ts[len(ts)/2]
		size := float64(int64(p.sizeMiB) << 20)
		line := fmt.Sprintf("  %-12s %3d MiB, drop %4.0f%%: time to ready %7.2f s, %6.2f MB/s", p.name, p.sizeMiB, p.drop*100, t.Seconds(), size/t.Seconds()/1e6)
		if p.rateKB > 0 {
			line += fmt.Sprintf(", %.2f of the link (%d ms each way, %.0f Mbit/s)", size/t.Seconds()/float64(p.rateKB*1000), p.latency, float64(p.rateKB)*8/1000)
		}
		fmt.Println(line + fmt.Sprintf("  [each: %v]", ts))
	}
	return nil
}

func once(ctx context.Context, dir string, bin *harness.Binaries, signer *harness.Signer, p profile, bs, rep int) (time.Duration, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cdir, err := os.MkdirTemp(dir, "c")
	if err != nil {
		return 0, err
	}
	defer os.RemoveAll(cdir)
	const thing = "linkbench-gw"
	cloud, err := harness.StartCloud(ctx, emulator.Options{Thing: thing, NoQuotas: !quotas})
	if err != nil {
		return 0, err
	}
	defer cloud.Close()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	proxy := toxiproxy.NewProxy(srv, "mqtt", "127.0.0.1:0", strings.TrimPrefix(cloud.BrokerURL(), "mqtt://"))
	if err := proxy.Start(); err != nil {
		return 0, err
	}
	defer proxy.Stop()
	for _, s := range []string{"upstream", "downstream"} {
		if p.latency > 0 {
			if err := toxic(proxy, "lat-"+s, "latency", s, fmt.Sprintf(`{"latency":%d,"jitter":%d}`, p.latency, p.jitter)); err != nil {
				return 0, err
			}
		}
		if p.rateKB > 0 {
			if err := toxic(proxy, "bw-"+s, "bandwidth", s, fmt.Sprintf(`{"rate":%d}`, p.rateKB)); err != nil {
				return 0, err
			}
		}
	}
	img := filepath.Join(cdir, "v2.img")
	if err := harness.WriteImage(img, int64(p.sizeMiB)<<20, uint64(rep+1)); err != nil {
		return 0, err
	}
	opts := harness.DeviceOptions{Dir: filepath.Join(cdir, "d"), Thing: thing, BrokerURL: "mqtt://" + proxy.Listen,
		Trusted: []*harness.Signer{signer}, BlockSize: bs, LogLevel: "info", LogTee: io.Discard}
	if !quotas {
		opts.StreamQuota = -1 // ota-net knows the emulator's quotas are lifted
	}
	if debugLog {
		opts.LogLevel, opts.LogTee = "debug", os.Stderr
	}
	if err := os.Mkdir(opts.Dir, 0o700); err != nil {
		return 0, err
	}
	dev, err := harness.NewDevice(bin, opts)
	if err != nil {
		return 0, err
	}
	defer dev.Close(false)
	dctx, dcancel := dev.Context(ctx)
	defer dcancel()
	if err := dev.Start(dctx); err != nil {
		return 0, err
	}
	// The clock is for the job, not for ota-net's start-up: wait until it is connected, then
	// for its subscriptions and first jobs query to have gone both ways (a bench, not a
	// test: a settle time is good enough here).
	for !strings.Contains(dev.Logs(), "mqtt connected") {
		select {
		case <-dctx.Done():
			return 0, dctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	time.Sleep(time.Second + 8*time.Duration(p.latency)*time.Millisecond)
	const job = "linkbench"
	if p.drop > 0 {
		cloud.SetFaults(job, emulator.Faults{Drop: p.drop})
	}
	start := time.Now()
	if err := cloud.CreateJob(dctx, backend.JobSpec{JobID: job, Protocols: []string{backend.ProtocolMQTT}, Files: []backend.FileSpec{signer.File(img)}}); err != nil {
		return 0, err
	}
	ev, err := cloud.WaitSelfTest(dctx, job, backend.StatusInProgress, "ready")
	if err != nil {
		return 0, fmt.Errorf("no ready: %w (%v)\n%s", err, harness.Steps(cloud.Updates(job)), dev.Logs())
	}
	_ = ev
	took := time.Since(start)
	dropped := 0
	for _, r := range cloud.StreamRequests(job) {
		dropped += len(r.Dropped)
	}
	if p.drop > 0 && dropped == 0 {
		return 0, fmt.Errorf("no stream message dropped")
	}
	return took, nil
}

func toxic(p *toxiproxy.Proxy, name, typ, stream, attrs string) error {
	js := fmt.Sprintf(`{"name":%q,"type":%q,"stream":%q,"toxicity":1,"attributes":%s}`, name, typ, stream, attrs)
	_, err := p.Toxics.AddToxicJson(strings.NewReader(js))
	return err
}
