// Command linkbench measures time to ready of a whole update through a shaped link: the real
// ota-net and ota-writer (test/harness), the emulator as the cloud, and toxiproxy (embedded)
// between ota-net and the broker, and between ota-net and the presigned-URL HTTP server, for
// latency, jitter and bandwidth. Stream messages are dropped by the emulator's fault
// injection (toxiproxy cannot drop one MQTT message). Time to ready runs from creating the
// job to the device's IN_PROGRESS ready update reaching the cloud (ota-net connected and
// settled before the job is created); fraction of link is image bytes over that time and the
// link's rate (or AWS's per-connection quota, when that is lower). Ratios compare runs made in
// the same invocation.
//
//	go run ./test/bench/linkbench -cases fast,fast-loss25,lte-loss5,sat
//
// -report FILE runs the whole matrix (links x image sizes x MQTT/HTTP x AWS quotas on/off x
// ota-net's defaults and the AWS C agent's request shape, pruned to what is meaningful) and
// writes a Markdown report with, per cell, time to ready, goodput, fraction of the link or
// quota, wire bytes per image byte (counted by a relay in front of each toxiproxy), and CPU
// seconds per GiB and peak RSS of ota-net and ota-writer (from /proc). scripts/bench-link.sh
// runs it.
//
// GWOTA_HARNESS_OTA_NET=/path/to/ota-net runs another build of ota-net (e.g. main's) in the
// same setup, for before/after figures.
package main

import (
	"bufio"
	"context"
	"flag"
	"fmt"
	"io"
	"net"
	"os"
	"path/filepath"
	"regexp"
	"sort"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	toxiproxy "github.com/Shopify/toxiproxy/v2"
	"github.com/prometheus/client_golang/prometheus"
	"github.com/rs/zerolog"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
	"github.com/gwota/gwota/writer/config"
)

// link is a network path: one-way latency and jitter (ms), rate (KB/s, 1000 bytes; 0: not
// shaped) and the share of stream messages the emulator drops.
type link struct {
	name            string
	latency, jitter int
	rateKB          int
	drop            float64
}

var (
	lan        = link{name: "lan"}
	lanLoss25  = link{name: "lan-loss25", drop: 0.25}
	lte        = link{name: "lte", latency: 25, jitter: 5, rateKB: 2500}
	lteLoss5   = link{name: "lte-loss5", latency: 25, jitter: 5, rateKB: 2500, drop: 0.05}
	satellite  = link{name: "sat", latency: 300, rateKB: 625}
	quotaBytes = float64(emulator.QuotaBytesPerSecond)
)

// agent is ota-net's stream request shape (zero: its defaults).
type agent struct {
	name                            string
	blockSize, perRequest, inFlight int
}

var (
	defaults = agent{name: "defaults"}
	cAgent   = agent{name: "C agent", blockSize: 4 << 10, perRequest: 8, inFlight: 1}
)

// cell is one measured configuration.
type cell struct {
	link    link
	sizeMiB int
	http    bool
	quotas  bool
	agent   agent
	reps    int // 0: the -reps flag
	// inproc runs ota-net's benchmark build with the writer engine linked in (no gRPC hop,
	// one process) instead of ota-net and ota-writer.
	inproc bool
}

func (c cell) String() string {
	p := "mqtt"
	if c.http {
		p = "http"
	}
	q := "quotas-off"
	if c.quotas {
		q = "quotas-on"
	}
	a := "defaults"
	if c.agent.name != defaults.name {
		a = "c-agent"
	}
	s := fmt.Sprintf("%s/%dMiB/%s/%s/%s", c.link.name, c.sizeMiB, p, a, q)
	if c.inproc {
		s += "/in-process"
	}
	return s
}

// profiles are the -cases of the quick mode (MQTT, ota-net's defaults, -quotas as given).
var profiles = map[string]cell{
	"fast":        {link: link{name: "fast"}, sizeMiB: 4},
	"fast-loss25": {link: link{name: "fast-loss25", drop: 0.25}, sizeMiB: 4},
	"lte":         {link: lte, sizeMiB: 16},
	"lte-loss5":   {link: lteLoss5, sizeMiB: 16},
	"sat":         {link: satellite, sizeMiB: 16},
}

