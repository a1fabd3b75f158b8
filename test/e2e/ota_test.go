package e2e

import (
	"context"
	"slices"
	"testing"
	"time"

	"github.com/gwota/gwota/test/awsbackend"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
)

const (
	smallImage = 512<<10 + 123 // a partial last block on purpose
	midImage   = 2 << 20
)

// TestHappyPath: download over a stream, verify, activate, reboot into the trial, self test,
// commit.
func TestHappyPath(t *testing.T) {
	onBrokers(t, func(t *testing.T, broker string) {
		e := newEnv(t, broker, func(o *harness.DeviceOptions) {
			o.Checks = []harness.Check{{Name: "ok", Command: []string{"/bin/true"}}}
		})
		img := e.image("v2.img", smallImage, 2)
		e.start()
		e.createJob("happy", e.signer.File(img))
		ex := e.waitEnd("happy")
		us := checkSteps(t, e.cloud, "happy", happy)
		checkProgress(t, us[:len(us)-2], false, -1)
		if ex.StatusDetails["hardware_rev"] != "e2e" {
			t.Errorf("final statusDetails lack the writer's extension hardware_rev=e2e: %v", ex.StatusDetails)
		}
		e.checkInstalled(img, 1)
	})
}

// TestBadSignature: the job carries the signature of the good image but delivers an altered
// one; the writer refuses it after reading it back, nothing is activated.
func TestBadSignature(t *testing.T) {
	onBrokers(t, func(t *testing.T, broker string) {
		e := newEnv(t, broker, nil)
		f := e.alteredFile()
		e.start()
		before := e.slots()
		e.createJob("badsig", f)
		ex := e.waitEnd("badsig")
		us := checkSteps(t, e.cloud, "badsig", []harness.Step{receiving, failed("aborted", "sig_check_failed", "1001")})
		checkProgress(t, us, false, -1)
		if ex.Status != backend.StatusFailed {
			t.Fatalf("status %s", ex.Status)
		}
		e.checkUntouched(before)
	})
}

