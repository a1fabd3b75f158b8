// Command demo runs a whole OTA update on this machine with nothing installed beyond Go: the
// AWS IoT emulator on its embedded MQTT broker, ota-writer with file-backed A/B slots and the
// file boot backend, and ota-net, as separate processes. It creates a signed afr_ota job and
// prints every job status update as the cloud records it, the simulated reboot included.
//
//	go run ./test/cmd/demo             a good image: ... ready, reboot, active, SUCCEEDED accepted
//	go run ./test/cmd/demo --corrupt   an image altered after signing: FAILED sig_check_failed/1001
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"maps"
	"os"
	"os/signal"
	"path/filepath"
	"slices"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
)

func main() {
	corrupt := flag.Bool("corrupt", false, "deliver an image altered after it was signed (the signature covers the good image)")
	size := flag.Int64("size", 4<<20, "image size in bytes")
	protocol := flag.String("protocol", backend.ProtocolMQTT, "download protocol: MQTT (stream) or HTTP (presigned URL)")
	keep := flag.Bool("keep", false, "keep the device directory (configs, slots, logs) and print its path")
	verbose := flag.Bool("v", false, "also print both processes' logs")
	timeout := flag.Duration("timeout", 2*time.Minute, "give up after this long")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	defer stop()
	ctx, cancel := context.WithTimeout(ctx, *timeout)
	defer cancel()
	err := run(ctx, os.Stdout, opts{corrupt: *corrupt, size: *size, protocol: *protocol, keep: *keep, verbose: *verbose})
	if err != nil {
		fmt.Fprintf(os.Stderr, "demo: %v\n", err)
		os.Exit(1)
	}
}

type opts struct {
	corrupt, keep, verbose bool
	size                   int64
	protocol               string
}

// printer writes one timestamped line at a time (status updates arrive on the emulator's
// goroutine, reboot events on the harness's).
type printer struct {
	mu    sync.Mutex
	w     io.Writer
	start time.Time
	done  bool
}

func (p *printer) line(format string, args ...any) {
	p.mu.Lock()
	defer p.mu.Unlock()
	if p.done {
		return
	}
	fmt.Fprintf(p.w, "%7.3fs  %s\n", time.Since(p.start).Seconds(), fmt.Sprintf(format, args...))
}

// finish ends the timed lines (late events are dropped) and returns the writer for the
// summary.
func (p *printer) finish() io.Writer {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.done = true
	return p.w
}

