package main

import (
	"bufio"
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"runtime"
	"sort"
	"strconv"
	"strings"
	"time"

	"github.com/gwota/gwota/test/bench/internal/curljson"
)

// report is the Markdown report of one -report run.
type report struct {
	command      string
	commit       string
	began, ended time.Time
	load0, load1 string
	net          string
	reps         int
	cells        []summary
	// matrixRun: the matrix was asked for (-matrix); false for a hop-only run.
	matrixRun bool
	hops      []hopSummary
	// writerDefaults: the writer ran with its default sync policy (-writer-defaults).
	writerDefaults bool
}

const gib = float64(1 << 30)

// limit is what bounds a cell's rate and that rate in bytes/s (0: nothing shaped).
func (s summary) limit() (string, float64) {
	linkRate := float64(s.link.rateKB) * 1000
	switch {
	case s.quotas && !s.http && (linkRate == 0 || quotaBytes < linkRate):
		return "quota", quotaBytes
	case linkRate > 0:
		return "link", linkRate
	}
	return "", 0
}

func (s summary) size() float64 { return float64(int64(s.sizeMiB) << 20) }

func (s summary) goodput() float64 { return s.size() / s.took.Seconds() }

func (s summary) fraction() (string, float64) {
	what, rate := s.limit()
	if rate == 0 {
		return "", 0
	}
	return what, s.goodput() / rate
}

func (r *report) find(name string) *summary {
	for i := range r.cells {
		if r.cells[i].err == nil && r.cells[i].String() == name {
			return &r.cells[i]
		}
	}
	return nil
}

func commit() string {
	out, err := exec.Command("git", "describe", "--always", "--dirty", "--abbrev=12").Output()
	if err != nil {
		return "unknown"
	}
	return strings.TrimSpace(string(out))
}

func cpuModel() string {
	b, err := os.ReadFile("/proc/cpuinfo")
	if err != nil {
		return "unknown CPU"
	}
	for _, l := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(l, "model name"); ok {
			return strings.TrimSpace(strings.TrimPrefix(strings.TrimSpace(v), ":"))
		}
	}
	return "unknown CPU"
}

