package engine

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/internal/bitmap"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/sign"
	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/journal"
)

// The fuzz targets of this file drive the engine through its API with arbitrary call
// sequences on file-backed slots and the file boot backend, with restarts and simulated
// power cycles in between, and check THE PROMISE after every call: a slot that is activated
// (pending) or on trial, and an installed file, hold exactly an image the trusted key signed;
// every refusal is a typed *status.Error with a reason.

// fuzzImages: two A/B images and one for the plain-file target, signed by the trusted key;
// one signature by a key the writer does not trust.
type fuzzKit struct {
	keys      string // directory with signer.crt.pem
	key       *ecdsa.PrivateKey
	imgs      [][]byte
	sigs      [][]byte
	untrusted []byte // a valid signature of imgs[0] by another key
}

func newFuzzKit(tb testing.TB) *fuzzKit {
	dir := tb.TempDir()
	id, err := sign.NewIdentity("ota-signer")
	if err != nil {
		tb.Fatal(err)
	}
	id.CertName = "signer.crt.pem"
	if _, err := id.WriteCert(dir); err != nil {
		tb.Fatal(err)
	}
	k := &fuzzKit{keys: dir, key: id.Key}
	for i, n := range []int{2500, 1024, 700} {
		img := make([]byte, n)
		for j := range img {
			img[j] = byte(j*7 + i*31 + j>>8)
		}
		sig, err := id.Sign(img)
		if err != nil {
			tb.Fatal(err)
		}
		k.imgs, k.sigs = append(k.imgs, img), append(k.sigs, sig)
	}
	other, err := sign.NewIdentity("untrusted")
	if err != nil {
		tb.Fatal(err)
	}
	if k.untrusted, err = other.Sign(k.imgs[0]); err != nil {
		tb.Fatal(err)
	}
	return k
}

// signedPrefix reports whether b starts with one of the signed images; which one.
func (k *fuzzKit) signedPrefix(b []byte, exact bool) (int, bool) {
	for i, img := range k.imgs {
		if bytes.HasPrefix(b, img) && (!exact || len(b) == len(img)) {
			return i, true
		}
	}
	return -1, false
}

// verifies is the oracle: the trusted key's signature sig verifies over exactly b.
func (k *fuzzKit) verifies(b, sig []byte) bool {
	sum := sha256.Sum256(b)
	return ecdsa.VerifyASN1(&k.key.PublicKey, sum[:], sig)
}

const fuzzSlotSize = 16 << 10

// fuzzRig is one device: slots, state, boot file, engine.
type fuzzRig struct {
	t       *testing.T
	kit     *fuzzKit
	dir     string
	cfg     *config.Config
	slots   [2]string
	appPath string
	fb      *boot.File
	e       *Engine
}

