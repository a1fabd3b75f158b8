// Command streambench measures the MQTT stream downloader (netagent/stream) on loopback
// through a real mosquitto, against the raw broker floor measured in the same run and against
// the AWS C agent's default request shape. scripts/bench-stream.sh runs it.
//
// The parent starts mosquitto, the emulator (test/emulator as a client of mosquitto, serving
// the stream) and, per case, a child process of itself that downloads with ota-net's real
// parts (mqttconn + stream.Downloader) into a file sink; the child's peak RSS comes from
// its rusage. The image written by the child is checked against the source by SHA-256.
package main

import (
	"bytes"
	"context"
	"crypto/rand"
	"crypto/sha256"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"net/url"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"syscall"
	"time"

	"github.com/eclipse/paho.golang/paho"

	"github.com/gwota/gwota/internal/runtimeopts"
	"github.com/gwota/gwota/netagent/stream"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
)

func main() {
	if err := parent(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "streambench:", err)
		os.Exit(1)
	}
}

type shape struct {
	Name             string
	BlockSize        int
	BlocksPerRequest int
	InFlight         int
}

func (s shape) String() string {
	return fmt.Sprintf("%s (%d KiB x %d per request, %d in flight)", s.Name, s.BlockSize>>10, s.BlocksPerRequest, s.InFlight)
}

var childEnv *string

// childProfile, when set, makes the downloader write a CPU profile (PREFIX-N.pprof).
var childProfile string
var childRuns int
var floorFlight *int

// writerForChild, when set, makes the downloader write into a real ota-writer.
var writerForChild *otaWriter
var writerJobs int

// brokerForChild, when set, is the broker address the downloader uses (through the delay proxy).
var brokerForChild string

type result struct {
	VerifySeconds float64
	Shape         shape
	SizeMiB       int
	Seconds       float64
	MBps          float64
	MaxRSSKB      int64
	Requests      int
	CPU           cpuMeter
}

