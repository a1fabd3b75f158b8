package main

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

// The report's curl target line comes from httpvscurl's JSON line: judged against curl -o FILE
// + fsync, with the other two baselines beside it; an older httpvscurl's line (one baseline)
// or a failed run gives no target line.
func TestCurlTargetLine(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	human := "httpvscurl: rep 0: ...\n"
	tests := []struct {
		name, out string
		want      []string // substrings of the target line; nil: no curl line
	}{
		{"met", human + `{"bench":"httpvscurl","size_bytes":67108864,"reps":5,"proxy":true,"rate_kbps":0,"otanet_median_s":0.4,"curl_null_median_s":0.3,"curl_file_median_s":0.32,"curl_fsync_median_s":0.4,"ratio_null":0.75,"ratio_file":0.8,"ratio_fsync":1.0}`,
			[]string{"64 MiB through tinyproxy", "1.00 of `curl -o FILE` + fsync (0.400 s against 0.400 s, median of 5; target at least 0.9: met)", "0.80 of `curl -o FILE`", "0.75 of `curl -o /dev/null`"}},
		{"missed", human + `{"bench":"httpvscurl","size_bytes":67108864,"reps":3,"proxy":false,"rate_kbps":0,"otanet_median_s":0.5,"curl_null_median_s":0.3,"curl_file_median_s":0.35,"curl_fsync_median_s":0.4,"ratio_null":0.6,"ratio_file":0.7,"ratio_fsync":0.8}`,
			[]string{"direct", "0.80 of `curl -o FILE` + fsync", "target at least 0.9: **missed**"}},
		{"older httpvscurl", human + `{"bench":"httpvscurl","size_bytes":67108864,"reps":3,"proxy":true,"rate_kbps":0,"curl_median_s":0.29,"otanet_median_s":0.6,"ratio":0.48}`, nil},
		{"paced link", human + `{"bench":"httpvscurl","size_bytes":67108864,"reps":3,"proxy":true,"rate_kbps":12500,"otanet_median_s":0.5,"curl_null_median_s":0.5,"curl_file_median_s":0.5,"curl_fsync_median_s":0.5,"ratio_null":1,"ratio_file":1,"ratio_fsync":1}`, nil},
		{"failed", "httpvscurl: curl is not installed\nhttpvscurl failed (exit 1)\n", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var w bytes.Buffer
			(&report{}).targets(&w, "", write(strings.ReplaceAll(tc.name, " ", "_"), tc.out))
			var line string
			for _, l := range strings.Split(w.String(), "\n") {
				if strings.HasPrefix(l, "- HTTP download") {
					line = l
				}
			}
			if tc.want == nil {
				if line != "" {
					t.Fatalf("curl target line %q, want none", line)
				}
				return
			}
			for _, s := range tc.want {
				if !strings.Contains(line, s) {
					t.Errorf("curl target line %q lacks %q", line, s)
				}
			}
			if !strings.Contains(line, "Judged against curl -o FILE + fsync") {
				t.Errorf("curl target line %q does not say what it is judged against", line)
			}
		})
	}
}

func secs(s float64) time.Duration { return time.Duration(s * float64(time.Second)) }