func newFuzzRig(t *testing.T, kit *fuzzKit) *fuzzRig {
	dir := t.TempDir()
	r := &fuzzRig{t: t, kit: kit, dir: dir}
	r.slots = [2]string{filepath.Join(dir, "slot-a.img"), filepath.Join(dir, "slot-b.img")}
	if err := os.WriteFile(r.slots[0], bytes.Repeat([]byte{0xA5}, fuzzSlotSize), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(r.slots[1], bytes.Repeat([]byte{0xEE}, fuzzSlotSize), 0o600); err != nil {
		t.Fatal(err)
	}
	os.MkdirAll(filepath.Join(dir, "app"), 0o755)
	r.appPath = filepath.Join(dir, "app", "bundle.tar")
	cfg, err := config.Parse([]byte(`
state_dir = "` + filepath.Join(dir, "state") + `"
trusted_keys = ["` + filepath.Join(kit.keys, "signer.crt.pem") + `"]
max_block_size = 4096
sync_interval = "1h"
[[target]]
name = "rootfs"
kind = "ab"
file_types = [0]
file_paths = ["/opt/fw/gateway.img"]
slots = ["` + r.slots[0] + `", "` + r.slots[1] + `"]
max_size = ` + fmt.Sprint(fuzzSlotSize) + `
[[target]]
name = "app"
kind = "file"
file_types = [1]
file_paths = ["/opt/app/bundle.tar"]
path = "` + r.appPath + `"
max_size = 4096
`))
	if err != nil {
		t.Fatal(err)
	}
	r.cfg = cfg
	os.MkdirAll(cfg.StateDir, 0o700)
	r.start(false)
	t.Cleanup(func() { r.e.Close() })
	return r
}

// start opens the boot file and the engine on the device's state, as a (re)started writer
// does; powerCycle first lets the simulated bootloader boot.
func (r *fuzzRig) start(powerCycle bool) {
	fb, err := boot.NewFile(filepath.Join(r.cfg.StateDir, "boot.json"), r.cfg.Boot.BootLimit, hclog.NewNullLogger())
	if err != nil {
		r.t.Fatal(err)
	}
	if powerCycle {
		if err := fb.Boot(context.Background(), ""); err != nil { // no boot id: always a power-on
			r.t.Fatal(err)
		}
	}
	r.fb = fb
	e, err := New(context.Background(), r.cfg, Deps{Boot: fb, Reboot: func(context.Context) error { return nil }}, hclog.NewNullLogger())
	if err != nil {
		r.t.Fatalf("engine does not start on its own state: %v", err)
	}
	r.e = e
}

func (r *fuzzRig) restart(powerCycle bool) {
	r.e.Close()
	r.start(powerCycle)
}

func (r *fuzzRig) slotPath(slot string) string {
	if slot == boot.SlotB {
		return r.slots[1]
	}
	return r.slots[0]
}

// checkPromise: whatever the calls so far, a pending or trial slot starts with a signed image
// and an installed file is exactly one.
func (r *fuzzRig) checkPromise(after string) {
	r.t.Helper()
	st, err := r.fb.State(context.Background())
	if err != nil {
		r.t.Fatal(err)
	}
	check := func(slot, why string) {
		b, err := os.ReadFile(r.slotPath(slot))
		if err != nil {
			r.t.Fatal(err)
		}
		if _, ok := r.kit.signedPrefix(b, false); !ok {
			r.t.Fatalf("after %s: slot %s is %s but holds no signed image (boot state %+v)", after, slot, why, st)
		}
	}
	if st.Pending != "" {
		check(st.Pending, "activated")
	}
	if st.Trial {
		check(st.Booted, "on trial")
	}
	if st.Committed != boot.SlotA || st.Booted != boot.SlotA {
		// Slot b only ever runs or gets committed through an activation.
		for _, s := range []string{st.Committed, st.Booted} {
			if s == boot.SlotB {
				check(s, "running or committed")
			}
		}
	}
	if b, err := os.ReadFile(r.appPath); err == nil {
		if _, ok := r.kit.signedPrefix(b, true); !ok {
			r.t.Fatalf("after %s: installed file of %d bytes is not a signed image", after, len(b))
		}
	}
}

// typedRefusal: every error is a *status.Error with a reason from the table, never
// unspecified or REASON_OTHER (nothing here fails for a reason outside the caller's
// control: media are temporary files).
func typedRefusal(t *testing.T, op string, err error, allowed ...otav1.Reason) otav1.Reason {
	t.Helper()
	if err == nil {
		return otav1.Reason_REASON_UNSPECIFIED
	}
	var se *status.Error
	if !errors.As(err, &se) {
		t.Fatalf("%s: untyped error %T %v", op, err, err)
	}
	if _, ok := status.Table[se.Reason]; !ok || se.Reason == otav1.Reason_REASON_UNSPECIFIED || se.Reason == otav1.Reason_REASON_OTHER {
		t.Fatalf("%s: refusal without a usable reason: %v", op, err)
	}
	if len(allowed) > 0 {
		for _, a := range allowed {
			if se.Reason == a {
				return se.Reason
			}
		}
		t.Fatalf("%s: reason %s not expected here: %v", op, status.Name(se.Reason), err)
	}
	return se.Reason
}

// checkInfo: a session as the engine reports it has a consistent size and missing bitmap.
func checkInfo(t *testing.T, op string, s *otav1.SessionInfo) {
	t.Helper()
	if s == nil {
		t.Fatalf("%s: no session info", op)
	}
	bs := uint64(s.GetBlockSize())
	if bs == 0 || s.GetTotalBlocks() != (s.GetFileSize()+bs-1)/bs || s.GetDurableBlocks() > s.GetTotalBlocks() {
		t.Fatalf("%s: inconsistent session %v", op, s)
	}
	m := bitmap.Bitmap(s.GetMissing())
	if err := m.Check(int(s.GetTotalBlocks())); err != nil {
		t.Fatalf("%s: missing: %v", op, err)
	}
	n := uint64(m.Count())
	if n != s.GetTotalBlocks()-s.GetDurableBlocks() {
		t.Fatalf("%s: %d missing + %d durable != %d blocks", op, n, s.GetDurableBlocks(), s.GetTotalBlocks())
	}
}

// opReader hands out the fuzz input byte by byte (zeros once exhausted).
type opReader struct {
	b []byte
}

func (o *opReader) next() byte {
	if len(o.b) == 0 {
		return 0
	}
	c := o.b[0]
	o.b = o.b[1:]
	return c
}

type fuzzSession struct {
	id  string
	img int // index in kit.imgs of the content it was begun for
	req *otav1.BeginSessionRequest
}

const (
	opBegin = iota
	opWrite
	opWriteAll
	opFinish
	opAbort
	opActivate
	opReboot
	opRestart
	opPowerCycle
	opCommit
	opReject
	opSelfTest
	opState
	numOps
)

var opNames = []string{"begin", "write", "write-all", "finish", "abort", "activate", "reboot", "restart", "power-cycle", "commit", "reject", "self-test", "state"}

// FuzzSession drives one device through a sequence of calls decoded from the input.
func FuzzSession(f *testing.F) {
	kit := newFuzzKit(f)
	// Seeds: a full update with commit; a corrupted block; out-of-order calls; a crash
	// between verify and activate; a rejected trial; the plain-file target.
	for _, s := range sessionSeeds {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, input []byte) {
		if len(input) > 512 {
			return
		}
		runSession(t, kit, input)
	})
}

