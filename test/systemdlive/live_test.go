// Package systemdlive proves the hardened deployment live: the project's .deb installed with
// dpkg into a Debian root file system, booted by systemd-nspawn with a real systemd 252 as
// PID 1, whole OTAs run through the installed units (ota-writer.socket activating
// ota-writer.service, ota-net.service), every sandbox claim of deploy/README.md checked on
// the running services next to a negative control that shows the observation would differ
// without it, and crashes, restarts, a hung writer and container reboots mid-download.
//
// It runs as root (the test command installs systemd-container and mmdebstrap); without them
// it skips, except under CI=true, where a missing prerequisite fails.
package systemdlive

import (
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"

	"github.com/gwota/gwota/test/testenv"
)

const (
	thing    = "gw-live"
	probeBin = "/usr/local/libexec/gwota-probe"
	slotDir  = "/srv/ota-slots"
	// A directory ota-net owns outside its StateDirectory: its permissions allow the write,
	// only ProtectSystem=strict refuses it.
	netScratch = "/srv/ota-net-scratch"
	bootIDCopy = "/run/gwota-test-boot-id"
	signerCN   = "live-signer"
	imageSize  = 1 << 20 // 16 stream blocks of 64 KiB
	// Paced jobs hold every stream response back this long (one block per request, one
	// request in flight), so a fault lands with most of the image still to come.
	paceDelay = 100 * time.Millisecond
	midBlocks = 4
)

var (
	receiving = harness.Step{Status: backend.StatusInProgress, SelfTest: "receiving"}
	ready     = harness.Step{Status: backend.StatusInProgress, SelfTest: "ready"}
	active    = harness.Step{Status: backend.StatusInProgress, SelfTest: "active"}
	accepted  = harness.Step{Status: backend.StatusSucceeded, SelfTest: "accepted"}
	happy     = []harness.Step{receiving, ready, active, accepted}
	terminal  = []string{backend.StatusSucceeded, backend.StatusFailed, backend.StatusRejected,
		backend.StatusCanceled, backend.StatusTimedOut, backend.StatusRemoved}
)

// requirePrereqs skips (fails under CI=true) when the machine cannot run the container.
func requirePrereqs(t *testing.T) {
	t.Helper()
	var missing []string
	if os.Getuid() != 0 {
		missing = append(missing, "root")
	}
	for _, c := range []string{"systemd-nspawn", "mmdebstrap", "ip", "nsenter", "losetup", "tar"} {
		if _, err := exec.LookPath(c); err != nil {
			missing = append(missing, c)
		}
	}
	if len(missing) == 0 {
		return
	}
	msg := fmt.Sprintf("live systemd deployment test needs %v (scripts/test.sh installs systemd-container, mmdebstrap, iproute2 as root)", missing)
	testenv.Need(t, errors.New(msg))
}

// live is one installed, booted container with the emulator reachable on its loopback.
type live struct {
	t       *testing.T
	ctx     context.Context
	tmp     string
	c       *container
	cloud   *harness.Cloud
	signer  *harness.Signer
	otaNet  int // ota-net's uid in the container
	loopA   string
	loopB   string
	broker  int // emulator broker port on the container's loopback
	llPort  int // a listener on the link-local address
	credSHA map[string]string
	score   map[string]string // systemd-analyze security, live
	// mainBoots are the boot times of the container under test (the negative-control boot
	// replaces it at the end).
	mainBoots []time.Duration
	timing    map[string]time.Duration
}

func TestLiveDeployment(t *testing.T) {
	requirePrereqs(t)
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Minute)
	defer cancel()
	l := setUp(t, ctx)

	t.Run("InstalledNothingStarted", l.testInstalled)
	t.Run("SocketActivatedOTA", l.testOTA)
	t.Run("WriterSandbox", l.testWriterSandbox)
	t.Run("NetSandbox", l.testNetSandbox)
	t.Run("ThirdUserRefused", l.testThirdUser)
	t.Run("NotifyAndWatchdog", l.testWatchdog)
	for _, f := range []struct{ name, unit, how string }{
		{"KillNet", "ota-net.service", "kill"},
		{"KillWriter", "ota-writer.service", "kill"},
		{"RestartNet", "ota-net.service", "restart"},
		{"RestartWriter", "ota-writer.service", "restart"},
	} {
		t.Run("Fault"+f.name, func(t *testing.T) { l.testServiceFault(t, f.unit, f.how) })
	}
	t.Run("FaultContainerReboot", l.testRebootMidDownload)
	t.Run("SameUpdateOutsideSystemd", l.testOutside)
	t.Run("SystemdBuildAndAnalyze", l.testPlatform)
	t.Run("WithoutBPFNotEnforced", l.testWithoutBPF)

	bt := l.mainBoots
	if bt == nil {
		bt = l.c.BootTimes()
	}
	t.Logf("FIGURES: rootfs tarball %s; extract %s; .deb build %s; boots %d, first boot %s, all %v; from job creation and a cold start of both daemons to ready (downloaded, verified, activated) under systemd %s, outside %s; to SUCCEEDED (reboot, trial, commit) under systemd %s (a container reboot), outside %s (both processes restarted)",
		l.timing["rootfs"], l.timing["extract"], l.timing["deb"], len(bt), first(bt), bt,
		l.timing["ota-ready"], l.timing["outside-ready"], l.timing["ota"], l.timing["outside"])
}

func first(d []time.Duration) time.Duration {
	if len(d) == 0 {
		return 0
	}
	return d[0]
}

