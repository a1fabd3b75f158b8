package main

import (
	"context"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"
	"time"
)

// TestReadySmoke runs the end-to-end mode (deltabench -ready, what scripts/bench-ready.sh
// runs on ext4 pairs) on a 1 MiB pair whose v2 rewrites 64 KiB of v1: every case and kind
// reaches ready; the delta update is served less than the full one and reports blocks
// reused; both processes' peaks are read from /proc and stay under the 25 MiB target.
func TestReadySmoke(t *testing.T) {
	if testing.Short() && os.Getenv("CI") != "true" {
		t.Skip("builds both binaries and runs six updates through the emulator")
	}
	dir := t.TempDir()
	v1 := make([]byte, 1<<20)
	if _, err := rand.Read(v1); err != nil {
		t.Fatal(err)
	}
	v2 := append([]byte(nil), v1...)
	if _, err := rand.Read(v2[40<<12 : 56<<12]); err != nil {
		t.Fatal(err)
	}
	p1, p2 := filepath.Join(dir, "v1.img"), filepath.Join(dir, "v2.img")
	for p, b := range map[string][]byte{p1: v1, p2: v2} {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	got := map[string]map[string]ReadyFigures{}
	err := readyBench(ctx, p1, p2, false, []string{"quota-mqtt", "link-mqtt", "link-http"}, []string{"full", "delta"}, func(f ReadyFigures) {
		t.Logf("%+v", f)
		if got[f.Case] == nil {
			got[f.Case] = map[string]ReadyFigures{}
		}
		got[f.Case][f.Kind] = f
	})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []string{"quota-mqtt", "link-mqtt", "link-http"} {
		full, delta := got[c]["full"], got[c]["delta"]
		if full.Served < int64(len(v2)) {
			t.Errorf("%s: full update served %d bytes, the image has %d", c, full.Served, len(v2))
		}
		if delta.Served <= 0 || delta.Served >= full.Served/2 {
			t.Errorf("%s: delta served %d bytes, full %d: want under half", c, delta.Served, full.Served)
		}
		if delta.Reused == "" || delta.Reused[0] == '0' {
			t.Errorf("%s: delta reused %q, want blocks from v1", c, delta.Reused)
		}
		for _, f := range []ReadyFigures{full, delta} {
			if f.Ready <= 0 {
				t.Errorf("%s %s: no time to ready", c, f.Kind)
			}
			for name, kib := range map[string]int64{"ota-net": f.NetHWMKiB, "ota-writer": f.WriterHWMKB} {
				if kib <= 0 || kib > rssLimitKiB {
					t.Errorf("%s %s: %s peak RSS %d KiB, want in (0, %d]", c, f.Kind, name, kib, rssLimitKiB)
				}
			}
		}
	}
}