// Seed builders: the argument bytes each operation reads, in order.
func seq(parts ...[]byte) []byte { return bytes.Join(parts, nil) }

// begin: target (0 file type 0, 1 file path, 2 the file target), image, size variant,
// block size index (0: 256, 2: 1024), signature, cert, algorithm, job, version variants.
func sBegin(tgt, img, bs, job byte) []byte { return []byte{opBegin, tgt, img, 0, bs, 0, 0, 0, job, 0} }
func sWriteAll(id, rev byte) []byte        { return []byte{opWriteAll, id, rev, 1} }
func sWrite(id byte, blocks ...byte) []byte {
	return append(append([]byte{opWrite, id, byte(len(blocks)/2 - 1)}, blocks...), 0)
}
func sFinish(id byte) []byte       { return []byte{opFinish, id} }
func sAbort(id byte) []byte        { return []byte{opAbort, id, 6} }
func sActivate(id byte) []byte     { return []byte{opActivate, id} }
func sCommit(job byte) []byte      { return []byte{opCommit, job} }
func sReject(job, why byte) []byte { return []byte{opReject, job, why} }
func sSelfTest(job byte) []byte    { return []byte{opSelfTest, job} }
func sOp(op byte) []byte           { return []byte{op} }

// sessionSeeds: a full update with commit; a corrupted block first, the right one after;
// calls out of order with guessed ids; a crash between verify and activate and a rejected
// trial; the plain-file target; a busy target; a restart mid-download.
var sessionSeeds = [][]byte{
	seq(sBegin(0, 0, 2, 0), sWriteAll(0, 0), sFinish(0), sActivate(0), sOp(opReboot), sOp(opPowerCycle), sSelfTest(1), sCommit(1), sOp(opState)),
	seq(sBegin(0, 0, 2, 0), sWrite(0, 1, 1, 2, 0), sWriteAll(0, 1), sFinish(0), sActivate(0), sOp(opState)),
	seq(sActivate(200), sFinish(201), sCommit(2), sReject(0, 0), sWrite(202, 0, 0), sAbort(203)),
	seq(sBegin(1, 1, 0, 0), sWriteAll(0, 0), sFinish(0), sOp(opRestart), sActivate(0), sOp(opPowerCycle), sReject(1, 3), sOp(opPowerCycle), sOp(opState)),
	seq(sBegin(2, 2, 0, 0), sWriteAll(0, 1), sFinish(0), sActivate(0), sOp(opState)),
	seq(sBegin(0, 0, 2, 0), sWriteAll(0, 1), sFinish(0), sBegin(0, 1, 2, 1), sAbort(0), sBegin(0, 1, 2, 1), sOp(opState)),
	seq(sBegin(0, 0, 0, 0), sWrite(0, 0, 0, 1, 0, 2, 0), sOp(opRestart), sWriteAll(0, 0), sFinish(0), sOp(opPowerCycle), sActivate(0)),
}