func setUp(t *testing.T, ctx context.Context) *live {
	t.Helper()
	root, err := harness.ModuleRoot(ctx)
	if err != nil {
		t.Fatal(err)
	}
	tmp, err := os.MkdirTemp("/var/tmp", "gwota-live-")
	if err != nil {
		t.Fatal(err)
	}
	l := &live{t: t, ctx: ctx, tmp: tmp, timing: map[string]time.Duration{}, score: map[string]string{}}
	t.Cleanup(func() {
		if t.Failed() || os.Getenv("GWOTA_LIVE_KEEP") != "" {
			t.Logf("container root kept: %s", tmp)
			return
		}
		os.RemoveAll(tmp)
	})

	tarball, built, took, err := rootfsTarball(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if built {
		l.timing["rootfs"] = took
		t.Logf("built %s with mmdebstrap in %s", tarball, took.Round(time.Millisecond))
	} else {
		t.Logf("using cached %s", tarball)
	}

	begin := time.Now()
	pkg := exec.CommandContext(ctx, "scripts/package.sh", filepath.Join(tmp, "out"))
	pkg.Dir = root
	out, err := pkg.Output()
	if err != nil {
		t.Fatalf("scripts/package.sh: %v\n%s", err, out)
	}
	lines := strings.Split(strings.TrimSpace(string(out)), "\n")
	deb := lines[len(lines)-1]
	l.timing["deb"] = time.Since(begin)

	dir := filepath.Join(tmp, "root")
	begin = time.Now()
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.CommandContext(ctx, "tar", "-C", dir, "-xpf", tarball).CombinedOutput(); err != nil {
		t.Fatalf("extracting %s: %v\n%s", tarball, err, out)
	}
	l.timing["extract"] = time.Since(begin)

	// Two loop devices: the writer's drop-in allows the first only.
	for i, p := range []*string{&l.loopA, &l.loopB} {
		back := filepath.Join(tmp, fmt.Sprintf("loop%d.img", i))
		if err := os.WriteFile(back, make([]byte, 1<<20), 0o600); err != nil {
			t.Fatal(err)
		}
		out, err := exec.CommandContext(ctx, "losetup", "--find", "--show", back).Output()
		if err != nil {
			t.Fatalf("losetup: %v", err)
		}
		*p = strings.TrimSpace(string(out))
		dev := *p
		t.Cleanup(func() { _ = exec.Command("losetup", "-d", dev).Run() })
	}

	name := fmt.Sprintf("gwota-live-%d", os.Getpid())
	c, err := newContainer(dir, name, filepath.Join(tmp, "nspawn.log"), []string{l.loopA, l.loopB})
	if err != nil {
		t.Fatal(err)
	}
	l.c = c
	t.Cleanup(func() {
		c := l.c // the negative-control boot replaces it
		if t.Failed() && c.PID1() != 0 {
			out, _ := c.Exec(context.Background(), "journalctl", "--no-pager", "-o", "short-monotonic", "-u", "ota-writer.service", "-u", "ota-net.service", "-u", "ota-writer.socket")
			t.Logf("journal of the units (all boots):\n%s", tail(out, 300))
		}
		if err := c.Stop(); err != nil {
			t.Errorf("halting the container: %v", err)
		}
	})

	// Install exactly as an operator does: dpkg -i inside the root file system.
	if err := copyFile(deb, c.hostPath("/var/tmp/gwota.deb"), 0o644); err != nil {
		t.Fatal(err)
	}
	out2, err := c.Run(ctx, "dpkg", "-i", "/var/tmp/gwota.deb")
	if err != nil {
		t.Fatalf("dpkg -i: %v\n%s", err, out2)
	}
	t.Logf("dpkg -i:\n%s", strings.TrimSpace(out2))
	// A third user allowed through the socket's group gate, to be refused by the writer.
	if out, err := c.Run(ctx, "useradd", "--system", "--no-create-home", "-G", "ota", "intruder"); err != nil {
		t.Fatalf("useradd: %v\n%s", err, out)
	}
	// The probe, and a persistent journal (failure reports span reboots).
	probe := exec.CommandContext(ctx, "go", "build", "-o", c.hostPath(probeBin), "./test/systemdlive/probe")
	probe.Dir, probe.Env = root, append(os.Environ(), "CGO_ENABLED=0")
	if out, err := probe.CombinedOutput(); err != nil {
		t.Fatalf("building the probe: %v\n%s", err, out)
	}
	if err := os.MkdirAll(c.hostPath("/var/log/journal"), 0o2755); err != nil {
		t.Fatal(err)
	}
	if l.otaNet, err = lookupUID(c.hostPath("/etc/passwd"), "ota-net"); err != nil {
		t.Fatal(err)
	}
	if err := c.Boot(ctx); err != nil {
		t.Fatal(err)
	}

	// The emulator runs in this process, its sockets made inside the container's network
	// namespace: the device reaches it on its own loopback, as through a local proxy.
	if err := inNetNS(c.NetNS, func() error {
		cl, err := harness.StartCloud(ctx, emulator.Options{Thing: thing})
		if err != nil {
			return err
		}
		l.cloud = cl
		ln, err := net.Listen("tcp", linkLocalAddr+":0")
		if err != nil {
			return err
		}
		l.llPort = ln.Addr().(*net.TCPAddr).Port
		go acceptAndClose(ln)
		t.Cleanup(func() { ln.Close() })
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = l.cloud.Close() })
	u := strings.TrimPrefix(l.cloud.BrokerURL(), "mqtt://")
	_, port, _ := net.SplitHostPort(u)
	l.broker, _ = strconv.Atoi(port)

	if l.signer, err = harness.NewSigner(signerCN); err != nil {
		t.Fatal(err)
	}
	return l
}

func acceptAndClose(ln net.Listener) {
	for {
		c, err := ln.Accept()
		if err != nil {
			return
		}
		c.Close()
	}
}

// configure writes what the operator writes after installing (deploy/README steps 2-6):
// trust store, writer configuration with file-backed A/B slots and the file boot backend, the
// board drop-in, ota-net's credentials and configuration.
func (l *live) configure(t *testing.T) {
	t.Helper()
	c := l.c
	must := func(err error) {
		t.Helper()
		if err != nil {
			t.Fatal(err)
		}
	}
	must(os.WriteFile(c.hostPath("/etc/ota/keys/"+l.signer.CertName), l.signer.CertPEM, 0o600))
	must(os.MkdirAll(c.hostPath(slotDir), 0o700))
	must(harness.WriteImage(c.hostPath(slotDir+"/slot-a.img"), 64<<10, 42))
	must(os.Chmod(c.hostPath(slotDir+"/slot-a.img"), 0o600))
	must(os.WriteFile(c.hostPath(slotDir+"/slot-b.img"), nil, 0o600))
	must(os.MkdirAll(c.hostPath(netScratch), 0o700))
	must(os.Chown(c.hostPath(netScratch), l.otaNet, -1))
	must(os.WriteFile(c.hostPath("/etc/ota/writer.toml"), []byte(fmt.Sprintf(`socket = "/run/ota/writer.sock"
socket_group = "ota"
state_dir = "/var/lib/ota-writer"
peer_users = ["ota-net"]
trusted_keys = ["/etc/ota/keys/%s"]
reboot_command = ["/usr/bin/systemctl", "reboot"]
version_policy = "any"
sync_bytes = 65536
sync_interval = "200ms"
self_test_timeout = "60s"
log_level = "debug"

[boot]
backend = "file"
boot_id_file = "%s"

[[target]]
name = "rootfs"
kind = "ab"
file_types = [0]
file_paths = [%q]
slots = ["%s/slot-a.img", "%s/slot-b.img"]

# Runs inside the writer's sandbox and asks systemd over its private socket.
[[check]]
name = "ota-net-active"
command = ["/usr/bin/systemctl", "is-active", "--quiet", "ota-net.service"]
timeout = "20s"
`, l.signer.CertName, bootIDCopy, harness.DevicePath, slotDir, slotDir)), 0o644))
	// The file boot backend takes its bootloader step once per boot, told by the boot id. In
	// this container the writer's sandbox does not see the container's boot id: nspawn
	// gives each container boot its own by a bind mount over /proc/sys/kernel/random/boot_id,
	// but ProtectProc= mounts the writer a fresh /proc, which shows the host's, the same at
	// every container boot. A unit copies PID 1's view to /run (a new tmpfs each boot) first.
	must(os.WriteFile(c.hostPath("/etc/systemd/system/gwota-test-boot-id.service"), []byte(`[Unit]
Description=test: the container's boot id where the writer's sandbox reads it
DefaultDependencies=no
Before=sysinit.target ota-writer.socket ota-writer.service

[Service]
Type=oneshot
ExecStart=/bin/cp /proc/sys/kernel/random/boot_id `+bootIDCopy+`

[Install]
WantedBy=sysinit.target
`), 0o644))
	must(os.MkdirAll(c.hostPath("/etc/systemd/system/sysinit.target.wants"), 0o755))
	must(os.Symlink("../gwota-test-boot-id.service", c.hostPath("/etc/systemd/system/sysinit.target.wants/gwota-test-boot-id.service")))
	must(os.MkdirAll(c.hostPath("/etc/systemd/system/ota-writer.service.d"), 0o755))
	must(os.WriteFile(c.hostPath("/etc/systemd/system/ota-writer.service.d/board.conf"), []byte(fmt.Sprintf(`[Service]
ReadWritePaths=%s
DeviceAllow=%s rw
`, slotDir, l.loopA)), 0o644))
	// Device identity: no TLS with the emulator, but the files still travel through
	// LoadCredential= and the test checks what the service receives.
	l.credSHA = map[string]string{}
	for i, n := range []string{"device.crt.pem", "device.key.pem"} {
		b := []byte(fmt.Sprintf("credential %d %s %d\n", i, n, time.Now().UnixNano()))
		must(os.WriteFile(c.hostPath("/etc/ota/net/"+n), b, 0o600))
		l.credSHA["tls_"+n] = sha256hex(b)
	}
	must(os.WriteFile(c.hostPath("/etc/ota/net.toml"), []byte(fmt.Sprintf(`broker = "mqtt://127.0.0.1:%d"
thing_name = %q
writer_socket = "/run/ota/writer.sock"
state_dir = "/var/lib/ota-net"
report_interval = "100ms"
report_percent_step = 1
blocks_per_request = 1
requests_in_flight = 1
log_level = "debug"
`, l.broker, thing)), 0o644))
}

func (l *live) sh(t *testing.T, argv ...string) string {
	t.Helper()
	out, err := l.c.Exec(l.ctx, argv...)
	if err != nil {
		t.Fatal(err)
	}
	return strings.TrimSpace(out)
}

func (l *live) show(t *testing.T, unit, prop string) string {
	t.Helper()
	return l.sh(t, "systemctl", "show", "-P", prop, unit)
}

// testInstalled: dpkg created the users and directories and enabled the units; with no
// configuration yet, the boot started nothing.
func (l *live) testInstalled(t *testing.T) {
	if got := l.sh(t, "getent", "passwd", "ota-net"); !strings.Contains(got, ":/var/lib/ota-net:/usr/sbin/nologin") {
		t.Errorf("ota-net user: %q", got)
	}
	for _, u := range []string{"ota-writer.socket", "ota-net.service"} {
		if got := l.show(t, u, "UnitFileState"); got != "enabled" {
			t.Errorf("%s is %q after dpkg -i, want enabled", u, got)
		}
	}
	for _, u := range []string{"ota-writer.socket", "ota-writer.service", "ota-net.service"} {
		if got := l.show(t, u, "ActiveState"); got != "inactive" {
			t.Errorf("%s is %q at the first boot without configuration, want inactive", u, got)
		}
	}
	// The negative control: the same units are enabled and wanted at boot; only their
	// ConditionPathExists= kept them from running.
	if got := l.show(t, "ota-net.service", "ConditionResult"); got != "no" {
		t.Errorf("ota-net.service ConditionResult %q, want no (skipped for lack of /etc/ota/net.toml)", got)
	}
	for p, want := range map[string]string{"/etc/ota/keys": "700 root", "/etc/ota/net": "700 root", "/var/lib/ota-writer": "700 root", "/var/lib/ota-net": "700 ota-net"} {
		if got := l.sh(t, "stat", "-c", "%a %U", p); got != want {
			t.Errorf("%s: %q, want %q", p, got, want)
		}
	}

	l.configure(t)
	l.sh(t, "systemctl", "daemon-reload")
	l.sh(t, "systemctl", "start", "gwota-test-boot-id.service")
	l.sh(t, "systemctl", "start", "ota-writer.socket")
	if got := l.show(t, "ota-writer.service", "ActiveState"); got != "inactive" {
		t.Errorf("ota-writer.service %q after starting only the socket, want inactive (socket activation)", got)
	}
	if got := l.sh(t, "stat", "-c", "%a %U %G %F", "/run/ota/writer.sock"); got != "660 root ota socket" {
		t.Errorf("writer socket: %q", got)
	}
}

// slotOf reads the file boot backend's state: the booted and committed slot.
func (l *live) bootState(t *testing.T) (booted, committed string) {
	t.Helper()
	b, err := os.ReadFile(l.c.hostPath("/var/lib/ota-writer/boot-state.json"))
	if os.IsNotExist(err) {
		return "a", "a"
	}
	if err != nil {
		t.Fatal(err)
	}
	var st struct{ Booted, Committed string }
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st.Booted, st.Committed
}

type jobRun struct {
	id       string
	img      string
	target   string // slot written
	bootsAt  int
	created  time.Time
	duration time.Duration
}

// startJob creates a signed job for a fresh image; paced jobs have their stream held back.
func (l *live) startJob(t *testing.T, id string, seed uint64, paced bool) *jobRun {
	t.Helper()
	img := filepath.Join(l.tmp, id+".img")
	if err := harness.WriteImage(img, imageSize, seed); err != nil {
		t.Fatal(err)
	}
	booted, _ := l.bootState(t)
	target := "b"
	if booted == "b" {
		target = "a"
	}
	if paced {
		l.cloud.SetFaults(id, emulator.Faults{Delay: paceDelay})
	}
	j := &jobRun{id: id, img: img, target: target, bootsAt: l.c.Boots(), created: time.Now()}
	if err := l.cloud.CreateJob(l.ctx, backend.JobSpec{JobID: id, Protocols: []string{backend.ProtocolMQTT},
		Files: []backend.FileSpec{l.signer.File(img)}}); err != nil {
		t.Fatal(err)
	}
	return j
}

func (l *live) waitMid(t *testing.T, j *jobRun) {
	t.Helper()
	ctx, cancel := context.WithTimeout(l.ctx, 2*time.Minute)
	defer cancel()
	if _, err := l.cloud.WaitProgress(ctx, j.id, midBlocks); err != nil {
		t.Fatal(err)
	}
}

// finish waits for the job's end and checks it: SUCCEEDED through every phase, the image's
// bytes in the slot written, that slot booted and committed after a container reboot.
func (l *live) finish(t *testing.T, j *jobRun) {
	t.Helper()
	l.cloud.ClearFaults(j.id)
	ctx, cancel := context.WithTimeout(l.ctx, 3*time.Minute)
	defer cancel()
	ex, err := l.cloud.WaitStatus(ctx, j.id, terminal...)
	if err != nil {
		t.Fatalf("job %s did not end: %v; updates %v", j.id, err, harness.Steps(l.cloud.Updates(j.id)))
	}
	j.duration = time.Since(j.created)
	if ex.Status != backend.StatusSucceeded {
		t.Fatalf("job %s ended %s %v", j.id, ex.Status, ex.StatusDetails)
	}
	us := l.cloud.Updates(j.id)
	if diff := cmp.Diff(happy, harness.Steps(us)); diff != "" {
		t.Errorf("job %s status sequence (-want +got):\n%s", j.id, diff)
	}
	want, err := harness.FileSHA256(j.img)
	if err != nil {
		t.Fatal(err)
	}
	got, err := harness.FilePrefixSHA256(l.c.hostPath(fmt.Sprintf("%s/slot-%s.img", slotDir, j.target)), imageSize)
	if err != nil || got != want {
		t.Errorf("slot %s holds %s (%v), want the image %s", j.target, got, err, want)
	}
	// The job ends during the boot that took the trial; the test goes on once it is over.
	if err := l.c.WaitBoots(ctx, j.bootsAt+1); err != nil {
		t.Fatalf("job %s succeeded, but the container did not boot again: %v", j.id, err)
	}
	if booted, committed := l.bootState(t); booted != j.target || committed != j.target {
		t.Errorf("after job %s booted %q committed %q, want %q", j.id, booted, committed, j.target)
	}
}

// testOTA: a whole OTA through the installed units; the writer's reboot_command reboots the
// container through systemd, which boots again on the same disk into the trial.
func (l *live) testOTA(t *testing.T) {
	// The job exists before ota-net first starts, as in test/e2e: one created while ota-net is
	// starting can be failed by its start-up reconciliation (a stale "no next job" answer
	// applied after the job's notification: user_abort/2006), a defect of ota-net's.
	j := l.startJob(t, "live-ota", 101, false)
	readyIn := timeToReady(l.ctx, l.cloud, j.id, j.created)
	l.sh(t, "systemctl", "start", "ota-net.service")
	l.finish(t, j)
	l.timing["ota"] = j.duration
	l.timing["ota-ready"] = <-readyIn
	// The writer ran from the socket systemd passed, never binding its own.
	log := l.sh(t, "journalctl", "--no-pager", "-o", "cat", "-u", "ota-writer.service")
	if !strings.Contains(log, "using socket passed by systemd") {
		t.Errorf("ota-writer never reported the socket passed by systemd:\n%s", tail(log, 30))
	}
	// Blocks crossed through the writer's shared buffer: the hardened units allow the side
	// channel (memfd_create, SCM_RIGHTS, the mappings), and ota-net did not fall back.
	if !strings.Contains(log, "shared block buffer handed out") {
		t.Errorf("ota-writer never handed out a shared block buffer:\n%s", tail(log, 30))
	}
	if netLog := l.sh(t, "journalctl", "--no-pager", "-o", "cat", "-u", "ota-net.service"); strings.Contains(netLog, "no shared block buffer") {
		t.Errorf("ota-net sent blocks inside the messages under systemd:\n%s", tail(netLog, 30))
	}
	if got := l.show(t, "ota-writer.service", "TriggeredBy"); got != "ota-writer.socket" {
		t.Errorf("ota-writer.service TriggeredBy %q", got)
	}
	t.Logf("update of %d bytes under systemd: %s (boots so far %d)", imageSize, j.duration.Round(time.Millisecond), l.c.Boots())
}

// procStatus reads /proc/PID/status fields inside the container.
func (l *live) procStatus(t *testing.T, pid string) map[string]string {
	t.Helper()
	m := map[string]string{}
	for _, line := range strings.Split(l.sh(t, "cat", "/proc/"+pid+"/status"), "\n") {
		if k, v, ok := strings.Cut(line, ":"); ok {
			m[k] = strings.Join(strings.Fields(v), " ")
		}
	}
	return m
}

// netDevs lists the interfaces of PID's network namespace.
func (l *live) netDevs(t *testing.T, pid string) []string {
	t.Helper()
	var out []string
	for _, line := range strings.Split(l.sh(t, "cat", "/proc/"+pid+"/net/dev"), "\n") {
		if name, _, ok := strings.Cut(line, ":"); ok && !strings.Contains(name, "|") {
			out = append(out, strings.TrimSpace(name))
		}
	}
	slices.Sort(out)
	return out
}

func (l *live) mainPID(t *testing.T, unit string) string {
	t.Helper()
	pid := l.show(t, unit, "MainPID")
	if pid == "" || pid == "0" {
		t.Fatalf("%s has no main process", unit)
	}
	return pid
}

type result struct {
	Op    string `json:"op"`
	OK    bool   `json:"ok"`
	Err   string `json:"err"`
	Value string `json:"value"`
}

func parseProbe(t *testing.T, b []byte) map[string]result {
	t.Helper()
	var rs []result
	if err := json.Unmarshal(b, &rs); err != nil {
		t.Fatalf("probe output %q: %v", b, err)
	}
	m := map[string]result{}
	for _, r := range rs {
		m[r.Op] = r
	}
	return m
}

// probeInUnit runs the probe as an ExecStartPre= of the real unit (same user, namespaces,
// capabilities, seccomp filter, cgroup BPF programs as its ExecStart=), through a drop-in
// that adds nothing else, and restarts the unit.
func (l *live) probeInUnit(t *testing.T, unit, stateDir string, ops ...string) map[string]result {
	t.Helper()
	out := stateDir + "/probe.json"
	_ = os.Remove(l.c.hostPath(out))
	dropDir := l.c.hostPath("/etc/systemd/system/" + unit + ".d")
	if err := os.MkdirAll(dropDir, 0o755); err != nil {
		t.Fatal(err)
	}
	drop := filepath.Join(dropDir, "zz-probe.conf")
	if err := os.WriteFile(drop, []byte(fmt.Sprintf("[Service]\nExecStartPre=%s --out %s %s\n", probeBin, out, strings.Join(ops, " "))), 0o644); err != nil {
		t.Fatal(err)
	}
	defer func() {
		os.Remove(drop)
		l.sh(t, "systemctl", "daemon-reload")
	}()
	l.sh(t, "systemctl", "daemon-reload")
	// --no-block: the probe's result is complete before ExecStart= runs, whether or not the
	// daemon then becomes ready (in the negative-control boot ota-net has no broker).
	l.sh(t, "systemctl", "restart", "--no-block", unit)
	var b []byte
	l.waitFor(t, "the probe's result in "+unit, time.Minute, func() bool {
		var err error
		b, err = os.ReadFile(l.c.hostPath(out))
		return err == nil
	})
	return parseProbe(t, b)
}

// probeOutside runs the probe in the container as a plain process of the given user, outside
// any unit: the negative control.
func (l *live) probeOutside(t *testing.T, user string, ops ...string) map[string]result {
	t.Helper()
	argv := []string{probeBin}
	if user != "root" {
		argv = []string{"setpriv", "--reuid=" + user, "--regid=ota", "--init-groups", probeBin}
	}
	return parseProbe(t, []byte(l.sh(t, append(argv, ops...)...)))
}

// expect compares probe results: "ok" or the errno name.
func expect(t *testing.T, where string, got map[string]result, want map[string]string) {
	t.Helper()
	for op, w := range want {
		r, found := got[op]
		switch {
		case !found:
			t.Errorf("%s: %s not probed", where, op)
		case w == "ok" && !r.OK:
			t.Errorf("%s: %s failed with %s, want success", where, op, r.Err)
		case w == "dropped":
			if r.OK || !strings.Contains(r.Err, "timeout") {
				t.Errorf("%s: %s: ok=%v err=%q, want the packets dropped (a timeout)", where, op, r.OK, r.Err)
			}
		case w != "ok" && (r.OK || (w != "any" && r.Err != w)):
			t.Errorf("%s: %s: ok=%v err=%q, want %s", where, op, r.OK, r.Err, w)
		}
	}
}

func keys(m map[string]string) []string {
	var ks []string
	for k := range m {
		ks = append(ks, k)
	}
	slices.Sort(ks)
	return ks
}

// testWriterSandbox: the running writer is root with no capabilities, no network but its
// own lo, the syscall filter on; in its unit it writes only its state and slot paths, opens
// only the allowed device, has no AF_INET, and is refused @privileged/@resources calls.
// Outside the unit, root in the same container does all of it.
func (l *live) testWriterSandbox(t *testing.T) {
	pid := l.mainPID(t, "ota-writer.service")
	st, init := l.procStatus(t, pid), l.procStatus(t, "1")
	for k, want := range map[string]string{"Uid": "0 0 0 0", "CapEff": "0000000000000000", "CapPrm": "0000000000000000",
		"CapBnd": "0000000000000000", "CapAmb": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"} {
		if st[k] != want {
			t.Errorf("ota-writer %s: %q, want %q", k, st[k], want)
		}
	}
	if init["CapEff"] == "0000000000000000" || init["NoNewPrivs"] != "0" {
		t.Errorf("negative control: the container's PID 1 has CapEff %s NoNewPrivs %s, want capabilities and no NoNewPrivs", init["CapEff"], init["NoNewPrivs"])
	}
	if got := l.netDevs(t, pid); !slices.Equal(got, []string{"lo"}) {
		t.Errorf("ota-writer sees interfaces %v, want only lo", got)
	}
	if got := l.netDevs(t, "1"); !slices.Contains(got, "gwv0") {
		t.Errorf("negative control: the container has interfaces %v, want gwv0 among them", got)
	}

	cert := "/etc/ota/keys/" + l.signer.CertName
	want := map[string]string{
		"whoami":                              "ok",
		"create:/var/lib/ota-writer/probe-x":  "ok",
		"create:" + slotDir + "/probe-x":      "ok",
		"open-rw:" + slotDir + "/slot-a.img":  "ok",
		"open-r:" + cert:                      "ok",
		"open-rw:" + l.loopA:                  "ok",
		"open-rw:" + l.loopB:                  "EPERM", // device cgroup (BPF): not in DeviceAllow=
		"create:/etc/ota/probe-x":             "EROFS",
		"create:/var/lib/probe-x":             "EROFS",
		"create:/usr/local/probe-x":           "EROFS",
		"create:/root/probe-x":                "any", // ProtectHome=
		"inet":                                "EAFNOSUPPORT",
		"setuid":                              "EPERM",
		"setpriority":                         "EPERM",
		"connect:127.0.0.1:" + itoa(l.broker): "any",
	}
	ops := keys(want)
	in := l.probeInUnit(t, "ota-writer.service", "/var/lib/ota-writer", ops...)
	expect(t, "in ota-writer.service", in, want)
	if !in["open-rw:"+l.loopA].OK {
		// Seen once on a machine shared with other tests using loop devices: say what the
		// unit allowed and what the nodes and loop devices were.
		t.Logf("DeviceAllow: %s; nodes: %s; host: %s", l.show(t, "ota-writer.service", "DeviceAllow"),
			l.sh(t, "ls", "-l", l.loopA, l.loopB), hostLoops(l.loopA, l.loopB))
	}
	if in["whoami"].Value != "uid=0 gid=0" {
		t.Errorf("in ota-writer.service: %s", in["whoami"].Value)
	}
	out := l.probeOutside(t, "root", ops...)
	all := map[string]string{}
	for _, op := range ops {
		all[op] = "ok"
	}
	expect(t, "negative control, root outside the unit", out, all)
}

func itoa(i int) string { return strconv.Itoa(i) }

// testNetSandbox: the running ota-net is user ota-net with no capabilities; in its unit it
// cannot open the slots, the writer's state or trust store, nor its own credentials' source,
// gets them through LoadCredential=, reaches the emulator on loopback but not a link-local
// address (IPAddressDeny=, BPF), and is refused @privileged/@resources calls.
func (l *live) testNetSandbox(t *testing.T) {
	pid := l.mainPID(t, "ota-net.service")
	st := l.procStatus(t, pid)
	uid := itoa(l.otaNet)
	for k, want := range map[string]string{"Uid": strings.Repeat(uid+" ", 3) + uid, "CapEff": "0000000000000000",
		"CapPrm": "0000000000000000", "CapBnd": "0000000000000000", "NoNewPrivs": "1", "Seccomp": "2"} {
		if st[k] != want {
			t.Errorf("ota-net %s: %q, want %q", k, st[k], want)
		}
	}
	if got := l.netDevs(t, pid); !slices.Contains(got, "gwv0") {
		t.Errorf("ota-net sees interfaces %v, want the container's (gwv0 among them)", got)
	}
	cert := "/etc/ota/keys/" + l.signer.CertName
	cred := "/run/credentials/ota-net.service/tls_device.key.pem"
	want := map[string]string{
		"whoami":                            "ok",
		"open-r:" + slotDir + "/slot-a.img": "EACCES",
		"open-r:/var/lib/ota-writer/boot-state.json": "EACCES",
		"open-r:" + cert:                      "EACCES",
		"open-r:/etc/ota/net/device.key.pem":  "EACCES",
		"open-rw:" + l.loopA:                  "any",
		"creds":                               "ok",
		"open-r:" + cred:                      "ok",
		"create:/var/lib/ota-net/probe-x":     "ok",
		"create:" + netScratch + "/probe-x":   "EROFS", // ota-net owns it, ProtectSystem=strict
		"setuid":                              "EPERM",
		"setpriority":                         "EPERM",
		"inet":                                "ok",
		"connect:127.0.0.1:" + itoa(l.broker): "ok",
		"connect:" + linkLocalAddr + ":" + itoa(l.llPort): "dropped", // IPAddressDeny= (BPF) drops the SYN
	}
	ops := keys(want)
	in := l.probeInUnit(t, "ota-net.service", "/var/lib/ota-net", ops...)
	expect(t, "in ota-net.service", in, want)
	if !strings.HasPrefix(in["whoami"].Value, fmt.Sprintf("uid=%d ", l.otaNet)) {
		t.Errorf("in ota-net.service: %s, want uid %d", in["whoami"].Value, l.otaNet)
	}
	var wantCreds []string
	for _, k := range keys(l.credSHA) {
		wantCreds = append(wantCreds, k+"="+l.credSHA[k])
	}
	if got, w := in["creds"].Value, "/run/credentials/ota-net.service "+strings.Join(wantCreds, ","); got != w {
		t.Errorf("credentials in the unit: %q, want %q", got, w)
	}

	// Negative controls. The writer's sandbox opens what ota-net cannot (so the files exist
	// and the refusals are ota-net's), and ota-net's uid outside the unit is granted the
	// syscalls, the link-local address and still not the root-only files.
	out := l.probeOutside(t, "ota-net", ops...)
	expect(t, "negative control, user ota-net outside the unit", out, map[string]string{
		"setuid":      "ok",
		"setpriority": "ok",
		"connect:" + linkLocalAddr + ":" + itoa(l.llPort): "ok",
		"create:" + netScratch + "/probe-x":               "ok",
		"open-r:" + cred:                                  "ok", // the copy belongs to the service's user
		"creds":                                           "any",
	})
	// A member of group ota (a second user of the writer socket's group) cannot read them.
	x := l.probeOutside(t, "intruder", "open-r:"+cred)
	expect(t, "user intruder (group ota) outside the unit", x, map[string]string{"open-r:" + cred: "EACCES"})
	w := l.probeOutside(t, "root", "open-r:/var/lib/ota-writer/boot-state.json", "open-r:"+cert, "open-r:/etc/ota/net/device.key.pem", "open-r:"+slotDir+"/slot-a.img")
	expect(t, "negative control, root outside the unit", w, map[string]string{
		"open-r:/var/lib/ota-writer/boot-state.json": "ok", "open-r:" + cert: "ok",
		"open-r:/etc/ota/net/device.key.pem": "ok", "open-r:" + slotDir + "/slot-a.img": "ok",
	})
	if in[`open-r:`+slotDir+"/slot-a.img"].OK || in["open-rw:"+l.loopA].OK {
		t.Errorf("ota-net opened a slot or the writer's device: %v %v", in[`open-r:`+slotDir+"/slot-a.img"], in["open-rw:"+l.loopA])
	}
}

// testThirdUser: a user in group ota passes the socket's permission but is refused by the
// writer's peer check; ota-net's uid is served.
func (l *live) testThirdUser(t *testing.T) {
	out, err := l.c.Exec(l.ctx, "setpriv", "--reuid=intruder", "--regid=ota", "--init-groups", "ota-writer", "status")
	if err == nil || !strings.Contains(out, "reason: permission_denied/3002") {
		t.Errorf("intruder: err %v, output:\n%s\nwant reason: permission_denied/3002", err, out)
	}
	out, err = l.c.Exec(l.ctx, "setpriv", "--reuid=ota-net", "--regid=ota", "--init-groups", "ota-writer", "status")
	if err != nil || !strings.Contains(out, "rootfs (ab)") {
		t.Errorf("negative control, ota-net's uid: err %v, output:\n%s", err, out)
	}
}

func (l *live) restarts(t *testing.T, unit string) int {
	t.Helper()
	n, err := strconv.Atoi(l.show(t, unit, "NRestarts"))
	if err != nil {
		t.Fatal(err)
	}
	return n
}

// waitFor polls a systemd property until ok accepts it.
func (l *live) waitFor(t *testing.T, what string, limit time.Duration, ok func() bool) {
	t.Helper()
	deadline := time.Now().Add(limit)
	for !ok() {
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s", what, limit)
		}
		time.Sleep(50 * time.Millisecond)
	}
}