func parent(args []string) error {
	fs := flag.NewFlagSet("streambench", flag.ExitOnError)
	mosq := fs.String("mosquitto", "/usr/sbin/mosquitto", "mosquitto binary")
	sizeMiB := fs.Int("size", 64, "image size for the speed comparison (MiB)")
	rssSizes := fs.String("rss-sizes", "16,64,256", "image sizes for the RSS check (MiB)")
	sweep := fs.Bool("sweep", false, "also sweep block size x requests in flight (how the defaults were chosen)")
	sweepFlights := fs.String("sweep-flights", "1,2,4,8,16,32", "requests in flight for -sweep")
	sweepBlocks := fs.String("sweep-blocks", "8,16,32,64", "block sizes (KiB) for -sweep")
	reps := fs.Int("reps", 3, "repetitions per case (the median is reported)")
	floorFlight = fs.Int("floor-flight", 64, "QoS 1 publishes in flight for the broker floor")
	latency := fs.Duration("latency", 5*time.Millisecond, "one-way delay of the downloader's link for the latency comparison (0: skip)")
	latencySize := fs.Int("latency-size", 4, "image size for the latency comparison (MiB)")
	writerBin := fs.String("ota-writer", "", "ota-writer binary: also download into a real writer (default: ota-writer next to this program, if present)")
	downloader := fs.String("downloader", "", "the downloader program (default: streamdl next to this one)")
	childEnv = fs.String("child-env", "", "extra environment of the downloader process (e.g. GOMEMLIMIT=16MiB)")
	only := fs.String("only", "", "run only this section: compare (floor and comparison), real (the real binaries end to end), latency, writer (the downloader into a real ota-writer), rss, sweep")
	netBin := fs.String("ota-net", "", "ota-net binary for the end-to-end case (default: ota-net next to this program, if present)")
	fs.StringVar(&netEnv, "net-env", "", "extra environment of the real ota-net process (tuning only; the report is meant for its defaults)")
	realSizes := fs.String("real-sizes", "16,64,256", "image sizes (MiB) of the end-to-end case with the real ota-net and ota-writer")
	skipC := fs.Bool("skip-cagent", false, "leave the C agent shape out of the comparison (quicker runs while tuning)")
	showCPU := fs.Bool("cpu", false, "print the CPU time of the bench process (emulator, floor clients), mosquitto and the downloader per comparison case")
	profile := fs.String("cpuprofile", "", "write CPU profiles of the emulator (PREFIX-emulator.pprof) and the downloader (PREFIX-downloader-N.pprof) during the default case of the comparison")
	fs.Parse(args)

	dir, err := os.MkdirTemp("", "streambench")
	if err != nil {
		return err
	}
	defer os.RemoveAll(dir)
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()

	port, err := freePort()
	if err != nil {
		return err
	}
	brokerURL, stop, err := startMosquitto(ctx, *mosq, dir, port)
	if err != nil {
		return err
	}
	defer stop()
	rec := harness.NewRecorder()
	emu, err := emulator.Start(ctx, emulator.Options{ExternalBrokerURL: brokerURL, Thing: "bench-gw", OnUpdate: rec.Add})
	if err != nil {
		return err
	}
	defer emu.Close()
	if *downloader == "" {
		self, err := os.Executable()
		if err != nil {
			return err
		}
		*downloader = filepath.Join(filepath.Dir(self), "streamdl")
	}
	self := *downloader

	def := shape{"default", stream.DefaultBlockSize, stream.DefaultBlocksPerRequest, stream.DefaultRequestsInFlight}
	cagent := shape{"C agent defaults", 4096, 1, 1}
	images := map[int]string{}
	image := func(mib int) (string, error) {
		if p, ok := images[mib]; ok {
			return p, nil
		}
		p := filepath.Join(dir, fmt.Sprintf("image-%d.bin", mib))
		if err := writeRandom(p, int64(mib)<<20); err != nil {
			return "", err
		}
		images[mib] = p
		return p, nil
	}
	jobs := 0
	runCase := func(sh shape, mib int) (result, error) {
		img, err := image(mib)
		if err != nil {
			return result{}, err
		}
		var rs []result
		for r := 0; r < *reps; r++ {
			jobs++
			jobID := fmt.Sprintf("bench-%d", jobs)
			if err := emu.CreateJob(ctx, backend.JobSpec{JobID: jobID, Files: []backend.FileSpec{{LocalPath: img, DevicePath: "/fw"}}}); err != nil {
				return result{}, err
			}
			cpu := startCPU()
			res, err := runChild(ctx, self, brokerURL, emu.ThingName(), emu.StreamName(jobID), img, dir, sh)
			used := cpu.stop()
			res.CPU.self, res.CPU.broker = used.self, used.broker
			if err != nil {
				return result{}, fmt.Errorf("%v, %d MiB: %w", sh, mib, err)
			}
			res.SizeMiB = mib
			res.Requests = len(emu.StreamRequests(jobID))
			rs = append(rs, res)
			emu.DeleteJob(ctx, jobID, true)
		}
		sort.Slice(rs, func(a, b int) bool { return rs[a].Seconds < rs[b].Seconds })
		m := rs[len(rs)/2]
		for _, r := range rs {
			m.MaxRSSKB = max(m.MaxRSSKB, r.MaxRSSKB)
		}
		return m, nil
	}

	// The machine is shared: each repetition runs floor, default and C-agent shape back to
	// back, so every ratio compares runs made under the same load; medians are reported.
	compare := func() error {
		floorImg, err := image(*sizeMiB)
		if err != nil {
			return err
		}
		var floors, defs, cags, rFloor, rC []float64
		var d, c result
		for r := 0; r < *reps; r++ {
			fcpu := startCPU()
			fl, err := floor(ctx, brokerURL, floorImg, def.BlockSize)
			if err != nil {
				return fmt.Errorf("floor: %w", err)
			}
			fcpu = fcpu.stop()
			stopProf := func() {}
			if *profile != "" {
				stopProf = profileSelf(fmt.Sprintf("%s-emulator-%d.pprof", *profile, r+1))
				childProfile = fmt.Sprintf("%s-downloader-%d", *profile, r+1)
			}
			d, err = runCase(def, *sizeMiB)
			stopProf()
			childProfile = ""
			if err != nil {
				return err
			}
			c = result{MBps: 1}
			if !*skipC {
				if c, err = runCase(cagent, *sizeMiB); err != nil {
					return err
				}
			}
			fmt.Printf("  rep %d: floor %6.1f MB/s, default %6.1f MB/s (%4.2f of floor, RSS %.1f MiB), C agent shape %5.1f MB/s (%.1fx)\n",
				r+1, fl, d.MBps, d.MBps/fl, float64(d.MaxRSSKB)/1024, c.MBps, d.MBps/c.MBps)
			if *showCPU {
				fmt.Printf("         floor %v; default (median run) %v\n", fcpu, d.CPU)
			}
			floors, defs, cags = append(floors, fl), append(defs, d.MBps), append(cags, c.MBps)
			rFloor, rC = append(rFloor, d.MBps/fl), append(rC, d.MBps/c.MBps)
		}
		fmt.Printf("\nmedians over %d repetitions, %d-MiB image:\n", *reps, *sizeMiB)
		fmt.Printf("  broker floor (one paho publisher, QoS 1, %d KiB blocks, %d in flight, one subscriber): %.1f MB/s\n", def.BlockSize>>10, *floorFlight, median(floors))
		fmt.Printf("  %-56s %.1f MB/s, %d requests\n", def.String()+":", median(defs), d.Requests)
		fmt.Printf("  %-56s %.1f MB/s, %d requests\n", cagent.String()+":", median(cags), c.Requests)
		fmt.Printf("  default / floor:          %.2f  (target >= 0.50)\n", median(rFloor))
		fmt.Printf("  default / C agent shape:  %.1fx (target >= 10x)\n", median(rC))
		return nil
	}
	fmt.Printf("streambench: mosquitto %s (set_tcp_nodelay), emulator as its client, %d-MiB image, median of %d\n", brokerURL, *sizeMiB, *reps)
	fmt.Println("sink: a file sink in the downloader process (pwrite at block offsets), except the ota-writer case")
	fmt.Printf("downloader runtime: ota-net's (internal/runtimeopts: GOMEMLIMIT %d MiB, GOMAXPROCS %d) unless -child-env sets them; extra env %q\n",
		runtimeopts.MemoryLimit>>20, runtimeopts.Procs, *childEnv)
	// want says whether a section runs: every section without -only, else the one named.
	want := func(section string) bool { return *only == "" || *only == section }
	if want("compare") {
		fmt.Println()
		if err := compare(); err != nil {
			return err
		}
	}
	if *netBin == "" {
		if self, err := os.Executable(); err == nil {
			if p := filepath.Join(filepath.Dir(self), "ota-net"); fileExists(p) {
				*netBin = p
			}
		}
	}
	if *writerBin == "" {
		if self, err := os.Executable(); err == nil {
			if p := filepath.Join(filepath.Dir(self), "ota-writer"); fileExists(p) {
				*writerBin = p
			}
		}
	}
	if *netBin != "" && *writerBin != "" && want("real") {
		sizes, err := intList(*realSizes)
		if err != nil {
			return err
		}
		fmt.Printf("\nend to end: the real ota-net and ota-writer binaries (default settings, ota-net's own memory limit), a fresh device per job, MQTT streams through mosquitto:\n")
		for _, mib := range sizes {
			img, err := image(mib)
			if err != nil {
				return err
			}
			var rs []realResult
			for r := 0; r < *reps; r++ {
				jobs++
				res, err := runReal(ctx, *netBin, *writerBin, brokerURL, emu, rec, img, dir, mib, fmt.Sprintf("real-%d", jobs))
				if err != nil {
					return fmt.Errorf("end to end, %d MiB: %w", mib, err)
				}
				rs = append(rs, res)
			}
			sort.Slice(rs, func(a, b int) bool { return rs[a].Seconds < rs[b].Seconds })
			m := rs[len(rs)/2]
			var hwm, whwm int64
			var each []string
			for _, r := range rs {
				hwm, whwm = max(hwm, r.NetHWMKB), max(whwm, r.WriterHWM)
				each = append(each, fmt.Sprintf("%.1f", float64(r.NetHWMKB)/1024))
			}
			fmt.Printf("  %4d MiB image: job to ready (download, verify, activate) %6.1f MB/s (median of %d, %.2f s); ota-net peak RSS %.1f MiB (max; each run %s), ota-writer %.1f MiB\n",
				mib, m.MBps, len(rs), m.Seconds, float64(hwm)/1024, strings.Join(each, " "), float64(whwm)/1024)
		}
	}
	if *latency > 0 && want("latency") {
		p, err := startDelayProxy(strings.TrimPrefix(brokerURL, "mqtt://"), *latency)
		if err != nil {
			return err
		}
		saved := brokerForChild
		brokerForChild = "mqtt://" + p.addr()
		fmt.Printf("\nover a link with %v round trip (delay proxy in front of mosquitto, downloader side only), %d-MiB image:\n", 2**latency, *latencySize)
		var rs []result
		for _, sh := range []shape{def, cagent} {
			r, err := runCase(sh, *latencySize)
			if err != nil {
				p.close()
				return err
			}
			rs = append(rs, r)
			fmt.Printf("  %-56s %7.2f MB/s, %d requests, %.2f s\n", sh.String()+":", r.MBps, r.Requests, r.Seconds)
		}
		fmt.Printf("  default / C agent shape:  %.0fx\n", rs[0].MBps/rs[1].MBps)
		brokerForChild = saved
		p.close()
	}

	if *writerBin != "" && want("writer") {
		w, err := startWriter(ctx, *writerBin, dir, def.BlockSize)
		if err != nil {
			return fmt.Errorf("ota-writer: %w", err)
		}
		img, err := image(*sizeMiB)
		if err == nil {
			err = signImage(w, img)
		}
		if err != nil {
			w.stop()
			return err
		}
		writerForChild = w
		fmt.Printf("\ninto a real ota-writer (writerlink, gRPC over its socket, engine, A/B slot file + journal), default settings, %d-MiB image:\n", *sizeMiB)
		saved := *childEnv
		for _, env := range []string{saved, strings.TrimSpace(fmt.Sprintf("%s GOMEMLIMIT=off GOMAXPROCS=%d", saved, runtime.NumCPU()))} {
			*childEnv = env
			r, err := runCase(def, *sizeMiB)
			if err != nil {
				writerForChild = nil
				w.stop()
				return err
			}
			if env == "" {
				env = "ota-net's runtime settings"
			}
			fmt.Printf("  %s: download %.1f MB/s (%.2f s), then FinishSession (read back + ECDSA verify) %.2f s, downloader peak RSS %.1f MiB\n",
				env, r.MBps, r.Seconds, r.VerifySeconds, float64(r.MaxRSSKB)/1024)
		}
		*childEnv = saved
		writerForChild = nil
		w.stop()
	}

	// Peak RSS with ota-net's runtime settings (internal/runtimeopts: soft memory limit,
	// GOMAXPROCS), which the downloader applies like ota-net's main, and with the Go runtime's
	// defaults.
	saved := *childEnv
	for _, env := range []string{saved, strings.TrimSpace(fmt.Sprintf("%s GOMEMLIMIT=off GOMAXPROCS=%d", saved, runtime.NumCPU()))} {
		if !want("rss") {
			break
		}
		*childEnv = env
		label := env
		if label == "" {
			label = "ota-net's runtime settings"
		}
		fmt.Printf("\npeak RSS of the downloader process, default settings, %s:\n", label)
		for _, s := range strings.Split(*rssSizes, ",") {
			var mib int
			if _, err := fmt.Sscan(s, &mib); err != nil {
				return fmt.Errorf("rss size %q: %w", s, err)
			}
			r, err := runCase(def, mib)
			if err != nil {
				return err
			}
			fmt.Printf("  %4d MiB image: %6.1f MiB peak RSS (max of %d), %.1f MB/s\n", mib, float64(r.MaxRSSKB)/1024, *reps, r.MBps)
		}
	}
	*childEnv = saved

	if *sweep || *only == "sweep" {
		fmt.Printf("\nsweep (%d MiB): block size x requests in flight, 128 KB per request\n", *sizeMiB)
		fmt.Printf("%-10s", "block")
		flights, err := intList(*sweepFlights)
		if err != nil {
			return err
		}
		blocks, err := intList(*sweepBlocks)
		if err != nil {
			return err
		}
		for _, f := range flights {
			fmt.Printf(" %9s", fmt.Sprintf("%d flight", f))
		}
		fmt.Println()
		for _, kb := range blocks {
			bs := kb << 10
			fmt.Printf("%-10s", fmt.Sprintf("%d KiB", bs>>10))
			for _, f := range flights {
				r, err := runCase(shape{"sweep", bs, stream.MaxRequestBytes / bs, f}, *sizeMiB)
				if err != nil {
					return err
				}
				fmt.Printf(" %9.1f", r.MBps)
			}
			fmt.Println()
		}
	}
	return nil
}

