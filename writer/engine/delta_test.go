package engine

import (
	"bytes"
	"context"
	"crypto/sha256"
	"errors"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/internal/bitmap"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/sign"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/manifest"
	"github.com/gwota/gwota/writer/server"
	"github.com/gwota/gwota/writer/target"
	"github.com/gwota/gwota/writer/target/targettest"
	"github.com/gwota/gwota/writer/writertest"
)

const (
	testCompatible = "gw-board-r1"
	dbs            = 4096 // the delta tests' image block size
)

// delta is a signed manifest and its chunk file for an image.
type delta struct {
	img, mf, chunks, sig []byte
	m                    *manifest.Manifest
}

// makeDelta builds the manifest (target rootfs, compatible testCompatible, version 2.0, 4 KiB
// blocks, 16 KiB chunks unless edit says otherwise) and signs it with openssl.
func makeDelta(t testing.TB, img []byte, edit func(*manifest.Params)) *delta {
	t.Helper()
	p := manifest.Params{Target: "rootfs", Compatible: testCompatible, Version: "2.0", BlockSize: dbs, ChunkSize: 16 << 10, TempDir: t.TempDir()}
	if edit != nil {
		edit(&p)
	}
	var ch, mf bytes.Buffer
	if _, err := manifest.Build(ctx, bytes.NewReader(img), p, &ch, &mf); err != nil {
		t.Fatal(err)
	}
	path := filepath.Join(t.TempDir(), "gateway.img.gwota-manifest")
	if err := os.WriteFile(path, mf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	m, err := manifest.Open(bytes.NewReader(mf.Bytes()), int64(mf.Len()))
	if err != nil {
		t.Fatal(err)
	}
	return &delta{img: img, mf: mf.Bytes(), chunks: ch.Bytes(), sig: signFile(t, path), m: m}
}

func (d *delta) manifestReq(job string) *otav1.BeginSessionRequest {
	return &otav1.BeginSessionRequest{
		JobId: job, FileIndex: 0, Kind: otav1.SessionKind_SESSION_KIND_MANIFEST,
		FilePath: "/opt/fw/gateway.img" + manifest.PathSuffix, FileSize: uint64(len(d.mf)), BlockSize: dbs,
		SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: d.sig, CertName: "signer.crt.pem",
	}
}

// chunksReq is the CHUNKS Begin of the job's file 1; its job-document version is forged
// (the writer must use the manifest's).
func (d *delta) chunksReq(job string) *otav1.BeginSessionRequest {
	ft := int32(0)
	return &otav1.BeginSessionRequest{
		JobId: job, FileIndex: 1, Kind: otav1.SessionKind_SESSION_KIND_CHUNKS, ManifestFileIndex: 0,
		FileType: &ft, FilePath: "/opt/fw/gateway.img", FileSize: uint64(len(d.chunks)), BlockSize: dbs, Version: "99.0",
	}
}

// unit is unit u of the chunk file (an ordinary chunk, or a delta chunk after them) as
// ota-net sends it: its bytes at its offset in the chunk file.
func (d *delta) unit(u int) *otav1.Block {
	c := d.m.Unit(u)
	return &otav1.Block{Offset: c.Offset, Data: d.chunks[c.Offset : c.Offset+c.Size]}
}

// installManifest runs the MANIFEST session: begin, write, finish.
func installManifest(t testing.TB, w api.Writer, d *delta, job string) (*otav1.FinishSessionResponse, error) {
	t.Helper()
	res, err := w.Begin(ctx, d.manifestReq(job))
	if err != nil {
		return nil, err
	}
	id := res.GetSession().GetSessionId()
	n := (len(d.mf) + dbs - 1) / dbs
	for k := 0; k < n; k += 8 {
		if _, err := w.Write(ctx, id, blocks(d.mf, dbs, k, k+8), k+8 >= n); err != nil {
			t.Fatal(err)
		}
	}
	return w.Finish(ctx, id)
}

// missingChunks lists the chunks a session reports missing.
func missingChunks(s *otav1.SessionInfo) []int {
	out := []int{}
	for k := range int(s.GetTotalBlocks()) {
		if bitmap.Bitmap(s.GetMissing()).Has(k) {
			out = append(out, k)
		}
	}
	return out
}

// sendChunks writes units ks (ordinary or delta chunks), four per batch, and syncs.
func sendChunks(t testing.TB, w api.Writer, id string, d *delta, ks []int) {
	t.Helper()
	for i := 0; i < len(ks); i += 4 {
		var batch []*otav1.Block
		for _, k := range ks[i:min(i+4, len(ks))] {
			batch = append(batch, d.unit(k))
		}
		if _, err := w.Write(ctx, id, batch, i+4 >= len(ks)); err != nil {
			t.Fatalf("chunks %v: %v", ks[i:min(i+4, len(ks))], err)
		}
	}
	if len(ks) == 0 {
		if _, err := w.Write(ctx, id, nil, true); err != nil {
			t.Fatal(err)
		}
	}
}

// neededFrom computes independently of the engine what a device holding local must
// download: the chunks with a non-zero block whose bytes are at no block-aligned offset of
// local. It also returns the number of such blocks.
func neededFrom(d *delta, local []byte) ([]int, int) {
	have := map[[32]byte]bool{}
	for off := 0; off+dbs <= len(local); off += dbs {
		have[sha256.Sum256(local[off:off+dbs])] = true
	}
	missing := map[uint64]bool{}
	for b := range d.m.Blocks() {
		blk := d.img[b*dbs : min(int(b+1)*dbs, len(d.img))]
		if !d.m.IsZero(b) && (len(blk) < dbs || !have[sha256.Sum256(blk)]) {
			missing[b] = true
		}
	}
	out := []int{}
	for _, c := range d.m.NeededChunks(func(b uint64) bool { return missing[b] }) {
		out = append(out, c.Index)
	}
	return out, len(missing)
}

// countingMedium counts the bytes written to a slot.
type countingMedium struct {
	target.Medium
	written, writes *atomic.Int64
}

func (m countingMedium) WriteAt(p []byte, off int64) (int, error) {
	m.written.Add(int64(len(p)))
	m.writes.Add(1)
	return m.Medium.WriteAt(p, off)
}

func (m countingMedium) Unwrap() target.Medium { return m.Medium }

// deltaRig is a rig whose rootfs target takes manifests, slot a (running) holding local,
// and a count of what is written to the rootfs slots.
func deltaRig(t testing.TB, local []byte, edit func(*config.Config)) (*rig, *atomic.Int64, *atomic.Int64) {
	t.Helper()
	r := newRig(t, func(c *config.Config) {
		c.Targets[0].Compatible = testCompatible
		if edit != nil {
			edit(c)
		}
	})
	written, writes := &atomic.Int64{}, &atomic.Int64{}
	r.wrap = func(name string, m target.Medium) target.Medium {
		if name != "rootfs" {
			return m
		}
		return countingMedium{m, written, writes}
	}
	r.e.Close()
	r.open()
	if local != nil {
		f, err := os.OpenFile(r.slots[0], os.O_WRONLY, 0)
		if err != nil {
			t.Fatal(err)
		}
		if _, err := f.WriteAt(local, 0); err != nil {
			t.Fatal(err)
		}
		f.Close()
	}
	return r, written, writes
}

func randBlocks(rng *rand.Rand, n int) []byte {
	b := make([]byte, n*dbs)
	for i := range b {
		b[i] = byte(rng.Uint32())
	}
	return b
}

// v1v2 is an update as a package upgrade makes it: v2 is v1 with a few blocks changed, a
// region moved to other block-aligned offsets, a region zeroed (2 MiB, 512 blocks).
func v1v2() (v1, v2 []byte) {
	rng := rand.New(rand.NewPCG(1, 2))
	v1 = randBlocks(rng, 512)
	clear(v1[200*dbs : 230*dbs]) // zeros already in v1
	v2 = bytes.Clone(v1)
	for _, b := range []int{3, 77, 150, 151, 480} {
		copy(v2[b*dbs:(b+1)*dbs], randBlocks(rng, 1))
	}
	copy(v2[300*dbs:340*dbs], v1[100*dbs:140*dbs])
	clear(v2[400*dbs : 420*dbs])
	return v1, v2
}

// A delta update where most blocks come from the running slot, through the engine and
// through gRPC on a Unix socket: Begin reports missing exactly the chunks that hold a block
// the running slot lacks (manifest.NeededChunks over an independent index of slot a), fills
// the rest locally, and only those chunks are sent; the read-back matches, the slot is
// activated with the manifest's version, not the job document's.
func TestDeltaReusesRunningSlot(t *testing.T) {
	for _, via := range []string{"engine", "grpc"} {
		t.Run(via, func(t *testing.T) {
			v1, v2 := v1v2()
			r, written, _ := deltaRig(t, v1, nil)
			var w api.Writer = r.e
			if via == "grpc" {
				w = writertest.Dial(t, writertest.Serve(t, r.e, server.Options{}, server.ListenConfig{}, nil).Sock)
			}
			d := makeDelta(t, v2, nil)
			fin, err := installManifest(t, w, d, "job-d")
			if err != nil {
				t.Fatal(err)
			}
			if s := fin.GetSession(); s.GetState() != otav1.SessionState_SESSION_STATE_VERIFIED || s.GetKind() != otav1.SessionKind_SESSION_KIND_MANIFEST ||
				s.GetTarget() != "rootfs" || s.GetVersion() != "2.0" || fin.GetSha256() != fmt.Sprintf("%x", sha256.Sum256(d.mf)) {
				t.Fatalf("manifest finish: %v", fin)
			}
			res, err := w.Begin(ctx, d.chunksReq("job-d"))
			if err != nil {
				t.Fatal(err)
			}
			s := res.GetSession()
			if s.GetKind() != otav1.SessionKind_SESSION_KIND_CHUNKS || s.GetTotalBlocks() != uint64(d.m.Chunks()) || s.GetFileSize() != uint64(len(d.chunks)) ||
				s.GetBlockSize() != dbs || s.GetVersion() != "2.0" || s.GetSlot() != "b" || s.GetTarget() != "rootfs" {
				t.Fatalf("chunks session: %v", s)
			}
			var sum uint64
			for _, sz := range res.GetChunkSizes() {
				sum += uint64(sz)
			}
			if len(res.GetChunkSizes()) != d.m.Chunks() || sum != uint64(len(d.chunks)) {
				t.Fatalf("chunk_sizes: %d sizes adding up to %d, want %d and %d", len(res.GetChunkSizes()), sum, d.m.Chunks(), len(d.chunks))
			}
			slotA, _ := os.ReadFile(r.slots[0])
			want, missingBlocks := neededFrom(d, slotA)
			got := missingChunks(s)
			if diff := cmp.Diff(want, got); diff != "" {
				t.Fatalf("missing chunks (-NeededChunks +Begin):\n%s", diff)
			}
			var download uint64
			for _, k := range want {
				download += d.m.Chunk(k).Size
			}
			wantDelta := &otav1.DeltaInfo{ImageBlocks: 512, ReusedBlocks: 512 - d.m.ZeroBlocks() - uint64(missingBlocks), ZeroBlocks: d.m.ZeroBlocks(),
				DownloadBytes: download, WritesSaved: s.GetDelta().GetWritesSaved(), ImageSize: uint64(len(v2)), ImageBlockSize: dbs}
			if diff := cmp.Diff(wantDelta.String(), s.GetDelta().String()); diff != "" {
				t.Fatalf("delta (-want +got):\n%s", diff)
			}
			if download*4 > uint64(len(d.chunks)) || len(want) == 0 {
				t.Fatalf("%d of %d chunk bytes to download: most should come from slot a", download, len(d.chunks))
			}
			fill := written.Load()
			sendChunks(t, w, s.GetSessionId(), d, want)
			// Only the blocks of the chunks sent were written after the fill.
			var raw uint64
			for _, k := range want {
				raw += d.m.Chunk(k).Raw
			}
			if got := uint64(written.Load() - fill); got == 0 || got > raw {
				t.Fatalf("%d bytes written for chunks holding %d bytes of blocks", got, raw)
			}
			t.Logf("%d chunks (%d bytes) of %d downloaded; fill wrote %d bytes, chunks %d", len(want), download, d.m.Chunks(), fill, written.Load()-fill)
			done, err := w.Finish(ctx, s.GetSessionId())
			if err != nil {
				t.Fatal(err)
			}
			if done.GetSha256() != fmt.Sprintf("%x", sha256.Sum256(v2)) || !bytes.Equal(slotContent(t, r.slots[1], len(v2)), v2) {
				t.Fatal("slot b does not hold v2")
			}
			if act, err := w.Activate(ctx, s.GetSessionId()); err != nil || act.GetSlot() != "b" {
				t.Fatalf("activate: %v %v", act, err)
			}
			st, err := w.State(ctx)
			if err != nil {
				t.Fatal(err)
			}
			if v := st.GetTargets()[0].GetSlots()[1].GetVersion(); v != "2.0" || st.GetLastUpdate().GetVersion() != "2.0" {
				t.Fatalf("slot b version %q, last update %v: want the manifest's 2.0", v, st.GetLastUpdate())
			}
		})
	}
}

// An image that is mostly zeros over a slot that holds none: every all-zero chunk is filled
// locally (the slot's old bytes overwritten with zeros, as the read-back proves), only the
// chunks with data are downloaded.
func TestDeltaZeroRegions(t *testing.T) {
	rng := rand.New(rand.NewPCG(3, 4))
	img := make([]byte, 768*dbs)
	copy(img[0:], randBlocks(rng, 16))
	copy(img[500*dbs:], randBlocks(rng, 10))
	copy(img[767*dbs:], randBlocks(rng, 1))
	r, _, _ := deltaRig(t, nil, nil)
	d := makeDelta(t, img, nil)
	if _, err := installManifest(t, r.e, d, "job-z"); err != nil {
		t.Fatal(err)
	}
	res, err := r.e.Begin(ctx, d.chunksReq("job-z"))
	if err != nil {
		t.Fatal(err)
	}
	s := res.GetSession()
	slotA, _ := os.ReadFile(r.slots[0])
	want, _ := neededFrom(d, slotA)
	if diff := cmp.Diff(want, missingChunks(s)); diff != "" {
		t.Fatalf("missing chunks (-want +got):\n%s", diff)
	}
	if dl := s.GetDelta(); dl.GetZeroBlocks() != 768-27 || dl.GetReusedBlocks() != 0 || len(want) != 4+3+1 {
		t.Fatalf("delta %v, %d chunks missing", dl, len(want))
	}
	sendChunks(t, r.e, s.GetSessionId(), d, want)
	if _, err := r.e.Finish(ctx, s.GetSessionId()); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(slotContent(t, r.slots[1], len(img)), img) {
		t.Fatal("slot b does not hold the image")
	}
}

// A manifest the writer must refuse is refused at its Finish (or Begin), typed, and leaves
// no session and no file in the state directory.
func TestManifestRefused(t *testing.T) {
	img := randBlocks(rand.New(rand.NewPCG(5, 6)), 8)
	otherSig := makeDelta(t, bytes.Repeat([]byte{1}, 4*dbs), nil).sig
	for _, tc := range []struct {
		name  string
		cfg   func(*config.Config)
		setup func(r *rig)
		edit  func(*manifest.Params)
		mod   func(d *delta, q *otav1.BeginSessionRequest)
		want  otav1.Reason
	}{
		{name: "signature of another file", mod: func(d *delta, q *otav1.BeginSessionRequest) { q.Signature = otherSig },
			want: otav1.Reason_REASON_SIG_CHECK_FAILED},
		{name: "manifest altered after signing", mod: func(d *delta, q *otav1.BeginSessionRequest) { d.mf[len(d.mf)-1] ^= 1 },
			want: otav1.Reason_REASON_SIG_CHECK_FAILED},
		{name: "unknown certificate", mod: func(d *delta, q *otav1.BeginSessionRequest) { q.CertName = "someone.crt.pem" },
			want: otav1.Reason_REASON_UNTRUSTED_SIGNER},
		{name: "another target", edit: func(p *manifest.Params) { p.Target = "bootloader" },
			want: otav1.Reason_REASON_TARGET_UNKNOWN},
		{name: "another compatible", edit: func(p *manifest.Params) { p.Compatible = "gw-board-r2" },
			want: otav1.Reason_REASON_UNSUPPORTED},
		{name: "target without compatible", cfg: func(c *config.Config) { c.Targets[0].Compatible = "" },
			want: otav1.Reason_REASON_UNSUPPORTED},
		{name: "downgrade under newer", cfg: func(c *config.Config) { c.VersionPolicy = config.VersionNewer },
			setup: func(r *rig) { must[string](r.t)(r.e.SetRunningVersion(ctx, "rootfs", "3.0")) },
			want:  otav1.Reason_REASON_VERSION_CHECK},
		{name: "same version under not_same", cfg: func(c *config.Config) { c.VersionPolicy = config.VersionNotSame },
			setup: func(r *rig) { must[string](r.t)(r.e.SetRunningVersion(ctx, "rootfs", "2.0")) },
			want:  otav1.Reason_REASON_VERSION_CHECK},
		{name: "chunk larger than max_block_size", cfg: func(c *config.Config) { c.MaxBlockSize = dbs },
			want: otav1.Reason_REASON_FILE_TOO_LARGE},
		{name: "manifest larger than the limit", mod: func(d *delta, q *otav1.BeginSessionRequest) { q.FileSize = MaxManifestSize + 1 },
			want: otav1.Reason_REASON_FILE_TOO_LARGE},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r, _, _ := deltaRig(t, nil, tc.cfg)
			if tc.setup != nil {
				tc.setup(r)
			}
			d := makeDelta(t, img, tc.edit)
			q := d.manifestReq("job-r")
			if tc.mod != nil {
				tc.mod(d, q)
			}
			var err error
			res, err := r.e.Begin(ctx, q)
			if err == nil {
				id := res.GetSession().GetSessionId()
				if _, err := r.e.Write(ctx, id, blocks(d.mf, dbs, 0, len(d.mf)/dbs+1), true); err != nil {
					t.Fatal(err)
				}
				_, err = r.e.Finish(ctx, id)
				wantReason(t, err, tc.want)
			} else {
				wantReason(t, err, tc.want)
			}
			st := must[*otav1.DeviceState](t)(r.e.State(ctx))
			if len(st.GetSessions()) != 0 {
				t.Fatalf("sessions left: %v", st.GetSessions())
			}
			left, _ := filepath.Glob(filepath.Join(r.cfg.StateDir, "sessions", "*"))
			if len(left) != 0 {
				t.Fatalf("state directory keeps %v", left)
			}
			// No CHUNKS session can begin on a refused manifest.
			_, err = r.e.Begin(ctx, d.chunksReq("job-r"))
			wantReason(t, err, otav1.Reason_REASON_INVALID_REQUEST)
		})
	}
}

