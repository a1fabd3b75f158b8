package e2e

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/json"
	"fmt"
	mrand "math/rand/v2"
	"net/http"
	"net/http/httptest"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/test/harness"
	"github.com/gwota/gwota/writer/manifest"
)

// Delta updates (docs/MANIFEST.md): a signed manifest and a chunk file in one job; the writer
// fills what it finds locally, ota-net downloads only the chunks the writer still lacks.

const (
	deltaCompat    = harness.Compatible
	deltaSlot      = 2 << 20 // the running image (slot a) of the delta tests
	deltaBlock     = 4096
	chunkFileID    = 1 // backend.DeltaFiles: the manifest has file id 0, its chunk file 1
	manifestFileID = 0
)

// deltaImage is an image with its manifest and chunk file.
type deltaImage struct {
	image, manifest, chunks string
	m                       *manifest.Manifest
	data                    []byte
}

// deltaEnv is newEnv with a running image of deltaSlot bytes in slot a (the harness gives the
// rootfs target its compatible string); mod may edit the device options further.
func deltaEnv(t *testing.T, mod func(*harness.DeviceOptions)) *env {
	t.Helper()
	e := newEnv(t, embedded, func(o *harness.DeviceOptions) {
		o.SlotSize = deltaSlot
		if mod != nil {
			mod(o)
		}
	})
	return e
}

// running is the image in slot a (what the device runs before the update).
func (e *env) running() []byte {
	e.t.Helper()
	b, err := os.ReadFile(e.dev.SlotA)
	if err != nil {
		e.t.Fatal(err)
	}
	return b
}

// deltaOf writes data as an image and builds its manifest and chunk file.
func (e *env) deltaOf(name string, data []byte, p manifest.Params) deltaImage {
	e.t.Helper()
	d := deltaImage{image: filepath.Join(e.dir, name+".img"), manifest: filepath.Join(e.dir, name+".gwota-manifest"), chunks: filepath.Join(e.dir, name+".chunks"), data: data}
	if p.Target == "" {
		p.Target = harness.TargetName
	}
	if p.Compatible == "" {
		p.Compatible = deltaCompat
	}
	if p.BlockSize == 0 {
		p.BlockSize = deltaBlock
	}
	p.TempDir = e.dir
	if err := os.WriteFile(d.image, data, 0o600); err != nil {
		e.t.Fatal(err)
	}
	var chunks, mf bytes.Buffer
	if _, err := manifest.Build(context.Background(), bytes.NewReader(data), p, &chunks, &mf); err != nil {
		e.t.Fatal(err)
	}
	if err := os.WriteFile(d.manifest, mf.Bytes(), 0o600); err != nil {
		e.t.Fatal(err)
	}
	if err := os.WriteFile(d.chunks, chunks.Bytes(), 0o600); err != nil {
		e.t.Fatal(err)
	}
	m, err := manifest.Open(bytes.NewReader(mf.Bytes()), int64(mf.Len()))
	if err != nil {
		e.t.Fatal(err)
	}
	d.m = m
	return d
}

// files are the job's two files, the manifest signed by the env's signer.
func (e *env) files(d deltaImage) []backend.FileSpec {
	f := e.signer.File(d.manifest)
	f.FileID = manifestFileID
	return backend.DeltaFiles(f, d.chunks)
}

func (e *env) createDelta(jobID string, files []backend.FileSpec, protocols ...string) {
	e.t.Helper()
	if len(protocols) == 0 {
		protocols = []string{backend.ProtocolMQTT}
	}
	if err := e.cloud.CreateJob(e.ctx, backend.JobSpec{JobID: jobID, Protocols: protocols, Files: files}); err != nil {
		e.t.Fatal(err)
	}
}

