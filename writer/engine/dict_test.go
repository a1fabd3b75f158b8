package engine

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/manifest"
)

// dictPair is an update whose new blocks are an updated program: v1 holds a random
// (incompressible) program, v2 the same program with a few bytes inserted every 5000 bytes,
// so none of its blocks is in v1 but its bytes are, shifted; the rest is v1's blocks. The
// delta is built with v1 as its base (delta chunks).
func dictPair(t testing.TB) (v1, v2 []byte, d *delta) {
	t.Helper()
	rng := rand.New(rand.NewPCG(5, 6))
	v1 = randBlocks(rng, 512)
	clear(v1[450*dbs : 480*dbs])
	prog := v1[100*dbs : 260*dbs]
	v2 = bytes.Clone(v1[:40*dbs])
	for i := 0; i < len(prog); i += 5000 {
		v2 = append(v2, prog[i:min(i+5000, len(prog))]...)
		v2 = append(v2, "v2!"...)
	}
	v2 = append(v2, make([]byte, (dbs-len(v2)%dbs)%dbs)...)
	v2 = append(v2, v1[300*dbs:]...)
	d = makeDelta(t, v2, func(p *manifest.Params) {
		sum := sha256.Sum256(v1)
		p.Base, p.BaseSize, p.BaseSHA256, p.NewChunkSize = bytes.NewReader(v1), int64(len(v1)), sum[:], 64<<10
	})
	if d.m.Deltas() == 0 {
		t.Fatal("no delta chunks")
	}
	return v1, v2, d
}

// wantUnits computes independently of the engine the units a device holding local must
// download: the chunks it lacks (neededFrom), each replaced by its delta chunk when onBase.
func wantUnits(d *delta, local []byte, onBase bool) (units []int, download uint64) {
	need, _ := neededFrom(d, local)
	for _, k := range need {
		u := k
		if dd, ok := d.m.DeltaOf(k); ok && onBase {
			u = d.m.Chunks() + dd
		}
		units = append(units, u)
		download += d.m.Unit(u).Size
	}
	slices.Sort(units)
	return units, download
}