// The version policy compares only signed versions: under "newer", an image whose only
// version is the job document's is refused (even a "newer" one: anyone editing the job
// document writes it), unless accept_unsigned_versions says so; a validly signed old
// manifest is refused before any chunk is downloaded; a CHUNKS session ignores the job
// document's version and records the manifest's.
func TestVersionPolicySignedOnly(t *testing.T) {
	img := newImage(t, 3*4096)
	r, _, _ := deltaRig(t, nil, func(c *config.Config) { c.VersionPolicy = config.VersionNewer })
	must[string](t)(r.e.SetRunningVersion(ctx, "rootfs", "1.0"))
	for _, v := range []string{"9.9", ""} {
		_, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.Version = v })
		wantReason(t, err, otav1.Reason_REASON_VERSION_CHECK)
	}
	// A validly signed old image, its job document claiming a newer version.
	old := makeDelta(t, img.data, func(p *manifest.Params) { p.Version = "0.9" })
	mq := old.manifestReq("job-old")
	mq.Version = "9.9"
	res, err := r.e.Begin(ctx, mq)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := r.e.Write(ctx, res.GetSession().GetSessionId(), blocks(old.mf, dbs, 0, len(old.mf)/dbs+1), true); err != nil {
		t.Fatal(err)
	}
	_, err = r.e.Finish(ctx, res.GetSession().GetSessionId())
	wantReason(t, err, otav1.Reason_REASON_VERSION_CHECK)

	d := makeDelta(t, img.data, nil) // signed 2.0
	if _, err := installManifest(t, r.e, d, "job-new"); err != nil {
		t.Fatal(err)
	}
	q := d.chunksReq("job-new")
	q.Version = "0.1" // forged: ignored
	res, err = r.e.Begin(ctx, q)
	if err != nil {
		t.Fatal(err)
	}
	if res.GetSession().GetVersion() != "2.0" {
		t.Fatalf("session version %q, want the manifest's", res.GetSession().GetVersion())
	}

	// The operator who trusts job documents says so.
	r2, _, _ := deltaRig(t, nil, func(c *config.Config) { c.VersionPolicy, c.AcceptUnsignedVersions = config.VersionNewer, true })
	must[string](t)(r2.e.SetRunningVersion(ctx, "rootfs", "1.0"))
	if _, err := r2.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.Version = "9.9" }); err != nil {
		t.Fatal(err)
	}
}

