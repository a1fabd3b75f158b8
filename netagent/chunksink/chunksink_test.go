package chunksink_test

import (
	"bytes"
	"context"
	"errors"
	"math/rand/v2"
	"strconv"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/netagent/blocksink"
	"github.com/gwota/gwota/netagent/chunksink"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// fakeWriter plays the writer link's sink of a CHUNKS session: it checks each chunk against
// the file, counts durability in chunks, refuses chunks (block_hash_mismatch) and restarts
// (losing what is not durable) on demand, answering both with a *blocksink.ResumedError as
// the link does.
type fakeWriter struct {
	t     *testing.T
	file  []byte
	offs  []uint64
	sizes []uint32

	got       map[int]int  // chunk -> times written
	durable   map[int]bool // chunks durable
	pending   []int        // written, not durable
	refuse    map[int]int  // chunk -> refusals left to make
	restartAt int          // restart the writer at this write (0: never)
	lost      map[int]int  // chunk -> times lost in a restart
	writes    int
}

func newFakeWriter(t *testing.T, file []byte, sizes []uint32, have []int) *fakeWriter {
	w := &fakeWriter{t: t, file: file, sizes: sizes, offs: make([]uint64, len(sizes)+1), got: map[int]int{}, durable: map[int]bool{}, refuse: map[int]int{}, lost: map[int]int{}}
	for k, n := range sizes {
		w.offs[k+1] = w.offs[k] + uint64(n)
		if n == 0 {
			w.durable[k] = true // filled locally
		}
	}
	for _, k := range have {
		w.durable[k] = true
	}
	return w
}

func (w *fakeWriter) missing() bitmap.Bitmap {
	m := bitmap.New(len(w.sizes))
	for k := range w.sizes {
		if !w.durable[k] {
			m.Set(k)
		}
	}
	return m
}

func (w *fakeWriter) chunkAt(off uint64) int {
	for k := range w.sizes {
		if w.offs[k] == off && w.sizes[k] > 0 {
			return k
		}
	}
	w.t.Fatalf("write at %d: not a chunk boundary", off)
	return -1
}

func (w *fakeWriter) WriteAt(_ context.Context, off uint64, data []byte) error {
	w.writes++
	k := w.chunkAt(off)
	if !bytes.Equal(data, w.file[w.offs[k]:w.offs[k+1]]) {
		w.t.Fatalf("chunk %d: wrong bytes", k)
	}
	if w.refuse[k] > 0 {
		w.refuse[k]--
		w.pending = nil // the stream ended: what was not durable is lost
		e := status.Errorf(otav1.Reason_REASON_BLOCK_HASH_MISMATCH, "chunk %d", k)
		e.Meta = map[string]string{"chunk": strconv.Itoa(k)}
		return &blocksink.ResumedError{Cause: e, Missing: w.missing()}
	}
	if w.writes == w.restartAt {
		for _, k := range w.pending {
			w.lost[k]++
		}
		w.pending = nil
		return &blocksink.ResumedError{Cause: status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "restart"), Missing: w.missing()}
	}
	w.got[k]++
	w.pending = append(w.pending, k)
	if len(w.pending) >= 2 { // the writer syncs now and then by itself
		w.sync()
	}
	return nil
}

func (w *fakeWriter) sync() {
	for _, k := range w.pending {
		w.durable[k] = true
	}
	w.pending = nil
}

func (w *fakeWriter) Sync(context.Context) error  { w.sync(); return nil }
func (w *fakeWriter) Flush(context.Context) error { w.sync(); return nil }
func (w *fakeWriter) Durable() int                { return len(w.durable) }
func (w *fakeWriter) Close()                      {}

// download plays a downloader: it hands over the blocks the sink asks for in the order
// given (a permutation of block indices; blocks not asked for are skipped), reloading from a
// *blocksink.ResumedError as downloaders do, until everything is flushed.
func download(t *testing.T, s *chunksink.Sink, file []byte, bs int, order []int) (fetched int, err error) {
	t.Helper()
	missing := s.Missing()
	for {
		resumed := false
		for _, i := range order {
			if !missing.Has(i) {
				continue
			}
			fetched++
			end := min((i+1)*bs, len(file))
			if err := s.WriteBlock(context.Background(), i, bytes.Clone(file[i*bs:end])); err != nil {
				var res *blocksink.ResumedError
				if !errors.As(err, &res) {
					return fetched, err
				}
				missing, resumed = res.Missing, true
				break
			}
			missing.Clear(i)
		}
		if resumed {
			continue
		}
		err := s.Flush(context.Background())
		var res *blocksink.ResumedError
		if errors.As(err, &res) {
			missing = res.Missing
			continue
		}
		return fetched, err
	}
}

