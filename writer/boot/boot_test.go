package boot

import (
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/go-hclog"
	"go.uber.org/goleak"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/testenv"
	"github.com/gwota/gwota/test/tinyfs"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const limit = 2

// rig is one backend plus a simulated power cycle of its bootloader.
type rig struct {
	b    Backend
	boot func(t *testing.T)
}

// needTool skips when a tool is missing, and fails under CI, which installs them.
func needTool(t *testing.T, name string) string {
	t.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		testenv.Need(t, fmt.Errorf("%s not installed (Debian: libubootenv-tool / grub-common): %w", name, err))
	}
	return p
}

func testLogger(t *testing.T) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Output: hclog.DefaultOutput, Level: hclog.Warn})
}

func newFileRig(t *testing.T) rig {
	path := filepath.Join(t.TempDir(), "boot.json")
	f, err := NewFile(path, limit, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	return rig{b: f, boot: func(t *testing.T) {
		t.Helper()
		if err := f.Boot(context.Background(), ""); err != nil {
			t.Fatal(err)
		}
		// A real boot also restarts the writer: reopen from disk to prove persistence.
		g, err := NewFile(path, limit, testLogger(t))
		if err != nil {
			t.Fatal(err)
		}
		*f = File{path: g.path, limit: g.limit, log: g.log, st: g.st}
	}}
}

// bootEnv plays the bootloader over a real environment: U-Boot's BOOTCOUNT_ENV logic plus
// the documented altbootcmd, a new boot id, and the kernel command line naming the slot.
func bootEnv(t *testing.T, eb *envBackend, bootID, cmdline string) func(t *testing.T) {
	n := 0
	return func(t *testing.T) {
		t.Helper()
		ctx := context.Background()
		env, err := eb.store.read(ctx)
		if err != nil {
			t.Fatal(err)
		}
		v := eb.s.Vars
		if env[v.Upgrade] == "1" {
			c, _ := strconv.Atoi(env[v.BootCount])
			c++
			set := map[string]string{v.BootCount: strconv.Itoa(c)}
			lim, _ := strconv.Atoi(env[v.BootLimit])
			if c > lim {
				cur, _ := eb.slotOf(env[v.Slot])
				set[v.Slot] = eb.s.SlotValues[Other(cur)]
				set[v.Upgrade] = "0"
				env[v.Slot] = set[v.Slot]
			}
			if err := eb.store.write(ctx, set); err != nil {
				t.Fatal(err)
			}
		}
		n++
		if err := os.WriteFile(bootID, []byte(fmt.Sprintf("boot-%d\n", n)), 0o644); err != nil {
			t.Fatal(err)
		}
		if cmdline != "" {
			slot, _ := eb.slotOf(env[v.Slot])
			line := fmt.Sprintf("console=ttyS0 root=/dev/mmcblk0p%d rauc.slot=%s quiet\n", map[string]int{"a": 2, "b": 3}[slot], strings.ToUpper(slot))
			if err := os.WriteFile(cmdline, []byte(line), 0o644); err != nil {
				t.Fatal(err)
			}
		}
	}
}

// newUBootEnv creates a file-backed, non-redundant U-Boot environment initialised with init.
func newUBootEnv(t *testing.T, init string) (cfg string) {
	needTool(t, "fw_printenv")
	setenv := needTool(t, "fw_setenv")
	dir := t.TempDir()
	envFile := filepath.Join(dir, "uboot.env")
	if err := os.WriteFile(envFile, make([]byte, 0x4000), 0o600); err != nil {
		t.Fatal(err)
	}
	cfg = filepath.Join(dir, "fw_env.config")
	mustWrite(t, cfg, envFile+" 0x0000 0x4000\n")
	// A zeroed file has no valid CRC: fw_setenv starts from the -f default environment (empty
	// here) and stores it together with the script's variables.
	def := filepath.Join(dir, "default.env")
	mustWrite(t, def, "")
	script := filepath.Join(dir, "init.script")
	mustWrite(t, script, init)
	if out, err := exec.Command(setenv, "-c", cfg, "-f", def, "-s", script).CombinedOutput(); err != nil {
		t.Fatalf("init env: %v: %s", err, out)
	}
	return cfg
}

func mustWrite(t *testing.T, path, s string) {
	t.Helper()
	if err := os.WriteFile(path, []byte(s), 0o600); err != nil {
		t.Fatal(err)
	}
}

func newUBootRig(t *testing.T, cmdline bool) rig {
	cfg := newUBootEnv(t, "boot_part=2\nbootcmd=run distro_bootcmd\n")
	dir := filepath.Dir(cfg)
	opts := UBootOptions{Config: cfg}
	opts.BootLimit = limit
	opts.SlotValues = map[string]string{SlotA: "2", SlotB: "3"} // Mender-style partition numbers
	opts.BootIDPath = filepath.Join(dir, "boot_id")
	cl := ""
	if cmdline {
		cl = filepath.Join(dir, "cmdline")
		opts.CmdlinePath, opts.CmdlineKey = cl, "root"
		opts.CmdlineValues = map[string]string{SlotA: "/dev/mmcblk0p2", SlotB: "/dev/mmcblk0p3"}
	}
	u, err := NewUBoot(opts, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	r := rig{b: u, boot: bootEnv(t, &u.envBackend, opts.BootIDPath, cl)}
	r.boot(t)
	return r
}

func newGRUBRig(t *testing.T, cmdline bool) rig {
	tool := needTool(t, "grub-editenv")
	dir := t.TempDir()
	envFile := filepath.Join(dir, "grubenv")
	for _, args := range [][]string{{envFile, "create"}, {envFile, "set", "boot_part=a"}} {
		if out, err := exec.Command(tool, args...).CombinedOutput(); err != nil {
			t.Fatalf("grub-editenv %v: %v: %s", args, err, out)
		}
	}
	opts := GRUBOptions{EnvFile: envFile}
	opts.BootLimit = limit
	opts.BootIDPath = filepath.Join(dir, "boot_id")
	cl := ""
	if cmdline {
		cl = filepath.Join(dir, "cmdline")
		opts.CmdlinePath, opts.CmdlineKey = cl, "rauc.slot" // A/B, matched in any case
	}
	g, err := NewGRUB(opts, testLogger(t))
	if err != nil {
		t.Fatal(err)
	}
	r := rig{b: g, boot: bootEnv(t, &g.envBackend, opts.BootIDPath, cl)}
	r.boot(t)
	return r
}

var rigs = []struct {
	name string
	new  func(t *testing.T) rig
}{
	{"file", newFileRig},
	{"uboot-env", func(t *testing.T) rig { return newUBootRig(t, false) }},
	{"uboot-cmdline", func(t *testing.T) rig { return newUBootRig(t, true) }},
	{"grub-env", func(t *testing.T) rig { return newGRUBRig(t, false) }},
	{"grub-cmdline", func(t *testing.T) rig { return newGRUBRig(t, true) }},
}

// step is one action and the state (or error reason) it must lead to.
type step struct {
	do   string // activate-a, activate-b, commit, reject, boot
	want State
	err  otav1.Reason
}

func TestLifecycle(t *testing.T) {
	normalA := State{Booted: "a", Committed: "a"}
	pendingB := State{Booted: "a", Committed: "a", Pending: "b"}
	trialB := func(n int) State { return State{Booted: "b", Committed: "a", Trial: true, BootCount: n} }
	bad := otav1.Reason_REASON_BAD_IMAGE_STATE

	scenarios := []struct {
		name  string
		steps []step
	}{
		{"activate, trial boot, commit", []step{
			{do: "commit", want: normalA, err: bad},
			{do: "reject", want: normalA, err: bad},
			{do: "activate-a", want: normalA, err: bad}, // the running slot
			{do: "activate-x", want: normalA, err: bad},
			{do: "activate-b", want: pendingB},
			{do: "activate-b", want: pendingB}, // idempotent
			{do: "commit", want: pendingB, err: bad},
			{do: "boot", want: trialB(1)},
			{do: "activate-a", want: trialB(1), err: bad}, // trial open
			{do: "commit", want: State{Booted: "b", Committed: "b"}},
			{do: "commit", want: State{Booted: "b", Committed: "b"}, err: bad},
			{do: "boot", want: State{Booted: "b", Committed: "b"}},
			// The next update goes the other way.
			{do: "activate-a", want: State{Booted: "b", Committed: "b", Pending: "a"}},
			{do: "boot", want: State{Booted: "a", Committed: "b", Trial: true, BootCount: 1}},
			{do: "commit", want: normalA},
		}},
		{"trial never committed: bootloader rolls back at the limit", []step{
			{do: "activate-b", want: pendingB},
			{do: "boot", want: trialB(1)},
			{do: "boot", want: trialB(2)},
			{do: "boot", want: State{Booted: "a", Committed: "a", RolledBack: true, BootCount: 3}},
			{do: "commit", want: State{Booted: "a", Committed: "a", RolledBack: true, BootCount: 3}, err: bad},
			{do: "boot", want: State{Booted: "a", Committed: "a", RolledBack: true, BootCount: 3}},
			{do: "activate-b", want: pendingB},
			{do: "boot", want: trialB(1)},
			{do: "commit", want: State{Booted: "b", Committed: "b"}},
		}},
		{"trial rejected: committed slot runs after the reboot", []step{
			{do: "activate-b", want: pendingB},
			{do: "boot", want: trialB(1)},
			{do: "reject", want: State{Booted: "b", Committed: "a", RolledBack: true, BootCount: 1}},
			{do: "reject", want: State{Booted: "b", Committed: "a", RolledBack: true, BootCount: 1}, err: bad},
			{do: "commit", want: State{Booted: "b", Committed: "a", RolledBack: true, BootCount: 1}, err: bad},
			{do: "activate-a", want: State{Booted: "b", Committed: "a", RolledBack: true, BootCount: 1}, err: bad}, // reboot first
			{do: "boot", want: State{Booted: "a", Committed: "a", RolledBack: true, BootCount: 1}},
			{do: "boot", want: State{Booted: "a", Committed: "a", RolledBack: true, BootCount: 1}},
			{do: "activate-b", want: pendingB},
		}},
		{"activation rejected before the reboot", []step{
			{do: "activate-b", want: pendingB},
			{do: "reject", want: State{Booted: "a", Committed: "a", RolledBack: true}},
			{do: "boot", want: State{Booted: "a", Committed: "a", RolledBack: true}},
			{do: "activate-b", want: pendingB},
		}},
	}
	for _, r := range rigs {
		for _, sc := range scenarios {
			t.Run(r.name+"/"+sc.name, func(t *testing.T) {
				ctx := context.Background()
				rg := r.new(t)
				if got, err := rg.b.State(ctx); err != nil || !cmp.Equal(got, normalA) {
					t.Fatalf("initial state %+v, %v; want %+v", got, err, normalA)
				}
				for i, s := range sc.steps {
					var err error
					switch {
					case s.do == "boot":
						rg.boot(t)
					case strings.HasPrefix(s.do, "activate-"):
						err = rg.b.Activate(ctx, strings.TrimPrefix(s.do, "activate-"))
					case s.do == "commit":
						err = rg.b.Commit(ctx)
					case s.do == "reject":
						err = rg.b.Reject(ctx)
					}
					if got := status.ReasonOf(err); got != s.err {
						t.Fatalf("step %d %s: error %v (reason %v), want reason %v", i, s.do, err, got, s.err)
					}
					got, err := rg.b.State(ctx)
					if err != nil {
						t.Fatalf("step %d %s: State: %v", i, s.do, err)
					}
					if d := cmp.Diff(s.want, got); d != "" {
						t.Fatalf("step %d %s: state (-want +got):\n%s", i, s.do, d)
					}
				}
			})
		}
	}
}

func TestImageState(t *testing.T) {
	tests := []struct {
		st   State
		want otav1.ImageState
	}{
		{State{Booted: "a", Committed: "a"}, otav1.ImageState_IMAGE_STATE_NORMAL},
		{State{Booted: "a", Committed: "a", Pending: "b"}, otav1.ImageState_IMAGE_STATE_ACTIVATED},
		{State{Booted: "a", Committed: "a", Pending: "b", RolledBack: true}, otav1.ImageState_IMAGE_STATE_ACTIVATED},
		{State{Booted: "b", Committed: "a", Trial: true}, otav1.ImageState_IMAGE_STATE_TRIAL},
		{State{Booted: "b", Committed: "a", RolledBack: true}, otav1.ImageState_IMAGE_STATE_ROLLED_BACK},
	}
	for _, tt := range tests {
		if got := tt.st.ImageState(); got != tt.want {
			t.Errorf("%+v: %v, want %v", tt.st, got, tt.want)
		}
	}
}

func TestFileRejectsCorruptState(t *testing.T) {
	tests := []struct{ name, content string }{
		{"not json", "{"},
		{"future version", `{"version":2,"booted":"a","committed":"a"}`},
		{"bad slot", `{"version":1,"booted":"c","committed":"a"}`},
		{"pending is running", `{"version":1,"booted":"a","committed":"a","pending":"a"}`},
		{"trial of committed", `{"version":1,"booted":"a","committed":"a","trial":true}`},
		{"negative count", `{"version":1,"booted":"a","committed":"a","boot_count":-1}`},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			path := filepath.Join(t.TempDir(), "boot.json")
			mustWrite(t, path, tt.content)
			_, err := NewFile(path, limit, nil)
			if got := status.ReasonOf(err); got != otav1.Reason_REASON_BOOT_CONTROL_FAILED {
				t.Fatalf("error %v (reason %v), want REASON_BOOT_CONTROL_FAILED", err, got)
			}
			b, _ := os.ReadFile(path)
			if string(b) != tt.content {
				t.Fatalf("corrupt state file was rewritten: %q", b)
			}
		})
	}
	if _, err := NewFile(filepath.Join(t.TempDir(), "x.json"), 0, nil); status.ReasonOf(err) != otav1.Reason_REASON_BOOT_CONTROL_FAILED {
		t.Fatalf("boot limit 0: %v", err)
	}
}