// A chunk altered in transit is refused with block_hash_mismatch naming it, and nothing of
// its batch is written (not even the good chunk before it); sent again intact, it is
// accepted and the update completes.
func TestChunkHashMismatch(t *testing.T) {
	for _, via := range []string{"engine", "grpc"} {
		t.Run(via, func(t *testing.T) { testChunkHashMismatch(t, via) })
	}
}

func testChunkHashMismatch(t *testing.T, via string) {
	v1, v2 := v1v2()
	r, _, writes := deltaRig(t, v1, nil)
	var w api.Writer = r.e
	if via == "grpc" {
		w = writertest.Dial(t, writertest.Serve(t, r.e, server.Options{}, server.ListenConfig{}, nil).Sock)
	}
	d := makeDelta(t, v2, nil)
	if _, err := installManifest(t, w, d, "job-h"); err != nil {
		t.Fatal(err)
	}
	res, err := w.Begin(ctx, d.chunksReq("job-h"))
	if err != nil {
		t.Fatal(err)
	}
	id, missing := res.GetSession().GetSessionId(), missingChunks(res.GetSession())
	if len(missing) < 2 {
		t.Fatalf("%d chunks missing", len(missing))
	}
	good, bad := d.unit(missing[0]), d.unit(missing[1])
	for _, where := range []int{0, len(bad.Data) / 2, len(bad.Data) - 1} {
		altered := &otav1.Block{Offset: bad.Offset, Data: bytes.Clone(bad.Data)}
		altered.Data[where] ^= 0x40
		before := writes.Load()
		_, err = w.Write(ctx, id, []*otav1.Block{good, altered}, true)
		wantReason(t, err, otav1.Reason_REASON_BLOCK_HASH_MISMATCH)
		var se *status.Error
		if !errors.As(err, &se) || se.Meta["chunk"] != strconv.Itoa(missing[1]) || !status.IsClass(err, status.ClassRetryable) {
			t.Fatalf("error %v: want metadata chunk=%d, class retryable", err, missing[1])
		}
		if writes.Load() != before {
			t.Fatalf("byte %d altered: %d writes for a refused batch", where, writes.Load()-before)
		}
	}
	st := must[*otav1.DeviceState](t)(w.State(ctx))
	if got := st.GetSessions()[0].GetReceivedBlocks(); got != res.GetSession().GetReceivedBlocks() {
		t.Fatalf("received %d chunks, before the refused batches %d", got, res.GetSession().GetReceivedBlocks())
	}
	sendChunks(t, w, id, d, missing)
	if _, err := w.Finish(ctx, id); err != nil {
		t.Fatal(err)
	}
}