// matrix is the report's cells: the full cross product of links, sizes, protocols, quotas and
// request shapes pruned as notRun says.
func matrix() []cell {
	m := func(l link, size int, quotas bool, a agent, reps int) cell {
		return cell{link: l, sizeMiB: size, quotas: quotas, agent: a, reps: reps}
	}
	h := func(l link, size int, reps int) cell {
		return cell{link: l, sizeMiB: size, http: true, agent: defaults, reps: reps}
	}
	return []cell{
		m(lan, 4, false, defaults, 0), m(lan, 64, false, defaults, 0),
		m(lan, 4, true, defaults, 0), m(lan, 64, true, defaults, 1),
		m(lte, 4, false, defaults, 0), m(lte, 16, false, defaults, 0), m(lte, 64, false, defaults, 1),
		m(lte, 4, true, defaults, 0), m(lte, 16, true, defaults, 1),
		m(satellite, 4, false, defaults, 0), m(satellite, 16, false, defaults, 0), m(satellite, 16, true, defaults, 0),
		m(lanLoss25, 4, false, defaults, 0), m(lanLoss25, 4, true, defaults, 0),
		m(lteLoss5, 16, false, defaults, 0), m(lteLoss5, 4, true, defaults, 0),
		m(lan, 4, false, cAgent, 0), m(lan, 64, false, cAgent, 1), m(lan, 4, true, cAgent, 0),
		m(lte, 4, false, cAgent, 0), m(lte, 4, true, cAgent, 0),
		m(satellite, 4, false, cAgent, 1),
		h(lan, 4, 0), h(lan, 64, 0), h(lte, 4, 0), h(lte, 64, 1), h(satellite, 4, 0), h(satellite, 16, 0),
	}
}

// hopCells are the cells the hop comparison runs twice, interleaved: the real ota-net and
// ota-writer, and ota-net with the writer linked in. The LAN with the quotas off is where the
// hop weighs most (nothing else limits); LTE and one quota-bound cell show what it costs where
// the link or AWS binds. The cells that last under a second run more often each way: the 4
// MiB LAN cells take about 60 ms to ready, where the machine's noise alone moves one run by
// 10 ms or more (paired ratios of one run from 0.88 to 1.41x), so 15 runs; the 64 MiB LAN
// HTTP cell 7; the others the report's -reps.
func hopCells() []cell {
	return []cell{
		{link: lan, sizeMiB: 4, agent: defaults, reps: 15}, {link: lan, sizeMiB: 64, agent: defaults},
		{link: lan, sizeMiB: 4, http: true, agent: defaults, reps: 15}, {link: lan, sizeMiB: 64, http: true, agent: defaults, reps: 7},
		{link: lte, sizeMiB: 16, agent: defaults},
		{link: lan, sizeMiB: 4, quotas: true, agent: defaults},
	}
}

// notRun lists the cells of the cross product the matrix leaves out, and why.
var notRun = []string{
	"64 MiB on the satellite link, either protocol: 107 s of transfer per run at 5 Mbit/s; the 16 MiB cells measure the same link.",
	"64 MiB over MQTT with the quotas on except on the LAN: the quota binds at 512 KiB/s whatever the link, so one 128 s cell (lan) stands for them.",
	"The C agent's request shape over HTTP: it is a shape of MQTT stream requests; ota-net's HTTP download has no such setting.",
	"The C agent's request shape at 64 MiB except on the LAN, with the quotas on except LAN and LTE at 4 MiB, and on the lossy links: one 32 KiB request per round trip makes the satellite 4 MiB cell alone last more than a minute.",
	"HTTP with the quotas on: AWS's per-connection quota is an MQTT quota; presigned S3 URLs have none, so the HTTP cells run with the quotas off only.",
	"HTTP on the lossy links: the emulator drops stream messages, not TCP segments.",
	"The satellite link with loss: not among the profiles the issue names.",
}

