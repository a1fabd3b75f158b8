// Package crash is the crash campaign: whole updates through the real ota-writer and ota-net
// processes and the emulator, over and over, with SIGKILL of ota-net, of the writer or of both
// at every named point of an update (internal/crashpoint, binaries built with the build tag
// gwota_crashpoints) and at random moments chosen with a seed. A supervisor restarts what
// died, as systemd's Restart= does. Every run must end SUCCEEDED with the image in slot b,
// slot a untouched, the boot state committed to b, no activation of bytes that differ from
// the signed image at any crash, and a bounded number of blocks fetched again per restart.
//
// GWOTA_FAULTS_N scales the random runs (default 4); GWOTA_CRASH_SEED fixes the seed;
// GWOTA_FAULTS_OUT names a directory that receives crash.json for docs/RELIABILITY.md.
package crash

import (
	"context"
	"encoding/json"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/gwota/gwota/internal/crashpoint"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
)

const (
	thing     = "gw-crash"
	imageSize = 1 << 20
	blockSize = 4096
	// The request window: blocks per request x requests in flight.
	blocksPerRequest = 8
	requestsInFlight = 2
	window           = blocksPerRequest * requestsInFlight
	// A restart costs at most two windows fetched again: the requests in flight on the
	// network, and the blocks between ota-net and the writer's medium that are not durable
	// yet (ota-net keeps those within one window: writerlink MaxAheadBytes).
	// The writer's own sync policy (it also syncs whenever ota-net asks).
	syncBytes = 64 << 10
	// streamDelay paces the stream so that a download lasts a few hundred milliseconds and
	// random kills land in it too.
	streamDelay = 5 * time.Millisecond
)

var terminal = []string{backend.StatusSucceeded, backend.StatusFailed, backend.StatusRejected,
	backend.StatusCanceled, backend.StatusTimedOut, backend.StatusRemoved}

// plan is one run: a crash point (with its hit number) or a random moment, and who dies.
type plan struct {
	Name   string
	Point  string // crashpoint name; "" for a random moment
	Nth    int
	At     time.Duration // random moment after the job is created
	Victim string        // "ota-writer", "ota-net" or "both"
}

// outcome is what one run observed.
type outcome struct {
	Plan        plan
	Crashes     map[string]int
	Fired       bool // the crash point or the random kill happened
	Refetched   int  // blocks sent by the stream beyond the image's blocks
	Duration    time.Duration
	Failure     string
	FiredDetail string
}

type report struct {
	Seed       uint64         `json:"seed"`
	Runs       int            `json:"runs"`
	Failures   int            `json:"failures"`
	Kills      map[string]int `json:"kills_by_process"`
	ByPoint    map[string]int `json:"kills_by_point"`
	Random     int            `json:"random_kills"`
	Refetched  int            `json:"blocks_fetched_again"`
	RefetchMax int            `json:"max_blocks_fetched_again_per_restart"`
	Bound      int            `json:"bound_per_restart"`
	BlockSize  int            `json:"block_size"`
	ImageSize  int            `json:"image_size"`
	Seconds    float64        `json:"seconds"`
	Failed     []string       `json:"failed_runs,omitempty"`
}

func envInt(name string, def int) int {
	if v, err := strconv.Atoi(os.Getenv(name)); err == nil && v >= 0 {
		return v
	}
	return def
}