// testWatchdog: Type=notify readiness (systemctl start returns with the writer serving) and
// the watchdog: keep-alives arrive while the writer works, and a writer stopped with SIGSTOP
// mid-download is killed and restarted by systemd, after which the update resumes and
// completes. The watchdog is shortened to 2 s by a drop-in for this test only.
func (l *live) testWatchdog(t *testing.T) {
	const wd = 2 * time.Second
	drop := l.c.hostPath("/etc/systemd/system/ota-writer.service.d/zz-watchdog.conf")
	if err := os.WriteFile(drop, []byte("[Service]\nWatchdogSec=2s\n"), 0o644); err != nil {
		t.Fatal(err)
	}
	l.sh(t, "systemctl", "daemon-reload")
	l.sh(t, "systemctl", "restart", "ota-writer.service")
	started := time.Now()
	// Readiness: the start job returned, so READY=1 arrived; the writer serves at once.
	if got := l.show(t, "ota-writer.service", "Type") + " " + l.show(t, "ota-writer.service", "SubState"); got != "notify running" {
		t.Errorf("ota-writer.service: %q, want notify running", got)
	}
	if out, err := l.c.Exec(l.ctx, "ota-writer", "status"); err != nil {
		t.Errorf("writer not serving right after its start returned: %v\n%s", err, out)
	}
	pid := l.mainPID(t, "ota-writer.service")
	nr := l.restarts(t, "ota-writer.service")
	ts0 := l.show(t, "ota-writer.service", "WatchdogTimestampMonotonic")

	j := l.startJob(t, "live-watchdog", 107, true)
	l.waitMid(t, j)
	// Hold the stream (responses from now on come 6 s late): the writer idles mid-session
	// through two watchdog periods without being killed, so its keep-alives arrive (the
	// negative control for the kill below).
	l.cloud.SetFaults(j.id, emulator.Faults{Delay: 3 * wd})
	defer l.cloud.ClearFaults(j.id)
	if rest := 2*wd - time.Since(started); rest > 0 {
		time.Sleep(rest)
	}
	if got := l.mainPID(t, "ota-writer.service"); got != pid || l.restarts(t, "ota-writer.service") != nr {
		t.Fatalf("the working writer was restarted (pid %s -> %s) within %s", pid, got, time.Since(started))
	}
	if ts := l.show(t, "ota-writer.service", "WatchdogTimestampMonotonic"); ts == ts0 || ts == "0" {
		t.Errorf("no keep-alive received since the start (WatchdogTimestampMonotonic %s -> %s)", ts0, ts)
	}
	os.Remove(drop)
	l.sh(t, "systemctl", "daemon-reload") // the running writer keeps its 2 s watchdog
	stopped := time.Now()
	l.sh(t, "systemctl", "kill", "--signal=SIGSTOP", "--kill-who=main", "ota-writer.service")
	l.waitFor(t, "the hung writer restarted by systemd", 30*time.Second, func() bool { return l.restarts(t, "ota-writer.service") > nr })
	t.Logf("hung writer restarted %s after SIGSTOP (WatchdogSec=%s)", time.Since(stopped).Round(time.Millisecond), wd)
	l.cloud.ClearFaults(j.id)
	log := l.sh(t, "journalctl", "--no-pager", "-o", "cat", "-u", "ota-writer.service")
	if !strings.Contains(log, "Watchdog timeout") {
		t.Errorf("no watchdog timeout in the journal:\n%s", tail(log, 20))
	}
	l.finish(t, j)
}

