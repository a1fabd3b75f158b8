package engine

import (
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/sign"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/selftest"
	"github.com/gwota/gwota/writer/target/targettest"
)

// outcome is "ok" or the reason name of err, for transcripts compared with go-cmp.
func outcome(err error) string {
	if err == nil {
		return "ok"
	}
	return status.Name(status.ReasonOf(err))
}

// The engine refuses two A/B targets itself, whatever validated the configuration: they
// would share the one boot switch.
func TestEngineRefusesTwoABTargets(t *testing.T) {
	r := newRig(t, nil)
	r.e.Close()
	cfg := *r.cfg
	cfg.Targets = append(append([]config.Target(nil), cfg.Targets...), config.Target{
		Name: "kernel", Kind: config.KindAB, FileTypes: []int32{2},
		Slots: []string{filepath.Join(r.dir, "kernel-a"), filepath.Join(r.dir, "kernel-b")},
	})
	e, err := New(ctx, &cfg, Deps{Boot: r.boot}, testLog(t))
	if err == nil {
		e.Close()
		t.Fatal("engine started with two A/B targets on one boot switch")
	}
	if want := `targets "rootfs" and "kernel" are both A/B`; !strings.Contains(err.Error(), want) {
		t.Fatalf("got %v, want it to contain %q", err, want)
	}
}

// The version policy fails closed: nothing recorded or a corrupt record refuses every image
// with version_check and says how to repair; the repair is durable across a restart.
func TestVersionPolicyFailsClosed(t *testing.T) {
	r := newRig(t, func(c *config.Config) { c.VersionPolicy, c.AcceptUnsignedVersions = config.VersionNewer, true })
	img := newImage(t, 5000)
	var got []string
	begin := func(what string, fileType int32, version string) {
		res, err := r.begin(img, fileType, func(q *otav1.BeginSessionRequest) { q.Version = version })
		got = append(got, what+": "+outcome(err))
		unknown := strings.Contains(what, "nothing recorded") || strings.Contains(what, "corrupt") || strings.Contains(what, "unknown")
		if unknown && err != nil && !strings.Contains(err.Error(), "ota-writer set-version") {
			t.Errorf("%s: the refusal does not say how to repair: %v", what, err)
		}
		if err == nil {
			r.e.Abort(ctx, res.GetSession().GetSessionId(), otav1.Reason_REASON_USER_ABORT)
		}
	}
	set := func(what, target, version string) {
		_, err := r.e.SetRunningVersion(ctx, target, version)
		got = append(got, what+": "+outcome(err))
	}
	begin("fresh device, nothing recorded", 0, "1.0.1")
	set("factory records 1.0.0", "rootfs", "1.0.0")
	begin("same version", 0, "1.0.0")
	begin("newer", 0, "1.0.1")
	r.e.Close()
	r.open()
	begin("older, after a restart", 0, "0.9")
	begin("newer, after a restart", 0, "1.0.1")
	begin("file target, nothing recorded", 1, "2.0")
	set("record the file target", "app", "2.0")
	begin("file target, newer", 1, "2.1")
	// A corrupt record: today's versions are unknown.
	r.e.Close()
	rec := filepath.Join(r.cfg.StateDir, "record")
	b, err := os.ReadFile(rec)
	if err != nil {
		t.Fatal(err)
	}
	b[len(b)-3] ^= 0xFF
	if err := os.WriteFile(rec, b, 0o600); err != nil {
		t.Fatal(err)
	}
	r.open()
	begin("corrupt record", 0, "9.0")
	begin("corrupt record, file target", 1, "9.0")
	set("repair", "rootfs", "1.0.0")
	begin("repaired", 0, "1.0.1")
	begin("repaired, another target still unknown", 1, "9.0")
	set("unknown target", "nope", "1.0")
	set("bad version", "rootfs", "1.0 beta")
	want := []string{
		"fresh device, nothing recorded: version_check",
		"factory records 1.0.0: ok",
		"same version: version_check",
		"newer: ok",
		"older, after a restart: version_check",
		"newer, after a restart: ok",
		"file target, nothing recorded: version_check",
		"record the file target: ok",
		"file target, newer: ok",
		"corrupt record: version_check",
		"corrupt record, file target: version_check",
		"repair: ok",
		"repaired: ok",
		"repaired, another target still unknown: version_check",
		"unknown target: target_unknown",
		"bad version: invalid_request",
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Fatalf("(-want +got):\n%s", d)
	}
}