func TestCrashCampaign(t *testing.T) {
	start := time.Now()
	seed := uint64(time.Now().UnixNano())
	if s, err := strconv.ParseUint(os.Getenv("GWOTA_CRASH_SEED"), 10, 64); err == nil {
		seed = s
	}
	t.Logf("seed %d (GWOTA_CRASH_SEED=%d reproduces this campaign)", seed, seed)
	rng := rand.New(rand.NewPCG(seed, seed^0x9e3779b97f4a7c15))
	nRandom := envInt("GWOTA_FAULTS_N", 4)

	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Minute)
	defer cancel()
	bin, err := harness.Build(ctx, harness.BuildOptions{Dir: t.TempDir(), Race: harness.RaceEnabled, Tags: []string{"gwota_crashpoints"}})
	if err != nil {
		t.Fatal(err)
	}

	// A clean run first: it proves the setup and times an update for the random moments.
	clean := runOnce(t, ctx, bin, plan{Name: "clean"}, 0)
	if clean.Failure != "" {
		t.Fatalf("clean run failed: %s", clean.Failure)
	}
	total := imageSize / blockSize

	var plans []plan
	for _, p := range crashpoint.Points {
		nth := 1
		switch p {
		case crashpoint.WriterBlock, crashpoint.NetBlock:
			nth = total / 2
		}
		for _, both := range []bool{false, true} {
			victim := "ota-writer"
			if strings.HasPrefix(p, "net.") {
				victim = "ota-net"
			}
			if both {
				victim = "both"
			}
			plans = append(plans, plan{Name: fmt.Sprintf("%s#%d/%s", p, nth, victim), Point: p, Nth: nth, Victim: victim})
		}
	}
	// A later status report too (a progress update or ready), not only the first.
	plans = append(plans, plan{Name: crashpoint.NetReported + "#3/ota-net", Point: crashpoint.NetReported, Nth: 3, Victim: "ota-net"})
	victims := []string{"ota-writer", "ota-net", "both"}
	for i := 0; i < nRandom; i++ {
		at := time.Duration(rng.Int64N(int64(clean.Duration)))
		v := victims[rng.IntN(len(victims))]
		plans = append(plans, plan{Name: fmt.Sprintf("random-%d@%v/%s", i, at.Round(time.Millisecond), v), At: at, Victim: v})
	}

	if only := os.Getenv("GWOTA_CRASH_ONLY"); only != "" {
		re := regexp.MustCompile(only)
		plans = slices.DeleteFunc(plans, func(p plan) bool { return !re.MatchString(p.Name) })
	}
	rep := report{Seed: seed, Kills: map[string]int{}, ByPoint: map[string]int{}, Bound: 2 * window, BlockSize: blockSize, ImageSize: imageSize}
	for i, p := range plans {
		o := runOnce(t, ctx, bin, p, seed+uint64(i))
		rep.Runs++
		for k, v := range o.Crashes {
			rep.Kills[k] += v
		}
		if p.Point != "" && o.Fired {
			rep.ByPoint[p.Point]++
		}
		if p.Point == "" && o.Fired {
			rep.Random++
		}
		rep.Refetched += o.Refetched
		restarts := 0
		for _, v := range o.Crashes {
			restarts += v
		}
		if restarts > 0 && o.Refetched/restarts > rep.RefetchMax {
			rep.RefetchMax = o.Refetched / restarts
		}
		if p.Point != "" && !o.Fired && o.Failure == "" {
			o.Failure = "the crash point was never reached"
		}
		if o.Failure == "" && restarts > 0 && o.Refetched > restarts*rep.Bound {
			o.Failure = fmt.Sprintf("%d blocks fetched again after %d restarts, bound %d per restart", o.Refetched, restarts, rep.Bound)
		}
		if o.Failure != "" {
			rep.Failures++
			rep.Failed = append(rep.Failed, p.Name+": "+o.Failure)
			t.Errorf("run %s: %s", p.Name, o.Failure)
		} else {
			t.Logf("run %-40s ok in %v, crashes %v, %d blocks fetched again %s", p.Name, o.Duration.Round(time.Millisecond), o.Crashes, o.Refetched, o.FiredDetail)
		}
	}
	for _, p := range crashpoint.Points {
		if rep.ByPoint[p] == 0 && os.Getenv("GWOTA_CRASH_ONLY") == "" {
			t.Errorf("crash point %s was never exercised", p)
		}
	}
	rep.Seconds = time.Since(start).Seconds()
	t.Logf("campaign: %d runs, kills %v, %d random kills, %d blocks fetched again (max %d per restart, bound %d), %d failures, %.0f s",
		rep.Runs, rep.Kills, rep.Random, rep.Refetched, rep.RefetchMax, rep.Bound, rep.Failures, rep.Seconds)
	if dir := os.Getenv("GWOTA_FAULTS_OUT"); dir != "" {
		b, _ := json.MarshalIndent(rep, "", "  ")
		if err := os.WriteFile(filepath.Join(dir, "crash.json"), b, 0o644); err != nil {
			t.Error(err)
		}
	}
}