// TestSessionSeedsDrive: the decoder of FuzzSession really drives updates: the first seed
// commits image 0 in slot b, the fifth installs the file. (If the argument layout drifted,
// the fuzz target would only ever exercise refusals.)
func TestSessionSeedsDrive(t *testing.T) {
	kit := newFuzzKit(t)
	run := runSession(t, kit, sessionSeeds[0])
	if run.ok[opBegin] != 1 || run.ok[opFinish] != 1 || run.ok[opActivate] != 1 || run.ok[opCommit] != 1 {
		t.Fatalf("seed 0 successes per op %v", run.ok)
	}
	st, _ := run.r.fb.State(context.Background())
	b, _ := os.ReadFile(run.r.slots[1])
	if st.Booted != boot.SlotB || st.Committed != boot.SlotB || st.Trial || !bytes.HasPrefix(b, kit.imgs[0]) {
		t.Fatalf("after seed 0: boot state %+v", st)
	}
	run = runSession(t, kit, sessionSeeds[4])
	if got, _ := os.ReadFile(run.r.appPath); !bytes.Equal(got, kit.imgs[2]) || run.ok[opActivate] != 1 {
		t.Fatalf("seed 4: installed %d bytes, successes %v", len(got), run.ok)
	}
	// A corrupted first write of a block is kept (writes are idempotent): verification fails.
	run = runSession(t, kit, sessionSeeds[1])
	if run.ok[opFinish] != 0 || run.ok[opActivate] != 0 {
		t.Fatalf("seed 1: corrupted image verified or activated: %v", run.ok)
	}
}

// sessionRun is what a run did: successful calls per operation.
type sessionRun struct {
	r  *fuzzRig
	ok [numOps]int
}

