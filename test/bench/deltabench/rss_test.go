package main

import (
	"encoding/binary"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
)

// rssLimitKiB is the peak RSS the publisher's build and the device's lookup stay under.
const rssLimitKiB = 25 << 10

// TestPeakRSSFlatInImageSize runs the real `ota-writer manifest` and the device's lookup
// (deltabench -manifest, under the writer's 12 MiB soft heap limit) on sparse 256 MiB and
// 2 GiB images with the same density of distinct non-zero 4 KiB blocks (one in 16, so the
// 2 GiB image has 32 Ki blocks to hash, index and compress), and reads each process's peak
// RSS from the kernel: under 25 MiB, and the 2 GiB image's at most 4 MiB above the 256 MiB
// image's (the index is 8 bytes per block and bounded; nothing holds the image).
func TestPeakRSSFlatInImageSize(t *testing.T) {
	if testing.Short() {
		t.Skip("writes 144 MiB of sparse images and runs the commands on them")
	}
	dir := t.TempDir()
	bin := func(pkg, name string) string {
		p := filepath.Join(dir, name)
		// Built without -race: the figures are the shipped binaries'.
		if out, err := exec.Command("go", "build", "-o", p, pkg).CombinedOutput(); err != nil {
			t.Fatalf("go build %s: %v\n%s", pkg, err, out)
		}
		return p
	}
	writer, bench := bin("github.com/gwota/gwota/cmd/ota-writer", "ota-writer"), bin(".", "deltabench")
	// Through deltabench -peak-rss: a child's peak counts the RSS of the process starting it
	// (runPeakRSS), and this test's is large under -race.
	peak := func(env []string, name string, args ...string) int64 {
		t.Helper()
		cmd := exec.Command(bench, append([]string{"-peak-rss", name}, args...)...)
		cmd.Env = append(os.Environ(), env...)
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("%s %v: %v", name, args, err)
		}
		kib, err := strconv.ParseInt(strings.TrimSpace(string(out)), 10, 64)
		if err != nil {
			t.Fatalf("peak RSS %q: %v", out, err)
		}
		return kib
	}
	type rss struct{ build, lookup int64 }
	measure := func(sizeMiB int64) rss {
		img := filepath.Join(dir, fmt.Sprintf("%d.img", sizeMiB))
		f, err := os.Create(img)
		if err != nil {
			t.Fatal(err)
		}
		if err := f.Truncate(sizeMiB << 20); err != nil {
			t.Fatal(err)
		}
		blk := make([]byte, 4096)
		for i := range blk {
			blk[i] = byte(i * 7)
		}
		for off := int64(0); off < sizeMiB<<20; off += 16 * 4096 {
			binary.BigEndian.PutUint64(blk, uint64(off)) // every block distinct
			if _, err := f.WriteAt(blk, off); err != nil {
				t.Fatal(err)
			}
		}
		if err := f.Close(); err != nil {
			t.Fatal(err)
		}
		m := filepath.Join(dir, "m")
		var r rss
		r.build = peak(nil, writer, "manifest", "--image", img, "--version", "1", "--target", "rootfs",
			"--compatible", "bench", "-o", m, "--chunks", filepath.Join(dir, "c"))
		r.lookup = peak([]string{"GOMEMLIMIT=12MiB"}, bench, "-manifest", m, "-local", img)
		if err := os.Remove(img); err != nil {
			t.Fatal(err)
		}
		t.Logf("%d MiB: peak RSS build %d KiB, lookup %d KiB", sizeMiB, r.build, r.lookup)
		return r
	}
	small, large := measure(256), measure(2048)
	for _, c := range []struct {
		what         string
		small, large int64
	}{{"build", small.build, large.build}, {"lookup", small.lookup, large.lookup}} {
		if c.large > rssLimitKiB || c.small > rssLimitKiB {
			t.Errorf("%s: peak RSS %d KiB (256 MiB), %d KiB (2 GiB), limit %d KiB", c.what, c.small, c.large, rssLimitKiB)
		}
		if c.large > c.small+4<<10 {
			t.Errorf("%s: peak RSS grows with the image: %d KiB (256 MiB), %d KiB (2 GiB)", c.what, c.small, c.large)
		}
	}
}
