package engine

import (
	"bytes"
	"io"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/ext"
	"github.com/gwota/gwota/writer/selftest"
	"github.com/gwota/gwota/writer/target/targettest"
)

// loopDevices attaches two loop devices of size bytes (skipped when not root or losetup is
// missing, except under CI where that fails).
func loopDevices(t *testing.T, size int64) [2]string {
	t.Helper()
	var devs [2]string
	for i := range devs {
		devs[i], _ = targettest.Loop(t, size)
	}
	return devs
}

func TestLoopDeviceAB(t *testing.T) {
	devs := loopDevices(t, 2<<20)
	r := newRig(t, func(c *config.Config) {
		c.Targets[0].Slots = devs[:]
		c.Targets[0].MaxSize = 0
	})
	big := newImage(t, 2<<20+1)
	_, err := r.begin(big, 0, nil)
	wantReason(t, err, otav1.Reason_REASON_FILE_TOO_LARGE)

	img := newImage(t, 2<<20-12345)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.BlockSize = 65536 })).Session
	writeAll(t, r, s.SessionId, img, 65536)
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
	act := must[*otav1.ActivateResponse](t)(r.e.Activate(ctx, s.SessionId))
	if act.Slot != "b" || !act.RebootRequired {
		t.Fatalf("%v", act)
	}
	f, err := os.Open(devs[1])
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, len(img.data))
	if _, err := io.ReadFull(f, got); err != nil || !bytes.Equal(got, img.data) {
		t.Fatalf("slot b device does not hold the image: %v", err)
	}
	a, _ := os.ReadFile(devs[0])
	if !bytes.Equal(a, make([]byte, 2<<20)) {
		t.Fatal("slot a device was written")
	}
}

// TestSelfTestAndExtensions uses the real health-check runner and extension collector.
func TestSelfTestAndExtensions(t *testing.T) {
	for _, tc := range []struct {
		name   string
		checks []selftest.Check
		passed bool
		reason otav1.Reason
	}{
		{"pass", []selftest.Check{{Name: "ok", Argv: []string{"true"}, Timeout: 5 * time.Second}}, true, otav1.Reason_REASON_UNSPECIFIED},
		{"fail", []selftest.Check{{Name: "bad", Argv: []string{"sh", "-c", "echo disk unhealthy; exit 3"}, Timeout: 5 * time.Second}}, false, otav1.Reason_REASON_SELF_TEST_FAILED},
		{"timeout", []selftest.Check{{Name: "slow", Argv: []string{"sleep", "30"}, Timeout: 200 * time.Millisecond}}, false, otav1.Reason_REASON_SELF_TEST_TIMEOUT},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, nil)
			img := newImage(t, 9000)
			s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.Version = "3.0" })).Session
			writeAll(t, r, s.SessionId, img, 4096)
			must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
			must[*otav1.ActivateResponse](t)(r.e.Activate(ctx, s.SessionId))
			r.e.Close()
			r.boot.Boot(ctx, "")
			r.open()
			r.e.Close()
			var err error
			r.e, err = New(ctx, r.cfg, Deps{
				Boot:       r.boot,
				SelfTest:   selftest.New(tc.checks, time.Minute, nil),
				Extensions: ext.New(ext.Config{Static: status.Pairs("site", "plant-7", "boot_count", "static-wins")}, nil),
				Reboot:     r.reboot,
			}, testLog(t))
			if err != nil {
				t.Fatal(err)
			}
			res, err := r.e.SelfTest(ctx, "job-1")
			if err != nil || res.Passed != tc.passed || res.Reason != tc.reason {
				t.Fatalf("self test: %v %v", res, err)
			}
			var got status.Fields
			for _, f := range must[status.Fields](t)(r.e.Extensions(ctx)) { // the collector's own sysfs/procfs fields vary by machine
				if k := f.Key; k != "uptime_s" && !strings.HasPrefix(k, "temp") && !strings.HasPrefix(k, "battery") && !strings.HasPrefix(k, "free") {
					got = append(got, f)
				}
			}
			// Configured first, then the writer's own fields; the static boot_count wins, in its place.
			want := status.Pairs("site", "plant-7", "boot_count", "static-wins", "firmware_version", "3.0", "boot_slot", "b", "image_state", "trial")
			if d := cmp.Diff(want, got); d != "" {
				t.Fatalf("extensions (-want +got):\n%s", d)
			}
		})
	}
}

// TestRebootCommand runs the configured reboot_command for real (no injected reboot func).
func TestRebootCommand(t *testing.T) {
	wantReason(t, CommandReboot(nil)(ctx), otav1.Reason_REASON_REBOOT_FAILED)
	err := CommandReboot([]string{"sh", "-c", "echo watchdog busy >&2; exit 1"})(ctx)
	wantReason(t, err, otav1.Reason_REASON_REBOOT_FAILED)
	if !strings.Contains(err.Error(), "watchdog busy") {
		t.Errorf("error does not carry the command's output: %v", err)
	}

	marker := filepath.Join(t.TempDir(), "rebooted")
	r := newRig(t, func(c *config.Config) { c.RebootCommand = []string{"sh", "-c", "echo ok > " + marker} })
	r.e.Close()
	e, err := New(ctx, r.cfg, Deps{Boot: r.boot}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	r.e = e
	img := newImage(t, 5000)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
	writeAll(t, r, s.SessionId, img, 4096)
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
	wantReason(t, r.e.Reboot(ctx), otav1.Reason_REASON_BAD_IMAGE_STATE)
	if _, err := os.Stat(marker); !os.IsNotExist(err) {
		t.Fatal("reboot command ran before an activation")
	}
	must[*otav1.ActivateResponse](t)(r.e.Activate(ctx, s.SessionId))
	if err := r.e.Reboot(ctx); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(marker); err != nil || string(b) != "ok\n" {
		t.Fatalf("reboot command did not run: %q %v", b, err)
	}
}