// runSession decodes input into calls and checks every property after each.
func runSession(t *testing.T, kit *fuzzKit, input []byte) *sessionRun {
	run := &sessionRun{}
	r := newFuzzRig(t, kit)
	run.r = r
	in := &opReader{b: input}
	var sessions []*fuzzSession
	guessed := hex.EncodeToString(bytes.Repeat([]byte{0x5a}, 16))
	pickID := func() (string, *fuzzSession) {
		c := in.next()
		switch {
		case c < 200 && len(sessions) > 0:
			s := sessions[int(c)%len(sessions)]
			return s.id, s
		case c%4 == 0:
			return guessed, nil
		case c%4 == 1:
			return "", nil
		case c%4 == 2:
			return strings.Repeat("../", 300), nil
		}
		return "\x00\xff", nil
	}
	ctx := context.Background()
	for step := 0; len(in.b) > 0 && step < 48; step++ {
		op := int(in.next()) % numOps
		name := fmt.Sprintf("step %d %s", step, opNames[op])
		failed := false
		// A session id never handed out is refused, whatever else the call carries.
		mustRefuse := func(name string, err error, allowed ...otav1.Reason) {
			t.Helper()
			if err == nil {
				t.Fatalf("%s: accepted an unknown session id", name)
			}
			failed = true
			typedRefusal(t, name, err, allowed...)
		}
		refuse := func(name string, err error, allowed ...otav1.Reason) {
			t.Helper()
			if err != nil {
				failed = true
			}
			typedRefusal(t, name, err, allowed...)
		}
		switch op {
		case opBegin:
			req, img := r.beginRequest(in)
			resp, err := r.e.Begin(ctx, req)
			if err != nil {
				refuse(name, err)
				break
			}
			checkInfo(t, name, resp.GetSession())
			s := resp.GetSession()
			if s.GetFileSize() != req.GetFileSize() || s.GetJobId() != req.GetJobId() {
				t.Fatalf("%s: session %v for request %v", name, s, req)
			}
			if s.GetTarget() == "rootfs" {
				st, _ := r.fb.State(ctx)
				if s.GetSlot() != boot.Other(st.Booted) || st.Trial || st.Pending != "" {
					t.Fatalf("%s: session writes slot %s in boot state %+v", name, s.GetSlot(), st)
				}
			}
			sessions = append(sessions, &fuzzSession{id: s.GetSessionId(), img: img, req: req})
		case opWrite, opWriteAll:
			id, s := pickID()
			var blocks []*otav1.Block
			if op == opWriteAll {
				blocks = r.allBlocks(s, in)
			} else {
				blocks = r.hostileBlocks(s, in)
			}
			sync := in.next()&1 == 1
			res, err := r.e.Write(ctx, id, blocks, sync)
			if s == nil {
				mustRefuse(name, err, otav1.Reason_REASON_BAD_FILE_HANDLE)
				break
			}
			if err != nil {
				refuse(name, err, otav1.Reason_REASON_BAD_FILE_HANDLE, otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, otav1.Reason_REASON_INVALID_REQUEST)
				break
			}
			if res.Durable > res.Received || res.Received > res.Total || (sync && (!res.Synced || res.Durable != res.Received)) {
				t.Fatalf("%s: write result %+v (sync %v)", name, res, sync)
			}
		case opFinish:
			id, s := pickID()
			resp, err := r.e.Finish(ctx, id)
			if s == nil {
				mustRefuse(name, err, otav1.Reason_REASON_BAD_FILE_HANDLE)
				break
			}
			if err != nil {
				refuse(name, err, otav1.Reason_REASON_BAD_FILE_HANDLE, otav1.Reason_REASON_SIG_CHECK_FAILED)
				break
			}
			checkInfo(t, name, resp.GetSession())
			// The oracle: what Finish calls verified is, on the medium, exactly an image
			// the trusted key signed, and its digest is the one reported.
			data := r.mediumContent(resp.GetSession())
			if !r.kit.verifies(data, s.req.GetSignature()) {
				t.Fatalf("%s: verified, but the medium does not hold the signed image", name)
			}
			if sum := sha256.Sum256(data); hex.EncodeToString(sum[:]) != resp.GetSha256() {
				t.Fatalf("%s: sha256 %s, medium has %x", name, resp.GetSha256(), sum)
			}
		case opAbort:
			id, s := pickID()
			err := r.e.Abort(ctx, id, otav1.Reason(in.next()))
			if s == nil {
				mustRefuse(name, err, otav1.Reason_REASON_BAD_FILE_HANDLE)
			} else {
				refuse(name, err, otav1.Reason_REASON_BAD_FILE_HANDLE)
			}
		case opActivate:
			id, s := pickID()
			resp, err := r.e.Activate(ctx, id)
			if s == nil {
				mustRefuse(name, err, otav1.Reason_REASON_BAD_FILE_HANDLE)
				break
			}
			if err != nil {
				refuse(name, err, otav1.Reason_REASON_BAD_FILE_HANDLE, otav1.Reason_REASON_BAD_IMAGE_STATE,
					otav1.Reason_REASON_SESSION_LOST, otav1.Reason_REASON_SIG_CHECK_FAILED, otav1.Reason_REASON_VERSION_CHECK)
				break
			}
			// Activated: the bytes on the medium are exactly the image this session's
			// signature signs.
			var data []byte
			if resp.GetTarget() == "rootfs" {
				b, _ := os.ReadFile(r.slotPath(resp.GetSlot()))
				if uint64(len(b)) < s.req.GetFileSize() {
					t.Fatalf("%s: slot shorter than the image", name)
				}
				data = b[:s.req.GetFileSize()]
				if st, _ := r.fb.State(ctx); st.Pending != resp.GetSlot() {
					t.Fatalf("%s: activated slot %s, boot state %+v", name, resp.GetSlot(), st)
				}
			} else {
				data, _ = os.ReadFile(r.appPath)
			}
			if !r.kit.verifies(data, s.req.GetSignature()) {
				t.Fatalf("%s: activated %s/%s without the signed image on it", name, resp.GetTarget(), resp.GetSlot())
			}
		case opReboot:
			refuse(name, r.e.Reboot(ctx), otav1.Reason_REASON_BAD_IMAGE_STATE)
		case opRestart:
			r.restart(false)
		case opPowerCycle:
			r.restart(true)
		case opCommit:
			_, err := r.e.Commit(ctx, r.jobID(in))
			refuse(name, err, otav1.Reason_REASON_BAD_IMAGE_STATE)
		case opReject:
			_, err := r.e.Reject(ctx, r.jobID(in), otav1.Reason(in.next()))
			refuse(name, err, otav1.Reason_REASON_BAD_IMAGE_STATE)
		case opSelfTest:
			_, err := r.e.SelfTest(ctx, r.jobID(in))
			refuse(name, err, otav1.Reason_REASON_BAD_IMAGE_STATE)
		case opState:
			ds, err := r.e.State(ctx)
			if err != nil {
				t.Fatalf("%s: %v", name, err)
			}
			for _, s := range ds.GetSessions() {
				checkInfo(t, name, s)
			}
		}
		if !failed {
			run.ok[op]++
		}
		if os.Getenv("GWOTA_FUZZ_TRACE") != "" {
			t.Logf("%s ok=%v", name, !failed)
		}
		r.checkPromise(name)
	}
	return run
}

