// Package hostile attacks a real `ota-writer serve` process on its Unix socket the way a
// compromised ota-net (or another local user) could: calls out of order, huge, zero and
// overflowing sizes and offsets, overlapping blocks with different contents, guessed and
// stale session ids, untrusted keys, path traversal in certificate and target names,
// thousands of begin/abort cycles, 200 concurrent clients, 500 idle connections, half-sent
// HTTP/2 frames and another uid. Every refusal must be a typed reason; afterwards the writer
// is the same process, its memory is bounded and a legitimate update still succeeds.
//
// GWOTA_FAULTS_N scales the repeated parts (1 is the figures: 1,000 begin/abort
// cycles, 200 clients, 500 idle connections; CI runs 1, about a minute). When
// GWOTA_FAULTS_OUT names a directory, a summary goes to hostile.json there.
package hostile

import (
	"context"
	"encoding/json"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"sort"
	"strconv"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/test/harness"
	"github.com/gwota/gwota/writer/client"
)

const (
	envRole   = "GWOTA_HOSTILE_ROLE" // "intruder": the test binary re-executed under another uid
	envSocket = "GWOTA_HOSTILE_SOCKET"

	devicePath = "/opt/fw/gateway.img"
	appPath    = "/opt/app/bundle.tar"
	slotMax    = 4 << 20
	blockSize  = 4096
	imageSize  = 256<<10 + 123 // the last block is short
	intruderID = 65534         // nobody/nogroup on Debian
)

func TestMain(m *testing.M) {
	if os.Getenv(envRole) == "intruder" {
		os.Exit(intruder(os.Getenv(envSocket)))
	}
	os.Exit(m.Run())
}

// scale is GWOTA_FAULTS_N (default 1).
func scale(t *testing.T) int {
	s := os.Getenv("GWOTA_FAULTS_N")
	if s == "" {
		return 1
	}
	n, err := strconv.Atoi(s)
	if err != nil || n < 1 {
		t.Fatalf("GWOTA_FAULTS_N=%q: want a positive integer", s)
	}
	return n
}

// summary is what the suite reports (hostile.json).
type summary struct {
	mu         sync.Mutex
	N          int                       `json:"n"`
	Tried      map[string]int            `json:"tried"`
	Failures   []string                  `json:"failures"`
	WriterPID  int                       `json:"writer_pid"`
	RSSKiB     map[string]int64          `json:"rss_kib"`
	LatencyMS  map[string]float64        `json:"latency_ms"`
	Seconds    map[string]float64        `json:"seconds"`
	Extra      map[string]map[string]int `json:"refusals_by_reason"`
	Race       bool                      `json:"race"`
	TotalSecs  float64                   `json:"total_seconds"`
	RSSBoundMi int                       `json:"rss_bound_mib"`
}

func (s *summary) tried(cat string, n int) {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Tried[cat] += n
}

func (s *summary) reason(cat string, r otav1.Reason) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Extra[cat] == nil {
		s.Extra[cat] = map[string]int{}
	}
	s.Extra[cat][otav1.Reason_name[int32(r)]]++
}

func (s *summary) failed(t *testing.T, format string, args ...any) {
	t.Helper()
	msg := fmt.Sprintf(format, args...)
	s.mu.Lock()
	s.Failures = append(s.Failures, t.Name()+": "+msg)
	s.mu.Unlock()
	t.Error(msg)
}

