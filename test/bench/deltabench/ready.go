package main

import (
	"bufio"
	"context"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
)

// The -ready mode measures an update end to end with the real processes: the emulator (AWS
// IoT's quotas on: 512 KiB/s each way on the MQTT connection), an ota-writer whose running
// slot holds v1 and an ota-net, for a full update to v2 (the signed image) and a delta update
// (a manifest and chunk file made by `ota-writer manifest`), over each link case.

// linkKBps is 5 Mbit/s in toxiproxy's unit (KB/s of 1000 bytes).
const linkKBps = 625

// readyCase is a link and a protocol.
type readyCase struct {
	name     string
	protocol string
	link     bool // through toxiproxy at 5 Mbit/s each way (MQTT and HTTP)
}

var readyCases = map[string]readyCase{
	"quota-mqtt": {name: "quota-mqtt", protocol: backend.ProtocolMQTT},
	"link-mqtt":  {name: "link-mqtt", protocol: backend.ProtocolMQTT, link: true},
	"link-http":  {name: "link-http", protocol: backend.ProtocolHTTP, link: true},
}

// ReadyFigures is one end-to-end run.
type ReadyFigures struct {
	Case  string  `json:"case"`
	Kind  string  `json:"kind"` // full or delta
	Ready float64 `json:"ready_s"`
	// Served is what the cloud sent for the job: stream block payloads over MQTT, response
	// bodies over HTTP.
	Served      int64  `json:"served_bytes"`
	NetHWMKiB   int64  `json:"ota_net_vmhwm_kib"`
	WriterHWMKB int64  `json:"ota_writer_vmhwm_kib"`
	Reused      string `json:"reused,omitempty"`
}

// readyBench runs every case for both kinds and calls out with each result.
func readyBench(ctx context.Context, v1, v2 string, withBase bool, cases, kinds []string, out func(ReadyFigures)) error {
	dir, err := os.MkdirTemp("", "deltaready")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	bin, err := harness.Build(ctx, harness.BuildOptions{Dir: filepath.Join(dir, "bin")})
	if err != nil {
		return err
	}
	signer, err := harness.NewSigner("deltaready-signer")
	if err != nil {
		return err
	}
	mf, chunks := filepath.Join(dir, "v2.gwota-manifest"), filepath.Join(dir, "v2.chunks")
	// The publisher's command, as an operator runs it (unsigned: the job signs the manifest
	// like any OTA file, as the e2e tests do).
	args := []string{"manifest", "--image", v2, "--version", "2.0.0",
		"--target", harness.TargetName, "--compatible", harness.Compatible, "-o", mf, "--chunks", chunks}
	if withBase {
		args = append(args, "--base", v1)
	}
	cmd := exec.CommandContext(ctx, bin.Writer, args...)
	if b, err := cmd.CombinedOutput(); err != nil {
		return fmt.Errorf("ota-writer manifest: %w\n%s", err, b)
	}
	for _, c := range cases {
		rc, ok := readyCases[c]
		if !ok {
			return fmt.Errorf("unknown -ready-cases %q (quota-mqtt, link-mqtt, link-http)", c)
		}
		for _, k := range kinds {
			var files []backend.FileSpec
			switch k {
			case "full":
				files = []backend.FileSpec{signer.File(v2)}
			case "delta":
				f := signer.File(mf)
				f.FileID = 0
				files = backend.DeltaFiles(f, chunks)
			default:
				return fmt.Errorf("unknown -ready-kinds %q (full, delta)", k)
			}
			f, err := readyOnce(ctx, dir, bin, signer, rc, v1, files)
			if err != nil {
				return fmt.Errorf("%s %s: %w", c, k, err)
			}
			f.Case, f.Kind = c, k
			out(f)
		}
	}
	return nil
}