func (r *fuzzRig) jobID(in *opReader) string {
	switch in.next() % 4 {
	case 0:
		return ""
	case 1:
		return "job-1"
	case 2:
		return "job-2"
	}
	return strings.Repeat("x", 100)
}

// beginRequest builds a BeginSession request, mostly plausible, sometimes hostile.
func (r *fuzzRig) beginRequest(in *opReader) (*otav1.BeginSessionRequest, int) {
	var ft *int32
	fp := ""
	switch in.next() % 6 {
	case 0:
		ft = new(int32)
	case 1:
		fp = "/opt/fw/gateway.img"
	case 2:
		one := int32(1)
		ft = &one
	case 3:
		seven := int32(7)
		ft = &seven
	case 4:
		one := int32(1)
		ft, fp = &one, "/opt/fw/gateway.img" // disagree
	case 5:
		fp = "../../../../etc/shadow"
	}
	img := int(in.next()) % len(r.kit.imgs)
	size := uint64(len(r.kit.imgs[img]))
	switch in.next() % 10 {
	case 1:
		size--
	case 2:
		size++
	case 3:
		size = 0
	case 4:
		size = 1<<62 + 1
	case 5:
		size = 1<<64 - 1
	case 6:
		size = fuzzSlotSize + 1
	}
	bs := []uint32{256, 512, 1024, 4096, 0, 255, 8192, 1000, 1<<32 - 1, 300}[in.next()%10]
	sig := r.kit.sigs[img]
	switch in.next() % 8 {
	case 1:
		sig = bytes.Clone(sig)
		sig[len(sig)/2] ^= 1
	case 2:
		sig = r.kit.sigs[(img+1)%len(r.kit.sigs)]
	case 3:
		sig = nil
	case 4:
		sig = r.kit.untrusted
	case 5:
		sig = bytes.Repeat([]byte{0x30}, 2000)
	}
	cert := []string{"signer.crt.pem", "", "ota-signer", "../../../../etc/ssl/private/x.pem", "/etc/ota/keys/../keys/signer.crt.pem", "other.pem", strings.Repeat("a", 300), "signer.crt.pem\x00"}[in.next()%8]
	alg := []otav1.SigAlgorithm{otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256,
		otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256, otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1, 0, 99}[in.next()%6]
	job := []string{"job-1", "job-2", "", "bad/id", strings.Repeat("j", 65), "job-1"}[in.next()%6]
	ver := []string{"", "", "1.0", "../x", "2.0"}[in.next()%5]
	return &otav1.BeginSessionRequest{JobId: job, FileType: ft, FilePath: fp, FileSize: size, BlockSize: bs,
		SigAlgorithm: alg, Signature: sig, CertName: cert, Version: ver}, img
}