// A commit needs a self test that passed in this boot of the trial slot when checks are
// configured: none run is bad_image_state, a failed one self_test_failed; a pass from an
// earlier boot does not count, one from an earlier writer process of this boot does.
func TestCommitNeedsSelfTestOfThisBoot(t *testing.T) {
	marker := filepath.Join(t.TempDir(), "healthy")
	checks := []config.Command{{Name: "healthy", Command: []string{"test", "-e", marker}, Timeout: 10 * time.Second}}
	r := newRig(t, nil)
	r.e.Close()
	r.cfg.Checks = checks
	r.selfTest = selftest.New([]selftest.Check{{Name: "healthy", Argv: checks[0].Command, Timeout: checks[0].Timeout}}, time.Minute, nil)
	r.open()
	img := newImage(t, 9000)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
	writeAll(t, r, s.SessionId, img, 4096)
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
	must[*otav1.ActivateResponse](t)(r.e.Activate(ctx, s.SessionId))

	var got []string
	note := func(what string, err error) { got = append(got, what+": "+outcome(err)) }
	selfTest := func(what string) {
		res, err := r.e.SelfTest(ctx, "job-1")
		if err == nil && !res.GetPassed() {
			err = status.Errorf(res.GetReason(), "not passed")
		}
		note(what, err)
	}
	commit := func(what string) { _, err := r.e.Commit(ctx, "job-1"); note(what, err) }
	boot := func() { r.e.Close(); note("boot", r.boot.Boot(ctx, "")); r.open() }

	boot()
	commit("commit with no self test")
	selfTest("self test, unhealthy")
	commit("commit after a failed self test")
	if err := os.WriteFile(marker, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	selfTest("self test, healthy")
	boot() // the trial slot boots again: the pass was in the previous boot
	commit("commit with a pass from the previous boot")
	selfTest("self test in this boot")
	r.e.Close()
	r.open() // the writer restarts within this boot
	commit("commit after a writer restart in the same boot")
	want := []string{
		"boot: ok",
		"commit with no self test: bad_image_state",
		"self test, unhealthy: self_test_failed",
		"commit after a failed self test: self_test_failed",
		"self test, healthy: ok",
		"boot: ok",
		"commit with a pass from the previous boot: bad_image_state",
		"self test in this boot: ok",
		"commit after a writer restart in the same boot: ok",
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Fatalf("(-want +got):\n%s", d)
	}
	// Checks configured without a runner would pass every self test: the engine refuses.
	r.e.Close()
	r.selfTest = nil
	if e, err := New(ctx, r.cfg, Deps{Boot: r.boot}, testLog(t)); err == nil {
		e.Close()
		t.Fatal("engine started with checks configured but no self test runner")
	}
}

// otherSigner makes a second ECDSA P-256 key and certificate with openssl (CN rootfs-signer).
func otherSigner(t *testing.T) sign.OpenSSL {
	dir := t.TempDir()
	o := sign.OpenSSL{Key: filepath.Join(dir, "rootfs.key"), Cert: filepath.Join(dir, "rootfs.crt.pem"), CN: "rootfs-signer"}
	if err := o.Make(); err != nil {
		t.Fatal(err)
	}
	return o
}

// The certfile policy and per-target keys: a job that names no certificate is refused unless
// the configuration allows any trusted key; a target with its own trusted_keys is verified
// by those only.
func TestSignerPolicy(t *testing.T) {
	signer(t)
	root := otherSigner(t)
	rootCert := root.Cert
	global := newImage(t, 6000) // signed by the global key (signer.crt.pem)
	own := newImage(t, 6000)
	var err error
	if own.sig, err = root.SignFile(own.path); err != nil {
		t.Fatal(err)
	}
	type job struct {
		img      image
		fileType int32
		cert     string
	}
	for _, tc := range []struct {
		name string
		edit func(*config.Config)
		jobs []job
		want []string // per job: begin outcome, then finish outcome when begun
	}{{
		name: "no certfile: refused by default",
		jobs: []job{{global, 0, ""}, {global, 1, ""}, {global, 0, "signer.crt.pem"}, {global, 0, "ota-signer"}},
		want: []string{"untrusted_signer", "untrusted_signer", "ok ok", "ok ok"},
	}, {
		name: "no certfile: any trusted key when the configuration allows it",
		edit: func(c *config.Config) { c.AllowAnyTrustedKey = true },
		jobs: []job{{global, 0, ""}, {global, 1, ""}},
		want: []string{"ok ok", "ok ok"},
	}, {
		name: "no certfile: allowed for one target only",
		edit: func(c *config.Config) { c.Targets[1].AllowAnyTrustedKey = true },
		jobs: []job{{global, 0, ""}, {global, 1, ""}},
		want: []string{"untrusted_signer", "ok ok"},
	}, {
		name: "a target with its own keys is verified by them only",
		edit: func(c *config.Config) { c.Targets[0].TrustedKeys = []string{rootCert} },
		jobs: []job{
			{global, 0, "signer.crt.pem"}, // the global key does not apply to rootfs
			{own, 0, "rootfs.crt.pem"},
			{own, 0, "rootfs-signer"},
			{global, 0, "rootfs.crt.pem"}, // names rootfs's key, signed by another: refused at finish
			{global, 1, "signer.crt.pem"}, // app still uses the global store
			{own, 1, "rootfs.crt.pem"},    // ... which does not hold rootfs's key
		},
		want: []string{"untrusted_signer", "ok ok", "ok ok", "ok sig_check_failed", "ok ok", "untrusted_signer"},
	}, {
		name: "a target's own keys and any-key: every key of the target, none of the global",
		edit: func(c *config.Config) {
			c.Targets[0].TrustedKeys = []string{rootCert}
			c.Targets[0].AllowAnyTrustedKey = true
		},
		jobs: []job{{own, 0, ""}, {global, 0, ""}},
		want: []string{"ok ok", "ok sig_check_failed"},
	}} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, tc.edit)
			var got []string
			for i, j := range tc.jobs {
				res, err := r.begin(j.img, j.fileType, func(q *otav1.BeginSessionRequest) {
					q.JobId = "job-" + string(rune('a'+i))
					q.CertName = j.cert
				})
				if err != nil {
					got = append(got, outcome(err))
					continue
				}
				id := res.GetSession().GetSessionId()
				writeAll(t, r, id, j.img, 4096)
				_, err = r.e.Finish(ctx, id)
				got = append(got, "ok "+outcome(err))
				r.e.Abort(ctx, id, otav1.Reason_REASON_USER_ABORT)
			}
			if d := cmp.Diff(tc.want, got); d != "" {
				t.Fatalf("(-want +got):\n%s", d)
			}
		})
	}
}

