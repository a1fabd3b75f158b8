package main

import (
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/gwota/gwota/test/testenv"
)

// The running slot comes from the kernel command line when [boot] slot_from_cmdline says so.
// The real binary runs in its own mount namespace with a test file bind-mounted over
// /proc/cmdline, so the production path is what is read; the GRUB environment says slot a
// runs, committed, throughout.
func TestRunningSlotFromCmdline(t *testing.T) {
	testenv.NeedTools(t, "unshare", "mount", "grub-editenv")
	testenv.NeedRoot(t, "to bind-mount over /proc/cmdline")
	b := newBench(t, "")
	env := filepath.Join(b.dir, "grubenv")
	for _, args := range [][]string{{env, "create"}, {env, "set", "boot_part=a", "upgrade_available=0"}} {
		if out, err := exec.Command("grub-editenv", args...).CombinedOutput(); err != nil {
			t.Fatalf("grub-editenv %v: %v\n%s", args, err, out)
		}
	}
	base, err := os.ReadFile(b.cfg)
	if err != nil {
		t.Fatal(err)
	}
	const rootValues = "slot_from_cmdline = \"root\"\ncmdline_slot_values = { a = \"PARTLABEL=rootfs-a\", b = \"PARTLABEL=rootfs-b\" }\n"
	for _, tt := range []struct {
		name, boot, cmdline string
		wantSlot            string // "" when status must fail
		wantErr             string
	}{
		{"not configured: from the environment", "", "quiet root=PARTLABEL=rootfs-b", "a", ""},
		{"root= names slot b", rootValues, "quiet root=PARTLABEL=rootfs-b ro", "b", ""},
		{"root= names slot a", rootValues, "root=PARTLABEL=rootfs-a", "a", ""},
		{"rauc.slot, default values", "slot_from_cmdline = \"rauc.slot\"\n", "rauc.slot=B", "b", ""},
		{"parameter missing", rootValues, "quiet ro", "", "kernel parameter root not in /proc/cmdline"},
		{"value names no slot", rootValues, "root=/dev/sda1", "", `root="/dev/sda1" names no slot`},
	} {
		t.Run(tt.name, func(t *testing.T) {
			boot := "[boot]\nbackend = \"grub\"\ngrub_env = \"" + env + "\"\n" + tt.boot
			cfg := strings.Replace(string(base), "[boot]\nbackend = \"file\"\n", boot, 1)
			if cfg == string(base) {
				t.Fatal("bench configuration has no [boot] backend = \"file\" section to replace")
			}
			cfgPath := filepath.Join(b.dir, "cmdline.toml")
			fake := filepath.Join(b.dir, "cmdline")
			if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
				t.Fatal(err)
			}
			if err := os.WriteFile(fake, []byte(tt.cmdline+"\n"), 0o644); err != nil {
				t.Fatal(err)
			}
			// No writer serves the socket: status runs the engine in-process from the config.
			cmd := exec.Command("unshare", "--mount", "--propagation", "private", "sh", "-ec",
				`mount --bind "$1" /proc/cmdline; shift; exec "$@"`,
				"sh", fake, binary, "status", "--json", "--config", cfgPath)
			var stderr strings.Builder
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if tt.wantSlot == "" {
				if err == nil || cmd.ProcessState.ExitCode() != exitFailed || !strings.Contains(stderr.String(), tt.wantErr) {
					t.Fatalf("status: %v, want exit %d with %q\nstdout:\n%s\nstderr:\n%s", err, exitFailed, tt.wantErr, out, stderr.String())
				}
				return
			}
			if err != nil {
				t.Fatalf("status: %v\n%s", err, stderr.String())
			}
			var got struct {
				State struct {
					Targets []struct {
						ActiveSlot string `json:"active_slot"`
					} `json:"targets"`
				} `json:"state"`
				Extensions map[string]string `json:"extensions"`
			}
			if err := json.Unmarshal(out, &got); err != nil {
				t.Fatalf("%v\n%s", err, out)
			}
			if len(got.State.Targets) != 1 || got.State.Targets[0].ActiveSlot != tt.wantSlot || got.Extensions["boot_slot"] != tt.wantSlot {
				t.Errorf("running slot %s, want %s:\n%s", out, tt.wantSlot, out)
			}
		})
	}
	// The bind mounts stayed in the test's namespaces.
	if host, err := os.ReadFile("/proc/cmdline"); err == nil && strings.Contains(string(host), "rootfs-b") {
		t.Errorf("/proc/cmdline of the test process shows a test command line: %q", host)
	}
}
