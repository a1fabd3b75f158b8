// Package privsplit proves the privilege split on a real machine, as root:
// the ota group and ota-net user come from deploy/sysusers.d, ota-net runs
// under that uid (setpriv: no groups, no capabilities, no new privileges),
// the writer runs as root with loop devices as its A/B slots (root-owned
// files when loop devices are unavailable), a full update goes through the
// emulator, and then, from the ota-net uid, the slots cannot be opened, the
// writer's state, configuration and trust store cannot be read, and a third
// uid that may connect to the socket has its connection closed by the writer,
// which the CLI reports as permission_denied (3002).
//
// It changes the machine: it creates the system users ota-net and
// ota-intruder and the group ota (left in place, as a package install would),
// and attaches two loop devices for the duration of the test. Skipped unless
// run as root.
package privsplit

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"os/exec"
	"os/user"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
	"github.com/gwota/gwota/writer/config"

	"github.com/gwota/gwota/test/testenv"
)

const (
	netUser      = "ota-net"
	otaGroup     = "ota"
	intruderUser = "ota-intruder" // in group ota, not in peer_uids
	thing        = "gw-privsplit"
	slotSize     = 4 << 20
	imageSize    = 1 << 20
)

func TestPrivilegeSplit(t *testing.T) {
	testenv.NeedRoot(t, "privsplit creates system users and loop devices; run `sudo go test ./test/privsplit/`")
	for _, tool := range []string{"systemd-sysusers", "setpriv"} {
		if _, err := exec.LookPath(tool); err != nil {
			t.Fatalf("privsplit needs %s: %v", tool, err)
		}
	}
	ctx, cancel := context.WithTimeout(context.Background(), 8*time.Minute)
	defer cancel()

	netUID, otaGID, intruderUID := createUsers(t)

	// The layout: one directory others may traverse but not list; inside it
	// the writer's files stay root-only, as tmpfiles.d makes them on a gateway.
	top, err := os.MkdirTemp("", "privsplit")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Logf("kept %s", top)
			return
		}
		os.RemoveAll(top)
	})
	mustChmod(t, top, 0o711)
	binDir := filepath.Join(top, "bin")
	devDir := filepath.Join(top, "d")
	backing := filepath.Join(top, "slots") // loop backing files: root only
	for _, d := range []struct {
		path string
		mode os.FileMode
	}{{binDir, 0o755}, {devDir, 0o711}, {backing, 0o700}} {
		if err := os.Mkdir(d.path, d.mode); err != nil {
			t.Fatal(err)
		}
		mustChmod(t, d.path, d.mode)
	}

	built := binaries(t)
	writerBin := install(t, built.Writer, filepath.Join(binDir, "ota-writer"))
	netBin := install(t, built.Net, filepath.Join(binDir, "ota-net"))
	// ota-net as the service runs it: its own uid, group ota and nothing
	// else, no capabilities in any set, no way to gain privileges.
	netWrapper := filepath.Join(binDir, "ota-net-as-user")
	script := fmt.Sprintf("#!/bin/sh\nexec setpriv --reuid=%s --regid=%s --clear-groups --inh-caps=-all --bounding-set=-all --no-new-privs -- %s \"$@\"\n", netUser, otaGroup, netBin)
	if err := os.WriteFile(netWrapper, []byte(script), 0o755); err != nil {
		t.Fatal(err)
	}
	bin := &harness.Binaries{Dir: binDir, Writer: writerBin, Net: netWrapper, Race: built.Race}

	slotA, slotB, kind := slots(t, backing)
	t.Logf("slots: %s, %s (%s)", slotA, slotB, kind)

	cloud, err := harness.StartCloud(ctx, emulator.Options{Thing: thing})
	if err != nil {
		t.Fatal(err)
	}
	defer cloud.Close()
	signer, err := harness.NewSigner("privsplit-signer")
	if err != nil {
		t.Fatal(err)
	}
	dev, err := harness.NewDevice(bin, harness.DeviceOptions{
		Dir:       devDir,
		Thing:     thing,
		BrokerURL: cloud.BrokerURL(),
		Trusted:   []*harness.Signer{signer},
		Checks:    []harness.Check{{Name: "ok", Command: []string{"/bin/true"}}},
		SlotSize:  64 << 10,
	})
	if err != nil {
		t.Fatal(err)
	}
	defer func() {
		if err := dev.Close(true); err != nil {
			t.Errorf("closing the device: %v", err)
		}
		if r := dev.RaceReports(); len(r) > 0 {
			t.Errorf("data races reported by the binaries: %v", r)
		}
		if t.Failed() {
			t.Log(dev.Logs())
		}
	}()
	deploySlots(t, dev, slotA, slotB, netUID, otaGID)

	dctx, dcancel := dev.Context(ctx)
	defer dcancel()
	if err := dev.Start(dctx); err != nil {
		t.Fatal(err)
	}
	checkSocket(t, dev.Socket, otaGID)

	// A full update through the emulator: stream download into the writer,
	// verification, activation, reboot into the trial, self test, commit.
	img := filepath.Join(top, "v2.img")
	if err := harness.WriteImage(img, imageSize, 2); err != nil {
		t.Fatal(err)
	}
	if err := cloud.CreateJob(dctx, backend.JobSpec{JobID: "split", Protocols: []string{backend.ProtocolMQTT}, Files: []backend.FileSpec{signer.File(img)}}); err != nil {
		t.Fatal(err)
	}
	if _, err := cloud.WaitStatus(dctx, "split", backend.StatusSucceeded, backend.StatusFailed, backend.StatusRejected, backend.StatusCanceled, backend.StatusTimedOut); err != nil {
		t.Fatalf("job did not end: %v (cause: %v)", err, context.Cause(dctx))
	}
	want := []harness.Step{
		{Status: backend.StatusInProgress, SelfTest: "receiving"},
		{Status: backend.StatusInProgress, SelfTest: "ready"},
		{Status: backend.StatusInProgress, SelfTest: "active"},
		{Status: backend.StatusSucceeded, SelfTest: "accepted"},
	}
	if d := cmp.Diff(want, harness.Steps(cloud.Updates("split"))); d != "" {
		t.Fatalf("job status sequence (-want +got):\n%s", d)
	}
	checkSlotHolds(t, slotB, img)
	// The ota-net that reported "accepted" (started again after the reboot)
	// runs with exactly these credentials.
	checkNetProcess(t, dev.Net().Pid, netUID, otaGID)

	t.Run("ota-net cannot open the slots", func(t *testing.T) {
		for _, s := range []string{slotA, slotB} {
			denied(t, netUser, "", "dd", "if="+s, "of=/dev/null", "bs=512", "count=1")
			denied(t, netUser, "", "dd", "if=/dev/zero", "of="+s, "bs=512", "count=1", "conv=notrunc")
		}
	})
	t.Run("ota-net cannot read the writer's state", func(t *testing.T) {
		denied(t, netUser, "", "ls", dev.WriterState)
		f := someFile(t, dev.WriterState)
		denied(t, netUser, "", "cat", f)
		denied(t, netUser, "", "cat", dev.WriterConfig)
	})
	t.Run("ota-net cannot read the trust store", func(t *testing.T) {
		keys := filepath.Join(dev.Dir, "keys")
		denied(t, netUser, "", "ls", keys)
		denied(t, netUser, "", "cat", filepath.Join(keys, signer.CertName))
	})
	t.Run("ota-net reads what is its own", func(t *testing.T) {
		// The control: the same setpriv identity can read its own state, so
		// the denials above are the permissions, not a broken setup.
		allowed(t, netUser, "", "ls", dev.NetState)
		allowed(t, netUser, "", "cat", dev.NetConfig)
	})
	t.Run("a third uid is refused at the socket with the typed reason", func(t *testing.T) {
		// In group ota, so the socket's file mode lets it connect: the
		// writer's peer uid check at accept is what refuses it.
		out, err := as(intruderUser, otaGroup, writerBin, "status", "--socket", dev.Socket)
		if err == nil {
			t.Fatalf("ota-writer status as %s (uid %d) succeeded:\n%s", intruderUser, intruderUID, out)
		}
		t.Logf("uid %d (group ota) refused:\n%s", intruderUID, out)
		for _, w := range []string{"permission_denied", "3002"} {
			if !strings.Contains(out, w) {
				t.Errorf("refusal of uid %d does not name %q:\n%s", intruderUID, w, out)
			}
		}
		// The writer closed the connection at accept and says why in its log.
		if logs := dev.Logs(); !strings.Contains(logs, "connection refused: uid not allowed") || !strings.Contains(logs, fmt.Sprintf("uid=%d", intruderUID)) {
			t.Errorf("the writer's log does not show the refusal of uid %d at accept", intruderUID)
		}
		// Root may always ask (peer uid 0).
		if out, err := run(writerBin, "status", "--socket", dev.Socket); err != nil {
			t.Errorf("ota-writer status as root: %v\n%s", err, out)
		}
	})
	t.Run("a uid outside group ota cannot even connect", func(t *testing.T) {
		out, err := as("nobody", "", writerBin, "status", "--socket", dev.Socket)
		t.Logf("nobody:\n%s", out)
		if err == nil || !strings.Contains(strings.ToLower(out), "permission denied") {
			t.Errorf("ota-writer status as nobody: %v, want the socket's permission denied:\n%s", err, out)
		}
	})
}

