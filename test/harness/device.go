package harness

import (
	"bufio"
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"

	"github.com/BurntSushi/toml"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/config"
)

// DevicePath is the job document filepath routed to the device's A/B target.
const DevicePath = "/opt/fw/gateway.img"

// TargetName is the writer's A/B target.
const TargetName = "rootfs"

// Compatible is the target's compatible string: what an update manifest for it must name
// (docs/MANIFEST.md).
const Compatible = "gwota,test-gateway"

// Check is a writer health check ([[check]] in its configuration).
type Check struct {
	Name    string
	Command []string
	Timeout time.Duration
}

// DeviceOptions describe a simulated gateway.
type DeviceOptions struct {
	// Dir holds everything of the device (a new temporary directory when empty, removed by
	// Close). Keep it short: the writer's Unix socket lives there (108-byte limit).
	Dir string
	// Thing is the thing name / MQTT client id; BrokerURL what ota-net connects to.
	Thing     string
	BrokerURL string
	// TLS files for mqtts:// (real AWS); empty for the emulator.
	CAFile, CertFile, KeyFile string
	// Signers whose certificates the writer trusts.
	Trusted []*Signer
	// Checks are the writer's self-test health checks (none: the self test passes).
	Checks []Check
	// SlotSize is the size of the factory image in slot a (default 64 KiB).
	SlotSize int64
	// SyncBytes is the writer's sync_bytes (default 64 KiB, so resume is fine-grained), and
	// SyncInterval its sync_interval (default 200 ms).
	SyncBytes    int64
	SyncInterval time.Duration
	// Extensions are static status extension fields.
	Extensions map[string]string
	// LogTee also receives both processes' output (nil: only the log files).
	LogTee io.Writer
	// LogLevel of both processes (default "debug").
	LogLevel string
	// BlocksPerRequest and RequestsInFlight tune ota-net's stream downloads (0: its
	// defaults); tests that act mid-download use 1 and 1 with a paced stream, so the
	// download lasts many round trips.
	BlocksPerRequest, RequestsInFlight int
	// BlockSize is ota-net's stream block size (0: its default).
	BlockSize int
	// StreamQuota is ota-net's stream_quota (0: AWS's quota; -1: none, for a cloud started
	// with emulator.Options.NoQuotas).
	StreamQuota int
	// Env is added to both processes' environment.
	Env []string
	// NetPrefix goes before ota-net's command line (nsenter --net=... runs it in another
	// network namespace); it must exec ota-net in its own process.
	NetPrefix []string
	// NetConfigExtra is appended to ota-net's configuration file (a [proxy] table).
	NetConfigExtra string
	// OnReboot is called when a simulated reboot begins (done false) and when it has ended
	// (done true: both processes started again, or err says what stopped it); n counts the
	// reboots from 1.
	OnReboot func(n int, done bool, err error)
	// Supervise restarts a process that dies without the harness asking (as systemd's
	// Restart=always does) instead of failing the device; OnCrash, when set, is called first
	// with the program's name ("ota-writer" or "ota-net").
	Supervise bool
	OnCrash   func(name string)
	// InProcess runs the benchmark build of ota-net (Binaries.NetInProc, built with
	// BuildOptions.InProcessNet) with the writer engine linked inside it, serving
	// WriterConfig, and no ota-writer process: Writer is nil, the socket is not served and
	// Net is the one process; reboots restart it. For pricing the gRPC hop
	// (test/bench/linkbench).
	InProcess bool
}