func run(ctx context.Context, w io.Writer, o opts) (err error) {
	out := &printer{w: w, start: time.Now()}
	const thing, jobID = "gw-demo", "demo-ota-1"

	out.line("building ota-writer and ota-net (go build)")
	bin, err := harness.Build(ctx, harness.BuildOptions{})
	if err != nil {
		return err
	}
	defer os.RemoveAll(bin.Dir)
	out.line("built in %s", bin.Dir)

	cloud, err := harness.StartCloud(ctx, emulator.Options{Thing: thing})
	if err != nil {
		return fmt.Errorf("emulator: %w", err)
	}
	defer cloud.Close()
	out.line("AWS IoT emulator up: MQTT %s, presigned HTTP %s, thing %s", cloud.BrokerURL(), cloud.HTTPURL(), thing)

	signer, err := harness.NewSigner("gwota-demo-signer")
	if err != nil {
		return err
	}
	var logTee io.Writer
	if o.verbose {
		logTee = prefixWriter{w: w, prefix: "    | "}
	}
	dev, err := harness.NewDevice(bin, harness.DeviceOptions{
		Thing:      thing,
		BrokerURL:  cloud.BrokerURL(),
		Trusted:    []*harness.Signer{signer},
		Extensions: map[string]string{"hardware_rev": "demo"},
		LogTee:     logTee,
		LogLevel:   "info",
		OnReboot: func(n int, done bool, err error) {
			switch {
			case !done:
				out.line("REBOOT   the writer ran its reboot command: stopping ota-net and ota-writer")
			case err != nil:
				out.line("REBOOT   failed: %v", err)
			default:
				out.line("REBOOT   ota-writer started again (file boot backend: trial boot of the new slot), ota-net started again")
			}
		},
	})
	if err != nil {
		return err
	}
	defer func() {
		if cerr := dev.Close(o.keep); err == nil && cerr != nil {
			err = cerr
		}
		if o.keep {
			fmt.Fprintf(out.finish(), "\ndevice directory kept: %s (writer.toml, net.toml, ota-writer.log, ota-net.log, slots)\n", dev.Dir)
		}
	}()

	// The image, and in --corrupt mode a copy with one byte changed: the job carries the
	// good image's signature but delivers the altered bytes.
	good := filepath.Join(dev.Dir, "image-v2.img")
	if err := harness.WriteImage(good, o.size, 2); err != nil {
		return err
	}
	file := signer.File(good)
	if o.corrupt {
		bad := filepath.Join(dev.Dir, "image-v2-corrupt.img")
		if err := harness.CorruptCopy(good, bad, o.size/2); err != nil {
			return err
		}
		sig, err := signer.SignFile(good)
		if err != nil {
			return err
		}
		file.LocalPath, file.SigningKeyPEM, file.Signature = bad, nil, sig
	}
	imgHash, err := harness.FileSHA256(file.LocalPath)
	if err != nil {
		return err
	}

	dctx, dcancel := dev.Context(ctx)
	defer dcancel()
	if err := dev.Start(dctx); err != nil {
		return err
	}
	out.line("ota-writer (pid %d) serving %s; ota-net (pid %d) connecting", dev.Writer().Pid, dev.Socket, dev.Net().Pid)
	// The writer created the boot state at its start.
	before, err := slotHashes(dev)
	if err != nil {
		return err
	}
	bootBefore, err := bootState(dev)
	if err != nil {
		return err
	}
	out.line("device: slot a (running) sha256 %s, slot b (inactive) sha256 %s; boot %s", short(before["a"]), short(before["b"]), bootBefore)

	cloud.Rec.OnEvent(func(ev emulator.UpdateEvent) {
		if ev.JobID == jobID {
			out.line("%-11s %s", ev.Status, details(ev.StatusDetails))
		}
	})
	what := "signed"
	if o.corrupt {
		what = "signed, then corrupted (1 byte flipped at offset " + fmt.Sprint(o.size/2) + ")"
	}
	if err := cloud.CreateJob(dctx, backend.JobSpec{JobID: jobID, Protocols: []string{o.protocol}, Files: []backend.FileSpec{file}}); err != nil {
		return fmt.Errorf("create job: %w", err)
	}
	out.line("job %s created: %d-byte image %s, sha256 %s, ECDSA P-256, over %s", jobID, o.size, what, short(imgHash), o.protocol)

	// Waiting on the recorder: its hook has printed the terminal update when this returns.
	ev, err := cloud.Rec.Wait(dctx, jobID, func(ev emulator.UpdateEvent) bool { return terminal(ev.Status) })
	if err != nil {
		if cause := context.Cause(dctx); cause != nil && !errors.Is(cause, context.Canceled) {
			err = cause
		}
		return fmt.Errorf("waiting for the job to end: %w\n%s", err, dev.Logs())
	}
	ex := backend.Execution{JobID: jobID, Status: ev.Status, StatusDetails: ev.StatusDetails}
	w = out.finish()
	fmt.Fprintf(w, "\nfinal: %s\n", ex.Status)
	for _, k := range slices.Sorted(maps.Keys(ex.StatusDetails)) {
		fmt.Fprintf(w, "  %-18s %s\n", k, ex.StatusDetails[k])
	}
	return conclude(ctx, w, dev, o, ex, before, bootBefore, imgHash)
}

func terminal(status string) bool {
	switch status {
	case backend.StatusSucceeded, backend.StatusFailed, backend.StatusRejected, backend.StatusCanceled, backend.StatusTimedOut, backend.StatusRemoved:
		return true
	}
	return false
}