// neededChunks are the chunks of d holding a block that is neither all zeros nor anywhere in
// local at a block-aligned offset: what the device must download.
func neededChunks(t *testing.T, d deltaImage, local []byte) []manifest.Chunk {
	t.Helper()
	found := map[uint64]bool{}
	if _, err := d.m.FindLocal(context.Background(), bytes.NewReader(local), int64(len(local)), 0, func(m manifest.Match, _ []byte) error {
		found[m.Block] = true
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return d.m.NeededChunks(func(b uint64) bool { return !found[b] })
}

// streamBlocksOf are the stream blocks of block size bs overlapping chunks.
func streamBlocksOf(chunks []manifest.Chunk, bs int64) []int {
	var out []int
	for _, c := range chunks {
		for b := int64(c.Offset) / bs; b <= (int64(c.Offset+c.Size)-1)/bs; b++ {
			out = append(out, int(b))
		}
	}
	return uniq(out)
}

// served are the stream blocks of the chunk file the emulator sent for jobID (each once,
// sorted), their block size, the blocks sent in all (repeats included), and the blocks it
// altered.
func served(e *env, jobID string) (blocks []int, bs int64, sent int, corrupted []int) {
	for _, r := range e.cloud.StreamRequests(jobID) {
		if r.FileID != chunkFileID || r.Rejected != "" {
			continue
		}
		if bs != 0 && r.BlockSize != bs {
			e.t.Fatalf("chunk file requested in blocks of %d and %d", bs, r.BlockSize)
		}
		bs = r.BlockSize
		blocks = append(blocks, r.Sent...)
		sent += len(r.Sent)
		corrupted = append(corrupted, r.Corrupted...)
	}
	return uniq(blocks), bs, sent, corrupted
}

// finalDetails are the statusDetails of the job's ready update.
func readyDetails(e *env, jobID string) map[string]string {
	for _, u := range e.cloud.Updates(jobID) {
		if u.StatusDetails[status.KeySelfTest] == status.SelfTestReady {
			return u.StatusDetails
		}
	}
	e.t.Fatalf("job %s has no ready update", jobID)
	return nil
}

// mutate returns a copy of img with blocks rewritten (random bytes), a run of blocks moved
// by one block, and a zeroed region: what an ext4 update does to most of an image.
func mutate(img []byte, seed uint64, rewrite []int, zeroFrom, zeroLen int) []byte {
	out := bytes.Clone(img)
	r := mrand.New(mrand.NewPCG(seed, seed))
	for _, b := range rewrite {
		for i := b * deltaBlock; i < (b+1)*deltaBlock; i++ {
			out[i] = byte(r.Uint32())
		}
	}
	// Files moved by one block: blocks 64..79 go to 65..80.
	copy(out[65*deltaBlock:81*deltaBlock], img[64*deltaBlock:80*deltaBlock])
	clear(out[zeroFrom : zeroFrom+zeroLen])
	return out
}

// TestDeltaFromRunningSlot: a delta update whose blocks are mostly in the running slot (some
// moved) or all zeros: the job succeeds with the image in slot b, the emulator served exactly
// the stream blocks overlapping the chunks with blocks the device lacks (much less than the
// image), and the ready update and the final one after the reboot say how many blocks were
// reused.
func TestDeltaFromRunningSlot(t *testing.T) {
	t.Parallel()
	e := deltaEnv(t, nil)
	v1 := e.running()
	v2 := mutate(v1, 7, []int{3, 100, 101, 250, 400, 511}, 200*deltaBlock, 32*deltaBlock)
	d := e.deltaOf("v2", v2, manifest.Params{Version: "2.0.0"})
	e.start()
	e.createDelta("delta", e.files(d))
	if ex := e.waitEnd("delta"); ex.Status != backend.StatusSucceeded {
		t.Fatalf("job ended %s %v", ex.Status, ex.StatusDetails)
	}
	checkSteps(t, e.cloud, "delta", happy)
	e.checkInstalled(d.image, 1)

	need := neededChunks(t, d, v1)
	blocks, bs, sent, _ := served(e, "delta")
	want := streamBlocksOf(need, bs)
	if !slices.Equal(blocks, want) {
		t.Errorf("the emulator served chunk-file blocks %v (block size %d), want exactly those overlapping the %d needed chunks: %v", blocks, bs, len(need), want)
	}
	// Each block once, as the emulator's records say: the link loses nothing, and the
	// stream's tail timeout waits until what it asked for could have drained at AWS's quota
	// (netagent/stream/download_test.go:TestSparseBlocksUnderQuotaAreNotLost).
	if bytesServed := int64(len(blocks)) * bs; bytesServed*10 > int64(len(v2)) {
		t.Errorf("%d bytes of the chunk file served for a %d-byte image: not a delta", bytesServed, len(v2))
	}
	if sent > len(want) {
		t.Errorf("%d chunk-file blocks sent for %d needed", sent, len(want))
	}
	var needBytes uint64
	for _, c := range need {
		needBytes += c.Size
	}
	det := readyDetails(e, "delta")
	wantReused := fmt.Sprintf("%d/%d", d.m.Blocks()-neededBlocks(t, d, v1), d.m.Blocks())
	if det["reused"] != wantReused {
		t.Errorf("ready reports reused %q, want %q (%v)", det["reused"], wantReused, det)
	}
	if us := e.cloud.Updates("delta"); us[len(us)-1].StatusDetails["reused"] != wantReused {
		t.Errorf("the final update (after the reboot) reports reused %q, want %q", us[len(us)-1].StatusDetails["reused"], wantReused)
	}
	if n, _ := strconv.Atoi(strings.Split(det[status.KeyProgress], "/")[1]); n != len(want) {
		t.Errorf("ready progress %q, want the %d stream blocks to download", det[status.KeyProgress], len(want))
	}
	t.Logf("image %d bytes; %d of %d chunks needed (%d compressed bytes); served %d blocks of %d bytes; reused %s",
		len(v2), len(need), d.m.Chunks(), needBytes, sent, bs, det["reused"])
}

// neededBlocks counts the image blocks of d found neither as zeros nor in local.
func neededBlocks(t *testing.T, d deltaImage, local []byte) uint64 {
	t.Helper()
	var found uint64
	if _, err := d.m.FindLocal(context.Background(), bytes.NewReader(local), int64(len(local)), 0, func(manifest.Match, []byte) error {
		found++
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	return d.m.Blocks() - found
}

// TestDeltaZeroRegions: an image that is mostly zeros and shares nothing with the running
// slot: the zero blocks are filled locally and only the chunks of the other blocks are
// fetched, over HTTP in coalesced ranges.
func TestDeltaZeroRegions(t *testing.T) {
	t.Parallel()
	e := deltaEnv(t, func(o *harness.DeviceOptions) { o.SlotSize = 64 << 10 })
	img := make([]byte, 4<<20)
	rnd := e.image("rnd.img", 512<<10, 77)
	data, err := os.ReadFile(rnd)
	if err != nil {
		t.Fatal(err)
	}
	copy(img[0:], data[:256<<10])     // 256 KiB at the start
	copy(img[3<<20:], data[256<<10:]) // 256 KiB at 3 MiB
	d := e.deltaOf("zeros", img, manifest.Params{Version: "2.0.0"})
	e.start()
	e.createDelta("zeros", e.files(d), backend.ProtocolHTTP)
	if ex := e.waitEnd("zeros"); ex.Status != backend.StatusSucceeded {
		t.Fatalf("job ended %s %v", ex.Status, ex.StatusDetails)
	}
	checkSteps(t, e.cloud, "zeros", happy)
	e.checkInstalled(d.image, 1)
	det := readyDetails(e, "zeros")
	if want := fmt.Sprintf("%d/%d", d.m.ZeroBlocks(), d.m.Blocks()); det["reused"] != want {
		t.Errorf("ready reports reused %q, want the %s zero blocks", det["reused"], want)
	}
	fi, err := os.Stat(d.chunks)
	if err != nil {
		t.Fatal(err)
	}
	mfi, err := os.Stat(d.manifest)
	if err != nil {
		t.Fatal(err)
	}
	got := e.cloud.HTTPBytes("zeros")
	if got > fi.Size()+mfi.Size() || got*4 > int64(len(img)) {
		t.Errorf("HTTP served %d bytes for a %d-byte image (chunk file %d, manifest %d)", got, len(img), fi.Size(), mfi.Size())
	}
	t.Logf("image %d bytes, %d zero blocks of %d; HTTP served %d bytes in ranges %v", len(img), d.m.ZeroBlocks(), d.m.Blocks(), got, e.cloud.HTTPRanges("zeros"))
}

// TestDeltaBadManifestSignature: the manifest's signature does not match its bytes: the job
// fails with sig_check_failed before any chunk is fetched, nothing is activated.
func TestDeltaBadManifestSignature(t *testing.T) {
	t.Parallel()
	e := deltaEnv(t, nil)
	v1 := e.running()
	d := e.deltaOf("v2", mutate(v1, 8, []int{5}, 0, 0), manifest.Params{Version: "2.0.0"})
	other := e.deltaOf("v3", mutate(v1, 9, []int{6}, 0, 0), manifest.Params{Version: "3.0.0"})
	sig, err := e.signer.SignFile(other.manifest)
	if err != nil {
		t.Fatal(err)
	}
	files := e.files(d)
	files[0].SigningKeyPEM, files[0].Signature = nil, sig
	e.start()
	before := e.slots()
	e.createDelta("badsig", files)
	e.wantEnd("badsig", backend.StatusFailed, otav1.Reason_REASON_SIG_CHECK_FAILED)
	e.checkUntouched(before)
	if blocks, _, _, _ := served(e, "badsig"); len(blocks) != 0 {
		t.Errorf("chunk-file blocks %v served for a manifest that failed its signature check", blocks)
	}
}

// TestDeltaWrongTargetOrCompatible: a validly signed manifest for another target, or for
// this target with another compatible string, is refused before any chunk is fetched;
// nothing is activated.
func TestDeltaWrongTargetOrCompatible(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		p      manifest.Params
		reason otav1.Reason
	}{
		{"target", manifest.Params{Target: "bootloader", Version: "2.0.0"}, otav1.Reason_REASON_TARGET_UNKNOWN},
		{"compatible", manifest.Params{Compatible: "acme,gw-2", Version: "2.0.0"}, compatibleMismatch},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			e := deltaEnv(t, nil)
			d := e.deltaOf("v2", mutate(e.running(), 10, []int{5}, 0, 0), tc.p)
			e.start()
			before := e.slots()
			e.createDelta("other", e.files(d))
			e.wantEnd("other", backend.StatusFailed, tc.reason)
			e.checkUntouched(before)
			if blocks, _, _, _ := served(e, "other"); len(blocks) != 0 {
				t.Errorf("chunk-file blocks %v served for a refused manifest", blocks)
			}
		})
	}
}

// compatibleMismatch is the writer's reason for a manifest whose compatible string is not
// the target's.
const compatibleMismatch = otav1.Reason_REASON_UNSUPPORTED

// TestDeltaDowngradeForgedVersion: with version policy "newer", the device runs 2.0.0; a
// validly signed manifest of 1.0.0 in a job whose document
// says "3.0.0" is refused with version_check: the writer compares the manifest's signed
// version, not the document's.
func TestDeltaDowngradeForgedVersion(t *testing.T) {
	t.Parallel()
	e := deltaEnv(t, nil)
	e.writerTOML(func(w map[string]any) { w["version_policy"] = "newer" })
	// The running image is 2.0.0, as the operator records it.
	if out, err := exec.CommandContext(e.ctx, bin.Writer, "set-version", "--config", e.dev.WriterConfig, "--target", harness.TargetName, "--version", "2.0.0").CombinedOutput(); err != nil {
		t.Fatalf("set-version: %v\n%s", err, out)
	}
	v1 := e.running()
	old := e.deltaOf("v1", mutate(v1, 12, []int{9}, 0, 0), manifest.Params{Version: "1.0.0"})
	e.start()
	before := e.slots()
	e.createDelta("downgrade", e.files(old))
	if err := e.cloud.RewriteDocument("downgrade", forgeVersion("3.0.0")); err != nil {
		t.Fatal(err)
	}
	e.wantEnd("downgrade", backend.StatusFailed, otav1.Reason_REASON_VERSION_CHECK)
	if after := e.slots(); after.Boot != before.Boot {
		t.Errorf("boot state changed by a refused downgrade:\n before %s\n after  %s", before.Boot, after.Boot)
	}
	if blocks, _, _, _ := served(e, "downgrade"); len(blocks) != 0 {
		t.Errorf("chunk-file blocks %v served for a refused downgrade", blocks)
	}
}

// forgeVersion sets "version" on every file of an afr_ota document.
func forgeVersion(v string) func(json.RawMessage) json.RawMessage {
	return func(doc json.RawMessage) json.RawMessage {
		var m map[string]map[string]any
		if err := json.Unmarshal(doc, &m); err != nil {
			return doc
		}
		for _, f := range m["afr_ota"]["files"].([]any) {
			f.(map[string]any)["version"] = v
		}
		out, _ := json.Marshal(m)
		return out
	}
}

// TestDeltaChunkAlteredInTransit: the emulator alters one byte of a needed chunk once; the
// writer refuses the chunk (block_hash_mismatch), ota-net fetches it again, and the update
// succeeds with the right image. Altered three times, the chunk fails the job with
// block_hash_mismatch and nothing is activated.
func TestDeltaChunkAlteredInTransit(t *testing.T) {
	t.Parallel()
	for _, times := range []int{1, 3} {
		t.Run(strconv.Itoa(times), func(t *testing.T) {
			t.Parallel()
			alteredChunk(t, times)
		})
	}
}

// alteredChunk runs a delta update whose emulator alters one needed chunk in transit the
// first times it is sent: once is refused, fetched again and installed; three times fails the
// job with block_hash_mismatch naming the chunk, the slots untouched.
func alteredChunk(t *testing.T, times int) {
	e := deltaEnv(t, nil)
	v1 := e.running()
	d := e.deltaOf("v2", mutate(v1, 13, []int{3, 100, 300}, 0, 0), manifest.Params{Version: "2.0.0"})
	need := neededChunks(t, d, v1)
	if len(need) == 0 {
		t.Fatal("nothing to download")
	}
	if err := e.dev.StartWriter(e.ctx); err != nil {
		t.Fatal(err)
	}
	before := e.slots()
	e.createDelta("altered", e.files(d))
	c := need[len(need)/2]
	e.cloud.SetFaults(e.cloud.StreamName("altered"), emulator.Faults{CorruptBlocks: times, CorruptFileID: chunkFileID, CorruptOffset: int64(c.Offset + c.Size/2)})
	if err := e.dev.StartNet(e.ctx); err != nil {
		t.Fatal(err)
	}
	if times == 1 {
		if ex := e.waitEnd("altered"); ex.Status != backend.StatusSucceeded {
			t.Fatalf("job ended %s %v", ex.Status, ex.StatusDetails)
		}
		checkSteps(t, e.cloud, "altered", happy)
		e.checkInstalled(d.image, 1)
	} else {
		ex := e.wantEnd("altered", backend.StatusFailed, otav1.Reason_REASON_BLOCK_HASH_MISMATCH)
		if ex.StatusDetails["chunk"] != strconv.Itoa(c.Index) {
			t.Errorf("failure names chunk %q, want %d: %v", ex.StatusDetails["chunk"], c.Index, ex.StatusDetails)
		}
		e.checkUntouched(before)
	}
	_, _, _, corrupted := served(e, "altered")
	if len(corrupted) != times {
		t.Fatalf("the emulator altered blocks %v, want %d", corrupted, times)
	}
	sent := 0
	for _, r := range e.cloud.StreamRequests("altered") {
		if r.FileID == chunkFileID {
			for _, b := range r.Sent {
				if b == corrupted[0] {
					sent++
				}
			}
		}
	}
	if sent < times+1 && times == 1 {
		t.Errorf("the altered block %d was sent %d times: never fetched again", corrupted[0], sent)
	}
	if n := strings.Count(e.dev.Logs(), "chunk refused"); n != times {
		t.Errorf("the writer refused %d chunks, want %d", n, times)
	}
}

// crashBins are binaries built with crash points (internal/crashpoint), once per test
// binary.
var crashBins = sync.OnceValues(func() (*harness.Binaries, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	return harness.Build(ctx, harness.BuildOptions{Race: harness.RaceEnabled, Tags: []string{"gwota_crashpoints"}})
})

// TestDeltaCrashes: each process is killed (SIGKILL, by a crash point) once during the
// delta download, and the writer during its local copy; the supervised device restarts it,
// the sessions resume from the writer's journal, and the update succeeds with the right
// image.
func TestDeltaCrashes(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct{ name, point string }{
		{"net during download", "net.block#3"},
		{"writer during download", "writer.block#6"},
		{"writer during local copy", "writer.fill#20"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			marker := filepath.Join(t.TempDir(), "fired")
			e := deltaEnv(t, func(o *harness.DeviceOptions) {
				o.Supervise = true
				o.SyncBytes = 4096
				o.Env = append(o.Env, "GWOTA_CRASHPOINT="+tc.point, "GWOTA_CRASHPOINT_FILE="+marker)
			})
			v1 := e.running()
			v2 := mutate(v1, 14, []int{1, 2, 3, 100, 101, 102, 200, 201, 300, 301, 400, 401, 402, 500}, 250*deltaBlock, 40*deltaBlock)
			d := e.deltaOf("v2", v2, manifest.Params{Version: "2.0.0", ChunkSize: deltaBlock})
			if err := e.dev.StartWriter(e.ctx); err != nil {
				t.Fatal(err)
			}
			e.createDelta("crash", e.files(d))
			slow(e, "crash")
			if err := e.dev.StartNet(e.ctx); err != nil {
				t.Fatal(err)
			}
			if ex := e.waitEnd("crash"); ex.Status != backend.StatusSucceeded {
				t.Fatalf("job ended %s %v", ex.Status, ex.StatusDetails)
			}
			e.checkInstalled(d.image, 1)
			if _, err := os.Stat(marker); err != nil {
				t.Fatalf("crash point %s never fired: %v", tc.point, err)
			}
			if c := e.dev.Crashes(); len(c) != 1 {
				t.Errorf("crashes %v, want one", c)
			}
		})
	}
}