func (r *report) write(path, hopFile, curlFile string) error {
	var w bytes.Buffer
	p := func(format string, a ...any) { fmt.Fprintf(&w, format, a...) }
	p("# Link benchmarks\n\n")
	p("Written by `scripts/bench-link.sh` (`test/bench/linkbench -report`); do not edit by hand.\n\n")
	p("- Command: `%s`\n", r.command)
	p("- Commit: `%s`; %s\n", r.commit, r.net)
	p("- Run: %s to %s UTC\n", r.began.Format("2006-01-02 15:04"), r.ended.Format("15:04"))
	p("- Machine: %d CPUs (%s), %s/%s; load average (1, 5, 15 min) %s at the start, %s at the end. The machine is shared: compare figures within this run only.\n",
		runtime.NumCPU(), cpuModel(), runtime.GOOS, runtime.GOARCH, r.load0, r.load1)
	p("- Each cell is the real `ota-net` and `ota-writer` processes, the emulator as AWS IoT, and toxiproxy between `ota-net` and both the broker and the presigned-URL HTTP server; figures are from the median run by time to ready (runs per cell in the table).\n")
	if r.writerDefaults {
		p("- The writer syncs as configured by default (`sync_bytes` 8 MiB, `sync_interval` 2 s; ota-net's sink asks for a sync every half of its window as well).\n\n")
	} else {
		p("- The writer syncs every 64 KiB or 200 ms (the test harness's setting, `-writer-defaults=false`).\n\n")
	}

	p("## Targets (issue 11)\n\n")
	r.targets(&w, hopFile, curlFile)

	if len(r.hops) > 0 {
		p("\n## gRPC hop, end to end\n\n")
		r.hopTable(&w)
	}

	if !r.matrixRun {
		p("\n## Matrix\n\nNot run (`-matrix=false`: the hop comparison only).\n")
		p("\n## gRPC hop, per call\n\n")
		r.hop(&w, hopFile)
		return os.WriteFile(path, w.Bytes(), 0o644)
	}

	p("\n## Matrix\n\n")
	p("Links: lan (not shaped), lte (25 ms each way, 5 ms jitter, 20 Mbit/s), sat (300 ms each way, 5 Mbit/s), lan-loss25 and lte-loss5 (lan and lte with 25 %% and 5 %% of stream messages dropped by the emulator). ")
	p("AWS quotas: the emulator's per-connection quotas (512 KiB/s each way, 100 publishes/s) on or off. ")
	p("ota-net: its defaults (64 KiB blocks, 2 per request, 8 requests in flight) or the AWS C agent's request shape (4 KiB blocks, 8 per request, one request in flight).\n\n")
	p("Columns: time to ready runs from creating the job to ota-net's IN_PROGRESS `ready` update reaching the cloud. Goodput is image bytes over that time. Fraction is goodput over what binds: the link's rate, or the 512 KiB/s quota when it is lower (MQTT only). Wire is bytes through both proxies, both ways, over image bytes. CPU is user+system seconds of each process over that time per GiB of image; CPU comes from /proc in ticks of 10 ms (2.6 s/GiB per tick at 4 MiB). RSS is each process's peak resident set (VmHWM) at ready.\n\n")
	p("| cell (link/image/protocol/ota-net/quotas) | runs | time to ready s | goodput MB/s | fraction | binds | wire/image | ota-net CPU s/GiB | writer CPU s/GiB | ota-net peak RSS MiB | writer peak RSS MiB |\n")
	p("|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, s := range r.cells {
		if s.err != nil {
			p("| %s | failed: %s | | | | | | | | | |\n", s.cell, oneLine(s.err.Error()))
			continue
		}
		frac, binds := "—", "nothing shaped"
		if what, f := s.fraction(); what != "" {
			frac, binds = fmt.Sprintf("%.2f", f), what
		}
		p("| %s | %d | %.2f | %.2f | %s | %s | %.3f | %.1f | %.1f | %.1f | %.1f |\n", s.cell, len(s.times), s.took.Seconds(), s.goodput()/1e6,
			frac, binds, float64(s.wire)/s.size(), s.netCPU.Seconds()/(s.size()/gib), s.writerCPU.Seconds()/(s.size()/gib),
			float64(s.netRSS)/(1<<20), float64(s.writerRSS)/(1<<20))
	}
	r.compare(&w)

	p("\n## gRPC hop, per call\n\n")
	r.hop(&w, hopFile)

	p("\n## HTTP download against curl\n\n")
	if curlFile == "" {
		p("HOOK (not run): `test/bench/httpvscurl` (HTTP download against `curl -o` of the same URL through the same proxy) is not in this tree; `scripts/bench-link.sh` runs it here once it is.\n")
	} else if b, err := os.ReadFile(curlFile); err != nil {
		p("Not run: %v\n", err)
	} else {
		p("ota-net's HTTP download (real processes; from before its first GET to every block durable in the writer) against three curl baselines of the same URL through the same proxy, alternating: `curl -o /dev/null`, `curl -o FILE` on the slots' filesystem, and that file fsynced right after curl exits. Ratios are median curl time over median ota-net time. Output of `test/bench/httpvscurl`:\n\n```\n%s\n```\n", strings.TrimSpace(string(b)))
	}

	p("\n## Cells not run\n\n")
	p("The matrix leaves out these cells of the full cross product:\n\n")
	for _, n := range notRun {
		p("- %s\n", n)
	}
	if missing := r.notYet(); len(missing) > 0 {
		p("- Not run in this run (time ran out or filtered out): %s.\n", strings.Join(missing, ", "))
	}
	return os.WriteFile(path, w.Bytes(), 0o644)
}

func oneLine(s string) string {
	s = strings.SplitN(s, "\n", 2)[0]
	return strings.ReplaceAll(s, "|", "/")
}

// notYet lists the matrix's cells this run has no figure for.
func (r *report) notYet() []string {
	var out []string
	for _, c := range matrix() {
		if r.find(c.String()) == nil {
			out = append(out, "`"+c.String()+"`")
		}
	}
	return out
}