func main() {
	cases := flag.String("cases", "fast,fast-loss25,lte,lte-loss5,sat", "profiles to run, in order: "+names())
	reps := flag.Int("reps", 1, "repetitions of each case (the median is printed)")
	blockSize := flag.Int("bs", 0, "ota-net block size (0: its default)")
	flag.BoolVar(&debugLog, "debug", false, "both processes log at debug level to stderr")
	flag.BoolVar(&writerDefaults, "writer-defaults", true, "the writer syncs as configured by default (sync_bytes 8 MiB, sync_interval 2 s); false: the test harness's 64 KiB and 200 ms")
	flag.Func("env", "KEY=VALUE added to both processes' environment (repeatable; e.g. GODEBUG=gctrace=1 with -debug)", func(v string) error {
		if !strings.Contains(v, "=") {
			return fmt.Errorf("%q: want KEY=VALUE", v)
		}
		extraEnv = append(extraEnv, v)
		return nil
	})
	quotas := flag.Bool("quotas", false, "the emulator enforces AWS IoT Core's per-connection quotas (512 KiB/s each way, 100 publishes/s); off: the link alone limits")
	report := flag.String("report", "", "run the whole matrix and write a Markdown report to this file (-cases, -bs and -quotas ignored)")
	only := flag.String("only", "", "with -report: run only the cells whose name matches this regexp (e.g. 'sat/16')")
	hop := flag.String("hop", "", "with -report: output of go test -bench Hop ./writer/server to include")
	curl := flag.String("httpvscurl", "", "with -report: output of test/bench/httpvscurl to include (empty: a marked hook)")
	command := flag.String("command", "", "with -report: the command line to record")
	hopCellsRe := flag.String("hopcells", ".", "with -report: run the hop comparison (gRPC against the writer linked in-process, interleaved) on the hop cells matching this regexp (empty: none)")
	runMatrix := flag.Bool("matrix", true, "with -report: run the matrix (false: only the hop comparison)")
	flag.Parse()
	var err error
	if *report != "" {
		err = runReport(reportOpts{path: *report, only: *only, hopCells: *hopCellsRe, matrix: *runMatrix, reps: *reps, hopFile: *hop, curlFile: *curl, command: *command})
	} else {
		var cs []cell
		for _, name := range strings.Split(*cases, ",") {
			c, ok := profiles[name]
			if !ok {
				err = fmt.Errorf("unknown case %q (%s)", name, names())
				break
			}
			c.quotas, c.agent.blockSize, c.reps = *quotas, *blockSize, *reps
			cs = append(cs, c)
		}
		if err == nil {
			err = runCases(cs, *quotas)
		}
	}
	if err != nil {
		fmt.Fprintln(os.Stderr, "linkbench:", err)
		os.Exit(1)
	}
}

var (
	debugLog       bool
	writerDefaults bool
	extraEnv       []string
)

func names() string {
	var n []string
	for k := range profiles {
		n = append(n, k)
	}
	sort.Strings(n)
	return strings.Join(n, ",")
}

// bench is what every run shares: the binaries, the signer, a scratch directory.
type bench struct {
	dir    string
	bin    *harness.Binaries
	signer *harness.Signer
	net    string
}

func newBench(ctx context.Context) (*bench, error) {
	dir, err := os.MkdirTemp("", "linkbench")
	if err != nil {
		return nil, err
	}
	if err := os.Mkdir(filepath.Join(dir, "bin"), 0o755); err != nil {
		return nil, err
	}
	bin, err := harness.Build(ctx, harness.BuildOptions{Dir: filepath.Join(dir, "bin"), InProcessNet: true})
	if err != nil {
		return nil, err
	}
	net := "ota-net of this tree"
	if p := os.Getenv(harness.EnvPrebuiltNet); p != "" {
		net = p
	}
	signer, err := harness.NewSigner("linkbench-signer")
	if err != nil {
		return nil, err
	}
	return &bench{dir: dir, bin: bin, signer: signer, net: net}, nil
}

// result is one run of a cell.
// With the writer in-process, netCPU and netRSS are the one process's and the writer's are
// zero.
type result struct {
	took              time.Duration
	wire              int64         // bytes both ways through the relays, job creation to ready
	netCPU, writerCPU time.Duration // user+system, job creation to ready
	netRSS, writerRSS int64         // peak RSS (VmHWM) at ready, bytes
	dropped           int
}

// summary is a cell's median run (by time) and all its times.
type summary struct {
	cell
	result
	times []time.Duration
	err   error
}