// TestDeltaNetKilledDuringLocalCopy: ota-net is killed (SIGKILL) while the writer fills a
// 32 MiB image from the running slot inside the chunk file's Begin; the writer stops the
// fill, keeps what it made durable, and the restarted ota-net's Begin resumes it; the update
// succeeds.
func TestDeltaNetKilledDuringLocalCopy(t *testing.T) {
	t.Parallel()
	const size = 32 << 20
	lw := &logWatch{}
	e := deltaEnv(t, func(o *harness.DeviceOptions) {
		o.SlotSize = size
		o.LogTee = lw
	})
	v1 := e.running()
	v2 := mutate(v1, 15, []int{10, 2000, 5000, 8000}, 0, 0)
	d := e.deltaOf("v2", v2, manifest.Params{Version: "2.0.0"})
	e.start()
	e.createDelta("netfill", e.files(d))
	if _, err := lw.wait(e.ctx, 1, "chunks session begun", "job=netfill"); err != nil {
		t.Fatal(err)
	}
	if err := e.dev.KillNet(e.ctx); err != nil {
		t.Fatal(err)
	}
	killed := lw.String()
	if strings.Contains(killed, "local fill done") {
		t.Fatalf("the local fill of %d bytes was done before ota-net was killed: the test missed its window", size)
	}
	if err := e.dev.StartNet(e.ctx); err != nil {
		t.Fatal(err)
	}
	if ex := e.waitEnd("netfill"); ex.Status != backend.StatusSucceeded {
		t.Fatalf("job ended %s %v", ex.Status, ex.StatusDetails)
	}
	e.checkInstalled(d.image, 1)
	if !strings.Contains(lw.String(), "resuming the local fill") {
		t.Errorf("the writer did not resume a local fill")
	}
}