func (r *report) targets(w *bytes.Buffer, hopFile, curlFile string) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	verdict := func(ok bool) string {
		if ok {
			return "met"
		}
		return "**missed**"
	}
	if s := r.find("sat/16MiB/mqtt/defaults/quotas-off"); s != nil {
		_, f := s.fraction()
		p("- Satellite, 16 MiB, MQTT, quotas off: %.2f of the link in %.2f s (target at least 0.9: %s).\n", f, s.took.Seconds(), verdict(f >= 0.9))
	} else if r.matrixRun {
		p("- Satellite, 16 MiB, MQTT, quotas off: not run.\n")
	}
	if s := r.find("sat/16MiB/mqtt/defaults/quotas-on"); s != nil {
		what, f := s.fraction()
		p("- Satellite, 16 MiB, MQTT, quotas on: the %s binds (512 KiB/s below 5 Mbit/s); %.2f of it in %.2f s.\n", what, f, s.took.Seconds())
	}
	if s := r.find("lte/16MiB/mqtt/defaults/quotas-off"); s != nil {
		_, f := s.fraction()
		p("- LTE, 16 MiB, MQTT, quotas off: %.2f of the link in %.2f s.\n", f, s.took.Seconds())
	}
	for _, q := range []string{"quotas-off", "quotas-on"} {
		l, c := r.find("lan-loss25/4MiB/mqtt/defaults/"+q), r.find("lan/4MiB/mqtt/defaults/"+q)
		if l != nil && c != nil {
			x := l.took.Seconds() / c.took.Seconds()
			p("- 25 %% of stream messages dropped on the LAN, 4 MiB, %s: time to ready %.2fx the loss-free time (%.2f s against %.2f s; target at most 2x: %s).\n",
				q, x, l.took.Seconds(), c.took.Seconds(), verdict(x <= 2))
		}
	}
	if s := r.find("lte-loss5/16MiB/mqtt/defaults/quotas-off"); s != nil {
		_, f := s.fraction()
		p("- 5 %% of stream messages dropped on LTE, 16 MiB, quotas off: %.2f of the link (target at least 0.8: %s).\n", f, verdict(f >= 0.8))
	}
	if c := parseCurl(curlFile); c != nil {
		via := "direct"
		if c.Proxy {
			via = "through tinyproxy"
		}
		p("- HTTP download, %d MiB %s, link not shaped: %.2f of `curl -o FILE` + fsync (%.3f s against %.3f s, median of %d; target at least 0.9: %s); %.2f of `curl -o FILE` without the fsync (%.3f s), %.2f of `curl -o /dev/null` (%.3f s). ",
			c.SizeBytes>>20, via, c.RatioFsync, c.OtaNetMedian, c.CurlFsyncMedian, c.Reps, verdict(c.RatioFsync >= 0.9),
			c.RatioFile, c.CurlFileMedian, c.RatioNull, c.CurlNullMedian)
		p("Judged against curl -o FILE + fsync: the issue asks for `curl -o` of the same URL, i.e. to a file, and ota-net's time ends with every block durable in the writer, which curl's file is only once fsynced.\n")
	}
	r.hopTargets(w, verdict)
	if h := parseHop(hopFile); len(h) > 0 {
		for _, shape := range []string{"block=64KiB/per_call=2", "block=4KiB/per_call=8"} {
			in, ok1 := h[shape+"/inprocess"]
			st, ok2 := h[shape+"/socket-stream"]
			if ok1 && ok2 {
				x := st.nsPerOp / in.nsPerOp
				p("- gRPC hop per call (microbenchmark, not the target's measure), %s, on ota-net's stream path: %.2fx the in-process writer's time per Write call; it carries %.0f MB/s, %.0fx the highest goodput of any cell in this run (%.2f MB/s).\n",
					shape, x, st.mbps, st.mbps/(r.bestGoodput()/1e6), r.bestGoodput()/1e6)
			}
		}
	}
}