func TestFileAtomicWriteLeavesNoTemp(t *testing.T) {
	dir := t.TempDir()
	f, err := NewFile(filepath.Join(dir, "boot.json"), limit, nil)
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Activate(context.Background(), "b"); err != nil {
		t.Fatal(err)
	}
	ents, _ := os.ReadDir(dir)
	if len(ents) != 1 || ents[0].Name() != "boot.json" {
		t.Fatalf("directory holds %v, want only boot.json", ents)
	}
	// A save that fails (the directory is gone) keeps the old state.
	if err := os.RemoveAll(dir); err != nil {
		t.Fatal(err)
	}
	if err := f.Reject(context.Background()); status.ReasonOf(err) != otav1.Reason_REASON_BOOT_CONTROL_FAILED {
		t.Fatalf("reject without a state directory: %v, want REASON_BOOT_CONTROL_FAILED", err)
	}
	if st, _ := f.State(context.Background()); st.Pending != "b" || st.RolledBack {
		t.Fatalf("state after a failed save %+v, want still pending b", st)
	}
}

func TestEnvBadValues(t *testing.T) {
	tests := []struct {
		name, env string
	}{
		{"unknown slot value", "boot_part=7\n"},
		{"slot unset", "bootcmd=x\n"},
		{"upgrade flag garbage", "boot_part=a\nupgrade_available=yes\n"},
		{"bootcount garbage", "boot_part=a\nupgrade_available=1\nbootcount=x\n"},
		{"trial marker garbage", "boot_part=a\nota_trial_slot=c\n"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			cfg := newUBootEnv(t, tt.env)
			u, err := NewUBoot(UBootOptions{Config: cfg}, nil)
			if err != nil {
				t.Fatal(err)
			}
			ctx := context.Background()
			if _, err := u.State(ctx); status.ReasonOf(err) != otav1.Reason_REASON_BOOT_CONTROL_FAILED {
				t.Fatalf("State: %v, want REASON_BOOT_CONTROL_FAILED", err)
			}
			if err := u.Activate(ctx, "b"); status.ReasonOf(err) != otav1.Reason_REASON_BOOT_CONTROL_FAILED {
				t.Fatalf("Activate: %v, want REASON_BOOT_CONTROL_FAILED", err)
			}
		})
	}
}