// Device is one simulated gateway: ota-writer and ota-net as processes, file-backed A/B
// slots, the file boot backend, and a reboot command that tells the harness to "reboot"
// (stop both processes, start them again; the writer's file boot backend then takes the
// trial boot).
type Device struct {
	Bin  *Binaries
	Opts DeviceOptions

	Dir          string
	WriterConfig string
	NetConfig    string
	Socket       string
	SlotA, SlotB string
	WriterLog    string
	NetLog       string
	WriterState  string // writer state_dir
	// BootIDFile identifies the simulated device's current boot (the file boot backend's
	// boot_id_file): Reboot writes a new one, a crash and restart keeps it.
	BootIDFile string
	NetState   string // ota-net state_dir

	ownDir bool
	fifo   *os.File

	mu         sync.Mutex
	writer     *Proc
	net        *Proc
	reboots    int
	rebootDone int           // reboots completed (both processes started again)
	rebootCh   chan struct{} // closed and replaced when a reboot completes
	failed     chan struct{} // closed on the first unexpected failure
	crashes    map[string]int
	restartMu  sync.Mutex // serialises supervised restarts with reboots
	failErr    error
	closed     bool
	wg         sync.WaitGroup
	rebootQ    chan struct{}
	stop       chan struct{}
}

// NewDevice lays out a device: directories, slot files, trust store, both configurations,
// and the reboot FIFO. Nothing runs until Start.
func NewDevice(bin *Binaries, opts DeviceOptions) (*Device, error) {
	if opts.Thing == "" || opts.BrokerURL == "" {
		return nil, errors.New("harness: device needs Thing and BrokerURL")
	}
	if opts.SlotSize == 0 {
		opts.SlotSize = 64 << 10
	}
	if opts.SyncBytes == 0 {
		opts.SyncBytes = 64 << 10
	}
	if opts.SyncInterval == 0 {
		opts.SyncInterval = 200 * time.Millisecond
	}
	if opts.LogLevel == "" {
		opts.LogLevel = "debug"
	}
	d := &Device{Bin: bin, Opts: opts, Dir: opts.Dir, failed: make(chan struct{}), crashes: map[string]int{}, rebootCh: make(chan struct{}), rebootQ: make(chan struct{}, 16), stop: make(chan struct{})}
	if d.Dir == "" {
		dir, err := os.MkdirTemp("", "gw")
		if err != nil {
			return nil, err
		}
		d.Dir, d.ownDir = dir, true
	}
	d.Socket = filepath.Join(d.Dir, "w.sock")
	d.SlotA = filepath.Join(d.Dir, "slot-a.img")
	d.SlotB = filepath.Join(d.Dir, "slot-b.img")
	d.WriterState = filepath.Join(d.Dir, "writer-state")
	d.NetState = filepath.Join(d.Dir, "net-state")
	d.WriterConfig = filepath.Join(d.Dir, "writer.toml")
	d.NetConfig = filepath.Join(d.Dir, "net.toml")
	d.WriterLog = filepath.Join(d.Dir, "ota-writer.log")
	d.BootIDFile = filepath.Join(d.Dir, "boot_id")
	if err := d.newBootID(); err != nil {
		return nil, err
	}
	d.NetLog = filepath.Join(d.Dir, "ota-net.log")
	keys := filepath.Join(d.Dir, "keys")
	for _, p := range []string{d.WriterState, d.NetState, keys} {
		if err := os.MkdirAll(p, 0o700); err != nil {
			return nil, err
		}
	}
	// Slot a holds the "factory" image that runs; slot b is empty until an update.
	if err := WriteImage(d.SlotA, opts.SlotSize, 42); err != nil {
		return nil, err
	}
	if err := os.WriteFile(d.SlotB, nil, 0o600); err != nil {
		return nil, err
	}
	var trusted []string
	for _, s := range opts.Trusted {
		p, err := s.WriteCert(keys)
		if err != nil {
			return nil, err
		}
		trusted = append(trusted, p)
	}
	fifo := filepath.Join(d.Dir, "reboot.fifo")
	if err := syscall.Mkfifo(fifo, 0o600); err != nil {
		return nil, fmt.Errorf("reboot fifo: %w", err)
	}
	// Opened read-write: the writer's reboot command never blocks on it, and reads see one
	// line per reboot request. Close unblocks the reader.
	f, err := os.OpenFile(fifo, os.O_RDWR, 0)
	if err != nil {
		return nil, err
	}
	d.fifo = f
	wc, err := d.writerConfig(trusted, fifo)
	if err != nil {
		return nil, err
	}
	if _, err := config.Parse(wc); err != nil {
		return nil, fmt.Errorf("harness: writer configuration refused: %w\n%s", err, wc)
	}
	if err := os.WriteFile(d.WriterConfig, wc, 0o600); err != nil {
		return nil, err
	}
	nc, err := d.netConfig()
	if err != nil {
		return nil, err
	}
	if err := os.WriteFile(d.NetConfig, nc, 0o600); err != nil {
		return nil, err
	}
	d.wg.Add(2)
	go d.readReboots()
	go d.rebootLoop()
	return d, nil
}