// TestDeltaFallbackHTTPToMQTT: a delta update whose presigned URLs all fail (403) after
// ota-net picked HTTP for its fast link: both files go on over the stream, and the chunk
// file still fetches only the stream blocks overlapping the needed chunks.
func TestDeltaFallbackHTTPToMQTT(t *testing.T) {
	t.Parallel()
	e := deltaEnv(t, func(o *harness.DeviceOptions) { o.NetConfigExtra = "link_bandwidth = \"20Mbit/s\"\n" })
	var gets atomic.Int32
	srv := httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		gets.Add(1)
		http.Error(w, "AccessDenied", http.StatusForbidden)
	}))
	t.Cleanup(srv.Close)
	e.cloud.SetHTTPURL(srv.URL)
	v1 := e.running()
	d := e.deltaOf("v2", mutate(v1, 16, []int{4, 200, 450}, 0, 0), manifest.Params{Version: "2.0.0"})
	e.start()
	e.createDelta("dfallback", e.files(d), backend.ProtocolMQTT, backend.ProtocolHTTP)
	if ex := e.waitEnd("dfallback"); ex.Status != backend.StatusSucceeded {
		t.Fatalf("job ended %s %v", ex.Status, ex.StatusDetails)
	}
	e.checkInstalled(d.image, 1)
	if gets.Load() == 0 {
		t.Fatal("HTTP was not tried first")
	}
	blocks, bs, _, _ := served(e, "dfallback")
	if want := streamBlocksOf(neededChunks(t, d, v1), bs); !slices.Equal(blocks, want) {
		t.Errorf("the stream served chunk-file blocks %v, want %v", blocks, want)
	}
}