func testFile(sizes []uint32) []byte {
	var n int
	for _, s := range sizes {
		n += int(s)
	}
	b := make([]byte, n)
	r := rand.New(rand.NewPCG(1, 2))
	for i := range b {
		b[i] = byte(r.Uint32())
	}
	return b
}

func orderOf(kind string, n int) []int {
	o := make([]int, n)
	for i := range o {
		o[i] = i
	}
	switch kind {
	case "reverse":
		for i, j := 0, n-1; i < j; i, j = i+1, j-1 {
			o[i], o[j] = o[j], o[i]
		}
	case "shuffle":
		r := rand.New(rand.NewPCG(3, 4))
		r.Shuffle(n, func(i, j int) { o[i], o[j] = o[j], o[i] })
	}
	return o
}

// TestChunkBoundaries: whatever the chunk sizes against the stream block size (several
// chunks in one block, chunks over several blocks, empty chunks, chunks the writer has) and
// whatever the order blocks come in, exactly the stream blocks that overlap a missing chunk
// are fetched, and every missing chunk reaches the writer once, whole and intact.
func TestChunkBoundaries(t *testing.T) {
	tests := []struct {
		name  string
		sizes []uint32
		bs    int
		have  []int
		// wantBlocks are the stream blocks to fetch.
		wantBlocks []int
	}{
		{name: "chunks smaller than a block", sizes: []uint32{100, 200, 50, 300, 250, 100}, bs: 512, have: []int{0, 1, 2},
			wantBlocks: []int{0, 1}}, // chunk 3 starts at 350, in block 0
		{name: "chunks over several blocks", sizes: []uint32{1500, 1000, 2100, 700}, bs: 512, have: []int{1, 3},
			wantBlocks: []int{0, 1, 2, 4, 5, 6, 7, 8}},
		{name: "chunk boundaries on block boundaries", sizes: []uint32{1024, 512, 1536}, bs: 512, have: []int{1},
			wantBlocks: []int{0, 1, 3, 4, 5}},
		{name: "empty chunks are never fetched", sizes: []uint32{0, 700, 0, 0, 900, 0}, bs: 256, have: nil,
			wantBlocks: []int{0, 1, 2, 3, 4, 5, 6}},
		{name: "nothing missing", sizes: []uint32{300, 300}, bs: 256, have: []int{0, 1}, wantBlocks: nil},
		{name: "one chunk, short last block", sizes: []uint32{1000}, bs: 300, wantBlocks: []int{0, 1, 2, 3}},
	}
	for _, tc := range tests {
		for _, ord := range []string{"forward", "reverse", "shuffle"} {
			t.Run(tc.name+"/"+ord, func(t *testing.T) {
				file := testFile(tc.sizes)
				w := newFakeWriter(t, file, tc.sizes, tc.have)
				s, err := chunksink.New(w, chunksink.Layout{Sizes: tc.sizes, BlockSize: tc.bs}, w.missing())
				if err != nil {
					t.Fatal(err)
				}
				if diff := cmp.Diff(tc.wantBlocks, s.Missing().Blocks()); diff != "" {
					t.Fatalf("blocks to fetch (-want +got):\n%s", diff)
				}
				if s.Need() != len(tc.wantBlocks) {
					t.Errorf("Need() = %d, want %d", s.Need(), len(tc.wantBlocks))
				}
				fetched, err := download(t, s, file, tc.bs, orderOf(ord, s.Blocks()))
				if err != nil {
					t.Fatal(err)
				}
				if fetched != len(tc.wantBlocks) {
					t.Errorf("fetched %d blocks, want %d", fetched, len(tc.wantBlocks))
				}
				want := map[int]int{}
				for k, n := range tc.sizes {
					if n > 0 && !contains(tc.have, k) {
						want[k] = 1
					}
				}
				if diff := cmp.Diff(want, w.got); diff != "" {
					t.Errorf("chunks written (-want +got):\n%s", diff)
				}
				if s.Durable() != s.Blocks() {
					t.Errorf("Durable() = %d after the flush, want %d", s.Durable(), s.Blocks())
				}
			})
		}
	}
}