// A device on the delta base (the first base_size bytes of its running slot have the
// digest base_sha256) is asked for exactly the delta chunks of the chunks it lacks, and the
// ordinary chunks without one: chunk_sizes lists every unit, DeltaInfo counts those bytes.
// The ordinary chunks replaced by delta chunks and the delta chunks not needed are ignored
// when ota-net sends them anyway (nothing written, nothing changes); a damaged delta chunk is
// refused and its ordinary chunk asked for instead; the delta chunks, decoded
// with dictionaries read from slot a, rebuild v2 in slot b, and a restart in the middle
// resumes with the same bitmap.
func TestDeltaChunksOnBase(t *testing.T) {
	v1, v2, d := dictPair(t)
	r, written, _ := deltaRig(t, v1, nil)
	if _, err := installManifest(t, r.e, d, "job-o"); err != nil {
		t.Fatal(err)
	}
	res, err := r.e.Begin(ctx, d.chunksReq("job-o"))
	if err != nil {
		t.Fatal(err)
	}
	s := res.GetSession()
	if s.GetTotalBlocks() != uint64(d.m.Units()) || cmp.Diff(d.m.ChunkSizes(), res.GetChunkSizes()) != "" {
		t.Fatalf("%d units, chunk_sizes %d: want %d", s.GetTotalBlocks(), len(res.GetChunkSizes()), d.m.Units())
	}
	slotA, _ := os.ReadFile(r.slots[0])
	want, download := wantUnits(d, slotA, true)
	got := missingChunks(s)
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("missing units (-want +Begin):\n%s", diff)
	}
	deltas := 0
	for _, u := range want {
		if u >= d.m.Chunks() {
			deltas++
		}
	}
	if deltas == 0 || s.GetDelta().GetDownloadBytes() != download {
		t.Fatalf("%d delta chunks among the missing units; download %d bytes, want %d", deltas, s.GetDelta().GetDownloadBytes(), download)
	}
	offBase, offDownload := wantUnits(d, slotA, false)
	if download*3 > offDownload {
		t.Errorf("on the base %d bytes to download, off it %d: delta chunks should be much smaller", download, offDownload)
	}
	id := s.GetSessionId()
	// Units not needed: the ordinary chunks replaced, and the delta chunks of local chunks.
	var spare []int
	for u := range d.m.Units() {
		if !slices.Contains(want, u) && d.m.Unit(u).Size > 0 {
			spare = append(spare, u)
		}
	}
	before := written.Load()
	sendChunks(t, r.e, id, d, spare)
	st := stateOf(t, r, id)
	if written.Load() != before || cmp.Diff(want, missingChunks(st)) != "" {
		t.Fatalf("units not needed wrote %d bytes; missing %v", written.Load()-before, missingChunks(st))
	}
	// A damaged delta chunk is refused and writes nothing; its ordinary chunk is asked for
	// instead (the delta chunk's dictionary may be what changed).
	u := want[len(want)-1]
	bad := d.unit(u)
	bad.Data = bytes.Clone(bad.Data)
	bad.Data[len(bad.Data)/2] ^= 0x40
	_, err = r.e.Write(ctx, id, []*otav1.Block{bad}, true)
	wantReason(t, err, otav1.Reason_REASON_BLOCK_HASH_MISMATCH)
	if written.Load() != before {
		t.Fatal("a damaged delta chunk was written")
	}
	k := d.m.Unit(u).Index
	download += d.m.Chunk(k).Size - d.m.Unit(u).Size
	want = append(want[:len(want)-1], k)
	slices.Sort(want)
	if st := stateOf(t, r, id); cmp.Diff(want, missingChunks(st)) != "" || st.GetDelta().GetDownloadBytes() != download {
		t.Fatalf("after a damaged delta chunk: missing %v, want %v; %v", missingChunks(st), want, st.GetDelta())
	}
	// The delta chunk itself, sent again, is not needed any more.
	sendChunks(t, r.e, id, d, []int{u})
	if written.Load() != before {
		t.Fatal("a delta chunk given up was written")
	}
	half := len(want) / 2
	sendChunks(t, r.e, id, d, want[:half])
	r.e.Close()
	r.open()
	res2, err := r.e.Begin(ctx, d.chunksReq("job-o"))
	if err != nil {
		t.Fatal(err)
	}
	if s2 := res2.GetSession(); !res2.GetResumed() || cmp.Diff(want[half:], missingChunks(s2)) != "" || s2.GetDelta().GetDownloadBytes() != download {
		t.Fatalf("after the restart: missing %v, want %v; %v", missingChunks(s2), want[half:], s2.GetDelta())
	}
	sendChunks(t, r.e, id, d, want[half:])
	done, err := r.e.Finish(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if done.GetSha256() != fmt.Sprintf("%x", sha256.Sum256(v2)) || !bytes.Equal(slotContent(t, r.slots[1], len(v2)), v2) {
		t.Fatal("slot b does not hold v2")
	}
	t.Logf("on the base: %d units, %d bytes (%d delta chunks); off it %d units, %d bytes", len(want), download, deltas, len(offBase), offDownload)
}

// A device not on the base (one byte of slot a differs from v1) gets the same update through
// ordinary chunks: every delta chunk is marked not needed, one sent anyway is ignored, and
// the chunks it lacks rebuild v2.
func TestDeltaChunksOffBase(t *testing.T) {
	v1, v2, d := dictPair(t)
	local := bytes.Clone(v1)
	local[470*dbs+7] = 1 // in a zero block of v1: no block of v2 is lost
	r, written, _ := deltaRig(t, local, nil)
	if _, err := installManifest(t, r.e, d, "job-f"); err != nil {
		t.Fatal(err)
	}
	res, err := r.e.Begin(ctx, d.chunksReq("job-f"))
	if err != nil {
		t.Fatal(err)
	}
	s := res.GetSession()
	slotA, _ := os.ReadFile(r.slots[0])
	want, download := wantUnits(d, slotA, false)
	if diff := cmp.Diff(want, missingChunks(s)); diff != "" || s.GetDelta().GetDownloadBytes() != download {
		t.Fatalf("missing units (-want +Begin):\n%s\ndownload %d, want %d", diff, s.GetDelta().GetDownloadBytes(), download)
	}
	for _, u := range want {
		if u >= d.m.Chunks() {
			t.Fatalf("delta chunk %d asked of a device not on the base", u)
		}
	}
	id := s.GetSessionId()
	before := written.Load()
	sendChunks(t, r.e, id, d, []int{d.m.Chunks(), d.m.Units() - 1})
	if written.Load() != before || cmp.Diff(want, missingChunks(stateOf(t, r, id))) != "" {
		t.Fatal("a delta chunk not needed was written or changed the bitmap")
	}
	sendChunks(t, r.e, id, d, want)
	if _, err := r.e.Finish(ctx, id); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(slotContent(t, r.slots[1], len(v2)), v2) {
		t.Fatal("slot b does not hold v2")
	}
}