// allBlocks: every block of the session's image, in an order and batch chosen by the input.
func (r *fuzzRig) allBlocks(s *fuzzSession, in *opReader) []*otav1.Block {
	if s == nil || s.req.GetBlockSize() == 0 {
		return nil
	}
	img := r.kit.imgs[s.img]
	bs := int(s.req.GetBlockSize())
	size := int(min(s.req.GetFileSize(), uint64(len(img))+1))
	rev := in.next()&1 == 1
	var out []*otav1.Block
	for off := 0; off < size && len(out) < 64; off += bs {
		end := min(off+bs, size)
		data := make([]byte, end-off)
		copy(data, img[min(off, len(img)):min(end, len(img))])
		out = append(out, &otav1.Block{Offset: uint64(off), Data: data})
	}
	if rev {
		for i, j := 0, len(out)-1; i < j; i, j = i+1, j-1 {
			out[i], out[j] = out[j], out[i]
		}
	}
	return out
}

// hostileBlocks: a few blocks with input-chosen offsets and contents: right, corrupted,
// another image's, short, long, unaligned, past the end, overflowing.
func (r *fuzzRig) hostileBlocks(s *fuzzSession, in *opReader) []*otav1.Block {
	n := int(in.next()%4) + 1
	bs := uint64(256)
	img := r.kit.imgs[0]
	if s != nil && s.req.GetBlockSize() != 0 {
		bs = uint64(s.req.GetBlockSize())
		img = r.kit.imgs[s.img]
	}
	var out []*otav1.Block
	for range n {
		k := uint64(in.next() % 16)
		off := k * bs
		want := bs
		if off < uint64(len(img)) {
			want = min(bs, uint64(len(img))-off)
		}
		data := make([]byte, want)
		if off < uint64(len(img)) {
			copy(data, img[off:])
		}
		switch in.next() % 9 {
		case 1:
			data[0] ^= 0xFF // same block, different content
		case 2:
			other := r.kit.imgs[(s.imgOr0()+1)%len(r.kit.imgs)]
			copy(data, other[min(off, uint64(len(other))):])
		case 3:
			data = data[:len(data)/2]
		case 4:
			data = append(data, 0)
		case 5:
			off++
		case 6:
			off = 0 - bs // wraps: the last block-aligned offset of the uint64 range
		case 7:
			off = 1 << 63
		case 8:
			data = nil
		}
		out = append(out, &otav1.Block{Offset: off, Data: data})
	}
	return out
}

func (s *fuzzSession) imgOr0() int {
	if s == nil {
		return 0
	}
	return s.img
}

// mediumContent reads what a session's medium holds for the image.
func (r *fuzzRig) mediumContent(s *otav1.SessionInfo) []byte {
	var p string
	switch s.GetTarget() {
	case "rootfs":
		p = r.slotPath(s.GetSlot())
	default:
		p = filepath.Join(filepath.Dir(r.appPath), ".bundle.tar.ota-new")
	}
	b, err := os.ReadFile(p)
	if err != nil || uint64(len(b)) < s.GetFileSize() {
		r.t.Fatalf("medium %s: %d bytes, %v", p, len(b), err)
	}
	return b[:s.GetFileSize()]
}