func TestUBootToolFailures(t *testing.T) {
	ctx := context.Background()
	t.Run("invalid env and no default", func(t *testing.T) {
		needTool(t, "fw_printenv")
		dir := t.TempDir()
		mustWrite(t, filepath.Join(dir, "uboot.env"), strings.Repeat("\x00", 0x4000))
		cfg := filepath.Join(dir, "fw_env.config")
		mustWrite(t, cfg, filepath.Join(dir, "uboot.env")+" 0x0000 0x4000\n")
		u, _ := NewUBoot(UBootOptions{Config: cfg, DefaultEnv: filepath.Join(dir, "missing")}, nil)
		_, err := u.State(ctx)
		if status.ReasonOf(err) != otav1.Reason_REASON_BOOT_CONTROL_FAILED || !strings.Contains(err.Error(), "Cannot read") {
			t.Fatalf("State: %v, want REASON_BOOT_CONTROL_FAILED with the tool's stderr", err)
		}
	})
	t.Run("tool missing", func(t *testing.T) {
		u, _ := NewUBoot(UBootOptions{PrintEnv: "/nonexistent/fw_printenv"}, nil)
		_, err := u.State(ctx)
		if status.ReasonOf(err) != otav1.Reason_REASON_BOOT_CONTROL_FAILED || !strings.Contains(err.Error(), "not installed") {
			t.Fatalf("State: %v", err)
		}
	})
	for _, tool := range []string{"false", "true"} {
		// fw_setenv failing, or exiting 0 without storing: the commit must not look done.
		t.Run("commit with setenv="+tool, func(t *testing.T) {
			cfg := newUBootEnv(t, "boot_part=b\nupgrade_available=1\nbootcount=1\nota_trial_slot=b\n")
			path, err := exec.LookPath(tool)
			testenv.Need(t, err)
			u, _ := NewUBoot(UBootOptions{Config: cfg, SetEnv: path}, nil)
			err = u.Commit(ctx)
			if status.ReasonOf(err) != otav1.Reason_REASON_COMMIT_FAILED {
				t.Fatalf("Commit: %v, want REASON_COMMIT_FAILED", err)
			}
			st, err := u.State(ctx)
			if err != nil || !st.Trial {
				t.Fatalf("state after failed commit %+v, %v: want still on trial", st, err)
			}
		})
	}
}