// dictUpdate is v2 of running image v1 with an updated program: v1's bytes 100..260 blocks
// with a few bytes inserted every 5000 bytes (none of its blocks is in v1, its bytes are),
// built against v1 as the delta base, so it has delta chunks.
func dictUpdate(e *env, v1 []byte) deltaImage {
	e.t.Helper()
	prog := v1[100*deltaBlock : 260*deltaBlock]
	v2 := bytes.Clone(v1[:40*deltaBlock])
	for i := 0; i < len(prog); i += 5000 {
		v2 = append(v2, prog[i:min(i+5000, len(prog))]...)
		v2 = append(v2, "v2!"...)
	}
	v2 = append(v2, make([]byte, (deltaBlock-len(v2)%deltaBlock)%deltaBlock)...)
	v2 = append(v2, v1[300*deltaBlock:]...)
	sum := sha256.Sum256(v1)
	d := e.deltaOf("v2", v2, manifest.Params{Version: "2.0.0", Base: bytes.NewReader(v1), BaseSize: int64(len(v1)), BaseSHA256: sum[:]})
	if d.m.Deltas() == 0 {
		e.t.Fatal("no delta chunks")
	}
	return d
}

// neededUnits are the units of the chunk file a device holding local fetches: the chunks it
// needs, each replaced by its delta chunk when onBase.
func neededUnits(t *testing.T, d deltaImage, local []byte, onBase bool) []manifest.Chunk {
	var out []manifest.Chunk
	for _, c := range neededChunks(t, d, local) {
		if dd, ok := d.m.DeltaOf(c.Index); ok && onBase {
			c = d.m.Delta(dd)
		}
		out = append(out, c)
	}
	slices.SortFunc(out, func(a, b manifest.Chunk) int { return int(a.Offset) - int(b.Offset) })
	return out
}