func readyOnce(ctx context.Context, dir string, bin *harness.Binaries, signer *harness.Signer, rc readyCase, v1 string, files []backend.FileSpec) (ReadyFigures, error) {
	var f ReadyFigures
	ctx, cancel := context.WithTimeout(ctx, 30*time.Minute)
	defer cancel()
	cdir, err := os.MkdirTemp(dir, "c")
	if err != nil {
		return f, err
	}
	defer os.RemoveAll(cdir)
	const thing = "deltaready-gw"
	cloud, err := harness.StartCloud(ctx, emulator.Options{Thing: thing})
	if err != nil {
		return f, err
	}
	defer cloud.Close()
	broker := cloud.BrokerURL()
	if rc.link {
		srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
		mq := toxiproxy.NewProxy(srv, "mqtt", "127.0.0.1:0", strings.TrimPrefix(broker, "mqtt://"))
		hp := toxiproxy.NewProxy(srv, "http", "127.0.0.1:0", strings.TrimPrefix(cloud.HTTPURL(), "http://"))
		for _, p := range []*toxiproxy.Proxy{mq, hp} {
			if err := p.Start(); err != nil {
				return f, err
			}
			defer p.Stop()
			for _, s := range []string{"upstream", "downstream"} {
				js := fmt.Sprintf(`{"name":"bw-%s","type":"bandwidth","stream":%q,"toxicity":1,"attributes":{"rate":%d}}`, s, s, linkKBps)
				if _, err := p.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
					return f, err
				}
			}
		}
		// One 5 Mbit/s link per direction would be shared by both connections; with HTTP
		// jobs the MQTT connection carries only a few small messages meanwhile.
		broker = "mqtt://" + mq.Listen
		cloud.SetHTTPURL("http://" + hp.Listen)
	}
	st, err := os.Stat(v1)
	if err != nil {
		return f, err
	}
	opts := harness.DeviceOptions{Dir: filepath.Join(cdir, "d"), Thing: thing, BrokerURL: broker,
		Trusted: []*harness.Signer{signer}, SlotSize: st.Size(), LogLevel: "info", LogTee: io.Discard}
	if err := os.Mkdir(opts.Dir, 0o700); err != nil {
		return f, err
	}
	dev, err := harness.NewDevice(bin, opts)
	if err != nil {
		return f, err
	}
	defer dev.Close(false)
	// The running slot holds v1 (the harness lays a random factory image of its size).
	if err := copyFile(v1, dev.SlotA); err != nil {
		return f, err
	}
	dctx, dcancel := dev.Context(ctx)
	defer dcancel()
	if err := dev.Start(dctx); err != nil {
		return f, err
	}
	// The clock is for the job, not for start-up: wait for the connection, then let the
	// subscriptions and the first jobs query settle (a bench, not a test).
	for !strings.Contains(dev.Logs(), "mqtt connected") {
		select {
		case <-dctx.Done():
			return f, dctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	time.Sleep(time.Second)
	const job = "deltaready"
	start := time.Now()
	if err := cloud.CreateJob(dctx, backend.JobSpec{JobID: job, Protocols: []string{rc.protocol}, Files: files}); err != nil {
		return f, err
	}
	ev, err := cloud.WaitSelfTest(dctx, job, backend.StatusInProgress, "ready")
	if err != nil {
		return f, fmt.Errorf("no ready: %w (%v)\n%s", err, harness.Steps(cloud.Updates(job)), dev.Logs())
	}
	f.Ready = time.Since(start).Seconds()
	f.Reused = ev.StatusDetails["reused"]
	f.Served = cloud.HTTPBytes(job)
	for _, r := range cloud.StreamRequests(job) {
		f.Served += int64(len(r.Sent)) * r.BlockSize
	}
	// Both processes are still running: their peaks so far cover the whole download.
	if f.NetHWMKiB, err = vmHWM(dev.Net().Pid); err != nil {
		return f, err
	}
	if f.WriterHWMKB, err = vmHWM(dev.Writer().Pid); err != nil {
		return f, err
	}
	return f, nil
}

// vmHWM is a process's peak resident set (KiB) from /proc: the peak of its own address
// space, which unlike the rusage peak does not count the process that started it.
func vmHWM(pid int) (int64, error) {
	fh, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer fh.Close()
	sc := bufio.NewScanner(fh)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			return strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
		}
	}
	if err := sc.Err(); err != nil {
		return 0, err
	}
	return 0, fmt.Errorf("pid %d: no VmHWM", pid)
}

func copyFile(from, to string) error {
	in, err := os.Open(from)
	if err != nil {
		return err
	}
	defer in.Close()
	out, err := os.OpenFile(to, os.O_WRONLY|os.O_TRUNC, 0)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	return out.Close()
}