func TestUBootClassicScript(t *testing.T) {
	// u-boot-tools' fw_setenv reads "name value"; libubootenv reads "name=value". A stand-in
	// tool copies the script it is given so the test sees exactly what each mode writes.
	dir := t.TempDir()
	rec := filepath.Join(dir, "rec")
	script := func(classic bool) string {
		t.Helper()
		f := filepath.Join(dir, "tool")
		mustWrite(t, f, "#!/bin/sh\nwhile [ $# -gt 1 ]; do shift; done\ncp \"$1\" "+rec+"\n")
		if err := os.Chmod(f, 0o755); err != nil {
			t.Fatal(err)
		}
		w := &fwEnv{o: UBootOptions{ClassicScript: classic, SetEnv: f}}
		if err := w.write(context.Background(), map[string]string{"b": "", "a": "x y"}); err != nil {
			t.Fatal(err)
		}
		b, _ := os.ReadFile(rec)
		return string(b)
	}
	if got, want := script(true), "a x y\nb\n"; got != want {
		t.Errorf("classic script %q, want %q", got, want)
	}
	if got, want := script(false), "a=x y\nb=\n"; got != want {
		t.Errorf("libubootenv script %q, want %q", got, want)
	}
}

func TestGRUBMissingFile(t *testing.T) {
	needTool(t, "grub-editenv")
	g, err := NewGRUB(GRUBOptions{EnvFile: filepath.Join(t.TempDir(), "grubenv")}, nil)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := g.State(context.Background()); status.ReasonOf(err) != otav1.Reason_REASON_BOOT_CONTROL_FAILED {
		t.Fatalf("State on a missing env file: %v", err)
	}
	if _, err := NewGRUB(GRUBOptions{}, nil); err == nil {
		t.Fatal("NewGRUB without EnvFile succeeded")
	}
}

