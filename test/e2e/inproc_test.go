package e2e

import (
	"context"
	"encoding/json"
	"sync"
	"testing"
	"time"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/harness"
)

// inprocBins add ota-net's benchmark build with the writer engine linked in
// (cmd/ota-net/inproc.go), once per test binary.
var inprocBins = sync.OnceValues(func() (*harness.Binaries, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	return harness.Build(ctx, harness.BuildOptions{Race: harness.RaceEnabled, InProcessNet: true})
})

// TestInProcessWriter: ota-net's benchmark build, with the writer engine linked in behind the
// same api.Writer instead of the gRPC hop (what test/bench/linkbench compares the two
// processes against), is the same agent: over MQTT and over HTTP a whole update goes through
// the same status steps to the image installed in slot b, booted and committed after one
// reboot, with no ota-writer process at all; an image altered after signing is refused from
// what the medium holds, as by the real writer, and nothing is activated.
func TestInProcessWriter(t *testing.T) {
	t.Parallel()
	for _, protocol := range []string{backend.ProtocolMQTT, backend.ProtocolHTTP} {
		t.Run(protocol, func(t *testing.T) {
			t.Parallel()
			e := newEnv(t, embedded, func(o *harness.DeviceOptions) {
				o.InProcess = true
				o.Checks = []harness.Check{{Name: "ok", Command: []string{"/bin/true"}}}
			})
			img := e.image("v2.img", midImage, 7)
			e.start()
			e.createJob("inproc", e.signer.File(img), protocol)
			ex := e.waitEnd("inproc")
			us := checkSteps(t, e.cloud, "inproc", happy)
			checkProgress(t, us[:len(us)-2], false, -1)
			if ex.StatusDetails["hardware_rev"] != "e2e" {
				t.Errorf("final statusDetails lack the writer's extension hardware_rev=e2e: %v", ex.StatusDetails)
			}
			if p := e.dev.Writer(); p != nil {
				t.Errorf("an ota-writer process ran (pid %d)", p.Pid)
			}
			want, err := harness.FileSHA256(img)
			if err != nil {
				t.Fatal(err)
			}
			if got, err := harness.FilePrefixSHA256(e.dev.SlotB, midImage); err != nil || got != want {
				t.Errorf("slot b holds %s (%v), want the image %s", got, err, want)
			}
			checkBootState(t, e, "b", "b")
			if n := e.dev.Reboots(); n != 1 {
				t.Errorf("device rebooted %d times, want 1", n)
			}
		})
	}
	t.Run("altered", func(t *testing.T) {
		t.Parallel()
		e := newEnv(t, embedded, func(o *harness.DeviceOptions) { o.InProcess = true })
		f := e.alteredFile()
		// Before the start: the engine comes up inside ota-net after it, unobserved.
		before, err := harness.FileSHA256(e.dev.SlotA)
		if err != nil {
			t.Fatal(err)
		}
		e.start()
		e.createJob("badsig", f)
		e.waitEnd("badsig")
		checkSteps(t, e.cloud, "badsig", []harness.Step{receiving, failed("aborted", "sig_check_failed", "1001")})
		// Which slot is booted and committed (the engine's start took a simulated boot, so
		// the boot id and count are new).
		checkBootState(t, e, "a", "a")
		if after := e.slots(); after.A != before {
			t.Errorf("running slot a changed: %s -> %s", before, after.A)
		}
		if n := e.dev.Reboots(); n != 0 {
			t.Errorf("device rebooted %d times, want 0", n)
		}
	})
}

// checkBootState reads the file boot backend's state (the writer's state directory): the
// slot booted and the one committed, and no trial pending.
func checkBootState(t *testing.T, e *env, booted, committed string) {
	t.Helper()
	raw, err := e.dev.BootState()
	if err != nil {
		t.Fatal(err)
	}
	var st struct {
		Booted, Committed, Pending string
		Trial                      bool
	}
	if err := json.Unmarshal([]byte(raw), &st); err != nil {
		t.Fatalf("boot state %q: %v", raw, err)
	}
	if st.Booted != booted || st.Committed != committed || st.Pending != "" || st.Trial {
		t.Errorf("boot state %s: want booted %s, committed %s, no trial", raw, booted, committed)
	}
}