func (r *report) bestGoodput() float64 {
	best := 0.0
	for _, s := range r.cells {
		if s.err == nil {
			best = max(best, s.goodput())
		}
	}
	for _, h := range r.hops {
		if h.err == nil {
			best = max(best, h.grpc.goodput())
		}
	}
	return best
}

// hopTarget is issue 11's bound on the gRPC hop: time to ready through it at most this many
// times the time with the writer linked in.
const hopTarget = 1.1

// hopTargets states the end-to-end ratio of every hop cell against the target.
func (r *report) hopTargets(w *bytes.Buffer, verdict func(bool) string) {
	var ok []hopSummary
	for _, h := range r.hops {
		if h.err == nil {
			ok = append(ok, h)
		}
	}
	if len(ok) == 0 {
		if r.matrixRun {
			fmt.Fprintf(w, "- gRPC hop end to end: not run.\n")
		}
		return
	}
	worst := ok[0]
	for _, h := range ok {
		if h.ratio() > worst.ratio() {
			worst = h
		}
	}
	fmt.Fprintf(w, "- gRPC hop end to end (time to ready through ota-net and ota-writer over the socket against ota-net with the writer linked in, interleaved, medians): at most %.2fx, in %s (target at most %.1fx: %s).\n",
		worst.ratio(), worst.cell, hopTarget, verdict(worst.ratio() <= hopTarget))
	for _, h := range ok {
		fmt.Fprintf(w, "  - %s: %.2fx (%.2f s against %.2f s)\n", h.cell, h.ratio(), h.grpc.took.Seconds(), h.inproc.took.Seconds())
	}
}

// hopTable is the end-to-end comparison, cell by cell.
func (r *report) hopTable(w *bytes.Buffer) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	p("Each cell run through the real `ota-net` and `ota-writer` (gRPC over the Unix socket) and through ota-net's benchmark build with the writer engine linked in behind the same `api.Writer` (`cmd/ota-net/inproc.go`, build tag `gwota_inproc`: no socket, no gRPC, one process), alternately, with the same image and link; `test/e2e/inproc_test.go:TestInProcessWriter` shows that build is the same agent. ")
	p("Times are medians (time to ready, as in the matrix); the ratio is gRPC over in-process; paired ratios are each run's gRPC time over its in-process twin's, in run order. CPU is user+system per GiB of image (gRPC: ota-net + ota-writer); RSS is peak (gRPC: ota-net + ota-writer).\n\n")
	p("| cell (link/image/protocol/ota-net/quotas) | runs each | gRPC s | in-process s | gRPC / in-process | paired ratios | gRPC MB/s | in-process MB/s | gRPC CPU s/GiB | in-process CPU s/GiB | gRPC peak RSS MiB | in-process peak RSS MiB |\n")
	p("|---|---|---|---|---|---|---|---|---|---|---|---|\n")
	for _, h := range r.hops {
		if h.err != nil {
			p("| %s | failed: %s | | | | | | | | | | |\n", h.cell, oneLine(h.err.Error()))
			continue
		}
		pairs := make([]string, len(h.pairs))
		for i, x := range h.pairs {
			pairs[i] = fmt.Sprintf("%.2f", x)
		}
		g, in := h.grpc, h.inproc
		p("| %s | %d | %.2f | %.2f | %.2fx | %s | %.2f | %.2f | %.1f | %.1f | %.1f | %.1f |\n", h.cell, len(g.times), g.took.Seconds(), in.took.Seconds(), h.ratio(),
			strings.Join(pairs, " "), g.goodput()/1e6, in.goodput()/1e6,
			(g.netCPU+g.writerCPU).Seconds()/(g.size()/gib), (in.netCPU+in.writerCPU).Seconds()/(in.size()/gib),
			float64(g.netRSS+g.writerRSS)/(1<<20), float64(in.netRSS+in.writerRSS)/(1<<20))
	}
}