// testServiceFault: SIGKILL or systemctl restart of one service mid-download; systemd
// restarts it (Restart=, socket activation) and the update completes.
func (l *live) testServiceFault(t *testing.T, unit, how string) {
	seed := uint64(200 + len(unit) + len(how))
	j := l.startJob(t, "live-"+how+"-"+strings.TrimSuffix(unit, ".service"), seed, true)
	l.waitMid(t, j)
	pid := l.mainPID(t, unit)
	switch how {
	case "kill":
		l.sh(t, "systemctl", "kill", "--signal=SIGKILL", "--kill-who=main", unit)
	case "restart":
		l.sh(t, "systemctl", "restart", unit)
	}
	l.finish(t, j)
	if how == "kill" {
		log := l.sh(t, "journalctl", "--no-pager", "-o", "cat", "-u", unit)
		if !strings.Contains(log, "Main process exited, code=killed, status=9/KILL") {
			t.Errorf("no SIGKILL of %s (pid %s) in the journal", unit, pid)
		}
	}
	t.Logf("%s of %s mid-download: update completed in %s", how, unit, j.duration.Round(time.Millisecond))
}

// testRebootMidDownload: the container reboots mid-download (systemctl reboot, the same disk
// boots again); the writer resumes from its journal: after the boot only blocks it did not
// hold are requested.
func (l *live) testRebootMidDownload(t *testing.T) {
	j := l.startJob(t, "live-reboot", 301, true)
	l.waitMid(t, j)
	boots := l.c.Boots()
	rebootAt := time.Now()
	_, _ = l.c.Exec(l.ctx, "systemctl", "reboot") // the connection may drop as it goes down
	if err := l.c.WaitBoots(l.ctx, boots+1); err != nil {
		t.Fatal(err)
	}
	l.finish(t, j)
	var after []int
	total := 0
	for _, r := range l.cloud.StreamRequests(j.id) {
		if r.BlockSize > 0 {
			total = int((imageSize + r.BlockSize - 1) / r.BlockSize)
		}
		if r.At.After(rebootAt) {
			after = append(after, r.Wanted...)
		}
	}
	slices.Sort(after)
	after = slices.Compact(after)
	if len(after) == 0 || len(after) >= total {
		t.Errorf("after the reboot %d of %d blocks were requested: want a resumed download, neither none nor all", len(after), total)
	}
	t.Logf("reboot mid-download: %d of %d blocks requested after the reboot; update completed in %s", len(after), total, j.duration.Round(time.Millisecond))
}