func runChild(ctx context.Context, self, brokerURL, thing, streamName, img, dir string, sh shape) (result, error) {
	st, err := os.Stat(img)
	if err != nil {
		return result{}, err
	}
	out := filepath.Join(dir, "out.bin")
	os.Remove(out)
	if brokerForChild != "" {
		brokerURL = brokerForChild
	}
	extra := []string{}
	if writerForChild != nil {
		writerJobs++
		extra = []string{"-writer", writerForChild.sock, "-sig", img + ".sig", "-job", fmt.Sprintf("bench-%d", writerJobs)}
	}
	cmd := exec.CommandContext(ctx, self, "-broker", brokerURL, "-thing", thing, "-stream", streamName,
		"-size", fmt.Sprint(st.Size()), "-bs", fmt.Sprint(sh.BlockSize), "-per", fmt.Sprint(sh.BlocksPerRequest),
		"-flight", fmt.Sprint(sh.InFlight), "-out", out)
	cmd.Args = append(cmd.Args, extra...)
	cmd.Env = os.Environ()
	if *childEnv != "" {
		cmd.Env = append(cmd.Env, strings.Fields(*childEnv)...)
	}
	if childProfile != "" {
		childRuns++
		cmd.Env = append(cmd.Env, fmt.Sprintf("STREAMDL_CPUPROFILE=%s-%d.pprof", childProfile, childRuns))
	}
	var stdout, stderr bytes.Buffer
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	if err := cmd.Run(); err != nil {
		return result{}, fmt.Errorf("%w: %s", err, stderr.String())
	}
	var res result
	if err := json.Unmarshal(stdout.Bytes(), &res); err != nil {
		return result{}, fmt.Errorf("child output %q: %w", stdout.String(), err)
	}
	res.Shape = sh
	res.CPU.child = cmd.ProcessState.UserTime() + cmd.ProcessState.SystemTime()
	if writerForChild != nil {
		return res, nil // the writer verified the signature over the slot's bytes
	}
	a, err := fileSHA(img)
	if err != nil {
		return result{}, err
	}
	b, err := fileSHA(out)
	if err != nil {
		return result{}, err
	}
	if a != b {
		return result{}, errors.New("downloaded image differs from the source")
	}
	os.Remove(out)
	return res, nil
}