// conclude checks the outcome against what the mode expects and shows the slots.
func conclude(ctx context.Context, w io.Writer, dev *harness.Device, o opts, ex backend.Execution, before map[string]string, bootBefore, imgHash string) error {
	after, err := slotHashes(dev)
	if err != nil {
		return err
	}
	bootAfter, err := bootState(dev)
	if err != nil {
		return err
	}
	fmt.Fprintf(w, "\nslot a   sha256 before %s  after %s\n", short(before["a"]), short(after["a"]))
	fmt.Fprintf(w, "slot b   sha256 before %s  after %s\n", short(before["b"]), short(after["b"]))
	fmt.Fprintf(w, "boot     before %s\n         after  %s\n", bootBefore, bootAfter)
	if st, err := dev.State(ctx); err == nil {
		fmt.Fprintf(w, "writer image state: %s\n", strings.ToLower(strings.TrimPrefix(st.GetImageState().String(), "IMAGE_STATE_")))
	}
	if !o.corrupt {
		if ex.Status != backend.StatusSucceeded || ex.StatusDetails["self_test"] != "accepted" {
			return fmt.Errorf("expected SUCCEEDED accepted, got %s %v", ex.Status, ex.StatusDetails)
		}
		if imgB, _ := harness.FilePrefixSHA256(dev.SlotB, o.size); imgB != imgHash {
			return fmt.Errorf("slot b does not hold the image: %s, image %s", short(imgB), short(imgHash))
		}
		fmt.Fprintf(w, "\nOK: slot b holds the image (sha256 %s), committed after the trial boot.\n", short(imgHash))
		return nil
	}
	if ex.Status != backend.StatusFailed || ex.StatusDetails["reason"] != "sig_check_failed" || ex.StatusDetails["error_code"] != "1001" {
		return fmt.Errorf("expected FAILED sig_check_failed/1001, got %s %v", ex.Status, ex.StatusDetails)
	}
	if after["a"] != before["a"] {
		return fmt.Errorf("the running slot a changed: %s -> %s", short(before["a"]), short(after["a"]))
	}
	if bootAfter != bootBefore {
		return fmt.Errorf("boot state changed: %s -> %s", bootBefore, bootAfter)
	}
	if dev.Reboots() != 0 {
		return fmt.Errorf("the device rebooted %d times", dev.Reboots())
	}
	fmt.Fprintf(w, "\nOK: refused. The running slot a is byte-for-byte unchanged and the boot state is unchanged:\n"+
		"nothing was activated, no reboot. (Slot b, the inactive slot the download streams into, holds\n"+
		"the refused bytes; it was never made bootable.)\n")
	return nil
}

func slotHashes(dev *harness.Device) (map[string]string, error) {
	m := map[string]string{}
	for _, s := range []string{"a", "b"} {
		h, err := harness.FileSHA256(dev.SlotPath(s))
		if err != nil {
			return nil, err
		}
		m[s] = h
	}
	return m, nil
}

// bootState is the file boot backend's state on one line.
func bootState(dev *harness.Device) (string, error) {
	raw, err := dev.BootState()
	if err != nil {
		return "", err
	}
	var st map[string]any
	if err := json.Unmarshal([]byte(raw), &st); err != nil {
		return "", fmt.Errorf("boot state: %w", err)
	}
	var parts []string
	for _, k := range slices.Sorted(maps.Keys(st)) {
		if k != "version" {
			parts = append(parts, fmt.Sprintf("%s=%v", k, st[k]))
		}
	}
	return strings.Join(parts, " "), nil
}

func short(h string) string {
	if len(h) > 12 {
		return h[:12]
	}
	return h
}

// details renders statusDetails as key=value, the base keys first.
func details(d map[string]string) string {
	base := []string{"self_test", "progress", "reason", "error_code"}
	var parts []string
	for _, k := range base {
		if v, ok := d[k]; ok {
			parts = append(parts, k+"="+v)
		}
	}
	for _, k := range slices.Sorted(maps.Keys(d)) {
		if !slices.Contains(base, k) {
			parts = append(parts, k+"="+d[k])
		}
	}
	return strings.Join(parts, " ")
}

// prefixWriter indents process logs under the status lines (-v).
type prefixWriter struct {
	w      io.Writer
	prefix string
}

func (p prefixWriter) Write(b []byte) (int, error) {
	s := strings.TrimRight(string(b), "\n")
	for _, l := range strings.Split(s, "\n") {
		fmt.Fprintf(p.w, "%s%s\n", p.prefix, l)
	}
	return len(b), nil
}
