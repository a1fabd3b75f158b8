// Command httpvscurl compares ota-net's HTTP download with curl's: the same image, served by
// the emulator's presigned-URL server, fetched through the same tinyproxy (a CONNECT tunnel
// for both: ota-net always tunnels, and curl is told to with --proxytunnel) and, with -rate,
// through the same toxiproxy bandwidth limit in front of the server. ota-net runs as the real
// process with the real ota-writer (test/harness) on an A/B target, as in the field.
//
// Times, per repetition, the curl runs and ota-net alternating (which goes first alternates
// too):
//
//   - curl /dev/null: curl's time_total for `curl -o /dev/null`, name lookup and proxy
//     connect included.
//   - curl file: the same for `curl -o FILE`, FILE a new file in the bench's directory, which
//     holds the device's slots too (the same filesystem). curl does not fsync: its file may
//     sit in the page cache when the timer stops.
//   - curl file+fsync: that curl's time plus an fsync of its file right after curl exits
//     (open, fsync, close): the baseline that, like ota-net, ends with the data durable.
//   - ota-net: time to download, as ota-net logs it in "file downloaded" (seconds): from the
//     HTTP downloader's start (before its first GET, so the proxy connect is included) to
//     every block durable in the writer (flushed), i.e. curl's work plus handing every block
//     to the writer over gRPC, the writer's writes and its syncs. Job notification, session
//     begin and the signature check after the download are not in it.
//
// Ratios are median curl time / median ota-net time (1.0: as fast as curl), one per baseline.
// The target (at least 0.9, issue 11) is judged against curl file+fsync: the issue names
// `curl -o` of the URL, i.e. to a file, and ota-net's time ends with every block durable in
// the writer, which curl's file is only after the fsync. The other two say how far the
// durability costs and the writer's hop are from curl's best case.
// With -base DIR, the ota-net and ota-writer in DIR (another build) run too in every
// repetition, so a change is measured against its baseline in the same run.
// The last line is JSON for scripts; the line before it is for people.
//
//	go run ./test/bench/httpvscurl -size 64 -reps 5
//	go run ./test/bench/httpvscurl -size 16 -rate 2500 -proxy=false
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/bench/internal/curljson"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
)

type options struct {
	sizeMiB   int
	reps      int
	proxy     bool
	rateKB    int
	blockSize int
	debug     bool
	base      string
	env       string
	profDir   string
}

// Summary is the JSON line (one type, shared with linkbench's report).
type Summary = curljson.Summary

func main() {
	var o options
	flag.IntVar(&o.sizeMiB, "size", 64, "image size in MiB")
	flag.IntVar(&o.reps, "reps", 3, "repetitions (medians are compared)")
	flag.BoolVar(&o.proxy, "proxy", true, "both go through tinyproxy (CONNECT); false: direct")
	flag.IntVar(&o.rateKB, "rate", 0, "toxiproxy bandwidth in front of the HTTP server, KB/s (1000 bytes); 0: none")
	flag.IntVar(&o.blockSize, "bs", 0, "ota-net block size (0: its default)")
	flag.BoolVar(&o.debug, "debug", false, "both processes log at debug level to stderr")
	flag.Bool("curl-file", true, "ignored: every repetition runs curl to /dev/null and to a file (kept for older command lines)")
	flag.StringVar(&o.env, "env", "", "extra environment of ota-net and ota-writer, space-separated (e.g. GOMAXPROCS=2 GOMEMLIMIT=off)")
	flag.StringVar(&o.profDir, "cpuprofile", "", "build with the gwota_pprof tag and have every ota-net and ota-writer process write a CPU profile of its run into this directory (NAME-PID.prof)")
	flag.StringVar(&o.base, "base", "", "directory with another build's ota-net and ota-writer, run in every repetition too")
	flag.Parse()
	if o.sizeMiB <= 0 || o.reps <= 0 || o.rateKB < 0 {
		fmt.Fprintln(os.Stderr, "httpvscurl: -size and -reps must be positive, -rate not negative")
		os.Exit(2)
	}
	s, err := run(context.Background(), o)
	if err != nil {
		fmt.Fprintln(os.Stderr, "httpvscurl:", err)
		os.Exit(1)
	}
	via := "direct"
	if s.Proxy {
		via = "through tinyproxy"
	}
	if s.RateKBps > 0 {
		via += fmt.Sprintf(", link %d KB/s", s.RateKBps)
	}
	fmt.Printf("httpvscurl: %d MiB %s, median of %d: ota-net %.3f s (%.1f MB/s); curl -o FILE + fsync %.3f s (%.1f MB/s), ratio %.2f; curl -o FILE %.3f s, ratio %.2f; curl -o /dev/null %.3f s, ratio %.2f; CPU to ready: ota-net %.2f s, writer %.2f s\n",
		s.SizeBytes>>20, via, s.Reps, s.OtaNetMedian, s.OtaNetMBps, s.CurlFsyncMedian, s.CurlMBps, s.RatioFsync, s.CurlFileMedian, s.RatioFile,
		s.CurlNullMedian, s.RatioNull, s.OtaNetCPU, s.WriterCPU)
	fmt.Printf("httpvscurl: load average %s at the start, %s at the end\n", s.LoadStart, s.LoadEnd)
	if s.BaseMedian > 0 {
		fmt.Printf("httpvscurl: base build (%s) %.3f s, ratio curl -o FILE + fsync / base %.2f; CPU to ready: ota-net %.2f s, writer %.2f s\n",
			o.base, s.BaseMedian, s.BaseRatio, s.BaseNetCPU, s.BaseWriterCPU)
	}
	b, _ := json.Marshal(s)
	fmt.Println(string(b))
}