// floor pushes the image through the broker as fast as one pipelined publisher can, in
// block-sized messages shaped like stream data (CBOR block, same topic depth), and returns
// MB/s of payload data received by one subscriber.
func floor(ctx context.Context, brokerURL, img string, bs int) (float64, error) {
	data, err := os.ReadFile(img)
	if err != nil {
		return 0, err
	}
	u, err := url.Parse(brokerURL)
	if err != nil {
		return 0, err
	}
	topic := "$aws/things/floor/streams/s/data/cbor"
	n := (len(data) + bs - 1) / bs
	var got atomic.Int64
	done := make(chan struct{})
	sub, err := pahoClient(ctx, u.Host, "floor-sub", func(pr paho.PublishReceived) (bool, error) {
		if got.Add(1) == int64(n) {
			close(done)
		}
		return true, nil
	})
	if err != nil {
		return 0, err
	}
	defer sub.Disconnect(&paho.Disconnect{})
	if _, err := sub.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: topic, QoS: 1}}}); err != nil {
		return 0, err
	}
	pub, err := pahoClient(ctx, u.Host, "floor-pub", nil)
	if err != nil {
		return 0, err
	}
	defer pub.Disconnect(&paho.Disconnect{})
	payloads := make([][]byte, n)
	for i := range payloads {
		b := stream.Block{FileID: 0, Index: int64(i), Length: int64(min(bs, len(data)-i*bs)), Payload: data[i*bs : min(len(data), (i+1)*bs)]}
		payloads[i], err = encodeBlock(b)
		if err != nil {
			return 0, err
		}
	}
	start := time.Now()
	next := make(chan int, n)
	for i := 0; i < n; i++ {
		next <- i
	}
	close(next)
	var wg sync.WaitGroup
	var perr atomic.Value
	for w := 0; w < *floorFlight; w++ {
		wg.Add(1)
		go func() {
			defer wg.Done()
			for i := range next {
				if _, err := pub.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: payloads[i]}); err != nil {
					perr.Store(err)
					return
				}
			}
		}()
	}
	select {
	case <-done:
	case <-time.After(2 * time.Minute):
		return 0, fmt.Errorf("floor: %d of %d messages after 2 min", got.Load(), n)
	}
	secs := time.Since(start).Seconds()
	wg.Wait()
	if err, _ := perr.Load().(error); err != nil {
		return 0, err
	}
	return float64(len(data)) / secs / 1e6, nil
}