// testOutside runs the same update (image size, ota-net settings, file slots, file boot
// backend) with the two binaries as plain processes (test/harness), for the figure.
func (l *live) testOutside(t *testing.T) {
	// The very binaries the package installed (static, so they run on the host too).
	bin := &harness.Binaries{Dir: l.c.hostPath("/usr/bin"), Writer: l.c.hostPath("/usr/bin/ota-writer"), Net: l.c.hostPath("/usr/bin/ota-net")}
	cloud, err := harness.StartCloud(l.ctx, emulator.Options{Thing: thing})
	if err != nil {
		t.Fatal(err)
	}
	defer cloud.Close()
	if err := os.Mkdir(filepath.Join(l.tmp, "o"), 0o700); err != nil {
		t.Fatal(err)
	}
	dev, err := harness.NewDevice(bin, harness.DeviceOptions{Dir: filepath.Join(l.tmp, "o"), Thing: thing, BrokerURL: cloud.BrokerURL(),
		Trusted: []*harness.Signer{l.signer}, BlocksPerRequest: 1, RequestsInFlight: 1, LogLevel: "debug"})
	if err != nil {
		t.Fatal(err)
	}
	defer dev.Close(false)
	img := filepath.Join(l.tmp, "outside.img")
	if err := harness.WriteImage(img, imageSize, 101); err != nil {
		t.Fatal(err)
	}
	// As in the container: the job exists, then both daemons start from cold.
	begin := time.Now()
	readyIn := timeToReady(l.ctx, cloud, "outside", begin)
	if err := cloud.CreateJob(l.ctx, backend.JobSpec{JobID: "outside", Protocols: []string{backend.ProtocolMQTT}, Files: []backend.FileSpec{l.signer.File(img)}}); err != nil {
		t.Fatal(err)
	}
	if err := dev.Start(l.ctx); err != nil {
		t.Fatal(err)
	}
	ex, err := cloud.WaitStatus(l.ctx, "outside", terminal...)
	if err != nil || ex.Status != backend.StatusSucceeded {
		t.Fatalf("outside: %v %v\n%s", ex, err, dev.Logs())
	}
	l.timing["outside"] = time.Since(begin)
	l.timing["outside-ready"] = <-readyIn
	t.Logf("the same update outside systemd: %s", l.timing["outside"].Round(time.Millisecond))
}