// TestSelfTestFailure: the new image boots on trial, a health check fails, the writer rolls
// back to slot a.
func TestSelfTestFailure(t *testing.T) {
	onBrokers(t, func(t *testing.T, broker string) {
		e := newEnv(t, broker, func(o *harness.DeviceOptions) {
			o.Checks = []harness.Check{
				{Name: "ok", Command: []string{"/bin/true"}},
				{Name: "app-health", Command: []string{"/bin/sh", "-c", "echo app not answering; exit 3"}},
			}
		})
		img := e.image("v2.img", smallImage, 4)
		e.start()
		slotA := e.slots().A
		e.createJob("selftest", e.signer.File(img))
		e.waitEnd("selftest")
		checkSteps(t, e.cloud, "selftest", []harness.Step{receiving, ready, active, failed("rejected", "self_test_failed", "3005")})
		// The rollback: the writer rejects the trial and reboots; slot a runs committed again,
		// unchanged.
		if err := e.dev.WaitReboots(e.ctx, 2); err != nil {
			t.Fatal(err)
		}
		st, err := e.dev.State(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, tg := range st.GetTargets() {
			if tg.GetName() == harness.TargetName && tg.GetActiveSlot() != "a" {
				t.Errorf("after the rollback target runs slot %q, want a (state %v)", tg.GetActiveSlot(), st)
			}
		}
		if got := e.slots().A; got != slotA {
			t.Errorf("slot a changed during the failed update")
		}
	})
}

// TestCancelMidDownload: the job is canceled (force) while blocks are flowing; ota-net drops
// the session, and a following job installs normally (the target is free again).
func TestCancelMidDownload(t *testing.T) {
	onBrokers(t, func(t *testing.T, broker string) {
		e := newEnv(t, broker, paced)
		img := e.image("v2.img", midImage, 5)
		if err := e.dev.StartWriter(e.ctx); err != nil {
			t.Fatal(err)
		}
		e.createJob("cancel", e.signer.File(img))
		slow(e, "cancel")
		if err := e.dev.StartNet(e.ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := e.cloud.WaitProgress(e.ctx, "cancel", midBlocks); err != nil {
			t.Fatal(err)
		}
		if err := e.cloud.CancelJob(e.ctx, "cancel", true); err != nil {
			t.Fatal(err)
		}
		ex := e.waitEnd("cancel")
		if ex.Status != backend.StatusCanceled {
			t.Fatalf("status %s, want CANCELED", ex.Status)
		}
		// The service keeps the last statusDetails on a cancel, as AWS does.
		checkSteps(t, e.cloud, "cancel", []harness.Step{receiving, {Status: backend.StatusCanceled, SelfTest: "receiving"}})

		// The device is free for the next job.
		img2 := e.image("v3.img", smallImage, 6)
		e.createJob("after-cancel", e.signer.File(img2))
		e.waitEnd("after-cancel")
		checkSteps(t, e.cloud, "after-cancel", happy)
		e.checkInstalled(img2, 1)
	})
}

// TestLossyStream: 20 % of blocks dropped, 20 % duplicated, every response reordered.
func TestLossyStream(t *testing.T) {
	onBrokers(t, func(t *testing.T, broker string) {
		e := newEnv(t, broker, nil)
		img := e.image("v2.img", midImage, 7)
		e.cloud.SetFaults("lossy", emulator.Faults{Drop: 0.2, Duplicate: 0.2, Reorder: true})
		e.start()
		e.createJob("lossy", e.signer.File(img))
		e.waitEnd("lossy")
		us := checkSteps(t, e.cloud, "lossy", happy)
		checkProgress(t, us[:len(us)-2], false, -1)
		e.checkInstalled(img, 1)
		var dropped, dup int
		for _, r := range e.cloud.StreamRequests("lossy") {
			dropped += len(r.Dropped)
			dup += len(r.Sent) - len(uniq(r.Sent))
		}
		if dropped == 0 || dup == 0 {
			t.Errorf("fault injection did not act: %d blocks dropped, %d duplicated", dropped, dup)
		}
	})
}

// TestNetKilledMidDownload: ota-net is killed with SIGKILL while downloading and started
// again; it resumes from the writer's durable blocks: after the restart it asks only for blocks
// the writer was missing, never from block 0 again.
func TestNetKilledMidDownload(t *testing.T) {
	onBrokers(t, func(t *testing.T, broker string) {
		e := newEnv(t, broker, paced)
		img := e.image("v2.img", midImage, 8)
		if err := e.dev.StartWriter(e.ctx); err != nil {
			t.Fatal(err)
		}
		e.createJob("netkill", e.signer.File(img))
		slow(e, "netkill")
		if err := e.dev.StartNet(e.ctx); err != nil {
			t.Fatal(err)
		}
		waitMid(t, e, "netkill")
		if err := e.dev.KillNet(e.ctx); err != nil {
			t.Fatal(err)
		}
		killedAt := time.Now()
		// What the writer lacks now; with ota-net dead it can only shrink (a late sync).
		missing, total := sessionMissing(t, e, "netkill")
		if len(missing) == total {
			t.Fatalf("ota-net had reported %d blocks received, but the writer holds none of the %d durably", midBlocks, total)
		}
		e.cloud.ClearFaults(e.cloud.StreamName("netkill"))
		if err := e.dev.StartNet(e.ctx); err != nil {
			t.Fatal(err)
		}
		e.waitEnd("netkill")
		us := checkSteps(t, e.cloud, "netkill", happy)
		checkProgress(t, us[:len(us)-2], true, -1)
		e.checkInstalled(img, 1)

		after := requestedAfter(e.cloud, "netkill", killedAt)
		if len(after) == 0 {
			t.Fatalf("no stream request after the restart")
		}
		for _, b := range after {
			if !slices.Contains(missing, b) {
				t.Errorf("after the restart block %d was requested, but the writer already held it durably (missing were %d of %d)", b, len(missing), total)
				break
			}
		}
		if len(after) >= total {
			t.Errorf("after the restart %d of %d blocks were requested: the download restarted", len(after), total)
		}
		t.Logf("writer held %d of %d blocks at the kill; %d requested after the restart", total-len(missing), total, len(after))
	})
}

// TestWriterKilledMidDownload: ota-writer is killed with SIGKILL while downloading and started
// again; ota-net reconnects, resumes the session and the update completes.
func TestWriterKilledMidDownload(t *testing.T) {
	onBrokers(t, func(t *testing.T, broker string) {
		e := newEnv(t, broker, paced)
		img := e.image("v2.img", midImage, 9)
		if err := e.dev.StartWriter(e.ctx); err != nil {
			t.Fatal(err)
		}
		e.createJob("wkill", e.signer.File(img))
		slow(e, "wkill")
		if err := e.dev.StartNet(e.ctx); err != nil {
			t.Fatal(err)
		}
		waitMid(t, e, "wkill")
		if err := e.dev.KillWriter(e.ctx); err != nil {
			t.Fatal(err)
		}
		e.cloud.ClearFaults(e.cloud.StreamName("wkill"))
		if err := e.dev.StartWriter(e.ctx); err != nil {
			t.Fatal(err)
		}
		e.waitEnd("wkill")
		us := checkSteps(t, e.cloud, "wkill", happy)
		checkProgress(t, us[:len(us)-2], true, -1)
		e.checkInstalled(img, 1)
	})
}

// TestBrokerRestartMidDownload: the device's broker goes away and comes back while
// downloading; ota-net reconnects, its session is still there, and the update completes. On
// mosquitto the device uses an edge broker bridged to the emulator's broker, and the edge is
// restarted: the emulator's external-broker client does not reconnect after a broker restart.
func TestBrokerRestartMidDownload(t *testing.T) {
	onBrokers(t, func(t *testing.T, broker string) {
		e := newEnvEdge(t, broker, true, paced)
		img := e.image("v2.img", midImage, 10)
		if err := e.dev.StartWriter(e.ctx); err != nil {
			t.Fatal(err)
		}
		e.createJob("brestart", e.signer.File(img))
		slow(e, "brestart")
		if err := e.dev.StartNet(e.ctx); err != nil {
			t.Fatal(err)
		}
		if _, err := e.cloud.WaitProgress(e.ctx, "brestart", midBlocks); err != nil {
			t.Fatal(err)
		}
		if broker == embedded {
			if err := e.cloud.RestartBroker(); err != nil {
				t.Fatal(err)
			}
		} else {
			if err := e.edge.Restart(e.ctx); err != nil {
				t.Fatal(err)
			}
		}
		e.cloud.ClearFaults(e.cloud.StreamName("brestart"))
		e.waitEnd("brestart")
		us := checkSteps(t, e.cloud, "brestart", happy)
		checkProgress(t, us[:len(us)-2], true, -1)
		e.checkInstalled(img, 1)
	})
}

// TestLargeImageHTTP: an image over the 16 MiB stream limit, downloaded from the presigned
// URL.
func TestLargeImageHTTP(t *testing.T) {
	onBrokers(t, func(t *testing.T, broker string) {
		e := newEnv(t, broker, nil)
		img := e.image("big.img", 17<<20+4321, 11)
		e.start()
		e.createJob("big", e.signer.File(img), backend.ProtocolHTTP)
		e.waitEnd("big")
		us := checkSteps(t, e.cloud, "big", happy)
		checkProgress(t, us[:len(us)-2], false, -1)
		e.checkInstalled(img, 1)
		if n := len(e.cloud.StreamRequests("big")); n != 0 {
			t.Errorf("an HTTP-only job saw %d stream requests", n)
		}
	})
}

// TestAWSHappyPath runs the happy path against real AWS IoT when the environment selects it
// (test/awsbackend.Configured) and names the device's certificate and key.
func TestAWSHappyPath(t *testing.T) {
	ok, why := awsbackend.Configured()
	if !ok {
		t.Skipf("real AWS IoT not configured: %s", why)
	}
	cert, key, ca := getenv(envDeviceCert), getenv(envDeviceKey), getenv(envDeviceCA)
	if cert == "" || key == "" {
		t.Skipf("real AWS IoT configured but the device credentials are not: set %s and %s (and optionally %s)", envDeviceCert, envDeviceKey, envDeviceCA)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	aws, err := awsbackend.FromEnv(ctx)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := aws.Close(); err != nil {
			t.Errorf("AWS clean-up: %v", err)
		}
	})
	awsHappyPath(t, ctx, aws, cert, key, ca)
}

// Mid-download tests pace the stream: one block per request, one request in flight, every
// response held back stepDelay, so the 32 blocks of a midImage take 32 round trips and the
// test acts after midBlocks of them with plenty of blocks still to come.
const (
	stepDelay = 150 * time.Millisecond
	midBlocks = 8
)

func paced(o *harness.DeviceOptions) { o.BlocksPerRequest, o.RequestsInFlight = 1, 1 }

// slow holds back every response of a job's stream by stepDelay.
func slow(e *env, jobID string) {
	e.cloud.SetFaults(e.cloud.StreamName(jobID), emulator.Faults{Delay: stepDelay})
}

// waitMid waits until ota-net has reported midBlocks blocks received: the writer must hold
// some durably by then (its sync_bytes is one block, its sync_interval 200 ms), and most of
// the paced stream is still to come.
func waitMid(t *testing.T, e *env, jobID string) {
	t.Helper()
	if _, err := e.cloud.WaitProgress(e.ctx, jobID, midBlocks); err != nil {
		t.Fatal(err)
	}
}

// sessionMissing asks the writer which blocks of the job's session are not durable.
func sessionMissing(t *testing.T, e *env, jobID string) (missing []int, total int) {
	t.Helper()
	st, err := e.dev.State(e.ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st.GetSessions() {
		if s.GetJobId() != jobID {
			continue
		}
		total = int(s.GetTotalBlocks())
		return emulator.BitmapBlocks(0, s.GetMissing()), total
	}
	t.Fatalf("the writer has no session for job %s: %v", jobID, st)
	return nil, 0
}

func uniq(xs []int) []int {
	s := slices.Clone(xs)
	slices.Sort(s)
	return slices.Compact(s)
}

// requestedAfter returns the blocks the stream requests of job asked for after since, each
// once, in order.
func requestedAfter(c *harness.Cloud, job string, since time.Time) []int {
	var after []int
	for _, r := range c.StreamRequests(job) {
		if r.At.After(since) {
			after = append(after, r.Wanted...)
		}
	}
	return uniq(after)
}

// TestCancelWhileNetDown: ota-net is killed with SIGKILL mid-download and the job is canceled
// while it is down, so nobody aborts the writer's session. At its next start ota-net finds
// the job gone in the cloud and aborts the orphaned session: a new job on the same target
// installs (without the reconciliation it was REJECTED session_busy/3012, for ever).
func TestCancelWhileNetDown(t *testing.T) {
	onBrokers(t, func(t *testing.T, broker string) {
		e := newEnv(t, broker, paced)
		img := e.image("v2.img", midImage, 12)
		if err := e.dev.StartWriter(e.ctx); err != nil {
			t.Fatal(err)
		}
		e.createJob("orphan", e.signer.File(img))
		slow(e, "orphan")
		if err := e.dev.StartNet(e.ctx); err != nil {
			t.Fatal(err)
		}
		waitMid(t, e, "orphan")
		if err := e.dev.KillNet(e.ctx); err != nil {
			t.Fatal(err)
		}
		if err := e.cloud.CancelJob(e.ctx, "orphan", true); err != nil {
			t.Fatal(err)
		}
		if ex := e.waitEnd("orphan"); ex.Status != backend.StatusCanceled {
			t.Fatalf("status %s, want CANCELED", ex.Status)
		}
		// The writer still holds the canceled job's session: the orphan.
		if missing, total := sessionMissing(t, e, "orphan"); len(missing) == 0 || len(missing) == total {
			t.Fatalf("want a half-written session, the writer misses %d of %d blocks", len(missing), total)
		}
		before := e.slots()

		if err := e.dev.StartNet(e.ctx); err != nil {
			t.Fatal(err)
		}
		img2 := e.image("v3.img", smallImage, 13)
		e.createJob("after-orphan", e.signer.File(img2))
		e.waitEnd("after-orphan")
		checkSteps(t, e.cloud, "after-orphan", happy)
		e.checkInstalled(img2, 1)
		if got := e.slots().A; got != before.A {
			t.Errorf("running slot a changed")
		}
		st, err := e.dev.State(e.ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range st.GetSessions() {
			t.Errorf("session left after the new job: %v", s)
		}
		// The canceled job got no report after its cancel.
		checkSteps(t, e.cloud, "orphan", []harness.Step{receiving, {Status: backend.StatusCanceled, SelfTest: "receiving"}})
	})
}