// A regular-file medium without max_size is bounded by its filesystem's free space minus
// free_space_reserve: an image declared larger is refused at Begin with file_too_large,
// before a byte is written or reserved. On a 16 MiB tmpfs with a 4 MiB reserve.
func TestGrowableMediumBounded(t *testing.T) {
	targettest.Need(t, os.Geteuid() == 0, "mounting a small tmpfs needs root")
	const mib = 1 << 20
	fs := t.TempDir()
	if out, err := exec.Command("mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", fs).CombinedOutput(); err != nil {
		t.Fatalf("mount tmpfs: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("umount", fs).Run() })
	// Slot files of 1 MiB each, allocated: 14 MiB stay free. Slot b may grow to its own
	// 1 MiB plus 14 - 4 MiB: 11 MiB.
	slots := []string{filepath.Join(fs, "slot-a"), filepath.Join(fs, "slot-b")}
	for _, p := range slots {
		if err := os.WriteFile(p, make([]byte, mib), 0o600); err != nil {
			t.Fatal(err)
		}
	}
	reserve := uint64(4 * mib)
	r := newRig(t, func(c *config.Config) {
		c.Targets[0].Slots, c.Targets[0].MaxSize = slots, 0
		c.Targets[1].Path, c.Targets[1].MaxSize = filepath.Join(fs, "bundle.tar"), 0
		c.FreeSpaceReserve = &reserve
	})
	img := newImage(t, 1000) // only the declared size matters at Begin
	var got []string
	for _, tc := range []struct {
		fileType int32
		size     uint64
	}{{1, 11 * mib}, {1, 9 * mib}, {0, 12 * mib}, {0, 1 << 40}, {0, 10 * mib}} {
		res, err := r.begin(img, tc.fileType, func(q *otav1.BeginSessionRequest) { q.FileSize = tc.size; q.BlockSize = 65536 })
		got = append(got, outcome(err))
		if err == nil {
			r.e.Abort(ctx, res.GetSession().GetSessionId(), otav1.Reason_REASON_USER_ABORT)
		}
	}
	// The file target's temporary file is removed at the abort; slot b keeps what Begin
	// reserved, so the A/B row that fits comes last.
	want := []string{"file_too_large", "ok", "file_too_large", "file_too_large", "ok"}
	if d := cmp.Diff(want, got); d != "" {
		t.Fatalf("(-want +got):\n%s", d)
	}
}