// timeToReady reports how long after begin the job reached "ready" (downloaded, verified,
// activated), or 0 if it never does.
func timeToReady(ctx context.Context, cloud *harness.Cloud, jobID string, begin time.Time) <-chan time.Duration {
	ch := make(chan time.Duration, 1)
	go func() {
		if _, err := cloud.WaitSelfTest(ctx, jobID, backend.StatusInProgress, "ready"); err != nil {
			ch <- 0
			return
		}
		ch <- time.Since(begin)
	}()
	return ch
}

// exposure runs systemd-analyze security on the live unit (its drop-ins included) and
// returns the overall exposure figure.
func (l *live) exposure(t *testing.T, unit string) string {
	t.Helper()
	out := l.sh(t, "systemd-analyze", "security", "--no-pager", unit)
	_, rest, ok := strings.Cut(out, "Overall exposure level for "+unit+": ")
	if !ok {
		t.Fatalf("systemd-analyze security %s: no overall exposure in\n%s", unit, tail(out, 5))
	}
	return strings.Fields(rest)[0]
}

// testPlatform: what deploy/README says of Debian 12's systemd and the live exposure.
func (l *live) testPlatform(t *testing.T) {
	v := l.sh(t, "systemctl", "--version")
	if !strings.Contains(v, "-BPF_FRAMEWORK") || !strings.Contains(v, "+SECCOMP") {
		t.Errorf("systemctl --version: %q, want -BPF_FRAMEWORK and +SECCOMP", v)
	}
	if got := l.sh(t, "stat", "-fc", "%T", "/sys/fs/cgroup"); got != "cgroup2fs" {
		t.Errorf("/sys/fs/cgroup is %q in the container, want cgroup2fs", got)
	}
	for _, u := range []string{"ota-writer.service", "ota-net.service", "ota-writer.socket"} {
		b, err := os.ReadFile(l.c.hostPath("/lib/systemd/system/" + u))
		if err != nil {
			t.Fatal(err)
		}
		for _, k := range []string{"RestrictFileSystems=", "RestrictNetworkInterfaces=", "SocketBindAllow=", "SocketBindDeny="} {
			if strings.Contains(string(b), "\n"+k) {
				t.Errorf("%s uses %s, which Debian's systemd never enforces", u, k)
			}
		}
	}
	for u, want := range map[string]string{"ota-writer.service": "0.9", "ota-net.service": "1.0"} {
		got := l.exposure(t, u)
		l.score[u] = got
		if got != want {
			t.Errorf("live exposure of %s (with the board drop-in): %s, want %s as deploy/README says", u, got, want)
		}
	}
}