func TestCmdlineDetection(t *testing.T) {
	needTool(t, "grub-editenv")
	tests := []struct {
		name, cmdline, key string
		values             map[string]string
		want               string
		err                bool
	}{
		{"rauc.slot", "quiet rauc.slot=B", "rauc.slot", nil, "b", false},
		{"root device", "root=/dev/sda3 ro", "root", map[string]string{"a": "/dev/sda2", "b": "/dev/sda3"}, "b", false},
		{"root partuuid", "root=PARTUUID=1234-02", "root", map[string]string{"a": "PARTUUID=1234-02", "b": "PARTUUID=1234-03"}, "a", false},
		{"unknown value", "root=/dev/sda9", "root", map[string]string{"a": "/dev/sda2", "b": "/dev/sda3"}, "", true},
		{"missing key", "quiet", "rauc.slot", nil, "", true},
		{"key without value", "quiet rauc.slot", "rauc.slot", nil, "", true},
		{"longer key is another parameter", "rauc.slot.x=A rauc.slot=b", "rauc.slot", nil, "b", false},
		{"twice, same value", "root=/dev/sda3 ro root=/dev/sda3", "root", map[string]string{"a": "/dev/sda2", "b": "/dev/sda3"}, "b", false},
		{"twice, different values", "root=/dev/sda2 ro root=/dev/sda3", "root", map[string]string{"a": "/dev/sda2", "b": "/dev/sda3"}, "", true},
		{"twice, one naming no slot", "rauc.slot=A rauc.slot=C", "rauc.slot", nil, "", true},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			dir := t.TempDir()
			env := filepath.Join(dir, "grubenv")
			if out, err := exec.Command("grub-editenv", env, "create").CombinedOutput(); err != nil {
				t.Fatalf("%v: %s", err, out)
			}
			cl := filepath.Join(dir, "cmdline")
			mustWrite(t, cl, tt.cmdline+"\n")
			opts := GRUBOptions{EnvFile: env}
			opts.CmdlinePath, opts.CmdlineKey, opts.CmdlineValues = cl, tt.key, tt.values
			g, err := NewGRUB(opts, testLogger(t))
			if err != nil {
				t.Fatal(err)
			}
			st, err := g.State(context.Background())
			if tt.err {
				if status.ReasonOf(err) != otav1.Reason_REASON_BOOT_CONTROL_FAILED {
					t.Fatalf("State %+v, %v: want REASON_BOOT_CONTROL_FAILED", st, err)
				}
				return
			}
			// boot_part is unset in a fresh env: the running slot is taken as committed.
			if err != nil || st.Booted != tt.want || st.Committed != tt.want {
				t.Fatalf("State %+v, %v: want booted and committed %s", st, err, tt.want)
			}
		})
	}
}