func (b *bench) measure(ctx context.Context, c cell, reps int) summary {
	s := summary{cell: c}
	var rs []result
	for r := 0; r < reps; r++ {
		res, err := b.once(ctx, c, r)
		if err != nil {
			s.err = err
			return s
		}
		rs = append(rs, res)
	}
	return medianOf(c, rs)
}

func runCases(cs []cell, quotas bool) error {
	ctx := context.Background()
	b, err := newBench(ctx)
	if err != nil {
		return err
	}
	defer os.RemoveAll(b.dir)
	fmt.Printf("linkbench: %s, time to ready (job created -> IN_PROGRESS ready at the cloud), median of %d, AWS quotas %v\n", b.net, cs[0].reps, quotas)
	for _, c := range cs {
		s := b.measure(ctx, c, c.reps)
		if s.err != nil {
			return fmt.Errorf("%s: %w", c.link.name, s.err)
		}
		size := float64(int64(c.sizeMiB) << 20)
		t := s.took
		line := fmt.Sprintf("  %-12s %3d MiB, drop %4.0f%%: time to ready %7.2f s, %6.2f MB/s", c.link.name, c.sizeMiB, c.link.drop*100, t.Seconds(), size/t.Seconds()/1e6)
		if c.link.rateKB > 0 {
			line += fmt.Sprintf(", %.2f of the link (%d ms each way, %.0f Mbit/s)", size/t.Seconds()/float64(c.link.rateKB*1000), c.link.latency, float64(c.link.rateKB)*8/1000)
		}
		fmt.Println(line + fmt.Sprintf("  [each: %v]", s.times))
	}
	return nil
}

// relay is a TCP forwarder that counts the bytes it carries both ways: toxiproxy counts a
// connection's bytes only once it closes.
type relay struct {
	ln     net.Listener
	target string
	n      atomic.Int64
	wg     sync.WaitGroup
	mu     sync.Mutex
	conns  []net.Conn
}

func newRelay(target string) (*relay, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	r := &relay{ln: ln, target: target}
	r.wg.Add(1)
	go r.accept()
	return r, nil
}

func (r *relay) addr() string { return r.ln.Addr().String() }

func (r *relay) accept() {
	defer r.wg.Done()
	for {
		c, err := r.ln.Accept()
		if err != nil {
			return
		}
		u, err := net.Dial("tcp", r.target)
		if err != nil {
			c.Close()
			continue
		}
		r.mu.Lock()
		r.conns = append(r.conns, c, u)
		r.mu.Unlock()
		r.wg.Add(2)
		go r.pipe(u, c)
		go r.pipe(c, u)
	}
}

func (r *relay) pipe(dst, src net.Conn) {
	defer r.wg.Done()
	buf := make([]byte, 64<<10)
	for {
		n, err := src.Read(buf)
		if n > 0 {
			r.n.Add(int64(n))
			if _, werr := dst.Write(buf[:n]); werr != nil {
				break
			}
		}
		if err != nil {
			break
		}
	}
	dst.Close()
	src.Close()
}

func (r *relay) close() {
	r.ln.Close()
	r.mu.Lock()
	for _, c := range r.conns {
		c.Close()
	}
	r.mu.Unlock()
	r.wg.Wait()
}

// shaped puts toxiproxy with l's latency and bandwidth in front of target, and a counting
// relay in front of that; it returns the relay's address.
func shaped(srv *toxiproxy.ApiServer, name, target string, l link) (string, *relay, func(), error) {
	proxy := toxiproxy.NewProxy(srv, name, "127.0.0.1:0", target)
	if err := proxy.Start(); err != nil {
		return "", nil, nil, err
	}
	for _, s := range []string{"upstream", "downstream"} {
		if l.latency > 0 {
			if err := toxic(proxy, "lat-"+s, "latency", s, fmt.Sprintf(`{"latency":%d,"jitter":%d}`, l.latency, l.jitter)); err != nil {
				proxy.Stop()
				return "", nil, nil, err
			}
		}
		if l.rateKB > 0 {
			if err := toxic(proxy, "bw-"+s, "bandwidth", s, fmt.Sprintf(`{"rate":%d}`, l.rateKB)); err != nil {
				proxy.Stop()
				return "", nil, nil, err
			}
		}
	}
	r, err := newRelay(proxy.Listen)
	if err != nil {
		proxy.Stop()
		return "", nil, nil, err
	}
	return r.addr(), r, func() { r.close(); proxy.Stop() }, nil
}