// testWithoutBPF boots the same disk without the unified hierarchy, CAP_BPF and the bpf
// system call: systemd starts the same units without complaint, systemd-analyze gives the
// same exposure, and neither DeviceAllow= nor IPAddressDeny= is enforced. The checks above
// would have passed falsely on such a boot without their negative controls.
func (l *live) testWithoutBPF(t *testing.T) {
	l.mainBoots = l.c.BootTimes()
	if err := l.c.Stop(); err != nil {
		t.Fatal(err)
	}
	c, err := newContainer(l.c.Dir, l.c.Name+"-nobpf", filepath.Join(l.tmp, "nspawn-nobpf.log"), l.c.Binds)
	if err != nil {
		t.Fatal(err)
	}
	c.NoBPF = true
	l.c = c // the set-up's clean-up halts whichever container is current
	if err := c.Boot(l.ctx); err != nil {
		t.Fatal(err)
	}
	var llPort int
	if err := inNetNS(c.NetNS, func() error {
		ln, err := net.Listen("tcp", linkLocalAddr+":0")
		if err != nil {
			return err
		}
		llPort = ln.Addr().(*net.TCPAddr).Port
		go acceptAndClose(ln)
		t.Cleanup(func() { ln.Close() })
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if got := l.sh(t, "stat", "-fc", "%T", "/sys/fs/cgroup"); got == "cgroup2fs" {
		t.Errorf("the negative-control boot has the unified hierarchy too")
	}
	for u, want := range l.score {
		if got := l.exposure(t, u); got != want {
			t.Errorf("exposure of %s without BPF: %s, with: %s", u, got, want)
		}
	}
	w := l.probeInUnit(t, "ota-writer.service", "/var/lib/ota-writer", "open-rw:"+l.loopB, "setuid")
	expect(t, "in ota-writer.service without BPF", w, map[string]string{"open-rw:" + l.loopB: "ok", "setuid": "EPERM"})
	n := l.probeInUnit(t, "ota-net.service", "/var/lib/ota-net", "connect:"+linkLocalAddr+":"+itoa(llPort), "setuid")
	expect(t, "in ota-net.service without BPF", n, map[string]string{"connect:" + linkLocalAddr + ":" + itoa(llPort): "ok", "setuid": "EPERM"})
	if t.Failed() {
		return
	}
	t.Logf("without BPF: the writer opened %s outside its DeviceAllow=, ota-net reached %s; seccomp still refused setuid", l.loopB, linkLocalAddr)
}

// hostLoops describes the loop devices as the host sees them (node, backing file).
func hostLoops(devs ...string) string {
	var out []string
	for _, d := range devs {
		b, _ := os.ReadFile("/sys/block/" + filepath.Base(d) + "/loop/backing_file")
		fi, err := os.Stat(d)
		out = append(out, fmt.Sprintf("%s stat=%v backing=%q", d, err == nil && fi.Mode()&os.ModeDevice != 0, strings.TrimSpace(string(b))))
	}
	return strings.Join(out, "; ")
}

func lookupUID(passwd, user string) (int, error) {
	b, err := os.ReadFile(passwd)
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Split(line, ":")
		if len(f) > 3 && f[0] == user {
			return strconv.Atoi(f[2])
		}
	}
	return 0, fmt.Errorf("no user %s in %s", user, passwd)
}

func sha256hex(b []byte) string {
	h := sha256.Sum256(b)
	return hex.EncodeToString(h[:])
}

func copyFile(src, dst string, mode os.FileMode) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, mode)
}