// createUsers applies the shipped sysusers.d entry (the ota group and the
// ota-net user) and adds the third uid, a member of ota not in peer_uids.
func createUsers(t *testing.T) (netUID, otaGID, intruderUID int) {
	t.Helper()
	conf, err := filepath.Abs("../../deploy/sysusers.d/ota.conf")
	if err != nil {
		t.Fatal(err)
	}
	extra := filepath.Join(t.TempDir(), "intruder.conf")
	if err := os.WriteFile(extra, []byte("u "+intruderUser+" - \"privsplit third uid\" / /usr/sbin/nologin\nm "+intruderUser+" "+otaGroup+"\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := run("systemd-sysusers", conf, extra); err != nil {
		t.Fatalf("systemd-sysusers: %v\n%s", err, out)
	}
	u, err := user.Lookup(netUser)
	if err != nil {
		t.Fatal(err)
	}
	g, err := user.LookupGroup(otaGroup)
	if err != nil {
		t.Fatal(err)
	}
	if u.Gid != g.Gid {
		t.Errorf("%s's primary group is %s, want %s (%s)", netUser, u.Gid, otaGroup, g.Gid)
	}
	i, err := user.Lookup(intruderUser)
	if err != nil {
		t.Fatal(err)
	}
	return atoi(t, u.Uid), atoi(t, g.Gid), atoi(t, i.Uid)
}

// slots attaches two loop devices over root-only backing files, or returns
// two root-only files (mode 0600) when loop devices cannot be had here.
func slots(t *testing.T, dir string) (a, b, kind string) {
	t.Helper()
	var devs []string
	for _, n := range []string{"a", "b"} {
		f := filepath.Join(dir, "slot-"+n+".img")
		if err := os.WriteFile(f, nil, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Truncate(f, slotSize); err != nil {
			t.Fatal(err)
		}
		out, err := exec.Command("losetup", "--find", "--show", f).Output()
		if err != nil {
			t.Logf("losetup unavailable (%v): using root-owned files as slots", err)
			for _, d := range devs {
				exec.Command("losetup", "-d", d).Run()
			}
			fa, fb := filepath.Join(dir, "slot-a.img"), filepath.Join(dir, "slot-b.img")
			// Reachable by path (the parent is traversable): only the mode protects them.
			mustChmod(t, dir, 0o711)
			return fa, fb, "root-owned files 0600"
		}
		d := strings.TrimSpace(string(out))
		devs = append(devs, d)
		t.Cleanup(func() {
			if out, err := exec.Command("losetup", "-d", d).CombinedOutput(); err != nil {
				t.Errorf("losetup -d %s: %v %s", d, err, out)
			}
		})
	}
	return devs[0], devs[1], "loop devices"
}

// deploySlots turns the harness's device into the deployed layout: the
// factory image moves onto slot a, the writer's configuration names the real
// slots, allows ota-net's uid and gives the socket to group ota, and ota-net
// owns its own configuration and state, as on a gateway.
func deploySlots(t *testing.T, dev *harness.Device, slotA, slotB string, netUID, otaGID int) {
	t.Helper()
	factory, err := os.ReadFile(dev.SlotA)
	if err != nil {
		t.Fatal(err)
	}
	if err := writeAt(slotA, factory); err != nil {
		t.Fatal(err)
	}
	for _, f := range []string{dev.SlotA, dev.SlotB} {
		os.Remove(f)
	}
	var w map[string]any
	if _, err := toml.DecodeFile(dev.WriterConfig, &w); err != nil {
		t.Fatal(err)
	}
	w["peer_uids"] = []int{netUID}
	w["socket_group"] = otaGroup
	targets, ok := w["target"].([]map[string]any)
	if !ok || len(targets) != 1 {
		t.Fatalf("harness writer configuration: unexpected targets %#v", w["target"])
	}
	targets[0]["slots"] = []string{slotA, slotB}
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(w); err != nil {
		t.Fatal(err)
	}
	if _, err := config.Parse(buf.Bytes()); err != nil {
		t.Fatalf("writer configuration refused: %v\n%s", err, buf.Bytes())
	}
	if err := os.WriteFile(dev.WriterConfig, buf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, p := range []string{dev.NetConfig, dev.NetState} {
		if err := os.Chown(p, netUID, otaGID); err != nil {
			t.Fatal(err)
		}
	}
	// What the writer keeps is root's alone.
	for _, p := range []string{dev.WriterState, filepath.Join(dev.Dir, "keys")} {
		mustChmod(t, p, 0o700)
	}
}

func writeAt(path string, data []byte) error {
	f, err := os.OpenFile(path, os.O_WRONLY, 0)
	if err != nil {
		return err
	}
	if _, err := f.Write(data); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	return f.Close()
}

func checkSocket(t *testing.T, sock string, otaGID int) {
	t.Helper()
	out, err := run("stat", "-c", "%a %u %g %F", sock)
	if err != nil {
		t.Fatal(err)
	}
	if got, want := strings.TrimSpace(out), fmt.Sprintf("660 0 %d socket", otaGID); got != want {
		t.Errorf("writer socket: %q, want %q (root:ota 0660)", got, want)
	}
}

// checkNetProcess reads the running ota-net's credentials from the kernel.
func checkNetProcess(t *testing.T, pid, uid, gid int) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		t.Fatal(err)
	}
	fields := map[string]string{}
	for _, line := range strings.Split(string(b), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			fields[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	u, g := strconv.Itoa(uid), strconv.Itoa(gid)
	want := map[string]string{
		"Uid":        strings.Join([]string{u, u, u, u}, " "),
		"Gid":        strings.Join([]string{g, g, g, g}, " "),
		"Groups":     "",
		"CapInh":     "0000000000000000",
		"CapPrm":     "0000000000000000",
		"CapEff":     "0000000000000000",
		"CapBnd":     "0000000000000000",
		"CapAmb":     "0000000000000000",
		"NoNewPrivs": "1",
	}
	got := map[string]string{}
	for k := range want {
		got[k] = fields[k]
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("ota-net (pid %d) credentials (-want +got):\n%s", pid, d)
	}
}

func checkSlotHolds(t *testing.T, slot, img string) {
	t.Helper()
	want, err := os.ReadFile(img)
	if err != nil {
		t.Fatal(err)
	}
	f, err := os.Open(slot)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, len(want))
	if _, err := io.ReadFull(f, got); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Errorf("slot %s does not hold the new image", slot)
	}
}

// someFile returns a regular file inside dir (read as root).
func someFile(t *testing.T, dir string) string {
	t.Helper()
	var found string
	filepath.WalkDir(dir, func(p string, d os.DirEntry, err error) error {
		if err == nil && found == "" && d.Type().IsRegular() {
			found = p
		}
		return nil
	})
	if found == "" {
		t.Fatalf("no file in %s", dir)
	}
	return found
}

// as runs argv with the real, effective and saved uid of name, its primary
// group (or group when set), supplementary groups only group, and no
// capabilities: what a process of that user can do.
func as(name, group string, argv ...string) (string, error) {
	u, err := user.Lookup(name)
	if err != nil {
		return "", err
	}
	args := []string{"--reuid=" + u.Uid, "--inh-caps=-all", "--bounding-set=-all", "--no-new-privs"}
	if group != "" {
		args = append(args, "--regid="+u.Gid, "--groups="+group)
	} else {
		args = append(args, "--regid="+u.Gid, "--clear-groups")
	}
	return run("setpriv", append(append(args, "--"), argv...)...)
}

// denied asserts that argv fails as name with EACCES.
func denied(t *testing.T, name, group string, argv ...string) {
	t.Helper()
	if _, err := os.Stat(argv[len(argv)-1]); err != nil && !strings.Contains(argv[len(argv)-1], "=") {
		t.Fatalf("%s: %v (the proof needs it to exist)", argv[len(argv)-1], err)
	}
	out, err := as(name, group, argv...)
	if err == nil || !strings.Contains(out, "Permission denied") {
		t.Errorf("as %s: %s: %v, want Permission denied:\n%s", name, strings.Join(argv, " "), err, out)
	}
	// The control: root can, so the denial is about who asks.
	if out, err := run(argv[0], argv[1:]...); err != nil && !strings.HasPrefix(argv[1], "if=/dev/zero") {
		t.Errorf("as root: %s: %v\n%s", strings.Join(argv, " "), err, out)
	}
}

func allowed(t *testing.T, name, group string, argv ...string) {
	t.Helper()
	if out, err := as(name, group, argv...); err != nil {
		t.Errorf("as %s: %s: %v\n%s", name, strings.Join(argv, " "), err, out)
	}
}

func run(name string, args ...string) (string, error) {
	var buf bytes.Buffer
	cmd := exec.Command(name, args...)
	cmd.Stdout, cmd.Stderr = &buf, &buf
	err := cmd.Run()
	var ee *exec.ExitError
	if err != nil && !errors.As(err, &ee) {
		return buf.String(), err
	}
	return buf.String(), err
}

func install(t *testing.T, src, dst string) string {
	t.Helper()
	b, err := os.ReadFile(src)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(dst, b, 0o755); err != nil {
		t.Fatal(err)
	}
	return dst
}

func mustChmod(t *testing.T, p string, m os.FileMode) {
	t.Helper()
	if err := os.Chmod(p, m); err != nil {
		t.Fatal(err)
	}
}

func atoi(t *testing.T, s string) int {
	t.Helper()
	n, err := strconv.Atoi(s)
	if err != nil {
		t.Fatal(err)
	}
	return n
}