// Hostile CHUNKS writes: an offset that is not the start of a chunk with bytes, a length
// that is not the chunk's, are refused whole before anything is written; a chunk sent twice
// (in one batch or again later) is written once.
func TestChunkWritesHostile(t *testing.T) {
	v1, v2 := v1v2()
	r, _, writes := deltaRig(t, v1, nil)
	d := makeDelta(t, v2, nil)
	if _, err := installManifest(t, r.e, d, "job-x"); err != nil {
		t.Fatal(err)
	}
	res, err := r.e.Begin(ctx, d.chunksReq("job-x"))
	if err != nil {
		t.Fatal(err)
	}
	id, missing := res.GetSession().GetSessionId(), missingChunks(res.GetSession())
	k := missing[len(missing)/2]
	c := d.unit(k)
	zeroChunk := -1
	for i := range d.m.Chunks() {
		if d.m.Chunk(i).Size == 0 {
			zeroChunk = i
			break
		}
	}
	if zeroChunk < 0 || c.Offset == 0 {
		t.Fatalf("the image needs a chunk of zeros and a missing chunk past the first (got %d, %d)", zeroChunk, k)
	}
	for _, tc := range []struct {
		name  string
		batch []*otav1.Block
		want  otav1.Reason
	}{
		{"inside a chunk", []*otav1.Block{c, {Offset: c.Offset + 1, Data: c.Data[1:]}}, otav1.Reason_REASON_BLOCK_OUT_OF_RANGE},
		{"past the end", []*otav1.Block{c, {Offset: uint64(len(d.chunks)), Data: []byte{1}}}, otav1.Reason_REASON_BLOCK_OUT_OF_RANGE},
		{"far past the end", []*otav1.Block{{Offset: 1 << 62, Data: []byte{1}}}, otav1.Reason_REASON_BLOCK_OUT_OF_RANGE},
		{"a chunk of zeros (never sent)", []*otav1.Block{{Offset: d.m.Chunk(zeroChunk).Offset, Data: nil}}, otav1.Reason_REASON_INVALID_REQUEST},
		{"short", []*otav1.Block{c, {Offset: c.Offset, Data: c.Data[:len(c.Data)-1]}}, otav1.Reason_REASON_INVALID_REQUEST},
		{"long", []*otav1.Block{{Offset: c.Offset, Data: append(bytes.Clone(c.Data), 0)}}, otav1.Reason_REASON_INVALID_REQUEST},
		{"empty", []*otav1.Block{{Offset: c.Offset}}, otav1.Reason_REASON_INVALID_REQUEST},
		{"a later chunk's bytes at this offset", []*otav1.Block{{Offset: c.Offset, Data: d.unit(missing[len(missing)-1]).Data}}, otav1.Reason_REASON_INVALID_REQUEST},
	} {
		before := writes.Load()
		_, err := r.e.Write(ctx, id, tc.batch, false)
		if status.ReasonOf(err) != tc.want && !(tc.name == "a later chunk's bytes at this offset" && status.ReasonOf(err) == otav1.Reason_REASON_BLOCK_HASH_MISMATCH) {
			t.Errorf("%s: got %v, want %s", tc.name, err, status.Name(tc.want))
		}
		if writes.Load() != before {
			t.Errorf("%s: %d writes for a refused batch", tc.name, writes.Load()-before)
		}
	}
	res2, err := r.e.Write(ctx, id, []*otav1.Block{c, c, c}, true)
	if err != nil || res2.Received != res.GetSession().GetReceivedBlocks()+1 {
		t.Fatalf("duplicates: %+v %v", res2, err)
	}
	before := writes.Load()
	if _, err := r.e.Write(ctx, id, []*otav1.Block{c}, true); err != nil || writes.Load() != before {
		t.Fatalf("a durable chunk sent again: %v, %d writes", err, writes.Load()-before)
	}
	sendChunks(t, r.e, id, d, missing)
	if _, err := r.e.Finish(ctx, id); err != nil {
		t.Fatal(err)
	}
}