func contains(s []int, v int) bool {
	for _, x := range s {
		if x == v {
			return true
		}
	}
	return false
}

// TestMemoryBoundedByChunksInFlight: blocks in file order keep at most the chunks that the
// current block overlaps; a chunk's buffer goes once it is written.
func TestMemoryBoundedByChunksInFlight(t *testing.T) {
	sizes := make([]uint32, 200)
	for i := range sizes {
		sizes[i] = uint32(3000 + 37*i%2000)
	}
	file := testFile(sizes)
	w := newFakeWriter(t, file, sizes, nil)
	s, err := chunksink.New(w, chunksink.Layout{Sizes: sizes, BlockSize: 1024}, w.missing())
	if err != nil {
		t.Fatal(err)
	}
	if _, err := download(t, s, file, 1024, orderOf("forward", s.Blocks())); err != nil {
		t.Fatal(err)
	}
	if bound := 2 * 5000; s.Peak > bound {
		t.Errorf("peak %d bytes held, want at most two chunks (%d) for a %d-byte file", s.Peak, bound, len(file))
	}
}

// TestRefetchAfterRefusal: a chunk the writer refuses (altered in transit) is fetched again
// and written again; other chunks are not lost; a chunk refused MaxRefusals times fails the
// download with the writer's block_hash_mismatch.
func TestRefetchAfterRefusal(t *testing.T) {
	sizes := []uint32{700, 900, 0, 1200, 400, 800}
	tests := []struct {
		name      string
		refuse    map[int]int
		wantErr   otav1.Reason
		wantTimes map[int]int
	}{
		{name: "refused once", refuse: map[int]int{3: 1}, wantTimes: map[int]int{0: 1, 1: 1, 3: 1, 4: 1, 5: 1}},
		{name: "refused twice", refuse: map[int]int{3: 2}, wantTimes: map[int]int{0: 1, 1: 1, 3: 1, 4: 1, 5: 1}},
		{name: "two chunks refused once", refuse: map[int]int{0: 1, 5: 1}, wantTimes: map[int]int{0: 1, 1: 1, 3: 1, 4: 1, 5: 1}},
		{name: "refused three times", refuse: map[int]int{3: 3}, wantErr: otav1.Reason_REASON_BLOCK_HASH_MISMATCH},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			file := testFile(sizes)
			w := newFakeWriter(t, file, sizes, nil)
			w.refuse = tc.refuse
			s, err := chunksink.New(w, chunksink.Layout{Sizes: sizes, BlockSize: 256}, w.missing())
			if err != nil {
				t.Fatal(err)
			}
			_, err = download(t, s, file, 256, orderOf("shuffle", s.Blocks()))
			if got := status.ReasonOf(err); err != nil && got != tc.wantErr || err == nil && tc.wantErr != otav1.Reason_REASON_UNSPECIFIED {
				t.Fatalf("download: %v (reason %v), want reason %v", err, got, tc.wantErr)
			}
			if err != nil {
				if s.Refusals(3) != chunksink.MaxRefusals {
					t.Errorf("refusals of chunk 3 = %d, want %d", s.Refusals(3), chunksink.MaxRefusals)
				}
				return
			}
			if diff := cmp.Diff(tc.wantTimes, w.got); diff != "" {
				t.Errorf("chunks accepted (-want +got):\n%s", diff)
			}
			if len(w.missing().Blocks()) != 0 {
				t.Errorf("writer still misses chunks %v", w.missing().Blocks())
			}
		})
	}
}

