package powercut

import (
	"encoding/json"
	"flag"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/gwota/gwota/test/lazyfs"

	"github.com/gwota/gwota/test/testenv"
)

var seedFlag = flag.Uint64("powercut.seed", 0, "seed of the random cut points (0: GWOTA_FAULTS_SEED or the clock)")

// Summary is what powercut.json holds, for the reliability report.
type Summary struct {
	Runs              int     `json:"runs"`
	Boundaries        int     `json:"boundaries_per_scenario"`
	Ops               int     `json:"fs_ops_per_scenario"`
	SyncBoundaryCuts  int     `json:"sync_boundary_cuts"`
	RandomCuts        int     `json:"random_cuts"`
	PowerCuts         int     `json:"power_cuts"`
	Failures          int     `json:"failures"`
	Seed              uint64  `json:"seed"`
	Seconds           float64 `json:"seconds"`
	AllBoundariesSeen bool    `json:"all_boundaries_cut"`
	// CutsByArea counts the boundary cuts by what the boundary belongs to: "boot state"
	// (the file boot backend's state file: activation, boot, commit, reject), "session
	// journal", "record", "slot", "directory".
	CutsByArea map[string]int `json:"boundary_cuts_by_area"`
}

// area names what boundary k (1-based) of trace belongs to; a directory sync right after a
// rename completes that rename's save.
func area(trace []string, k int) string {
	op := trace[k-1]
	if strings.HasPrefix(op, "fsync ") && k > 1 && strings.HasPrefix(trace[k-2], "rename ") &&
		strings.HasPrefix(strings.Fields(trace[k-2])[2], strings.TrimPrefix(op, "fsync ")+"/") {
		op = trace[k-2]
	}
	switch {
	case strings.Contains(op, "boot-state"):
		return "boot state"
	case strings.Contains(op, "sessions/"):
		return "session journal"
	case strings.Contains(op, "state/record"):
		return "record"
	case strings.Contains(op, "slot-"):
		return "slot"
	}
	return "directory"
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v > 0 {
		return v
	}
	return def
}

func seed() uint64 {
	if *seedFlag != 0 {
		return *seedFlag
	}
	if v, err := strconv.ParseUint(os.Getenv("GWOTA_FAULTS_SEED"), 10, 64); err == nil && v != 0 {
		return v
	}
	return uint64(time.Now().UnixNano())
}

func needFUSE(t *testing.T) {
	testenv.Need(t, lazyfs.Available())
}

// TestPowerCuts is the campaign: a dry run counts the sync boundaries and file system
// operations of the whole scenario; then one run per chosen boundary cuts the power right
// after it, and runs with random cut points (one to three cuts each, anywhere among the
// operations) follow.
func TestPowerCuts(t *testing.T) {
	needFUSE(t)
	start := time.Now()
	n := envInt("GWOTA_FAULTS_N", 6)
	sd := seed()
	t.Logf("seed %d (rerun with GWOTA_FAULTS_SEED=%d), N %d", sd, sd, n)
	rng := rand.New(rand.NewPCG(sd, sd^0x5eed))
	c := newCommon(t)

	var sum Summary
	sum.Seed = sd
	sum.CutsByArea = map[string]int{}
	// Written however the campaign ends, failures included.
	defer writeSummary(t, &sum, start)
	var trace []string
	ran := false // set by each run that is not filtered out by -run
	record := func(ok bool, cuts int, boundary bool) {
		if !ran {
			return
		}
		ran = false
		sum.Runs++
		sum.PowerCuts += cuts
		if boundary {
			sum.SyncBoundaryCuts += cuts
		} else {
			sum.RandomCuts += cuts
		}
		if !ok {
			sum.Failures++
		}
	}

	// Dry run: no cut. It must end right, and it gives the number of boundaries.
	ok := t.Run("dry", func(t *testing.T) {
		ran = true
		r := newRig(t, c)
		if err := r.run(); err != nil {
			t.Fatal(err)
		}
		cnt := r.fs.Counts()
		sum.Boundaries, sum.Ops = cnt.Boundaries(), cnt.Any
		trace = r.fs.Trace()
		if len(trace) != cnt.Boundaries() {
			t.Fatalf("trace of %d boundaries, counted %d", len(trace), cnt.Boundaries())
		}
		t.Logf("scenario: %d sync boundaries (%d file syncs, %d directory syncs, %d renames), %d operations",
			cnt.Boundaries(), cnt.FileSyncs, cnt.DirSyncs, cnt.Renames, cnt.Any)
	})
	record(ok, 0, true)
	if !ok || sum.Boundaries == 0 {
		t.Fatal("dry run failed")
	}

	// Boundaries: all of them when N covers them, else N spread evenly from a random offset.
	var ks []int
	if n >= sum.Boundaries {
		for k := 1; k <= sum.Boundaries; k++ {
			ks = append(ks, k)
		}
		sum.AllBoundariesSeen = true
	} else {
		step := float64(sum.Boundaries) / float64(n)
		off := rng.Float64() * step
		for i := 0; i < n; i++ {
			ks = append(ks, 1+int(off+float64(i)*step))
		}
	}
	for _, k := range ks {
		var cuts int
		op := trace[k-1]
		ok := t.Run(fmt.Sprintf("boundary-%03d", k), func(t *testing.T) {
			ran = true
			t.Logf("cut right after boundary %d: %s (%s)", k, op, area(trace, k))
			r := newRig(t, c)
			r.fired = r.fs.Freeze(lazyfs.Boundary, k)
			err := r.run()
			cuts = r.cuts
			if err != nil {
				t.Fatal(err)
			}
			if cuts != 1 {
				t.Fatalf("%d cuts, want 1 (the scenario's boundaries changed?)", cuts)
			}
		})
		record(ok, cuts, true)
		sum.CutsByArea[area(trace, k)] += cuts
	}

	// Random cut points among all operations, one to three per run; N/2 runs (at least 3).
	for i := 0; i < max(3, n/2); i++ {
		want := 1 + rng.IntN(3)
		var pts []int
		for j := 0; j < want; j++ {
			pts = append(pts, 1+rng.IntN(max(1, sum.Ops/want)))
		}
		var cuts int
		ok := t.Run(fmt.Sprintf("random-%03d", i), func(t *testing.T) {
			ran = true
			t.Logf("cuts after %v operations (each counted from the previous cut)", pts)
			r := newRig(t, c)
			next := 0
			arm := func() {
				if next < len(pts) {
					r.fired = r.fs.Freeze(lazyfs.Any, pts[next])
					next++
				}
			}
			r.onCut = arm
			arm()
			err := r.run()
			cuts = r.cuts
			if err != nil {
				t.Fatal(err)
			}
		})
		record(ok, cuts, false)
	}
}

// writeSummary logs sum and writes it to $GWOTA_FAULTS_OUT/powercut.json when set.
func writeSummary(t *testing.T, sum *Summary, start time.Time) {
	sum.Seconds = time.Since(start).Seconds()
	t.Logf("summary: %+v", *sum)
	dir := os.Getenv("GWOTA_FAULTS_OUT")
	if dir == "" {
		return
	}
	b, err := json.MarshalIndent(sum, "", "  ")
	if err != nil {
		t.Fatal(err)
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(dir, "powercut.json"), append(b, '\n'), 0o644); err != nil {
		t.Fatal(err)
	}
}