func pahoClient(ctx context.Context, addr, id string, onPub func(paho.PublishReceived) (bool, error)) (*paho.Client, error) {
	conn, err := net.Dial("tcp", addr)
	if err != nil {
		return nil, err
	}
	cfg := paho.ClientConfig{Conn: conn, ClientID: id}
	if onPub != nil {
		cfg.OnPublishReceived = []func(paho.PublishReceived) (bool, error){onPub}
	}
	c := paho.NewClient(cfg)
	if _, err := c.Connect(ctx, &paho.Connect{ClientID: id, CleanStart: true, KeepAlive: 30}); err != nil {
		conn.Close()
		return nil, err
	}
	return c, nil
}

func startMosquitto(ctx context.Context, bin, dir string, port int) (string, func(), error) {
	conf := filepath.Join(dir, "mosquitto.conf")
	// Nagle off (44 ms round trips otherwise), queues and in-flight windows raised so the
	// broker does not drop QoS 1 messages when a publisher runs ahead.
	text := fmt.Sprintf("listener %d 127.0.0.1\nallow_anonymous true\nset_tcp_nodelay true\npersistence false\n"+
		"max_queued_messages 1000000\nmax_queued_bytes 0\nmax_inflight_messages 0\nmax_inflight_bytes 0\nlog_dest stderr\nlog_type error\n", port)
	if err := os.WriteFile(conf, []byte(text), 0o600); err != nil {
		return "", nil, err
	}
	cmd := exec.CommandContext(ctx, bin, "-c", conf)
	cmd.Stderr = os.Stderr
	if err := cmd.Start(); err != nil {
		return "", nil, err
	}
	mosquittoPID = cmd.Process.Pid
	stop := func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
	}
	addr := fmt.Sprintf("127.0.0.1:%d", port)
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("tcp", addr)
		if err == nil {
			c.Close()
			break
		}
		if time.Now().After(deadline) {
			stop()
			return "", nil, fmt.Errorf("mosquitto did not listen on %s: %w", addr, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
	return "mqtt://" + addr, stop, nil
}

func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

func writeRandom(path string, n int64) error {
	f, err := os.Create(path)
	if err != nil {
		return err
	}
	defer f.Close()
	_, err = io.CopyN(f, rand.Reader, n)
	return err
}

func fileSHA(path string) (string, error) {
	f, err := os.Open(path)
	if err != nil {
		return "", err
	}
	defer f.Close()
	h := sha256.New()
	if _, err := io.Copy(h, f); err != nil {
		return "", err
	}
	return fmt.Sprintf("%x", h.Sum(nil)), nil
}

func median(v []float64) float64 {
	s := append([]float64(nil), v...)
	sort.Float64s(s)
	if len(s)%2 == 1 {
		return s[len(s)/2]
	}
	return (s[len(s)/2-1] + s[len(s)/2]) / 2
}

func intList(s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		var n int
		if _, err := fmt.Sscan(f, &n); err != nil {
			return nil, fmt.Errorf("list %q: %w", s, err)
		}
		out = append(out, n)
	}
	return out, nil
}