// TestResumeAfterWriterRestart: a writer restart loses the chunks that were not durable; the
// writer's bitmap after the resume is the truth, so exactly those are fetched again, and a
// sink built from a resumed session's bitmap fetches only what the writer lacks.
func TestResumeAfterWriterRestart(t *testing.T) {
	sizes := []uint32{700, 900, 1200, 400, 800, 650, 0, 1000}
	for _, at := range []int{1, 2, 3, 5} {
		t.Run("restart at write "+strconv.Itoa(at), func(t *testing.T) {
			file := testFile(sizes)
			w := newFakeWriter(t, file, sizes, nil)
			w.restartAt = at
			s, err := chunksink.New(w, chunksink.Layout{Sizes: sizes, BlockSize: 512}, w.missing())
			if err != nil {
				t.Fatal(err)
			}
			if _, err := download(t, s, file, 512, orderOf("forward", s.Blocks())); err != nil {
				t.Fatal(err)
			}
			if len(w.missing().Blocks()) != 0 {
				t.Errorf("writer still misses chunks %v", w.missing().Blocks())
			}
			for k, n := range w.got {
				if want := 1 + w.lost[k]; n != want {
					t.Errorf("chunk %d accepted %d times, want %d (lost %d times in a restart)", k, n, want, w.lost[k])
				}
			}
		})
	}
	t.Run("new process, resumed session", func(t *testing.T) {
		file := testFile(sizes)
		w := newFakeWriter(t, file, sizes, []int{0, 1, 2, 4})
		s, err := chunksink.New(w, chunksink.Layout{Sizes: sizes, BlockSize: 512}, w.missing())
		if err != nil {
			t.Fatal(err)
		}
		// Chunk 3 is bytes 2800..3200, chunk 5 4000..4650, chunk 7 4650..5650.
		if diff := cmp.Diff([]int{5, 6, 7, 8, 9, 10, 11}, s.Missing().Blocks()); diff != "" {
			t.Fatalf("blocks to fetch (-want +got):\n%s", diff)
		}
		if _, err := download(t, s, file, 512, orderOf("shuffle", s.Blocks())); err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(map[int]int{3: 1, 5: 1, 7: 1}, w.got); diff != "" {
			t.Errorf("chunks written (-want +got):\n%s", diff)
		}
	})
}

// TestRefusesBadInput: a block of the wrong length or outside the file, and a bitmap of the
// wrong size, are errors, not panics.
func TestRefusesBadInput(t *testing.T) {
	sizes := []uint32{700, 900}
	file := testFile(sizes)
	w := newFakeWriter(t, file, sizes, nil)
	if _, err := chunksink.New(w, chunksink.Layout{Sizes: sizes, BlockSize: 512}, bitmap.New(20)); err == nil {
		t.Error("bitmap for 20 chunks accepted for 2")
	}
	s, err := chunksink.New(w, chunksink.Layout{Sizes: sizes, BlockSize: 512}, w.missing())
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range []struct {
		i int
		n int
	}{{-1, 512}, {4, 512}, {0, 100}, {3, 512}} {
		if err := s.WriteBlock(context.Background(), c.i, make([]byte, c.n)); status.ReasonOf(err) != otav1.Reason_REASON_BLOCK_OUT_OF_RANGE {
			t.Errorf("block %d of %d bytes: %v, want block_out_of_range", c.i, c.n, err)
		}
	}
}

// TestFlushKeepsPartialChunks: a flush between two protocols (the agent's fallback) makes
// the whole chunks durable and keeps the blocks of partial ones; the other protocol's blocks
// complete them.
func TestFlushKeepsPartialChunks(t *testing.T) {
	sizes := []uint32{1000, 1500, 700}
	file := testFile(sizes)
	w := newFakeWriter(t, file, sizes, nil)
	s, err := chunksink.New(w, chunksink.Layout{Sizes: sizes, BlockSize: 512}, w.missing())
	if err != nil {
		t.Fatal(err)
	}
	ctx := context.Background()
	// Blocks 0..2 hold chunk 0 (0..1000) whole and the start of chunk 1 (1000..2500).
	for i := range 3 {
		if err := s.WriteBlock(ctx, i, bytes.Clone(file[i*512:(i+1)*512])); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatalf("flush with a partial chunk: %v", err)
	}
	if diff := cmp.Diff(map[int]int{0: 1}, w.got); diff != "" || !w.durable[0] {
		t.Fatalf("after the flush (-want +got):\n%s (durable %v)", diff, w.durable)
	}
	for i := 3; i < s.Blocks(); i++ {
		end := min((i+1)*512, len(file))
		if err := s.WriteBlock(ctx, i, bytes.Clone(file[i*512:end])); err != nil {
			t.Fatal(err)
		}
	}
	if err := s.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(map[int]int{0: 1, 1: 1, 2: 1}, w.got); diff != "" {
		t.Errorf("chunks written (-want +got):\n%s", diff)
	}
}