// TestDeltaChunksFromBase: with real processes, an update built with the running image as
// its delta base (delta chunks). A device on the base: ota-net (unchanged: it fetches the
// units the writer reports missing) is served exactly the stream blocks overlapping the
// delta chunks of the chunks it lacks, far fewer bytes than the ordinary chunks; the job
// succeeds with v2 in slot b. A device running another image gets the same update through
// ordinary chunks.
func TestDeltaChunksFromBase(t *testing.T) {
	t.Parallel()
	for _, onBase := range []bool{true, false} {
		t.Run(fmt.Sprintf("on_base=%v", onBase), func(t *testing.T) {
			t.Parallel()
			e := deltaEnv(t, nil)
			v1 := e.running()
			d := dictUpdate(e, v1)
			local := v1
			if !onBase {
				// One byte of a block v2 does not hold: the slot is no longer the base.
				local = bytes.Clone(v1)
				local[280*deltaBlock+9] ^= 0xFF
				if err := os.WriteFile(e.dev.SlotA, local, 0o600); err != nil {
					t.Fatal(err)
				}
			}
			e.start()
			e.createDelta("dict", e.files(d))
			if ex := e.waitEnd("dict"); ex.Status != backend.StatusSucceeded {
				t.Fatalf("job ended %s %v", ex.Status, ex.StatusDetails)
			}
			e.checkInstalled(d.image, 1)
			need := neededUnits(t, d, local, onBase)
			var deltas int
			var needBytes uint64
			for _, c := range need {
				needBytes += c.Size
				if c.Delta {
					deltas++
				}
			}
			if onBase != (deltas > 0) {
				t.Fatalf("%d delta chunks needed on_base=%v", deltas, onBase)
			}
			blocks, bs, _, _ := served(e, "dict")
			if want := streamBlocksOf(need, bs); !slices.Equal(blocks, want) {
				t.Errorf("the emulator served chunk-file blocks %v (block size %d), want exactly those overlapping the %d needed units: %v", blocks, bs, len(need), want)
			}
			off := neededUnits(t, d, local, false)
			var offBytes uint64
			for _, c := range off {
				offBytes += c.Size
			}
			if onBase && needBytes*3 > offBytes {
				t.Errorf("on the base %d bytes of units, %d through ordinary chunks", needBytes, offBytes)
			}
			t.Logf("%d units needed (%d delta chunks), %d bytes; ordinary chunks would be %d bytes; %d stream blocks of %d served",
				len(need), deltas, needBytes, offBytes, len(blocks), bs)
		})
	}
}