// FuzzJournalRestore: a session file with a valid checksum but hostile content (what a
// bug, a downgrade or an attacker with the state directory could leave) never makes the
// engine fail to start, never gets a session resumed that breaks the engine's invariants, and
// never gets anything activated that is not exactly a signed image on the medium.
func FuzzJournalRestore(f *testing.F) {
	kit := newFuzzKit(f)
	good := func(state int32, sig []byte, size uint64, durable []byte) []byte {
		s := journal.Session{ID: strings.Repeat("ab", 16), JobID: "job-1", Target: "rootfs", Slot: "b", FileSize: size,
			BlockSize: 256, Signature: sig, Algorithm: 1, CertName: "signer.crt.pem", State: state, Durable: durable}
		b, _ := jsonMarshal(s)
		return b
	}
	// 2500 bytes in 256-byte blocks: 10 blocks, bitmap ff 03. Bits past the end are a lie.
	f.Add(good(2, kit.sigs[0], 2500, []byte{0xff, 0xff}), true)
	f.Add(good(1, kit.sigs[0], 2500, []byte{0xff, 0xff}), true)
	f.Add(good(2, kit.sigs[0], 2500, []byte{0xff, 0x03}), false)
	f.Add(good(1, kit.sigs[0], 2500, []byte{0xff, 0x00}), true)
	f.Add(good(2, kit.sigs[1], 1024, []byte{0x0f}), true)
	f.Add(good(3, kit.sigs[0], 2500, []byte{0xff, 0x03}), true)
	f.Add([]byte(`{"id":"`+strings.Repeat("ab", 16)+`","job_id":"j","target":"rootfs","slot":"a","file_size":18446744073709551615,"block_size":256,"state":2,"durable":"AA=="}`), true)
	f.Add([]byte(`{"id":"`+strings.Repeat("ab", 16)+`","job_id":"j","target":"app","slot":"file","file_size":700,"block_size":256,"signature":"AA==","algorithm":1,"state":2,"durable":"Bw=="}`), true)
	// A CHUNKS session without its manifest file, a MANIFEST session under a target's name.
	f.Add([]byte(`{"id":"`+strings.Repeat("ab", 16)+`","job_id":"j","target":"rootfs","slot":"b","file_size":700,"block_size":4096,"signature":"AA==","algorithm":1,"state":1,"durable":"AA==","kind":3,"image_size":2500,"fill_done":true}`), true)
	f.Add([]byte(`{"id":"`+strings.Repeat("ab", 16)+`","job_id":"j","target":"rootfs","file_size":700,"block_size":256,"signature":"AA==","algorithm":1,"state":2,"durable":"Bw==","kind":2}`), true)
	f.Fuzz(func(t *testing.T, payload []byte, writeImage bool) {
		r := newFuzzRig(t, kit)
		r.e.Close()
		if writeImage {
			// Slot b holds image 0 (as if a download had finished), so a resumed verified
			// session of it may legitimately be activated.
			b, _ := os.ReadFile(r.slots[1])
			copy(b, kit.imgs[0])
			os.WriteFile(r.slots[1], b, 0o600)
		}
		for _, tgt := range []string{"rootfs", "app"} {
			writeFrame(t, filepath.Join(r.cfg.StateDir, "sessions", tgt+".session"), payload)
		}
		r.start(false)
		ctx := context.Background()
		ds, err := r.e.State(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, s := range ds.GetSessions() {
			checkInfo(t, "restore", s)
			if s.GetBlockSize() < config.MinBlockSize || s.GetBlockSize() > r.cfg.MaxBlockSize || len(s.GetSessionId()) != 32 {
				t.Fatalf("resumed session breaks the limits: %v", s)
			}
			if s.GetTarget() == "rootfs" && s.GetSlot() != boot.SlotB {
				t.Fatalf("resumed a session on the running slot: %v", s)
			}
			if s.GetState() == otav1.SessionState_SESSION_STATE_VERIFIED && s.GetDurableBlocks() != s.GetTotalBlocks() {
				t.Fatalf("verified session with missing blocks: %v", s)
			}
			_, err := r.e.Activate(ctx, s.GetSessionId())
			if err != nil {
				typedRefusal(t, "activate resumed", err)
			} else {
				r.checkPromise("activate resumed")
			}
			// Writing, finishing and aborting a restored session stay typed.
			_, err = r.e.Write(ctx, s.GetSessionId(), []*otav1.Block{{Offset: 0, Data: kit.imgs[0][:min(256, len(kit.imgs[0]))]}}, true)
			typedRefusal(t, "write resumed", err)
			_, err = r.e.Finish(ctx, s.GetSessionId())
			typedRefusal(t, "finish resumed", err)
		}
		r.checkPromise("restore")
	})
}

func jsonMarshal(v any) ([]byte, error) { return json.Marshal(v) }

// writeFrame stores payload as a journal file with a valid checksum: only its content is
// hostile. Payloads that are not JSON cannot be framed by journal.WriteFile (the journal fuzz
// targets cover those); they are skipped.
func writeFrame(t *testing.T, path string, payload []byte) {
	t.Helper()
	if !json.Valid(payload) {
		t.Skip("not JSON")
	}
	if err := journal.WriteFile(path, json.RawMessage(payload)); err != nil {
		t.Fatal(err)
	}
}