// TestInterleave: the two variants alternate which runs first, run i of both gets image seed
// i, the pairs are run i's gRPC time over its in-process twin's, and the medians are each
// variant's own.
func TestInterleave(t *testing.T) {
	c := cell{link: lan, sizeMiB: 4, agent: defaults}
	grpc := []float64{1.2, 1.0, 3.0} // run 2 an outlier: the median ignores it
	inproc := []float64{1.0, 1.0, 1.5}
	var calls []string
	h := interleave(c, 3, func(x cell, rep int) (result, error) {
		calls = append(calls, fmt.Sprintf("%d %s", rep, x))
		if x.inproc {
			return result{took: secs(inproc[rep])}, nil
		}
		return result{took: secs(grpc[rep])}, nil
	})
	if h.err != nil {
		t.Fatal(h.err)
	}
	g, in := "lan/4MiB/mqtt/defaults/quotas-off", "lan/4MiB/mqtt/defaults/quotas-off/in-process"
	if diff := cmp.Diff([]string{"0 " + g, "0 " + in, "1 " + in, "1 " + g, "2 " + g, "2 " + in}, calls); diff != "" {
		t.Errorf("run order (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]float64{1.2, 1.0, 2.0}, h.pairs); diff != "" {
		t.Errorf("pairs (-want +got):\n%s", diff)
	}
	if h.grpc.took != secs(1.2) || h.inproc.took != secs(1.0) || h.grpc.inproc || !h.inproc.inproc {
		t.Errorf("medians: gRPC %v (%v), in-process %v (%v)", h.grpc.took, h.grpc.cell, h.inproc.took, h.inproc.cell)
	}
	if r := h.ratio(); r < 1.199 || r > 1.201 {
		t.Errorf("ratio %v, want 1.2", r)
	}

	// A failed run ends the cell with the variant's name in the error.
	calls = nil
	h = interleave(c, 3, func(x cell, rep int) (result, error) {
		if x.inproc && rep == 1 {
			return result{}, errors.New("no ready")
		}
		return result{took: time.Second}, nil
	})
	if h.err == nil || !strings.Contains(h.err.Error(), in+": no ready") {
		t.Errorf("error %v", h.err)
	}
}

// hopOf is a hop cell with the given median times (s) and CPU (s) and RSS (MiB) per process.
func hopOf(c cell, grpc, inproc float64) hopSummary {
	in := c
	in.inproc = true
	g := summary{cell: c, result: result{took: secs(grpc), netCPU: secs(0.05), writerCPU: secs(0.05), netRSS: 20 << 20, writerRSS: 22 << 20}, times: []time.Duration{secs(grpc), secs(grpc), secs(grpc)}}
	i := summary{cell: in, result: result{took: secs(inproc), netCPU: secs(0.05), netRSS: 25 << 20}, times: []time.Duration{secs(inproc), secs(inproc), secs(inproc)}}
	return hopSummary{cell: c, grpc: g, inproc: i, pairs: []float64{grpc / inproc, 1.0, grpc / inproc}}
}

// TestHopReport: the targets state the worst cell's end-to-end ratio against 1.1x with the
// right verdict and every cell's ratio; the hop table has one row per cell with the figures of
// both variants; a hop-only run (-matrix=false) does not list the matrix's cells as missing
// and labels the microbenchmark as the per-call price.
func TestHopReport(t *testing.T) {
	lan4 := cell{link: lan, sizeMiB: 4, agent: defaults}
	lan64 := cell{link: lan, sizeMiB: 64, agent: defaults}
	hopOut := "BenchmarkHop/block=64KiB/per_call=2/inprocess-2   1024  100000 ns/op  1000.00 MB/s\n" +
		"BenchmarkHop/block=64KiB/per_call=2/socket-2   1024  400000 ns/op  250.00 MB/s\n" +
		"BenchmarkHop/block=64KiB/per_call=2/socket-stream-2   1024  250000 ns/op  400.00 MB/s\n"
	for _, tc := range []struct {
		name      string
		hops      []hopSummary
		matrixRun bool
		want      []string // whole lines the report must hold
		wantNot   []string
	}{
		{
			name: "met", hops: []hopSummary{hopOf(lan4, 0.40, 0.38), hopOf(lan64, 6.60, 6.20)},
			want: []string{
				"- gRPC hop end to end (time to ready through ota-net and ota-writer over the socket against ota-net with the writer linked in, interleaved, medians): at most 1.06x, in lan/64MiB/mqtt/defaults/quotas-off (target at most 1.1x: met).",
				"  - lan/4MiB/mqtt/defaults/quotas-off: 1.05x (0.40 s against 0.38 s)",
				"| lan/64MiB/mqtt/defaults/quotas-off | 3 | 6.60 | 6.20 | 1.06x | 1.06 1.00 1.06 | 10.17 | 10.82 | 1.6 | 0.8 | 42.0 | 25.0 |",
				"- gRPC hop per call (microbenchmark, not the target's measure), block=64KiB/per_call=2, on ota-net's stream path: 2.50x the in-process writer's time per Write call; it carries 400 MB/s, 38x the highest goodput of any cell in this run (10.49 MB/s).",
				"## gRPC hop, per call",
				"Not run (`-matrix=false`: the hop comparison only).",
			},
			wantNot: []string{"Satellite", "Not run in this run"},
		},
		{
			name: "missed", hops: []hopSummary{hopOf(lan4, 0.50, 0.38), {cell: lan64, err: errors.New("no ready\nlog")}}, matrixRun: true,
			want: []string{
				"- gRPC hop end to end (time to ready through ota-net and ota-writer over the socket against ota-net with the writer linked in, interleaved, medians): at most 1.32x, in lan/4MiB/mqtt/defaults/quotas-off (target at most 1.1x: **missed**).",
				"| lan/64MiB/mqtt/defaults/quotas-off | failed: no ready | | | | | | | | | | |",
				"- Satellite, 16 MiB, MQTT, quotas off: not run.",
			},
		},
		{
			name: "none", matrixRun: true,
			want:    []string{"- gRPC hop end to end: not run."},
			wantNot: []string{"## gRPC hop, end to end"},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			hopFile := filepath.Join(dir, "hop.txt")
			if err := os.WriteFile(hopFile, []byte(hopOut), 0o644); err != nil {
				t.Fatal(err)
			}
			r := &report{matrixRun: tc.matrixRun, hops: tc.hops}
			out := filepath.Join(dir, "report.out")
			if err := r.write(out, hopFile, ""); err != nil {
				t.Fatal(err)
			}
			b, err := os.ReadFile(out)
			if err != nil {
				t.Fatal(err)
			}
			lines := strings.Split(string(b), "\n")
			has := func(want string) bool {
				for _, l := range lines {
					if l == want {
						return true
					}
				}
				return false
			}
			for _, w := range tc.want {
				if !has(w) {
					t.Errorf("report lacks %q:\n%s", w, b)
				}
			}
			for _, w := range tc.wantNot {
				if strings.Contains(string(b), w) {
					t.Errorf("report holds %q:\n%s", w, b)
				}
			}
		})
	}
}