// TestDeltaChunkAlteredFallsBack: on a device on the base, a delta chunk altered in transit is
// refused by the writer, which asks for its ordinary chunk instead; ota-net (unchanged)
// begins again, fetches that chunk, and the update succeeds.
func TestDeltaChunkAlteredFallsBack(t *testing.T) {
	t.Parallel()
	e := deltaEnv(t, nil)
	v1 := e.running()
	d := dictUpdate(e, v1)
	need := neededUnits(t, d, v1, true)
	c := need[len(need)-1]
	if !c.Delta {
		t.Fatalf("unit %+v is no delta chunk", c)
	}
	if err := e.dev.StartWriter(e.ctx); err != nil {
		t.Fatal(err)
	}
	e.createDelta("altered", e.files(d))
	e.cloud.SetFaults(e.cloud.StreamName("altered"), emulator.Faults{CorruptBlocks: 1, CorruptFileID: chunkFileID, CorruptOffset: int64(c.Offset + c.Size/2)})
	if err := e.dev.StartNet(e.ctx); err != nil {
		t.Fatal(err)
	}
	if ex := e.waitEnd("altered"); ex.Status != backend.StatusSucceeded {
		t.Fatalf("job ended %s %v", ex.Status, ex.StatusDetails)
	}
	e.checkInstalled(d.image, 1)
	blocks, bs, _, corrupted := served(e, "altered")
	if len(corrupted) != 1 {
		t.Fatalf("the emulator altered blocks %v, want one", corrupted)
	}
	for _, b := range streamBlocksOf([]manifest.Chunk{d.m.Chunk(c.Index)}, bs) {
		if !slices.Contains(blocks, b) {
			t.Errorf("stream block %d of ordinary chunk %d never served", b, c.Index)
		}
	}
	if n := strings.Count(e.dev.Logs(), "its ordinary chunk will be fetched instead"); n != 1 {
		t.Errorf("the writer fell back %d times, want once", n)
	}
}