// A CHUNKS Begin is refused without the job's verified manifest, for a chunk file of
// another size, or routed to another target; a manifest session is never activated.
func TestChunksBeginRefused(t *testing.T) {
	v1, v2 := v1v2()
	r, _, _ := deltaRig(t, v1, nil)
	d := makeDelta(t, v2, nil)
	_, err := r.e.Begin(ctx, d.chunksReq("job-c"))
	wantReason(t, err, otav1.Reason_REASON_INVALID_REQUEST)
	// Begun, not finished.
	mres, err := r.e.Begin(ctx, d.manifestReq("job-c"))
	if err != nil {
		t.Fatal(err)
	}
	_, err = r.e.Begin(ctx, d.chunksReq("job-c"))
	wantReason(t, err, otav1.Reason_REASON_INVALID_REQUEST)
	if _, err := installManifest(t, r.e, d, "job-c"); err != nil {
		t.Fatal(err)
	}
	_, err = r.e.Activate(ctx, mres.GetSession().GetSessionId())
	wantReason(t, err, otav1.Reason_REASON_INVALID_REQUEST)
	for _, tc := range []struct {
		name string
		mod  func(q *otav1.BeginSessionRequest)
		want otav1.Reason
	}{
		{"another job", func(q *otav1.BeginSessionRequest) { q.JobId = "job-other" }, otav1.Reason_REASON_INVALID_REQUEST},
		{"another manifest file", func(q *otav1.BeginSessionRequest) { q.ManifestFileIndex = 7 }, otav1.Reason_REASON_INVALID_REQUEST},
		{"the manifest's own index", func(q *otav1.BeginSessionRequest) { q.FileIndex = 0 }, otav1.Reason_REASON_INVALID_REQUEST},
		{"chunk file of another size", func(q *otav1.BeginSessionRequest) { q.FileSize++ }, otav1.Reason_REASON_INVALID_REQUEST},
		{"routed to the app target", func(q *otav1.BeginSessionRequest) { ft := int32(1); q.FileType, q.FilePath = &ft, "" }, otav1.Reason_REASON_TARGET_UNKNOWN},
		{"routed nowhere", func(q *otav1.BeginSessionRequest) { q.FileType, q.FilePath = nil, "/elsewhere" }, otav1.Reason_REASON_TARGET_UNKNOWN},
	} {
		q := d.chunksReq("job-c")
		tc.mod(q)
		_, err := r.e.Begin(ctx, q)
		if status.ReasonOf(err) != tc.want {
			t.Errorf("%s: got %v, want %s", tc.name, err, status.Name(tc.want))
		}
	}
	if st := must[*otav1.DeviceState](t)(r.e.State(ctx)); len(st.GetSessions()) != 1 {
		t.Fatalf("sessions %v: want the manifest's only", st.GetSessions())
	}
}

// Re-installing the image the slot already holds writes nothing: every block is found in
// place and counted in writes_saved.
func TestWritesSavedOnReinstall(t *testing.T) {
	v1, v2 := v1v2()
	r, _, writes := deltaRig(t, v1, nil)
	d := makeDelta(t, v2, nil)
	install := func(job string) *otav1.SessionInfo {
		t.Helper()
		if _, err := installManifest(t, r.e, d, job); err != nil {
			t.Fatal(err)
		}
		res, err := r.e.Begin(ctx, d.chunksReq(job))
		if err != nil {
			t.Fatal(err)
		}
		sendChunks(t, r.e, res.GetSession().GetSessionId(), d, missingChunks(res.GetSession()))
		fin, err := r.e.Finish(ctx, res.GetSession().GetSessionId())
		if err != nil {
			t.Fatal(err)
		}
		return fin.GetSession()
	}
	first := install("job-1")
	if err := r.e.Abort(ctx, first.GetSessionId(), otav1.Reason_REASON_USER_ABORT); err != nil {
		t.Fatal(err)
	}
	before := writes.Load()
	second := install("job-2")
	if n := writes.Load() - before; n != 0 {
		t.Fatalf("%d block writes re-installing the image the slot holds", n)
	}
	// A block of a chunk that is downloaded may be met twice, in the fill and in its chunk.
	if got := second.GetDelta().GetWritesSaved(); got < 512 || first.GetDelta().GetWritesSaved() >= 512 {
		t.Fatalf("writes saved: first install %d, second %d; want every one of the 512 blocks the second time", first.GetDelta().GetWritesSaved(), got)
	}
}