// runOnce runs one whole update under plan p and checks every invariant.
func runOnce(t *testing.T, parent context.Context, bin *harness.Binaries, p plan, seed uint64) (o outcome) {
	t.Helper()
	o.Plan = p
	began := time.Now()
	defer func() { o.Duration = time.Since(began) }()
	ctx, cancel := context.WithTimeout(parent, 3*time.Minute)
	defer cancel()
	dir, err := os.MkdirTemp("", "crash")
	if err != nil {
		o.Failure = err.Error()
		return o
	}
	keep := false
	defer func() {
		if keep || os.Getenv("E2E_KEEP") != "" {
			t.Logf("run %s: directory kept: %s", p.Name, dir)
			return
		}
		os.RemoveAll(dir)
	}()
	fail := func(format string, args ...any) outcome {
		keep = true
		o.Failure = fmt.Sprintf(format, args...)
		return o
	}

	cloud, err := harness.StartCloud(ctx, emulator.Options{Thing: thing, Seed: seed})
	if err != nil {
		return fail("emulator: %v", err)
	}
	defer cloud.Close()
	signer, err := harness.NewSigner("crash-signer")
	if err != nil {
		return fail("%v", err)
	}
	img := filepath.Join(dir, "v2.img")
	if err := harness.WriteImage(img, imageSize, seed+7); err != nil {
		return fail("%v", err)
	}
	want, err := harness.FileSHA256(img)
	if err != nil {
		return fail("%v", err)
	}
	marker := filepath.Join(dir, "crashpoint.fired")
	env := []string{"GWOTA_CRASHPOINT_FILE=" + marker}
	if p.Point != "" {
		env = append(env, fmt.Sprintf("GWOTA_CRASHPOINT=%s#%d", p.Point, p.Nth))
	}

	var (
		mu         sync.Mutex
		violations []string
		dev        *harness.Device
		bothDone   atomic.Bool
	)
	violate := func(format string, args ...any) {
		mu.Lock()
		violations = append(violations, fmt.Sprintf(format, args...))
		mu.Unlock()
	}
	// checkBoot: whenever the boot state names slot b (pending, trial or committed), slot b
	// must hold exactly the signed image: nothing unverified is ever activated.
	checkBoot := func(when string) {
		st, err := readBoot(dev)
		if err != nil {
			violate("%s: boot state unreadable: %v", when, err)
			return
		}
		if st.names("b") {
			got, err := harness.FilePrefixSHA256(dev.SlotB, imageSize)
			if err != nil || got != want {
				violate("%s: boot state %+v names slot b, which holds %s (%v), not the signed image %s", when, st, got, err, want)
			}
		}
	}
	opts := harness.DeviceOptions{
		Dir:              filepath.Join(dir, "d"),
		Thing:            thing,
		BrokerURL:        cloud.BrokerURL(),
		Trusted:          []*harness.Signer{signer},
		Checks:           []harness.Check{{Name: "ok", Command: []string{"/bin/true"}}},
		SyncBytes:        syncBytes,
		BlockSize:        blockSize,
		BlocksPerRequest: blocksPerRequest,
		RequestsInFlight: requestsInFlight,
		Env:              env,
		Supervise:        true,
		OnCrash: func(name string) {
			checkBoot("crash of " + name)
			if p.Victim != "both" || p.Point == "" || bothDone.Swap(true) {
				return
			}
			// The crash point killed one process: the other dies at the same moment.
			other := dev.Net()
			if name == "ota-net" {
				other = dev.Writer()
			}
			if other != nil && other.Running() {
				_ = other.Crash()
			}
		},
	}
	if err := os.Mkdir(opts.Dir, 0o700); err != nil {
		return fail("%v", err)
	}
	dev, err = harness.NewDevice(bin, opts)
	if err != nil {
		return fail("%v", err)
	}
	defer func() {
		if err := dev.Close(true); err != nil && o.Failure == "" {
			o.Failure = fmt.Sprintf("closing the device: %v", err)
		}
		if r := dev.RaceReports(); len(r) > 0 && o.Failure == "" {
			o.Failure = fmt.Sprintf("data races reported by the binaries, see %v", r)
		}
		if o.Failure != "" {
			keep = true
			t.Logf("run %s logs:\n%s", p.Name, dev.Logs())
		}
	}()
	slotA, err := harness.FileSHA256(dev.SlotA)
	if err != nil {
		return fail("%v", err)
	}
	cloud.Rec.OnEvent(func(ev emulator.UpdateEvent) { checkBoot("status " + ev.StatusDetails["self_test"]) })
	dctx, dcancel := dev.Context(ctx)
	defer dcancel()
	if err := dev.Start(dctx); err != nil {
		return fail("start: %v", err)
	}
	jobID := "crash"
	cloud.SetFaults(jobID, emulator.Faults{Delay: streamDelay})
	if err := cloud.CreateJob(dctx, backend.JobSpec{JobID: jobID, Protocols: []string{backend.ProtocolMQTT}, Files: []backend.FileSpec{signer.File(img)}}); err != nil {
		return fail("create job: %v", err)
	}
	randomKill := make(chan string, 1)
	if p.Point == "" && p.Victim != "" {
		timer := time.AfterFunc(p.At, func() {
			var procs []*harness.Proc
			if p.Victim != "ota-net" {
				procs = append(procs, dev.Writer())
			}
			if p.Victim != "ota-writer" {
				procs = append(procs, dev.Net())
			}
			killed := []string{}
			for _, pr := range procs {
				if pr != nil && pr.Running() && pr.Crash() == nil {
					killed = append(killed, pr.Name)
				}
			}
			randomKill <- strings.Join(killed, "+")
		})
		defer timer.Stop()
	}
	ex, err := cloud.WaitStatus(dctx, jobID, terminal...)
	if err != nil {
		return fail("job did not end: %v (cause: %v); updates %v", err, context.Cause(dctx), harness.Steps(cloud.Updates(jobID)))
	}
	o.Crashes = dev.Crashes()
	if p.Point != "" {
		if b, err := os.ReadFile(marker); err == nil {
			o.Fired = true
			o.FiredDetail = "(" + strings.TrimSpace(string(b)) + ")"
		}
	} else if p.Victim != "" {
		select {
		case k := <-randomKill:
			o.Fired = k != ""
			o.FiredDetail = fmt.Sprintf("(killed %q %v after the job)", k, p.At.Round(time.Millisecond))
		default:
			o.FiredDetail = "(the update ended before the kill)"
		}
	}

	// Invariants.
	mu.Lock()
	vs := append([]string(nil), violations...)
	mu.Unlock()
	if len(vs) > 0 {
		return fail("unverified activation: %s", strings.Join(vs, "; "))
	}
	us := cloud.Updates(jobID)
	last := us[len(us)-1]
	if ex.Status != backend.StatusSucceeded || last.StatusDetails["self_test"] != "accepted" {
		return fail("job ended %s %v, want SUCCEEDED accepted; updates %v", ex.Status, last.StatusDetails, harness.Steps(us))
	}
	for _, u := range us {
		if u.Status == backend.StatusFailed || u.StatusDetails["reason"] != "" {
			return fail("a failure was reported on the way: %v", harness.Steps(us))
		}
	}
	if got, err := harness.FilePrefixSHA256(dev.SlotB, imageSize); err != nil || got != want {
		return fail("slot b holds %s (%v), want the image %s", got, err, want)
	}
	if got, err := harness.FileSHA256(dev.SlotA); err != nil || got != slotA {
		return fail("slot a changed: %s -> %s (%v)", slotA, got, err)
	}
	// The job is SUCCEEDED once ota-net has committed: the boot state must say so already.
	st, err := readBoot(dev)
	if err != nil {
		return fail("boot state: %v", err)
	}
	if st.Committed != "b" || st.Pending != "" || st.Trial {
		return fail("boot state %+v after SUCCEEDED, want b committed, nothing pending", st)
	}
	sent := 0
	for _, r := range cloud.StreamRequests(jobID) {
		sent += len(r.Sent)
	}
	if o.Refetched = sent - imageSize/blockSize; o.Refetched < 0 {
		return fail("the stream sent %d blocks of %d", sent, imageSize/blockSize)
	}
	return o
}

// bootState is the part of the file boot backend's state the invariants read.
type bootState struct {
	Committed string `json:"committed"`
	Booted    string `json:"booted"`
	Pending   string `json:"pending"`
	Trial     bool   `json:"trial"`
}

func (s bootState) names(slot string) bool {
	return s.Committed == slot || s.Booted == slot || s.Pending == slot
}

func readBoot(d *harness.Device) (bootState, error) {
	var st bootState
	raw, err := d.BootState()
	if os.IsNotExist(err) {
		return bootState{Committed: "a", Booted: "a"}, nil
	}
	if err != nil {
		return st, err
	}
	if err := json.Unmarshal([]byte(raw), &st); err != nil {
		return st, fmt.Errorf("%w: %s", err, raw)
	}
	return st, nil
}