// loadAvg is the 1, 5 and 15 minute load averages ("?" where /proc has none).
func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if f := strings.Fields(string(b)); err == nil && len(f) >= 3 {
		return strings.Join(f[:3], " ")
	}
	return "?"
}

func median(xs []float64) float64 {
	s := slices.Clone(xs)
	slices.Sort(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func run(ctx context.Context, o options) (*Summary, error) {
	if _, err := exec.LookPath("curl"); err != nil {
		return nil, errors.New("curl is not installed")
	}
	dir, err := os.MkdirTemp("", "httpvscurl")
	if err != nil {
		return nil, err
	}
	defer os.RemoveAll(dir)
	if err := os.Mkdir(filepath.Join(dir, "bin"), 0o755); err != nil {
		return nil, err
	}
	bo := harness.BuildOptions{Dir: filepath.Join(dir, "bin")}
	if o.profDir != "" {
		if o.profDir, err = filepath.Abs(o.profDir); err != nil {
			return nil, err
		}
		if err := os.MkdirAll(o.profDir, 0o755); err != nil {
			return nil, err
		}
		bo.Tags = []string{"gwota_pprof"}
		o.env = strings.TrimSpace(o.env + " GWOTA_CPUPROFILE=" + o.profDir)
	}
	bin, err := harness.Build(ctx, bo)
	if err != nil {
		return nil, err
	}
	signer, err := harness.NewSigner("httpvscurl-signer")
	if err != nil {
		return nil, err
	}
	const thing = "httpvscurl-gw"
	cloud, err := harness.StartCloud(ctx, emulator.Options{Thing: thing})
	if err != nil {
		return nil, err
	}
	defer cloud.Close()

	// toxiproxy in front of the presigned-URL server: both clients meet the same link.
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	tp := toxiproxy.NewProxy(srv, "http", "127.0.0.1:0", strings.TrimPrefix(cloud.HTTPURL(), "http://"))
	if err := tp.Start(); err != nil {
		return nil, err
	}
	defer tp.Stop()
	if o.rateKB > 0 {
		js := fmt.Sprintf(`{"name":"bw","type":"bandwidth","stream":"downstream","toxicity":1,"attributes":{"rate":%d}}`, o.rateKB)
		if _, err := tp.Toxics.AddToxicJson(strings.NewReader(js)); err != nil {
			return nil, err
		}
	}
	cloud.SetHTTPURL("http://" + tp.Listen)

	var px *harness.WebProxy
	if o.proxy {
		pdir := filepath.Join(dir, "proxy")
		if err := os.Mkdir(pdir, 0o700); err != nil {
			return nil, err
		}
		px, err = harness.StartWebProxy(ctx, pdir, harness.WebProxyOptions{})
		if err != nil {
			return nil, err
		}
		defer px.Stop()
	}

	img := filepath.Join(dir, "v2.img")
	size := int64(o.sizeMiB) << 20
	if err := harness.WriteImage(img, size, 7); err != nil {
		return nil, err
	}
	s := &Summary{Bench: "httpvscurl", SizeBytes: size, Reps: o.reps, Proxy: o.proxy, RateKBps: o.rateKB, BlockSize: o.blockSize}
	var base *harness.Binaries
	if o.base != "" {
		base = &harness.Binaries{Dir: o.base, Writer: filepath.Join(o.base, "ota-writer"), Net: filepath.Join(o.base, "ota-net")}
	}
	var netCPU, wCPU, baseNetCPU, baseWCPU []float64
	s.LoadStart = loadAvg()
	for r := range o.reps {
		steps := []func() error{
			func() error {
				d, _, err := curlOnce(ctx, cloud, signer, img, px, dir, fmt.Sprintf("curl-null-%d", r), false, o)
				s.CurlNullSeconds = append(s.CurlNullSeconds, d)
				return err
			},
			func() error {
				d, ds, err := curlOnce(ctx, cloud, signer, img, px, dir, fmt.Sprintf("curl-file-%d", r), true, o)
				s.CurlFileSeconds = append(s.CurlFileSeconds, d)
				s.CurlFsyncSeconds = append(s.CurlFsyncSeconds, d+ds)
				return err
			},
			func() error {
				d, cpu, err := otaNetOnce(ctx, cloud, bin, signer, img, px, dir, thing, fmt.Sprint(r), o)
				s.OtaNetSeconds = append(s.OtaNetSeconds, d)
				netCPU, wCPU = append(netCPU, cpu[0]), append(wCPU, cpu[1])
				return err
			},
		}
		if base != nil {
			steps = append(steps, func() error {
				d, cpu, err := otaNetOnce(ctx, cloud, base, signer, img, px, dir, thing, fmt.Sprintf("base-%d", r), o)
				s.BaseSeconds = append(s.BaseSeconds, d)
				baseNetCPU, baseWCPU = append(baseNetCPU, cpu[0]), append(baseWCPU, cpu[1])
				return err
			})
		}
		if r%2 == 1 {
			slices.Reverse(steps)
		}
		for _, f := range steps {
			if err := f(); err != nil {
				return nil, fmt.Errorf("repetition %d: %w", r, err)
			}
		}
		fmt.Fprintf(os.Stderr, "httpvscurl: rep %d: ota-net %.3f s, curl file+fsync %.3f s, curl file %.3f s, curl /dev/null %.3f s",
			r, s.OtaNetSeconds[r], s.CurlFsyncSeconds[r], s.CurlFileSeconds[r], s.CurlNullSeconds[r])
		if base != nil {
			fmt.Fprintf(os.Stderr, ", base %.3f s", s.BaseSeconds[r])
		}
		fmt.Fprintln(os.Stderr)
	}
	s.LoadEnd = loadAvg()
	s.OtaNetMedian = median(s.OtaNetSeconds)
	s.CurlNullMedian, s.CurlFileMedian, s.CurlFsyncMedian = median(s.CurlNullSeconds), median(s.CurlFileSeconds), median(s.CurlFsyncSeconds)
	s.OtaNetCPU, s.WriterCPU = median(netCPU), median(wCPU)
	s.CurlMBps, s.OtaNetMBps = float64(size)/s.CurlFsyncMedian/1e6, float64(size)/s.OtaNetMedian/1e6
	s.RatioNull, s.RatioFile, s.RatioFsync = s.CurlNullMedian/s.OtaNetMedian, s.CurlFileMedian/s.OtaNetMedian, s.CurlFsyncMedian/s.OtaNetMedian
	s.Ratio = s.RatioFsync
	if base != nil {
		s.BaseMedian = median(s.BaseSeconds)
		s.BaseRatio = s.CurlFsyncMedian / s.BaseMedian
		s.BaseNetCPU, s.BaseWriterCPU = median(baseNetCPU), median(baseWCPU)
	}
	return s, nil
}

// presignedURL creates a job for a thing that never connects and returns its file's URL:
// the same image, the same server, the same signing, only another job's path.
func presignedURL(ctx context.Context, cloud *harness.Cloud, signer *harness.Signer, img, job string) (string, error) {
	if err := cloud.CreateJob(ctx, backend.JobSpec{JobID: job, Things: []string{"httpvscurl-curl"}, Protocols: []string{backend.ProtocolHTTP},
		Files: []backend.FileSpec{signer.File(img)}}); err != nil {
		return "", err
	}
	raw, err := cloud.JobDocument(job)
	if err != nil {
		return "", err
	}
	var doc struct {
		OTA struct {
			Files []struct {
				URL string `json:"update_data_url"`
			} `json:"files"`
		} `json:"afr_ota"`
	}
	if err := json.Unmarshal(raw, &doc); err != nil || len(doc.OTA.Files) == 0 || doc.OTA.Files[0].URL == "" {
		return "", fmt.Errorf("no URL in %s (%v)", raw, err)
	}
	return doc.OTA.Files[0].URL, nil
}

// curlOnce returns curl's time_total (job names the presigned URL's job) and, with toFile, how
// long an fsync of its file took right after; without, curl writes to /dev/null.
func curlOnce(ctx context.Context, cloud *harness.Cloud, signer *harness.Signer, img string, px *harness.WebProxy, dir, job string, toFile bool, o options) (secs, fsyncSecs float64, err error) {
	u, err := presignedURL(ctx, cloud, signer, img, job)
	if err != nil {
		return 0, 0, err
	}
	out := "/dev/null"
	if toFile {
		out = filepath.Join(dir, job+".img")
		defer os.Remove(out)
	}
	args := []string{"-sS", "--fail", "-o", out, "-w", "%{time_total} %{size_download}"}
	if px != nil {
		args = append(args, "--proxytunnel", "-x", px.URL())
	}
	args = append(args, u)
	cctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	b, err := exec.CommandContext(cctx, "curl", args...).Output()
	if err != nil {
		return 0, 0, fmt.Errorf("curl: %w", err)
	}
	if toFile {
		start := time.Now()
		f, err := os.Open(out)
		if err != nil {
			return 0, 0, err
		}
		err = f.Sync()
		f.Close()
		if err != nil {
			return 0, 0, fmt.Errorf("fsync %s: %w", out, err)
		}
		fsyncSecs = time.Since(start).Seconds()
	}
	f := strings.Fields(string(b))
	if len(f) != 2 {
		return 0, 0, fmt.Errorf("curl printed %q", b)
	}
	t, err1 := strconv.ParseFloat(f[0], 64)
	n, err2 := strconv.ParseInt(f[1], 10, 64)
	if err1 != nil || err2 != nil || n != int64(o.sizeMiB)<<20 || t <= 0 {
		return 0, 0, fmt.Errorf("curl printed %q (want %d bytes)", b, int64(o.sizeMiB)<<20)
	}
	return t, fsyncSecs, nil
}

var downloadedRE = regexp.MustCompile(`file downloaded:.*protocol=HTTP .*seconds=([0-9.]+)`)

// cpuSeconds is user+system CPU time of a running process (Linux /proc).
func cpuSeconds(pid int) float64 {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0
	}
	// Fields after the ")" that ends the command name: utime is the 12th, stime the 13th.
	f := strings.Fields(string(b[strings.LastIndexByte(string(b), ')')+1:]))
	if len(f) < 13 {
		return 0
	}
	u, _ := strconv.ParseFloat(f[11], 64)
	st, _ := strconv.ParseFloat(f[12], 64)
	return (u + st) / 100 // USER_HZ
}

func otaNetOnce(ctx context.Context, cloud *harness.Cloud, bin *harness.Binaries, signer *harness.Signer, img string, px *harness.WebProxy, dir, thing, rep string, o options) (secs float64, cpu [2]float64, err error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	ddir, err := os.MkdirTemp(dir, "d")
	if err != nil {
		return 0, cpu, err
	}
	defer os.RemoveAll(ddir)
	opts := harness.DeviceOptions{Dir: ddir, Thing: thing, BrokerURL: cloud.BrokerURL(), Trusted: []*harness.Signer{signer},
		BlockSize: o.blockSize, LogLevel: "info", LogTee: io.Discard,
		// The writer's own default, not the harness's fine-grained test setting.
		SyncBytes: 8 << 20, Env: strings.Fields(o.env)}
	if px != nil {
		opts.NetConfigExtra = fmt.Sprintf("\n[proxy]\nurl = %q\n", px.URL())
	}
	if o.debug {
		opts.LogLevel, opts.LogTee = "debug", os.Stderr
	}
	dev, err := harness.NewDevice(bin, opts)
	if err != nil {
		return 0, cpu, err
	}
	defer dev.Close(false)
	dctx, dcancel := dev.Context(ctx)
	defer dcancel()
	if err := dev.Start(dctx); err != nil {
		return 0, cpu, err
	}
	job := "otanet-" + rep
	if err := cloud.CreateJob(dctx, backend.JobSpec{JobID: job, Protocols: []string{backend.ProtocolHTTP}, Files: []backend.FileSpec{signer.File(img)}}); err != nil {
		return 0, cpu, err
	}
	if _, err := cloud.WaitSelfTest(dctx, job, backend.StatusInProgress, "ready"); err != nil {
		return 0, cpu, fmt.Errorf("no ready: %w (%v)\n%s", err, harness.Steps(cloud.Updates(job)), dev.Logs())
	}
	cpu = [2]float64{cpuSeconds(dev.Net().Pid), cpuSeconds(dev.Writer().Pid)}
	m := downloadedRE.FindStringSubmatch(dev.Logs())
	if m == nil {
		return 0, cpu, fmt.Errorf("ota-net logged no HTTP \"file downloaded\" line:\n%s", dev.Logs())
	}
	if px != nil && px.Tunnels(strings.TrimPrefix(cloud.HTTPURL(), "http://")) == 0 {
		return 0, cpu, errors.New("ota-net did not go through the proxy")
	}
	secs, err = strconv.ParseFloat(m[1], 64)
	return secs, cpu, err
}