func TestOptionsValidation(t *testing.T) {
	tests := []struct {
		name string
		s    Scheme
	}{
		{"negative limit", Scheme{BootLimit: -1}},
		{"bad var name", Scheme{Vars: Vars{Slot: "a=b"}}},
		{"slot values equal", Scheme{SlotValues: map[string]string{"a": "1", "b": "1"}}},
		{"slot values incomplete", Scheme{SlotValues: map[string]string{"a": "1"}}},
		{"slot value newline", Scheme{SlotValues: map[string]string{"a": "1\n", "b": "2"}}},
		{"cmdline values incomplete", Scheme{CmdlineValues: map[string]string{"b": "x"}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := NewUBoot(UBootOptions{Scheme: tt.s}, nil)
			var se *status.Error
			if !errors.As(err, &se) {
				t.Fatalf("NewUBoot: %v, want a *status.Error", err)
			}
		})
	}
}

// TestBootControlFailures: a boot tool or state store that cannot store the change fails
// with boot_control_failed (storage_full when it is out of space), with the cause in the
// message, and the boot state stays what it was. Real tools, real read-only and full
// filesystems.
func TestBootControlFailures(t *testing.T) {
	ctx := context.Background()
	check := func(t *testing.T, b Backend, want otav1.Reason, msg string) {
		t.Helper()
		before, err := b.State(ctx)
		if err != nil {
			t.Fatal(err)
		}
		err = b.Activate(ctx, "b")
		if got := status.ReasonOf(err); got != want || !strings.Contains(err.Error(), msg) {
			t.Fatalf("Activate: %v (%s), want %s mentioning %q", err, status.Name(got), status.Name(want), msg)
		}
		if after, err := b.State(ctx); err != nil || after != before {
			t.Fatalf("state after the failed activation %+v, %v; want %+v", after, err, before)
		}
	}
	t.Run("fw_setenv on a read-only environment", func(t *testing.T) {
		cfg := newUBootEnv(t, "boot_part=a\n")
		u, err := NewUBoot(UBootOptions{Config: cfg}, nil)
		if err != nil {
			t.Fatal(err)
		}
		tinyfs.ReadOnly(t, filepath.Dir(cfg))
		check(t, u, otav1.Reason_REASON_BOOT_CONTROL_FAILED, "fw_setenv")
	})
	t.Run("fw_setenv missing", func(t *testing.T) {
		cfg := newUBootEnv(t, "boot_part=a\n")
		u, err := NewUBoot(UBootOptions{Config: cfg, SetEnv: "/nonexistent/fw_setenv"}, nil)
		if err != nil {
			t.Fatal(err)
		}
		check(t, u, otav1.Reason_REASON_BOOT_CONTROL_FAILED, "not installed")
	})
	t.Run("grub-editenv on a read-only directory", func(t *testing.T) {
		r := newGRUBRig(t, false)
		tinyfs.ReadOnly(t, filepath.Dir(r.b.(*GRUB).store.(*grubEnv).o.EnvFile))
		check(t, r.b, otav1.Reason_REASON_BOOT_CONTROL_FAILED, "read-only")
	})
	t.Run("grub-editenv on a full filesystem", func(t *testing.T) {
		tool := needTool(t, "grub-editenv")
		dir := tinyfs.Tmpfs(t, 64<<10)
		env := filepath.Join(dir, "grubenv")
		for _, args := range [][]string{{env, "create"}, {env, "set", "boot_part=a"}} {
			if out, err := exec.Command(tool, args...).CombinedOutput(); err != nil {
				t.Fatalf("grub-editenv %v: %v: %s", args, err, out)
			}
		}
		g, err := NewGRUB(GRUBOptions{EnvFile: env}, nil)
		if err != nil {
			t.Fatal(err)
		}
		tinyfs.Fill(t, dir)
		check(t, g, otav1.Reason_REASON_STORAGE_FULL, "no space")
	})
	t.Run("file backend on a full filesystem", func(t *testing.T) {
		dir := tinyfs.Tmpfs(t, 64<<10)
		f, err := NewFile(filepath.Join(dir, "boot.json"), limit, nil)
		if err != nil {
			t.Fatal(err)
		}
		tinyfs.Fill(t, dir)
		check(t, f, otav1.Reason_REASON_STORAGE_FULL, "no space")
	})
	t.Run("file backend on a read-only directory", func(t *testing.T) {
		dir := t.TempDir()
		f, err := NewFile(filepath.Join(dir, "boot.json"), limit, nil)
		if err != nil {
			t.Fatal(err)
		}
		tinyfs.ReadOnly(t, dir)
		check(t, f, otav1.Reason_REASON_BOOT_CONTROL_FAILED, "read-only")
	})
}