func (s *summary) write(t *testing.T) {
	dir := os.Getenv("GWOTA_FAULTS_OUT")
	if dir == "" {
		return
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.Failures == nil {
		s.Failures = []string{}
	}
	b, err := json.MarshalIndent(s, "", "  ")
	if err != nil {
		t.Error(err)
		return
	}
	if err := os.MkdirAll(dir, 0o755); err != nil {
		t.Error(err)
		return
	}
	if err := os.WriteFile(filepath.Join(dir, "hostile.json"), append(b, '\n'), 0o644); err != nil {
		t.Error(err)
	}
}

// refusal reads a writer error: its reason and whether the writer typed it (a ReasonDetail,
// or grpc's own ResourceExhausted for a message over the size limit, which the client maps
// to invalid_request).
func refusal(err error) (otav1.Reason, bool) {
	st, ok := grpcstatus.FromError(err)
	if !ok {
		return otav1.Reason_REASON_UNSPECIFIED, false
	}
	for _, d := range st.Details() {
		if rd, ok := d.(*otav1.ReasonDetail); ok {
			return rd.GetReason(), rd.GetReason() != otav1.Reason_REASON_UNSPECIFIED
		}
	}
	if st.Code() == codes.ResourceExhausted {
		return otav1.Reason_REASON_INVALID_REQUEST, true
	}
	return otav1.Reason_REASON_UNSPECIFIED, false
}

// writer is the ota-writer serve process under attack.
type writer struct {
	dir, sock, stateDir, log string
	bin                      string // the ota-writer binary
	slotA, slotB, appDest    string
	keysDir, attackerDir     string
	cmd                      *exec.Cmd
	done                     chan struct{}
	trusted, evil            *harness.Signer
	image                    []byte
	imagePath                string
	sig, evilSig             []byte
}

func startWriter(t *testing.T, bin *harness.Binaries) *writer {
	t.Helper()
	// Short: the socket path must fit sun_path. Traversable by the intruder uid, which must
	// reach the socket to be refused by the writer rather than by the file system.
	dir, err := os.MkdirTemp("", "gwh")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	if err := os.Chmod(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	w := &writer{dir: dir, sock: filepath.Join(dir, "w.sock"), stateDir: filepath.Join(dir, "state"), log: filepath.Join(dir, "writer.log"),
		slotA: filepath.Join(dir, "slot-a.img"), slotB: filepath.Join(dir, "slot-b.img"), appDest: filepath.Join(dir, "app", "bundle.tar"),
		keysDir: filepath.Join(dir, "keys"), attackerDir: filepath.Join(dir, "attacker"), done: make(chan struct{})}
	for _, d := range []string{w.stateDir, w.keysDir, w.attackerDir, filepath.Dir(w.appDest)} {
		if err := os.MkdirAll(d, 0o700); err != nil {
			t.Fatal(err)
		}
	}
	if w.trusted, err = harness.NewSigner("hostile-signer"); err != nil {
		t.Fatal(err)
	}
	if w.evil, err = harness.NewSigner("evil-signer"); err != nil {
		t.Fatal(err)
	}
	cert, err := w.trusted.WriteCert(w.keysDir)
	if err != nil {
		t.Fatal(err)
	}
	// The attacker's certificates, outside the trust store: one under its own name, one
	// under the trusted certificate's file name.
	if _, err := w.evil.WriteCert(w.attackerDir); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(w.attackerDir, w.trusted.CertName), w.evil.CertPEM, 0o644); err != nil {
		t.Fatal(err)
	}
	if err := harness.WriteImage(w.slotA, 1<<20, 42); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(w.slotB, nil, 0o600); err != nil {
		t.Fatal(err)
	}
	w.imagePath = filepath.Join(dir, "image.bin")
	if err := harness.WriteImage(w.imagePath, imageSize, 7); err != nil {
		t.Fatal(err)
	}
	if w.image, err = os.ReadFile(w.imagePath); err != nil {
		t.Fatal(err)
	}
	if w.sig, err = w.trusted.SignFile(w.imagePath); err != nil {
		t.Fatal(err)
	}
	if w.evilSig, err = w.evil.SignFile(w.imagePath); err != nil {
		t.Fatal(err)
	}
	peers := "[]"
	if os.Getuid() != 0 {
		peers = fmt.Sprintf("[%d]", os.Getuid())
	}
	cfg := fmt.Sprintf(`socket = %q
socket_group = "%d"
state_dir = %q
peer_uids = %s
trusted_keys = [%q]
reboot_command = ["/bin/true"]
log_level = "info"
[boot]
backend = "file"
[[target]]
name = "rootfs"
kind = "ab"
file_types = [0]
file_paths = [%q]
slots = [%q, %q]
max_size = %d
[[target]]
name = "app"
kind = "file"
file_types = [1]
file_paths = [%q]
path = %q
max_size = %d
`, w.sock, intruderID, w.stateDir, peers, cert, devicePath, w.slotA, w.slotB, slotMax, appPath, w.appDest, 1<<20)
	cfgPath := filepath.Join(dir, "writer.toml")
	if err := os.WriteFile(cfgPath, []byte(cfg), 0o600); err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(w.log)
	if err != nil {
		t.Fatal(err)
	}
	w.bin = bin.Writer
	w.cmd = exec.Command(bin.Writer, "serve", "--config", cfgPath)
	w.cmd.Stdout, w.cmd.Stderr = logf, logf
	w.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true}
	if err := w.cmd.Start(); err != nil {
		t.Fatal(err)
	}
	go func() {
		w.cmd.Wait()
		logf.Close()
		close(w.done)
	}()
	t.Cleanup(func() {
		w.cmd.Process.Signal(syscall.SIGTERM)
		select {
		case <-w.done:
		case <-time.After(15 * time.Second):
			syscall.Kill(-w.cmd.Process.Pid, syscall.SIGKILL)
			<-w.done
		}
		if t.Failed() {
			t.Logf("writer log (last lines):\n%s", tail(w.log, 40))
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c := w.client(t)
	if err := c.WaitReady(ctx); err != nil {
		t.Fatalf("writer not ready: %v\n%s", err, tail(w.log, 20))
	}
	return w
}

// client dials the writer with a send limit far above the writer's, so oversize messages
// reach it (a hostile peer does not use our client's checks).
func (w *writer) client(t *testing.T) *client.Client {
	t.Helper()
	c, err := client.Dial(context.Background(), w.sock, client.Options{Name: "hostile", MaxMessageSize: 8 << 20})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

func (w *writer) alive() bool {
	select {
	case <-w.done:
		return false
	default:
		return syscall.Kill(w.cmd.Process.Pid, 0) == nil
	}
}

// procStatus reads VmRSS and VmHWM (peak RSS) in KiB, and the open file count.
func (w *writer) procStatus(t *testing.T) (rss, hwm int64, fds int) {
	t.Helper()
	b, err := os.ReadFile(fmt.Sprintf("/proc/%d/status", w.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	for _, line := range strings.Split(string(b), "\n") {
		f := strings.Fields(line)
		if len(f) >= 2 && (f[0] == "VmRSS:" || f[0] == "VmHWM:") {
			v, _ := strconv.ParseInt(f[1], 10, 64)
			if f[0] == "VmRSS:" {
				rss = v
			} else {
				hwm = v
			}
		}
	}
	ents, err := os.ReadDir(fmt.Sprintf("/proc/%d/fd", w.cmd.Process.Pid))
	if err != nil {
		t.Fatal(err)
	}
	return rss, hwm, len(ents)
}

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

func (w *writer) beginReq(job string) *otav1.BeginSessionRequest {
	ft := int32(0)
	return &otav1.BeginSessionRequest{JobId: job, FileType: &ft, FilePath: devicePath, FileSize: uint64(len(w.image)),
		BlockSize: blockSize, SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: w.sig, CertName: w.trusted.CertName}
}

// blocks cuts img's blocks [from, to) into messages.
func blocks(img []byte, from, to int) []*otav1.Block {
	var out []*otav1.Block
	for k := from; k < to && k*blockSize < len(img); k++ {
		end := min((k+1)*blockSize, len(img))
		out = append(out, &otav1.Block{Offset: uint64(k * blockSize), Data: img[k*blockSize : end]})
	}
	return out
}

func nBlocks() int { return (imageSize + blockSize - 1) / blockSize }

// pending is the slot the file boot backend will try at the next boot ("" when none): what
// the attacks must never change.
func (w *writer) pending(t *testing.T) string {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(w.stateDir, "boot-state.json"))
	if err != nil {
		t.Fatalf("boot state: %v", err)
	}
	var st struct {
		Pending string `json:"pending"`
	}
	if err := json.Unmarshal(b, &st); err != nil {
		t.Fatal(err)
	}
	return st.Pending
}

// TestHostileWriter runs every attack against one writer process, then checks it is the same
// process, within its memory bound, and still does a legitimate update.
func TestHostileWriter(t *testing.T) {
	start := time.Now()
	n := scale(t)
	ctx, cancel := context.WithTimeout(context.Background(), time.Duration(5+3*n)*time.Minute)
	defer cancel()
	bin, err := harness.Build(ctx, harness.BuildOptions{Dir: t.TempDir(), Race: harness.RaceEnabled, Only: []string{"ota-writer"}})
	if err != nil {
		t.Fatal(err)
	}
	w := startWriter(t, bin)
	sum := &summary{N: n, Tried: map[string]int{}, RSSKiB: map[string]int64{}, LatencyMS: map[string]float64{}, Seconds: map[string]float64{},
		Extra: map[string]map[string]int{}, Race: harness.RaceEnabled, WriterPID: w.cmd.Process.Pid, RSSBoundMi: rssBoundMiB()}
	defer func() {
		sum.TotalSecs = time.Since(start).Seconds()
		sum.write(t)
	}()
	rss, _, fds0 := w.procStatus(t)
	sum.RSSKiB["start"] = rss

	phases := []struct {
		name string
		fn   func(t *testing.T, ctx context.Context, w *writer, s *summary, n int)
	}{
		{"out_of_order", outOfOrder},
		{"sizes_offsets", sizesAndOffsets},
		{"overlapping_blocks", overlappingBlocks},
		{"session_ids", sessionIDs},
		{"untrusted_keys", untrustedKeys},
		{"path_traversal", pathTraversal},
		{"begin_abort_cycles", beginAbortCycles},
		{"concurrent_clients", concurrentClients},
		{"idle_connections", idleConnections},
		{"half_sent_frames", halfSentFrames},
		{"other_uid", otherUID},
	}
	for _, p := range phases {
		t0 := time.Now()
		t.Run(p.name, func(t *testing.T) { p.fn(t, ctx, w, sum, n) })
		sum.Seconds[p.name] = time.Since(t0).Seconds()
		if !w.alive() {
			sum.failed(t, "writer died during %s:\n%s", p.name, tail(w.log, 30))
			return
		}
	}

	// Afterwards: the same process, memory within its bound, no leaked descriptors, and a
	// legitimate update goes through.
	t.Run("afterwards", func(t *testing.T) {
		if !w.alive() {
			sum.failed(t, "writer pid %d is gone", sum.WriterPID)
			return
		}
		rss, hwm, fds := w.procStatus(t)
		sum.RSSKiB["end"], sum.RSSKiB["peak"] = rss, hwm
		bound := int64(sum.RSSBoundMi) << 10
		if hwm > bound {
			sum.failed(t, "peak RSS %d KiB over the bound of %d MiB", hwm, sum.RSSBoundMi)
		}
		// Descriptors: what the idle and half-sent connections held is given back (a
		// few may still be closing).
		if fds > fds0+8 {
			sum.failed(t, "writer holds %d file descriptors, %d at the start", fds, fds0)
		}
		legitimateUpdate(t, ctx, w, sum)
	})
}

// rssBoundMiB is the writer's peak RSS bound over the whole suite: 500 open connections cost
// some buffers each; the race detector multiplies memory several times.
func rssBoundMiB() int {
	if harness.RaceEnabled {
		return 384
	}
	return 64
}

// legitimateUpdate: a whole update the ordinary way, ending with the slot activated.
func legitimateUpdate(t *testing.T, ctx context.Context, w *writer, sum *summary) {
	c := w.client(t)
	if _, err := c.Handshake(ctx, nil); err != nil {
		sum.failed(t, "handshake: %v", err)
		return
	}
	b, err := c.Begin(ctx, w.beginReq("legit-final"))
	if err != nil {
		sum.failed(t, "begin: %v", err)
		return
	}
	id := b.GetSession().GetSessionId()
	bs, err := c.OpenBlockStream(ctx, id)
	if err != nil {
		sum.failed(t, "stream: %v", err)
		return
	}
	go func() {
		for range bs.Acks() {
		}
	}()
	for k := 0; k < nBlocks(); k += 8 {
		if _, err := bs.Send(blocks(w.image, k, k+8), k+8 >= nBlocks()); err != nil {
			sum.failed(t, "send: %v", err)
			return
		}
	}
	bs.CloseSend()
	if err := bs.Wait(); err != nil {
		sum.failed(t, "stream: %v", err)
		return
	}
	fin, err := c.Finish(ctx, id)
	if err != nil {
		sum.failed(t, "finish: %v", err)
		return
	}
	if fin.GetSha256() == "" {
		sum.failed(t, "finish without digest")
	}
	act, err := c.Activate(ctx, id)
	if err != nil {
		sum.failed(t, "activate: %v", err)
		return
	}
	slot, _ := os.ReadFile(w.slotB)
	if act.GetSlot() != "b" || len(slot) < len(w.image) || string(slot[:len(w.image)]) != string(w.image) {
		sum.failed(t, "activated slot %s does not hold the image", act.GetSlot())
	}
	st, err := c.State(ctx)
	if err != nil || st.GetImageState() != otav1.ImageState_IMAGE_STATE_ACTIVATED {
		sum.failed(t, "state after activation: %v %v", st.GetImageState(), err)
	}
}

// expect checks that err is a typed refusal with one of the wanted reasons (any typed reason
// when none is given) and counts the input under cat.
func expect(t *testing.T, s *summary, cat, what string, err error, want ...otav1.Reason) otav1.Reason {
	t.Helper()
	s.tried(cat, 1)
	if err == nil {
		s.failed(t, "%s: accepted", what)
		return otav1.Reason_REASON_UNSPECIFIED
	}
	r, typed := refusal(err)
	if !typed {
		s.failed(t, "%s: untyped refusal %v", what, err)
		return r
	}
	s.reason(cat, r)
	if len(want) == 0 {
		return r
	}
	for _, w := range want {
		if r == w {
			return r
		}
	}
	names := make([]string, len(want))
	for i, w := range want {
		names[i] = w.String()
	}
	sort.Strings(names)
	s.failed(t, "%s: reason %s, want %s (%v)", what, r, strings.Join(names, " or "), err)
	return r
}
