package main

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"time"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
)

// netEnv is extra environment of the ota-net process (GOMEMLIMIT=..., GOGC=...) for tuning.
var netEnv string

// realResult is one job run by the real binaries.
type realResult struct {
	SizeMiB   int
	Seconds   float64 // job created -> IN_PROGRESS self_test ready (download, verify, activate)
	MBps      float64
	NetHWMKB  int64 // ota-net's VmHWM
	WriterHWM int64 // ota-writer's VmHWM
}

// runReal runs one update job end to end through the real cmd/ota-net and cmd/ota-writer
// binaries with their default settings: a fresh device (A/B slot files, file boot backend,
// empty state) per run, so each VmHWM belongs to one image size. The job goes over MQTT
// streams through mosquitto; the time is from job creation to the device's "ready" report
// (every block received and durable, signature verified, slot activated).
func runReal(ctx context.Context, netBin, writerBin, brokerURL string, emu *emulator.Emulator, rec *harness.Recorder, img, dir string, mib int, jobID string) (realResult, error) {
	d := filepath.Join(dir, "real-"+jobID)
	if err := os.MkdirAll(d, 0o700); err != nil {
		return realResult{}, err
	}
	defer os.RemoveAll(d)
	signer, err := harness.NewSigner("bench")
	if err != nil {
		return realResult{}, err
	}
	cert, err := signer.WriteCert(d)
	if err != nil {
		return realResult{}, err
	}
	slotA, slotB := filepath.Join(d, "slot_a"), filepath.Join(d, "slot_b")
	for _, s := range []string{slotA, slotB} {
		if err := os.WriteFile(s, nil, 0o600); err != nil {
			return realResult{}, err
		}
	}
	sock := filepath.Join(d, "w.sock")
	wconf := fmt.Sprintf(`socket = %q
state_dir = %q
trusted_keys = [%q]
reboot_command = ["/bin/true"]
log_level = "warn"
[boot]
backend = "file"
[[target]]
name = "rootfs"
kind = "ab"
file_paths = [%q]
slots = [%q, %q]
`, sock, filepath.Join(d, "wstate"), cert, harness.DevicePath, slotA, slotB)
	nconf := fmt.Sprintf("broker = %q\nthing_name = %q\nwriter_socket = %q\nstate_dir = %q\nlog_level = \"info\"\n",
		brokerURL, emu.ThingName(), sock, filepath.Join(d, "nstate"))
	for name, text := range map[string]string{"writer.toml": wconf, "net.toml": nconf} {
		if err := os.WriteFile(filepath.Join(d, name), []byte(text), 0o600); err != nil {
			return realResult{}, err
		}
	}
	wlog, err := os.Create(filepath.Join(d, "writer.log"))
	if err != nil {
		return realResult{}, err
	}
	defer wlog.Close()
	w := exec.CommandContext(ctx, writerBin, "serve", "--config", filepath.Join(d, "writer.toml"))
	w.Stdout, w.Stderr = wlog, wlog
	if err := w.Start(); err != nil {
		return realResult{}, err
	}
	defer stopProc(w)
	if err := waitSocket(sock, w); err != nil {
		return realResult{}, fmt.Errorf("ota-writer: %w\n%s", err, readTail(wlog.Name()))
	}

	n := exec.CommandContext(ctx, netBin, "--config", filepath.Join(d, "net.toml"))
	n.Env = append(os.Environ(), strings.Fields(netEnv)...)
	stderr, err := n.StderrPipe()
	if err != nil {
		return realResult{}, err
	}
	if err := n.Start(); err != nil {
		return realResult{}, err
	}
	defer stopProc(n)
	// Start timing once ota-net is connected, so its start-up is not counted.
	connected := make(chan struct{})
	var logTail strings.Builder
	go func() {
		sc := bufio.NewScanner(stderr)
		once := false
		for sc.Scan() {
			line := sc.Text()
			if strings.Contains(line, "mqtt connected") && !once {
				once = true
				close(connected)
			}
			if strings.Contains(line, "[ERROR]") && logTail.Len() < 4096 {
				logTail.WriteString(line + "\n")
			}
		}
		io.Copy(io.Discard, stderr)
	}()
	select {
	case <-connected:
	case <-time.After(30 * time.Second):
		return realResult{}, errors.New("ota-net did not connect within 30 s")
	}
	start := time.Now()
	if err := emu.CreateJob(ctx, backend.JobSpec{JobID: jobID, Files: []backend.FileSpec{signer.File(img)}}); err != nil {
		return realResult{}, err
	}
	wctx, cancel := context.WithTimeout(ctx, 10*time.Minute)
	defer cancel()
	ev, err := rec.Wait(wctx, jobID, func(ev emulator.UpdateEvent) bool {
		return ev.Status != backend.StatusInProgress || ev.StatusDetails["self_test"] == "ready"
	})
	if err != nil {
		return realResult{}, fmt.Errorf("job %s: %w", jobID, err)
	}
	secs := time.Since(start).Seconds()
	if ev.Status != backend.StatusInProgress {
		return realResult{}, fmt.Errorf("job %s ended %s %v; ota-net errors:\n%s", jobID, ev.Status, ev.StatusDetails, logTail.String())
	}
	nh, err := vmHWM(n.Process.Pid)
	if err != nil {
		return realResult{}, err
	}
	wh, _ := vmHWM(w.Process.Pid)
	emu.DeleteJob(ctx, jobID, true)
	return realResult{SizeMiB: mib, Seconds: secs, MBps: float64(int64(mib)<<20) / secs / 1e6, NetHWMKB: nh, WriterHWM: wh}, nil
}

func stopProc(c *exec.Cmd) {
	c.Process.Signal(syscall.SIGTERM)
	done := make(chan struct{})
	go func() { c.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(10 * time.Second):
		c.Process.Kill()
		<-done
	}
}

func waitSocket(sock string, p *exec.Cmd) error {
	deadline := time.Now().Add(10 * time.Second)
	for {
		c, err := net.Dial("unix", sock)
		if err == nil {
			c.Close()
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("no socket at %s: %w", sock, err)
		}
		time.Sleep(20 * time.Millisecond)
	}
}

func readTail(path string) string {
	b, _ := os.ReadFile(path)
	if len(b) > 4096 {
		b = b[len(b)-4096:]
	}
	return string(b)
}

// vmHWM is a process's peak resident set size in KiB, from /proc/PID/status.
func vmHWM(pid int) (int64, error) {
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", pid))
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var kb int64
			_, err := fmt.Sscanf(strings.TrimSpace(v), "%d kB", &kb)
			return kb, err
		}
	}
	return 0, errors.New("no VmHWM")
}