// writerTOML mirrors the writer's configuration keys (writer/config).
type writerTOML struct {
	Socket          string            `toml:"socket"`
	StateDir        string            `toml:"state_dir"`
	PeerUIDs        []int             `toml:"peer_uids"`
	TrustedKeys     []string          `toml:"trusted_keys"`
	RebootCommand   []string          `toml:"reboot_command"`
	SyncBytes       int64             `toml:"sync_bytes"`
	SyncInterval    string            `toml:"sync_interval"`
	VersionPolicy   string            `toml:"version_policy"`
	SelfTestTimeout string            `toml:"self_test_timeout"`
	LogLevel        string            `toml:"log_level"`
	Boot            map[string]any    `toml:"boot"`
	Targets         []map[string]any  `toml:"target"`
	Checks          []map[string]any  `toml:"check,omitempty"`
	Extensions      map[string]string `toml:"extensions,omitempty"`
}

func (d *Device) writerConfig(trusted []string, fifo string) ([]byte, error) {
	w := writerTOML{
		Socket:      d.Socket,
		StateDir:    d.WriterState,
		PeerUIDs:    []int{os.Getuid()},
		TrustedKeys: trusted,
		// The "reboot": one line into the FIFO the harness reads (argv, no shell features
		// beyond the redirection).
		RebootCommand:   []string{"/bin/sh", "-c", "echo reboot >> " + fifo},
		SyncBytes:       d.Opts.SyncBytes,
		SyncInterval:    d.Opts.SyncInterval.String(),
		VersionPolicy:   config.VersionAny,
		SelfTestTimeout: "60s",
		LogLevel:        d.Opts.LogLevel,
		Boot:            map[string]any{"backend": config.BootFile, "boot_limit": 3, "boot_id_file": d.BootIDFile},
		Targets: []map[string]any{{
			"name":       TargetName,
			"compatible": Compatible,
			"kind":       config.KindAB,
			"file_types": []int{0},
			"file_paths": []string{DevicePath},
			"slots":      []string{d.SlotA, d.SlotB},
		}},
		Extensions: d.Opts.Extensions,
	}
	for _, c := range d.Opts.Checks {
		m := map[string]any{"name": c.Name, "command": c.Command}
		if c.Timeout > 0 {
			m["timeout"] = c.Timeout.String()
		}
		w.Checks = append(w.Checks, m)
	}
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(w); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

// Start starts the writer (waiting until it serves) and then ota-net.
func (d *Device) Start(ctx context.Context) error {
	if err := d.StartWriter(ctx); err != nil {
		return err
	}
	return d.StartNet(ctx)
}

// StartWriter starts ota-writer serve and waits until its health service answers. With
// InProcess there is no writer process: it does nothing.
func (d *Device) StartWriter(ctx context.Context) error {
	if d.Opts.InProcess {
		return nil
	}
	d.mu.Lock()
	if d.writer != nil && d.writer.Running() {
		d.mu.Unlock()
		return fmt.Errorf("harness: writer %w", errRunning)
	}
	d.mu.Unlock()
	p, err := startProc("ota-writer", []string{d.Bin.Writer, "serve", "--config", d.WriterConfig}, d.Opts.Env, d.WriterLog, d.Opts.LogTee, d.onExit)
	if err != nil {
		return err
	}
	d.mu.Lock()
	d.writer = p
	d.mu.Unlock()
	// Ready = the health service answers; a writer that exits first ends the wait.
	wctx, cancel := context.WithCancelCause(ctx)
	defer cancel(nil)
	go func() {
		select {
		case <-p.Done():
			cancel(fmt.Errorf("ota-writer exited during start (%v); log %s:\n%s", exitText(p.err), d.WriterLog, tail(d.WriterLog, 40)))
		case <-wctx.Done():
		}
	}()
	c, err := client.Dial(wctx, d.Socket, client.Options{Name: "harness"})
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.WaitReady(wctx); err != nil {
		if cause := context.Cause(wctx); cause != nil {
			return cause
		}
		return err
	}
	return nil
}

// StartNet starts ota-net.
func (d *Device) StartNet(ctx context.Context) error {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.net != nil && d.net.Running() {
		return fmt.Errorf("harness: ota-net %w", errRunning)
	}
	p, err := startProc("ota-net", d.netArgv(), d.netEnv(), d.NetLog, d.Opts.LogTee, d.onExit)
	if err != nil {
		return err
	}
	d.net = p
	return nil
}

var errRunning = errors.New("already running")

// Writer and Net return the current processes (nil before the first start).
func (d *Device) Writer() *Proc { d.mu.Lock(); defer d.mu.Unlock(); return d.writer }
func (d *Device) Net() *Proc    { d.mu.Lock(); defer d.mu.Unlock(); return d.net }

// StopWriter / StopNet: SIGTERM and wait. KillWriter / KillNet: SIGKILL (a crash) and wait.
func (d *Device) StopWriter(ctx context.Context) error { return stopIf(ctx, d.Writer(), false) }
func (d *Device) StopNet(ctx context.Context) error    { return stopIf(ctx, d.Net(), false) }
func (d *Device) KillWriter(ctx context.Context) error { return stopIf(ctx, d.Writer(), true) }
func (d *Device) KillNet(ctx context.Context) error    { return stopIf(ctx, d.Net(), true) }

func stopIf(ctx context.Context, p *Proc, kill bool) error {
	if p == nil {
		return nil
	}
	if kill {
		return p.Kill(ctx)
	}
	return p.Stop(ctx)
}

// onExit turns an exit the harness did not ask for into a device failure.
func (d *Device) onExit(p *Proc, expected bool) {
	if expected {
		return
	}
	if d.Opts.Supervise {
		d.mu.Lock()
		closed := d.closed
		if !closed {
			d.crashes[p.Name]++
			d.wg.Add(1)
		}
		d.mu.Unlock()
		if !closed {
			go d.restart(p)
		}
		return
	}
	log := d.WriterLog
	if p.Name == "ota-net" {
		log = d.NetLog
	}
	d.fail(fmt.Errorf("%s (pid %d) exited unexpectedly: %s; log %s:\n%s", p.Name, p.Pid, exitText(p.err), log, tail(log, 60)))
}

// restart starts a crashed process again (Supervise).
func (d *Device) restart(p *Proc) {
	defer d.wg.Done()
	if d.Opts.OnCrash != nil {
		d.Opts.OnCrash(p.Name)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	// One restart at a time, and never while a reboot stops and starts the processes.
	d.restartMu.Lock()
	defer d.restartMu.Unlock()
	d.mu.Lock()
	closed := d.closed
	cur := d.writer
	if p.Name == "ota-net" {
		cur = d.net
	}
	d.mu.Unlock()
	if closed || cur != p {
		return // closed, or already started again (a reboot)
	}
	var err error
	if p.Name == "ota-net" {
		err = d.StartNet(ctx)
	} else {
		err = d.StartWriter(ctx)
	}
	if err != nil && !errors.Is(err, errRunning) {
		d.fail(fmt.Errorf("restarting %s after a crash: %w", p.Name, err))
	}
}

// Crashes counts the unexpected exits of each program a supervised device restarted.
func (d *Device) Crashes() map[string]int {
	d.mu.Lock()
	defer d.mu.Unlock()
	out := map[string]int{}
	for k, v := range d.crashes {
		out[k] = v
	}
	return out
}

func (d *Device) fail(err error) {
	d.mu.Lock()
	defer d.mu.Unlock()
	if d.failErr != nil || d.closed {
		return
	}
	d.failErr = err
	close(d.failed)
}

// Failed is closed when a process exited without the harness asking, or a reboot failed;
// Err says why.
func (d *Device) Failed() <-chan struct{} { return d.failed }

// Err is the first failure, or nil.
func (d *Device) Err() error { d.mu.Lock(); defer d.mu.Unlock(); return d.failErr }

// Context returns a context canceled, with the failure as its cause, when the device fails:
// waits made with it end at once when a process dies instead of at the test's deadline.
func (d *Device) Context(parent context.Context) (context.Context, context.CancelFunc) {
	ctx, cancel := context.WithCancelCause(parent)
	go func() {
		select {
		case <-d.failed:
			cancel(d.Err())
		case <-ctx.Done():
		}
	}()
	return ctx, func() { cancel(nil) }
}

// readReboots turns each line the writer's reboot command writes into a reboot request.
func (d *Device) readReboots() {
	defer d.wg.Done()
	sc := bufio.NewScanner(d.fifo)
	for sc.Scan() {
		select {
		case d.rebootQ <- struct{}{}:
		case <-d.stop:
			return
		}
	}
}

// rebootLoop performs the requested reboots one at a time.
func (d *Device) rebootLoop() {
	defer d.wg.Done()
	for {
		select {
		case <-d.stop:
			return
		case <-d.rebootQ:
		}
		d.mu.Lock()
		n := d.reboots + 1
		d.mu.Unlock()
		if d.Opts.OnReboot != nil {
			d.Opts.OnReboot(n, false, nil)
		}
		ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
		d.restartMu.Lock()
		err := d.Reboot(ctx)
		d.restartMu.Unlock()
		cancel()
		if err != nil {
			d.fail(fmt.Errorf("simulated reboot %d: %w", n, err))
		} else {
			d.mu.Lock()
			d.rebootDone++
			close(d.rebootCh)
			d.rebootCh = make(chan struct{})
			d.mu.Unlock()
		}
		if d.Opts.OnReboot != nil {
			d.Opts.OnReboot(n, true, err)
		}
	}
}

// Reboot simulates a reboot: both processes are stopped (SIGTERM, as systemd does at
// shutdown) and started again; the writer's file boot backend takes the trial boot (or rolls
// back) at its start. It runs by itself when the writer's reboot command fires.
func (d *Device) Reboot(ctx context.Context) error {
	d.mu.Lock()
	d.reboots++
	closed := d.closed
	d.mu.Unlock()
	if closed {
		return errors.New("device closed")
	}
	// Only what ran comes back (a test may drive the writer without ota-net).
	withNet := d.Net() != nil
	if err := d.StopNet(ctx); err != nil {
		return err
	}
	if err := d.StopWriter(ctx); err != nil {
		return err
	}
	if err := d.newBootID(); err != nil {
		return err
	}
	if err := d.StartWriter(ctx); err != nil && !d.crashedStarting(d.Writer()) {
		return err
	}
	if !withNet {
		return nil
	}
	if err := d.StartNet(ctx); err != nil && !d.crashedStarting(d.Net()) {
		return err
	}
	return nil
}

// crashedStarting says whether p was killed while a reboot started it, on a supervised
// device: the supervisor starts it again (as systemd would), so the reboot itself succeeded.
func (d *Device) crashedStarting(p *Proc) bool {
	if !d.Opts.Supervise || p == nil || p.Running() {
		return false
	}
	p.mu.Lock()
	defer p.mu.Unlock()
	return !p.stopping
}

// newBootID starts a new simulated boot.
func (d *Device) newBootID() error {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		return err
	}
	return os.WriteFile(d.BootIDFile, []byte(hex.EncodeToString(b[:])+"\n"), 0o600)
}

// WaitReboots waits until n reboots requested by the writer have completed (both processes
// running again).
func (d *Device) WaitReboots(ctx context.Context, n int) error {
	for {
		d.mu.Lock()
		done, ch := d.rebootDone, d.rebootCh
		d.mu.Unlock()
		if done >= n {
			return nil
		}
		select {
		case <-ch:
		case <-d.failed:
			return d.Err()
		case <-ctx.Done():
			return fmt.Errorf("waiting for reboot %d (%d done): %w", n, done, context.Cause(ctx))
		}
	}
}

// Reboots counts the simulated reboots so far.
func (d *Device) Reboots() int { d.mu.Lock(); defer d.mu.Unlock(); return d.reboots }

// Close stops both processes, ends the reboot machinery and removes the directory when the
// harness made it and keep is false.
func (d *Device) Close(keep bool) error {
	d.mu.Lock()
	already := d.closed
	d.closed = true
	d.mu.Unlock()
	if already {
		return nil
	}
	close(d.stop)
	d.fifo.Close()
	// A reboot in progress finishes first, so nothing is started after the stop below.
	d.wg.Wait()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	errs := []error{d.StopNet(ctx), d.StopWriter(ctx)}
	if d.ownDir && !keep {
		errs = append(errs, os.RemoveAll(d.Dir))
	}
	return errors.Join(errs...)
}

// RaceReports returns the data race reports found in both logs (race-enabled builds).
func (d *Device) RaceReports() []string {
	var out []string
	for _, p := range []string{d.WriterLog, d.NetLog} {
		b, _ := os.ReadFile(p)
		if bytes.Contains(b, []byte("WARNING: DATA RACE")) {
			out = append(out, p)
		}
	}
	return out
}

// Logs returns both logs, for a failure report.
func (d *Device) Logs() string {
	var sb strings.Builder
	for _, p := range []string{d.WriterLog, d.NetLog} {
		b, err := os.ReadFile(p)
		fmt.Fprintf(&sb, "----- %s -----\n", p)
		if err != nil {
			fmt.Fprintf(&sb, "(%v)\n", err)
			continue
		}
		sb.Write(b)
	}
	return sb.String()
}

// WriterClient connects to the running writer (the harness runs as root or a peer uid).
func (d *Device) WriterClient(ctx context.Context) (*client.Client, error) {
	c, err := client.Dial(ctx, d.Socket, client.Options{Name: "harness"})
	if err != nil {
		return nil, err
	}
	if err := c.WaitReady(ctx); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// State asks the running writer for its state.
func (d *Device) State(ctx context.Context) (*otav1.DeviceState, error) {
	c, err := d.WriterClient(ctx)
	if err != nil {
		return nil, err
	}
	defer c.Close()
	return c.State(ctx)
}

// BootState is the file boot backend's state file, raw.
func (d *Device) BootState() (string, error) {
	b, err := os.ReadFile(filepath.Join(d.WriterState, "boot-state.json"))
	return strings.TrimSpace(string(b)), err
}

// SlotPath returns the file of slot "a" or "b".
func (d *Device) SlotPath(slot string) string {
	if slot == "b" {
		return d.SlotB
	}
	return d.SlotA
}

// tail returns the last n lines of a file.
func tail(path string, n int) string {
	b, err := os.ReadFile(path)
	if err != nil {
		return err.Error()
	}
	lines := strings.Split(strings.TrimRight(string(b), "\n"), "\n")
	if len(lines) > n {
		lines = lines[len(lines)-n:]
	}
	return strings.Join(lines, "\n")
}