// stateOf returns session id's state.
func stateOf(t testing.TB, r *rig, id string) *otav1.SessionInfo {
	t.Helper()
	st, err := r.e.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	for _, s := range st.GetSessions() {
		if s.GetSessionId() == id {
			return s
		}
	}
	t.Fatalf("no session %s", id)
	return nil
}

// FuzzDeltaUnitWrites: any sequence of unit writes from a hostile ota-net (ordinary and
// delta chunks at shifted offsets, cut, padded, altered or swapped, units not needed, in
// any batches), on a device on the base or off it, is accepted or refused typed, and the
// units then missing still rebuild v2 exactly.
func FuzzDeltaUnitWrites(f *testing.F) {
	v1, v2, d := dictPair(f)
	f.Add(false, []byte{0, 0, 0, 1})
	f.Add(true, []byte{0, 30, 0, 1, 0, 2, 0, 1})
	f.Add(false, []byte{4, 31, 7, 1, 5, 32, 9, 3, 0, 33, 0, 1})
	f.Add(true, []byte{2, 29, 7, 2, 3, 40, 9, 3, 1, 41, 100, 1})
	f.Fuzz(func(t *testing.T, offBase bool, ops []byte) {
		if len(ops) > 64 {
			ops = ops[:64]
		}
		local := v1
		if offBase {
			local = bytes.Clone(v1)
			local[470*dbs] = 1
		}
		hostileInstall(t, local, v2, d, d.m.Units(), ops)
	})
}

// TestDeltaChunkDictChanged: the running slot changes after the fill (a slot mounted
// read-write), so a delta chunk no longer decodes with its dictionary: it is refused with
// block_hash_mismatch, its ordinary chunk is asked for instead, and the update completes
// with v2 in slot b.
func TestDeltaChunkDictChanged(t *testing.T) {
	v1, v2, d := dictPair(t)
	r, _, _ := deltaRig(t, v1, nil)
	if _, err := installManifest(t, r.e, d, "job-c"); err != nil {
		t.Fatal(err)
	}
	res, err := r.e.Begin(ctx, d.chunksReq("job-c"))
	if err != nil {
		t.Fatal(err)
	}
	id, want := res.GetSession().GetSessionId(), missingChunks(res.GetSession())
	f, err := os.OpenFile(r.slots[0], os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := f.WriteAt(bytes.Repeat([]byte{0x5A}, 160*dbs), 100*dbs); err != nil { // the old program
		t.Fatal(err)
	}
	f.Close()
	refused := 0
	for _, u := range want {
		_, err := r.e.Write(ctx, id, []*otav1.Block{d.unit(u)}, true)
		if err != nil {
			wantReason(t, err, otav1.Reason_REASON_BLOCK_HASH_MISMATCH)
			refused++
		}
	}
	again := missingChunks(stateOf(t, r, id))
	if refused == 0 || len(again) != refused {
		t.Fatalf("%d delta chunks refused, then missing %v", refused, again)
	}
	for _, k := range again {
		if k >= d.m.Chunks() {
			t.Fatalf("delta chunk %d asked for again", k)
		}
	}
	sendChunks(t, r.e, id, d, again)
	if _, err := r.e.Finish(ctx, id); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(slotContent(t, r.slots[1], len(v2)), v2) {
		t.Fatal("slot b does not hold v2")
	}
}