func (b *bench) once(ctx context.Context, c cell, rep int) (result, error) {
	ctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	cdir, err := os.MkdirTemp(b.dir, "c")
	if err != nil {
		return result{}, err
	}
	defer os.RemoveAll(cdir)
	const thing = "linkbench-gw"
	cloud, err := harness.StartCloud(ctx, emulator.Options{Thing: thing, NoQuotas: !c.quotas})
	if err != nil {
		return result{}, err
	}
	defer cloud.Close()
	srv := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(prometheus.NewRegistry()), zerolog.Nop())
	mqttAddr, mqttRelay, stopMQTT, err := shaped(srv, "mqtt", strings.TrimPrefix(cloud.BrokerURL(), "mqtt://"), c.link)
	if err != nil {
		return result{}, err
	}
	defer stopMQTT()
	httpAddr, httpRelay, stopHTTP, err := shaped(srv, "http", strings.TrimPrefix(cloud.HTTPURL(), "http://"), c.link)
	if err != nil {
		return result{}, err
	}
	defer stopHTTP()
	cloud.SetHTTPURL("http://" + httpAddr)
	img := filepath.Join(cdir, "v2.img")
	if err := harness.WriteImage(img, int64(c.sizeMiB)<<20, uint64(rep+1)); err != nil {
		return result{}, err
	}
	opts := harness.DeviceOptions{Dir: filepath.Join(cdir, "d"), Thing: thing, BrokerURL: "mqtt://" + mqttAddr,
		Trusted: []*harness.Signer{b.signer}, BlockSize: c.agent.blockSize, BlocksPerRequest: c.agent.perRequest,
		RequestsInFlight: c.agent.inFlight, LogLevel: "info", LogTee: io.Discard, InProcess: c.inproc, Env: extraEnv}
	if !c.quotas {
		opts.StreamQuota = -1 // ota-net knows the emulator's quotas are lifted
	}
	if writerDefaults {
		opts.SyncBytes, opts.SyncInterval = config.DefaultSyncBytes, config.DefaultSyncInterval
	}
	if debugLog {
		opts.LogLevel, opts.LogTee = "debug", os.Stderr
	}
	if err := os.Mkdir(opts.Dir, 0o700); err != nil {
		return result{}, err
	}
	dev, err := harness.NewDevice(b.bin, opts)
	if err != nil {
		return result{}, err
	}
	defer dev.Close(false)
	dctx, dcancel := dev.Context(ctx)
	defer dcancel()
	if err := dev.Start(dctx); err != nil {
		return result{}, err
	}
	// The clock is for the job, not for ota-net's start-up: wait until it is connected, then
	// for its subscriptions and first jobs query to have gone both ways (a bench, not a
	// test: a settle time is good enough here).
	for !strings.Contains(dev.Logs(), "mqtt connected") {
		select {
		case <-dctx.Done():
			return result{}, dctx.Err()
		case <-time.After(20 * time.Millisecond):
		}
	}
	time.Sleep(time.Second + 8*time.Duration(c.link.latency)*time.Millisecond)
	const job = "linkbench"
	if c.link.drop > 0 {
		cloud.SetFaults(job, emulator.Faults{Drop: c.link.drop})
	}
	protocols := []string{backend.ProtocolMQTT}
	if c.http {
		protocols = []string{backend.ProtocolHTTP}
	}
	netPid, writerPid := dev.Net().Pid, 0
	if w := dev.Writer(); w != nil {
		writerPid = w.Pid
	}
	netCPU0, err := cpuTime(netPid)
	if err != nil {
		return result{}, err
	}
	writerCPU0, err := cpuTime(writerPid)
	if err != nil {
		return result{}, err
	}
	wire0 := mqttRelay.n.Load() + httpRelay.n.Load()
	start := time.Now()
	if err := cloud.CreateJob(dctx, backend.JobSpec{JobID: job, Protocols: protocols, Files: []backend.FileSpec{b.signer.File(img)}}); err != nil {
		return result{}, err
	}
	if _, err := cloud.WaitSelfTest(dctx, job, backend.StatusInProgress, "ready"); err != nil {
		return result{}, fmt.Errorf("no ready: %w (%v)\n%s", err, harness.Steps(cloud.Updates(job)), dev.Logs())
	}
	res := result{took: time.Since(start), wire: mqttRelay.n.Load() + httpRelay.n.Load() - wire0}
	netCPU1, err := cpuTime(netPid)
	if err != nil {
		return result{}, err
	}
	writerCPU1, err := cpuTime(writerPid)
	if err != nil {
		return result{}, err
	}
	res.netCPU, res.writerCPU = netCPU1-netCPU0, writerCPU1-writerCPU0
	if res.netRSS, err = peakRSS(netPid); err != nil {
		return result{}, err
	}
	if res.writerRSS, err = peakRSS(writerPid); err != nil {
		return result{}, err
	}
	for _, r := range cloud.StreamRequests(job) {
		res.dropped += len(r.Dropped)
	}
	if c.link.drop > 0 && res.dropped == 0 {
		return result{}, fmt.Errorf("no stream message dropped")
	}
	return res, nil
}