// compare puts ota-net's defaults against the C agent's request shape, cell by cell.
func (r *report) compare(w *bytes.Buffer) {
	var lines []string
	for _, s := range r.cells {
		if s.err != nil || s.agent.name != cAgent.name {
			continue
		}
		d := s.cell
		d.agent = defaults
		if o := r.find(d.String()); o != nil {
			lines = append(lines, fmt.Sprintf("| %s | %.2f | %.2f | %.1fx |", strings.Replace(d.String(), "/defaults", "", 1), s.took.Seconds(), o.took.Seconds(), s.took.Seconds()/o.took.Seconds()))
		}
	}
	if len(lines) == 0 {
		return
	}
	fmt.Fprintf(w, "\nota-net's defaults against the C agent's request shape (same run, same cell otherwise):\n\n")
	fmt.Fprintf(w, "| cell | C agent shape s | defaults s | C agent / defaults |\n|---|---|---|---|\n")
	for _, l := range lines {
		fmt.Fprintln(w, l)
	}
}

type hopLine struct{ nsPerOp, mbps float64 }

// parseCurl returns the last httpvscurl JSON line of path with all three baselines (nil:
// none, or an older httpvscurl's).
func parseCurl(path string) *curljson.Summary {
	b, err := os.ReadFile(path)
	if err != nil {
		return nil
	}
	lines := strings.Split(strings.TrimSpace(string(b)), "\n")
	for i := len(lines) - 1; i >= 0; i-- {
		var c curljson.Summary
		if strings.HasPrefix(lines[i], `{"bench":"httpvscurl"`) && json.Unmarshal([]byte(lines[i]), &c) == nil && c.Complete() {
			return &c
		}
	}
	return nil
}

// parseHop reads go test -bench Hop output: name -> ns/op and MB/s, the median by ns/op of
// the lines of that name (-count).
func parseHop(path string) map[string]hopLine {
	all := map[string][]hopLine{}
	out := map[string]hopLine{}
	f, err := os.Open(path)
	if err != nil {
		return out
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		fs := strings.Fields(sc.Text())
		if len(fs) < 6 || !strings.HasPrefix(fs[0], "BenchmarkHop/") {
			continue
		}
		name := strings.TrimPrefix(fs[0], "BenchmarkHop/")
		if i := strings.LastIndexByte(name, '-'); i > 0 {
			name = name[:i] // GOMAXPROCS suffix
		}
		var h hopLine
		for i := 1; i+1 < len(fs); i++ {
			v, err := strconv.ParseFloat(fs[i], 64)
			if err != nil {
				continue
			}
			switch fs[i+1] {
			case "ns/op":
				h.nsPerOp = v
			case "MB/s":
				h.mbps = v
			}
		}
		all[name] = append(all[name], h)
	}
	for name, hs := range all {
		sort.Slice(hs, func(a, b int) bool { return hs[a].nsPerOp < hs[b].nsPerOp })
		out[name] = hs[len(hs)/2]
	}
	return out
}

func (r *report) hop(w *bytes.Buffer, hopFile string) {
	p := func(format string, a ...any) { fmt.Fprintf(w, format, a...) }
	h := parseHop(hopFile)
	if len(h) == 0 {
		p("Not run.\n")
		return
	}
	p("The price per Write call, a microbenchmark (the end-to-end price is the section above and the target's measure). ")
	p("`writer/server/hop_test.go:BenchmarkHop`: the same `api.Writer` Write calls to the engine linked in-process, to `writer/client` over the Unix socket (one unary call each), and as messages on one WriteBlocks stream (ota-net's path); file-backed slot, the engine's sync policy.\n\n")
	p("| shape | in-process MB/s | socket unary MB/s | socket stream MB/s | unary / in-process | stream / in-process |\n|---|---|---|---|---|---|\n")
	for _, shape := range []string{"block=64KiB/per_call=2", "block=4KiB/per_call=8"} {
		in, su, ss := h[shape+"/inprocess"], h[shape+"/socket"], h[shape+"/socket-stream"]
		if in.nsPerOp == 0 {
			continue
		}
		p("| %s | %.0f | %.0f | %.0f | %.2fx | %.2fx |\n", shape, in.mbps, su.mbps, ss.mbps, su.nsPerOp/in.nsPerOp, ss.nsPerOp/in.nsPerOp)
	}
}