// Finish reads the slot back from the medium: a slot altered after the chunks were written
// fails the SHA-256 of the manifest, and the session is closed.
func TestChunksFinishDetectsAlteredSlot(t *testing.T) {
	v1, v2 := v1v2()
	r, _, _ := deltaRig(t, v1, nil)
	d := makeDelta(t, v2, nil)
	if _, err := installManifest(t, r.e, d, "job-a"); err != nil {
		t.Fatal(err)
	}
	res, err := r.e.Begin(ctx, d.chunksReq("job-a"))
	if err != nil {
		t.Fatal(err)
	}
	id := res.GetSession().GetSessionId()
	sendChunks(t, r.e, id, d, missingChunks(res.GetSession()))
	f, err := os.OpenFile(r.slots[1], os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt([]byte{0x5A}, 310*dbs+17); err != nil { // a block filled from slot a
		t.Fatal(err)
	}
	f.Sync()
	f.Close()
	_, err = r.e.Finish(ctx, id)
	wantReason(t, err, otav1.Reason_REASON_SIG_CHECK_FAILED)
	if _, err := r.e.Activate(ctx, id); status.ReasonOf(err) != otav1.Reason_REASON_BAD_FILE_HANDLE {
		t.Fatalf("activate after a failed read-back: %v", err)
	}
}

// A fill interrupted at its sync (the data reached the medium, the fill never learned it)
// leaves the session journaled: a restarted writer resumes it at the next Begin, fills again
// without writing what is already in place (writes_saved), and the update completes.
func TestFillInterruptedResumes(t *testing.T) {
	v1, v2 := v1v2()
	r, _, _ := deltaRig(t, v1, nil)
	d := makeDelta(t, v2, nil)
	if _, err := installManifest(t, r.e, d, "job-f"); err != nil {
		t.Fatal(err)
	}
	r.wrap = func(name string, m target.Medium) target.Medium {
		if name != "rootfs" {
			return m
		}
		tm := targettest.Wrap(m)
		tm.AfterFlush = func(int) error { return errors.New("power lost after the flush") }
		return tm
	}
	r.e.Close()
	r.open()
	_, err := r.e.Begin(ctx, d.chunksReq("job-f"))
	wantReason(t, err, otav1.Reason_REASON_FILE_WRITE_FAILED)

	r.wrap = nil
	r.e.Close()
	r.open() // the writer restarts
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	if len(st.GetSessions()) != 2 {
		t.Fatalf("sessions after the restart: %v", st.GetSessions())
	}
	res, err := r.e.Begin(ctx, d.chunksReq("job-f"))
	if err != nil {
		t.Fatal(err)
	}
	slotA, _ := os.ReadFile(r.slots[0])
	want, _ := neededFrom(d, slotA)
	if !res.GetResumed() || cmp.Diff(want, missingChunks(res.GetSession())) != "" {
		t.Fatalf("resumed %v, missing %v, want %v", res.GetResumed(), missingChunks(res.GetSession()), want)
	}
	if saved := res.GetSession().GetDelta().GetWritesSaved(); saved < 400 {
		t.Fatalf("writes saved %d: the second fill wrote again what the first put in place", saved)
	}
	sendChunks(t, r.e, res.GetSession().GetSessionId(), d, want)
	if _, err := r.e.Finish(ctx, res.GetSession().GetSessionId()); err != nil {
		t.Fatal(err)
	}
}

// A writer process killed in the middle of the local fill (SIGKILL at its 100th block
// written) leaves a session that the next writer resumes to success.
func TestFillKilledResumes(t *testing.T) {
	if os.Getenv(fillChildEnv) != "" {
		fillChild(t)
		return
	}
	v1, v2 := v1v2()
	r, _, _ := deltaRig(t, v1, nil)
	d := makeDelta(t, v2, nil)
	if _, err := installManifest(t, r.e, d, "job-k"); err != nil {
		t.Fatal(err)
	}
	r.e.Close()
	req := d.chunksReq("job-k")
	cfgPath := filepath.Join(r.dir, "writer.toml")
	if err := os.WriteFile(cfgPath, []byte(r.toml), 0o600); err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command(os.Args[0], "-test.run=^TestFillKilledResumes$", "-test.count=1")
	cmd.Env = append(os.Environ(), fillChildEnv+"="+cfgPath, fillChunkSizeEnv+"="+strconv.Itoa(len(d.chunks)))
	out, err := cmd.CombinedOutput()
	var ee *exec.ExitError
	if !errors.As(err, &ee) || ee.Sys().(syscall.WaitStatus).Signal() != syscall.SIGKILL {
		t.Fatalf("the writer was not killed in the fill: %v\n%s", err, out)
	}
	r.open()
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	var chunks *otav1.SessionInfo
	for _, s := range st.GetSessions() {
		if s.GetKind() == otav1.SessionKind_SESSION_KIND_CHUNKS {
			chunks = s
		}
	}
	if chunks == nil || chunks.GetDurableBlocks() != 0 {
		t.Fatalf("after the kill: %v", st.GetSessions())
	}
	res, err := r.e.Begin(ctx, req)
	if err != nil {
		t.Fatal(err)
	}
	slotA, _ := os.ReadFile(r.slots[0])
	want, _ := neededFrom(d, slotA)
	if !res.GetResumed() || cmp.Diff(want, missingChunks(res.GetSession())) != "" {
		t.Fatalf("resumed %v, missing %v, want %v", res.GetResumed(), missingChunks(res.GetSession()), want)
	}
	if saved := res.GetSession().GetDelta().GetWritesSaved(); saved < 99 {
		t.Fatalf("writes saved %d: the blocks written before the kill were written again", saved)
	}
	sendChunks(t, r.e, res.GetSession().GetSessionId(), d, want)
	if _, err := r.e.Finish(ctx, res.GetSession().GetSessionId()); err != nil {
		t.Fatal(err)
	}
}

const (
	fillChildEnv     = "GWOTA_TEST_FILL_CHILD"
	fillChunkSizeEnv = "GWOTA_TEST_FILL_CHUNKS"
)

// fillChild is the writer process TestFillKilledResumes kills: it begins the CHUNKS session
// and SIGKILLs itself at the 100th block its fill writes.
func fillChild(t *testing.T) {
	cfg, err := config.Load(os.Getenv(fillChildEnv))
	if err != nil {
		t.Fatal(err)
	}
	cfg.Targets[0].Compatible = testCompatible
	fb, err := boot.NewFile(filepath.Join(cfg.StateDir, "boot.json"), cfg.Boot.BootLimit, hclog.NewNullLogger())
	if err != nil {
		t.Fatal(err)
	}
	var n atomic.Int64
	kill := func(name string, m target.Medium) target.Medium {
		return killMedium{m, &n}
	}
	e, err := New(ctx, cfg, Deps{Boot: fb, Reboot: func(context.Context) error { return nil }, WrapMedium: kill}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	size, _ := strconv.Atoi(os.Getenv(fillChunkSizeEnv))
	ft := int32(0)
	_, err = e.Begin(ctx, &otav1.BeginSessionRequest{JobId: "job-k", FileIndex: 1, Kind: otav1.SessionKind_SESSION_KIND_CHUNKS,
		FileType: &ft, FilePath: "/opt/fw/gateway.img", FileSize: uint64(size), BlockSize: dbs, Version: "99.0"})
	t.Fatalf("the fill ended without the kill: %v", err)
}

type killMedium struct {
	target.Medium
	n *atomic.Int64
}

func (m killMedium) WriteAt(p []byte, off int64) (int, error) {
	if m.n.Add(1) == 100 {
		syscall.Kill(os.Getpid(), syscall.SIGKILL)
		select {}
	}
	return m.Medium.WriteAt(p, off)
}

// FuzzChunkWrites sends arbitrary batches of chunks to a CHUNKS session: offsets moved,
// lengths cut or padded, bytes altered, another chunk's bytes, duplicates, with syncs in
// between. Every refusal is typed (block_out_of_range, invalid_request, block_hash_mismatch)
// and nothing hostile reaches the slot: sending the missing chunks afterwards completes an
// update whose read-back matches the manifest.
func FuzzChunkWrites(f *testing.F) {
	v1, v2 := v1v2()
	d := makeDelta(f, v2, nil)
	f.Add([]byte{0, 0, 0, 1})
	f.Add([]byte{1, 3, 1, 0, 0, 3, 0, 1})
	f.Add([]byte{2, 5, 7, 2, 3, 5, 9, 3, 4, 5, 100, 1})
	f.Add([]byte{5, 1, 2, 6, 0, 1, 0, 0, 0, 1, 0, 1})
	f.Add([]byte{4, 9, 0, 7, 4, 9, 255, 5, 0, 9, 0, 1, 0, 9, 0, 1})
	f.Fuzz(func(t *testing.T, ops []byte) {
		if len(ops) > 64 {
			ops = ops[:64]
		}
		hostileInstall(t, v1, v2, d, d.m.Chunks(), ops)
	})
}

// hostileInstall runs a CHUNKS session on a device holding local through hostileWrites with
// ops over the first n units, then sends what is still missing: the slot must end up holding
// want, whatever was sent before.
func hostileInstall(t *testing.T, local, want []byte, d *delta, n int, ops []byte) {
	t.Helper()
	r, _, _ := deltaRig(t, local, func(c *config.Config) { c.SyncBytes = 1 << 30 })
	if _, err := installManifest(t, r.e, d, "job-f"); err != nil {
		t.Fatal(err)
	}
	res, err := r.e.Begin(ctx, d.chunksReq("job-f"))
	if err != nil {
		t.Fatal(err)
	}
	id := res.GetSession().GetSessionId()
	hostileWrites(t, r, id, d, n, ops)
	sendChunks(t, r.e, id, d, missingChunks(stateOf(t, r, id)))
	fin, err := r.e.Finish(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if fin.GetSha256() != fmt.Sprintf("%x", sha256.Sum256(want)) {
		t.Fatal("the slot does not hold the image")
	}
}

// hostileWrites sends units altered as ops say (4 bytes an op: moved, cut short, padded,
// flipped or swapped for another of the n units; batched or not, synced or not) and fails
// the test on anything but success or a typed refusal: what a compromised ota-net can send.
func hostileWrites(t *testing.T, r *rig, id string, d *delta, n int, ops []byte) {
	t.Helper()
	var batch []*otav1.Block
	for i := 0; i+4 <= len(ops); i += 4 {
		kind, u, delta, flags := ops[i]%6, int(ops[i+1])%n, int(ops[i+2]), ops[i+3]
		c := d.unit(u)
		b := &otav1.Block{Offset: c.Offset, Data: bytes.Clone(c.Data)}
		switch kind {
		case 1:
			b.Offset += uint64(delta)
		case 2:
			b.Data = b.Data[:len(b.Data)-min(delta, len(b.Data))]
		case 3:
			b.Data = append(b.Data, make([]byte, delta)...)
		case 4:
			if len(b.Data) > 0 {
				b.Data[delta%len(b.Data)] ^= byte(flags | 1)
			}
		case 5:
			b.Data = d.unit((u + 1 + delta) % n).Data
		}
		batch = append(batch, b)
		if flags&6 != 0 && len(batch) < 4 {
			continue
		}
		_, err := r.e.Write(ctx, id, batch, flags&1 != 0)
		batch = nil
		switch status.ReasonOf(err) {
		case otav1.Reason_REASON_UNSPECIFIED:
			if err != nil {
				t.Fatalf("untyped error %v", err)
			}
		case otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, otav1.Reason_REASON_INVALID_REQUEST, otav1.Reason_REASON_BLOCK_HASH_MISMATCH:
		default:
			t.Fatalf("write: %v", err)
		}
	}
}

// A plain-file target takes a delta update too: blocks are reused from the installed file,
// the new file is written beside it, verified against the manifest and renamed into place.
func TestDeltaFileTarget(t *testing.T) {
	v1, v2 := v1v2()
	v1, v2 = v1[:128*dbs], v2[:128*dbs]
	r, _, _ := deltaRig(t, nil, func(c *config.Config) { c.Targets[1].Compatible = testCompatible })
	if err := os.WriteFile(r.appPath, v1, 0o644); err != nil {
		t.Fatal(err)
	}
	d := makeDelta(t, v2, func(p *manifest.Params) { p.Target = "app" })
	if _, err := installManifest(t, r.e, d, "job-app"); err != nil {
		t.Fatal(err)
	}
	q := d.chunksReq("job-app")
	ft := int32(1)
	q.FileType, q.FilePath = &ft, ""
	res, err := r.e.Begin(ctx, q)
	if err != nil {
		t.Fatal(err)
	}
	want, _ := neededFrom(d, v1)
	if diff := cmp.Diff(want, missingChunks(res.GetSession())); diff != "" || res.GetSession().GetTarget() != "app" {
		t.Fatalf("target %q, missing chunks (-want +got):\n%s", res.GetSession().GetTarget(), diff)
	}
	sendChunks(t, r.e, res.GetSession().GetSessionId(), d, want)
	if _, err := r.e.Finish(ctx, res.GetSession().GetSessionId()); err != nil {
		t.Fatal(err)
	}
	if _, err := r.e.Activate(ctx, res.GetSession().GetSessionId()); err != nil {
		t.Fatal(err)
	}
	if got, _ := os.ReadFile(r.appPath); !bytes.Equal(got, v2) {
		t.Fatal("the installed file is not the image")
	}
}

// A writer restarted during the download resumes the CHUNKS session from its journal (its
// manifest verified again from the state directory): only the chunks not yet durable are
// missing and the delta figures survive; restarted once more after the finish, it verifies
// the slot against the manifest again before it activates it.
func TestChunksResumeAfterRestart(t *testing.T) {
	v1, v2 := v1v2()
	r, _, _ := deltaRig(t, v1, nil)
	d := makeDelta(t, v2, nil)
	if _, err := installManifest(t, r.e, d, "job-r"); err != nil {
		t.Fatal(err)
	}
	res, err := r.e.Begin(ctx, d.chunksReq("job-r"))
	if err != nil {
		t.Fatal(err)
	}
	id, missing := res.GetSession().GetSessionId(), missingChunks(res.GetSession())
	half := len(missing) / 2
	sendChunks(t, r.e, id, d, missing[:half])
	r.e.Close()
	r.open()
	res2, err := r.e.Begin(ctx, d.chunksReq("job-r"))
	if err != nil {
		t.Fatal(err)
	}
	if s := res2.GetSession(); !res2.GetResumed() || s.GetSessionId() != id || cmp.Diff(missing[half:], missingChunks(s)) != "" ||
		s.GetDelta().GetReusedBlocks() != res.GetSession().GetDelta().GetReusedBlocks() || len(res2.GetChunkSizes()) != d.m.Chunks() {
		t.Fatalf("after the restart: %v, missing %v, want %v", res2, missingChunks(s), missing[half:])
	}
	sendChunks(t, r.e, id, d, missing[half:])
	if _, err := r.e.Finish(ctx, id); err != nil {
		t.Fatal(err)
	}
	r.e.Close()
	// While the writer is down, the slot changes: the activation must notice.
	f, err := os.OpenFile(r.slots[1], os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte{0xA5}, 5)
	f.Close()
	r.open()
	_, err = r.e.Activate(ctx, id)
	wantReason(t, err, otav1.Reason_REASON_SIG_CHECK_FAILED)
}

// A target with its own trusted_keys takes only manifests its keys signed, and its keys sign
// no manifest for another target: the store is the one of the target the manifest names.
func TestManifestSignerPerTarget(t *testing.T) {
	id, err := sign.NewIdentity("app-signer")
	if err != nil {
		t.Fatal(err)
	}
	certPath, err := id.WriteCert(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	r, _, _ := deltaRig(t, nil, func(c *config.Config) {
		c.Targets[1].Compatible, c.Targets[1].TrustedKeys = testCompatible, []string{certPath}
	})
	img := randBlocks(rand.New(rand.NewPCG(7, 8)), 8)
	for i, tc := range []struct {
		target string
		appKey bool
		want   otav1.Reason
	}{
		{"app", false, otav1.Reason_REASON_UNTRUSTED_SIGNER},
		{"app", true, otav1.Reason_REASON_UNSPECIFIED},
		{"rootfs", true, otav1.Reason_REASON_UNTRUSTED_SIGNER},
		{"rootfs", false, otav1.Reason_REASON_UNSPECIFIED},
	} {
		d := makeDelta(t, img, func(p *manifest.Params) { p.Target = tc.target })
		job := fmt.Sprintf("job-%d", i)
		q := d.manifestReq(job)
		if tc.appKey {
			if q.Signature, err = id.Sign(d.mf); err != nil {
				t.Fatal(err)
			}
			q.CertName = id.CertName
		}
		res, err := r.e.Begin(ctx, q)
		if err == nil {
			if _, err := r.e.Write(ctx, res.GetSession().GetSessionId(), blocks(d.mf, dbs, 0, len(d.mf)/dbs+1), true); err != nil {
				t.Fatal(err)
			}
			_, err = r.e.Finish(ctx, res.GetSession().GetSessionId())
		}
		if got := status.ReasonOf(err); got != tc.want {
			t.Errorf("manifest for %s signed by the app key %v: %v, want %s", tc.target, tc.appKey, err, status.Name(tc.want))
		}
	}
}

// Chunks are refused until the local fill is complete (it writes the zero blocks inside
// every chunk): a client that writes to a session whose fill a crash interrupted is told to
// begin again.
func TestChunksRefusedBeforeFill(t *testing.T) {
	v1, v2 := v1v2()
	r, _, _ := deltaRig(t, v1, nil)
	d := makeDelta(t, v2, nil)
	if _, err := installManifest(t, r.e, d, "job-b"); err != nil {
		t.Fatal(err)
	}
	r.wrap = func(name string, m target.Medium) target.Medium {
		tm := targettest.Wrap(m)
		tm.SyncErr = func(int) error { return errors.New("sync failed") }
		return tm
	}
	r.e.Close()
	r.open()
	_, err := r.e.Begin(ctx, d.chunksReq("job-b"))
	wantReason(t, err, otav1.Reason_REASON_FILE_WRITE_FAILED)
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	var id string
	for _, s := range st.GetSessions() {
		if s.GetKind() == otav1.SessionKind_SESSION_KIND_CHUNKS {
			id = s.GetSessionId()
		}
	}
	want, _ := neededFrom(d, v1)
	_, err = r.e.Write(ctx, id, []*otav1.Block{d.unit(want[0])}, true)
	wantReason(t, err, otav1.Reason_REASON_BAD_FILE_HANDLE)
	r.wrap = nil
	r.e.Close()
	r.open()
	res, err := r.e.Begin(ctx, d.chunksReq("job-b"))
	if err != nil {
		t.Fatal(err)
	}
	sendChunks(t, r.e, res.GetSession().GetSessionId(), d, missingChunks(res.GetSession()))
	if _, err := r.e.Finish(ctx, res.GetSession().GetSessionId()); err != nil {
		t.Fatal(err)
	}
}