// cpuTime is a process's user plus system time (/proc/pid/stat, in USER_HZ = 100 ticks);
// pid 0 (no such process: the writer in-process) is 0.
func cpuTime(pid int) (time.Duration, error) {
	if pid == 0 {
		return 0, nil
	}
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/stat", pid))
	if err != nil {
		return 0, err
	}
	// The command name may hold spaces: fields count from after its closing parenthesis.
	s := string(b)
	f := strings.Fields(s[strings.LastIndexByte(s, ')')+1:])
	if len(f) < 13 {
		return 0, fmt.Errorf("/proc/%d/stat: %d fields", pid, len(f))
	}
	ut, err1 := strconv.ParseInt(f[11], 10, 64) // field 14, utime
	st, err2 := strconv.ParseInt(f[12], 10, 64) // field 15, stime
	if err1 != nil || err2 != nil {
		return 0, fmt.Errorf("/proc/%d/stat: %q %q", pid, f[11], f[12])
	}
	return time.Duration(ut+st) * 10 * time.Millisecond, nil
}

// peakRSS is a process's VmHWM in bytes (pid 0: 0).
func peakRSS(pid int) (int64, error) {
	if pid == 0 {
		return 0, nil
	}
	f, err := os.Open(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if v, ok := strings.CutPrefix(sc.Text(), "VmHWM:"); ok {
			kb, err := strconv.ParseInt(strings.TrimSuffix(strings.TrimSpace(v), " kB"), 10, 64)
			return kb << 10, err
		}
	}
	return 0, fmt.Errorf("/proc/%d/status: no VmHWM", pid)
}

func toxic(p *toxiproxy.Proxy, name, typ, stream, attrs string) error {
	js := fmt.Sprintf(`{"name":%q,"type":%q,"stream":%q,"toxicity":1,"attributes":%s}`, name, typ, stream, attrs)
	_, err := p.Toxics.AddToxicJson(strings.NewReader(js))
	return err
}

// reportOpts are -report's flags.
type reportOpts struct {
	path, only, hopCells string
	matrix               bool
	reps                 int
	hopFile, curlFile    string
	command              string
}

// runReport runs the matrix (or the cells matching only), then the hop comparison, and writes
// the report after every cell.
func runReport(o reportOpts) error {
	ctx := context.Background()
	var re, hre *regexp.Regexp
	var err error
	if o.only != "" {
		if re, err = regexp.Compile(o.only); err != nil {
			return err
		}
	}
	if o.hopCells != "" {
		if hre, err = regexp.Compile(o.hopCells); err != nil {
			return err
		}
	}
	b, err := newBench(ctx)
	if err != nil {
		return err
	}
	defer os.RemoveAll(b.dir)
	rep := &report{command: o.command, commit: commit(), began: time.Now().UTC(), load0: loadAvg(), net: b.net, reps: o.reps, matrixRun: o.matrix, writerDefaults: writerDefaults}
	write := func() error {
		// Written after every cell: a run cut short still leaves the cells it measured.
		rep.ended, rep.load1 = time.Now().UTC(), loadAvg()
		return rep.write(o.path, o.hopFile, o.curlFile)
	}
	for _, c := range matrix() {
		if !o.matrix || re != nil && !re.MatchString(c.String()) {
			continue
		}
		n := c.reps
		if n == 0 {
			n = o.reps
		}
		t0 := time.Now()
		s := b.measure(ctx, c, n)
		if s.err != nil {
			fmt.Fprintf(os.Stderr, "linkbench: %s: %v\n", c, s.err)
		} else {
			fmt.Fprintf(os.Stderr, "linkbench: %-40s %7.2f s (%d runs, %.0f s)\n", c, s.took.Seconds(), n, time.Since(t0).Seconds())
		}
		rep.cells = append(rep.cells, s)
		if err := write(); err != nil {
			return err
		}
	}
	for _, c := range hopCells() {
		if hre == nil || !hre.MatchString(c.String()) {
			continue
		}
		t0 := time.Now()
		n := c.reps
		if n == 0 {
			n = max(o.reps, 3)
		}
		h := b.measureHop(ctx, c, n)
		if h.err != nil {
			fmt.Fprintf(os.Stderr, "linkbench: hop %s: %v\n", c, h.err)
		} else {
			fmt.Fprintf(os.Stderr, "linkbench: hop %-36s gRPC %6.2f s, in-process %6.2f s: %.3fx (%d runs each, %.0f s); pairs %.2f; CPU s: gRPC ota-net %.2f + writer %.2f, in-process %.2f\n",
				c, h.grpc.took.Seconds(), h.inproc.took.Seconds(), h.ratio(), len(h.grpc.times), time.Since(t0).Seconds(), h.pairs,
				h.grpc.netCPU.Seconds(), h.grpc.writerCPU.Seconds(), h.inproc.netCPU.Seconds())
		}
		rep.hops = append(rep.hops, h)
		if err := write(); err != nil {
			return err
		}
	}
	return nil
}

// hopSummary is one hop cell: the same cell through the gRPC hop and with the writer linked
// in, run alternately (pairs[i] is run i's gRPC time over its in-process twin's).
type hopSummary struct {
	cell
	grpc, inproc summary
	pairs        []float64
	err          error
}

// ratio is the hop's price: the gRPC median time to ready over the in-process one.
func (h hopSummary) ratio() float64 { return h.grpc.took.Seconds() / h.inproc.took.Seconds() }

// measureHop runs c reps times each way, interleaved: run i of both uses the same image, and
// which goes first alternates, so drift in the machine's load falls on both alike.
func (b *bench) measureHop(ctx context.Context, c cell, reps int) hopSummary {
	return interleave(c, reps, func(x cell, rep int) (result, error) { return b.once(ctx, x, rep) })
}

// interleave runs c's two variants reps times each through run, alternating which goes
// first, and pairs run i of both.
func interleave(c cell, reps int, run func(c cell, rep int) (result, error)) hopSummary {
	h := hopSummary{cell: c}
	in := c
	in.inproc = true
	var gs, is []result
	for r := 0; r < reps; r++ {
		order := []cell{c, in}
		if r%2 == 1 {
			order = []cell{in, c}
		}
		var g, i result
		for _, x := range order {
			res, err := run(x, r)
			if err != nil {
				h.err = fmt.Errorf("%s: %w", x, err)
				return h
			}
			if x.inproc {
				i = res
			} else {
				g = res
			}
		}
		gs, is = append(gs, g), append(is, i)
		h.pairs = append(h.pairs, g.took.Seconds()/i.took.Seconds())
	}
	h.grpc, h.inproc = medianOf(c, gs), medianOf(in, is)
	return h
}

// medianOf is the summary of rs: the median run by time, and every time.
func medianOf(c cell, rs []result) summary {
	s := summary{cell: c}
	sort.Slice(rs, func(a, b int) bool { return rs[a].took < rs[b].took })
	s.result = rs[len(rs)/2]
	for _, r := range rs {
		s.times = append(s.times, r.took)
	}
	return s
}

func loadAvg() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}
