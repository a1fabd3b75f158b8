// Package chunksink joins ota-net's downloaders to a writer CHUNKS session (docs/MANIFEST.md):
// the downloaders fetch a chunk file in stream blocks (MQTT) or byte ranges cut into blocks
// (HTTP), the writer takes whole chunks, each one zstd frame it decodes and checks against the
// signed manifest. Sink is the blocksink.Sink the downloader sees: it turns the writer's
// bitmap of missing chunks into the bitmap of the stream blocks that overlap them (the only
// ones fetched), assembles each missing chunk from those blocks, and hands every complete
// chunk to the writer as one write. Memory is bounded by the chunks in flight: a chunk's
// buffer exists from its first block to its write.
//
// A chunk the writer refuses (block_hash_mismatch: altered in transit) is fetched again: the
// writer link resumes the session, the writer's bitmap is the truth again, and the downloader
// goes on from it. A chunk refused MaxRefusals times fails the download with the writer's
// error.
package chunksink

import (
	"context"
	"errors"
	"fmt"
	"sort"
	"strconv"
	"sync"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/netagent/blocksink"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// MaxRefusals is how many times the writer may refuse one chunk before the job fails.
const MaxRefusals = 3

// MetaChunk is the writer's metadata key naming a refused chunk.
const MetaChunk = "chunk"

// Writer is the writer session's side: the writer link's sink for a CHUNKS session. Its
// units are chunks: Durable counts durable chunks and a *blocksink.ResumedError carries the
// writer's bitmap of missing chunks.
type Writer interface {
	// WriteAt takes the bytes of one whole chunk at its offset in the chunk file.
	WriteAt(ctx context.Context, off uint64, data []byte) error
	Sync(ctx context.Context) error
	Flush(ctx context.Context) error
	Durable() int
	Close()
}

// Layout is a chunk file as the writer's Begin answered it.
type Layout struct {
	// Sizes is the compressed size of every chunk (0: an all-zero chunk, never sent).
	Sizes []uint32
	// BlockSize is the downloader's block size (stream block or HTTP cut).
	BlockSize int
}

// Sink is a blocksink.Sink over a Writer. One goroutine uses it (the downloader's).
type Sink struct {
	w      Writer
	bs     int
	size   uint64
	offs   []uint64 // offs[k] = start of chunk k; offs[len] = file size
	sizes  []uint32
	blocks int

	refusals map[int]int

	// Since the last reload (the writer's bitmap).
	missing  bitmap.Bitmap // chunks the writer lacks
	written  bitmap.Bitmap // missing chunks handed to the writer since
	recv     bitmap.Bitmap // stream blocks taken since
	partial  map[int]*chunkBuf
	baseHave int // stream blocks not needed at the reload
	baseDur  int // w.Durable() at the reload
	nWritten int
	nRecv    int

	mu      sync.Mutex
	durable int // stream blocks, never dropping but at a resume

	// Peak is the most chunk bytes held at once (for tests of the memory bound).
	Peak int
	held int
}

type chunkBuf struct {
	data []byte
	left int // overlapping stream blocks not received yet
}

var _ blocksink.Sink = (*Sink)(nil)

// New builds a sink for a chunk file whose chunks the writer lacks as missing says (one bit
// per chunk).
func New(w Writer, l Layout, missing bitmap.Bitmap) (*Sink, error) {
	if l.BlockSize <= 0 || len(l.Sizes) == 0 {
		return nil, status.Errorf(otav1.Reason_REASON_OTHER, "chunk sink: %d chunks, block size %d", len(l.Sizes), l.BlockSize)
	}
	s := &Sink{w: w, bs: l.BlockSize, sizes: l.Sizes, offs: make([]uint64, len(l.Sizes)+1), refusals: map[int]int{}}
	for k, n := range l.Sizes {
		s.offs[k+1] = s.offs[k] + uint64(n)
	}
	s.size = s.offs[len(l.Sizes)]
	if s.size == 0 {
		return nil, status.Errorf(otav1.Reason_REASON_OTHER, "chunk sink: a chunk file of no bytes")
	}
	s.blocks = int((s.size + uint64(s.bs) - 1) / uint64(s.bs))
	if err := s.reload(missing); err != nil {
		return nil, err
	}
	return s, nil
}

// FileSize is the chunk file's size (the sum of the chunk sizes).
func (s *Sink) FileSize() int64 { return int64(s.size) }

// Blocks is the number of stream blocks of the chunk file.
func (s *Sink) Blocks() int { return s.blocks }

// Missing is the bitmap of the stream blocks to fetch: those that overlap a chunk the writer
// lacks (as of the last reload).
func (s *Sink) Missing() bitmap.Bitmap {
	return StreamMissing(Layout{Sizes: s.sizes, BlockSize: s.bs}, s.missing)
}

// StreamMissing is the bitmap of the stream blocks of l that overlap a non-empty chunk that
// missing (one bit per chunk) marks.
func StreamMissing(l Layout, missing bitmap.Bitmap) bitmap.Bitmap {
	var size uint64
	for _, n := range l.Sizes {
		size += uint64(n)
	}
	bs := uint64(max(l.BlockSize, 1))
	m := bitmap.New(int((size + bs - 1) / bs))
	var off uint64
	for k, n := range l.Sizes {
		if n > 0 && k>>3 < len(missing) && missing.Has(k) {
			for i := off / bs; i <= (off+uint64(n)-1)/bs; i++ {
				m.Set(int(i))
			}
		}
		off += uint64(n)
	}
	return m
}

// Need is the number of stream blocks to fetch as of the last reload.
func (s *Sink) Need() int { return s.blocks - s.baseHave }

// MissingChunks is the number of chunks with bytes the writer lacks as of the last reload.
func (s *Sink) MissingChunks() int {
	n := 0
	for k := range s.sizes {
		if s.needed(k) {
			n++
		}
	}
	return n
}

func (s *Sink) needed(k int) bool { return s.sizes[k] > 0 && s.missing.Has(k) }

// span is the first and last stream block that chunk k (not empty) overlaps.
func (s *Sink) span(k int) (int, int) {
	return int(s.offs[k] / uint64(s.bs)), int((s.offs[k+1] - 1) / uint64(s.bs))
}

func (s *Sink) reload(missing bitmap.Bitmap) error {
	if len(missing) != bitmap.Len(len(s.sizes)) {
		return status.Errorf(otav1.Reason_REASON_OTHER, "chunk sink: missing bitmap of %d bytes for %d chunks", len(missing), len(s.sizes))
	}
	s.missing = missing
	s.written = bitmap.New(len(s.sizes))
	s.recv = bitmap.New(s.blocks)
	s.partial = map[int]*chunkBuf{}
	s.held = 0
	s.nWritten, s.nRecv = 0, 0
	s.baseHave = s.blocks - s.Missing().Count()
	s.baseDur = s.w.Durable()
	s.mu.Lock()
	s.durable = s.baseHave
	s.mu.Unlock()
	return nil
}

// WriteBlock takes stream block i: its bytes go to every missing chunk it overlaps, and each
// chunk that is then complete goes to the writer.
func (s *Sink) WriteBlock(ctx context.Context, i int, data []byte) error {
	if i < 0 || i >= s.blocks {
		return status.Errorf(otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, "chunk sink: block %d of %d", i, s.blocks)
	}
	start := uint64(i) * uint64(s.bs)
	end := min(start+uint64(s.bs), s.size)
	if uint64(len(data)) != end-start {
		return status.Errorf(otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, "chunk sink: block %d of %d bytes, want %d", i, len(data), end-start)
	}
	if s.recv.Has(i) {
		return nil // a duplicate: its chunks have it
	}
	s.recv.Set(i)
	s.nRecv++
	// The last chunk starting at or before start.
	k := sort.Search(len(s.sizes), func(k int) bool { return s.offs[k+1] > start })
	for ; k < len(s.sizes) && s.offs[k] < end; k++ {
		if !s.needed(k) || s.written.Has(k) {
			continue
		}
		b := s.partial[k]
		if b == nil {
			first, last := s.span(k)
			b = &chunkBuf{data: make([]byte, s.sizes[k]), left: last - first + 1}
			s.partial[k] = b
			s.held += len(b.data)
			s.Peak = max(s.Peak, s.held)
		}
		lo, hi := max(start, s.offs[k]), min(end, s.offs[k+1])
		copy(b.data[lo-s.offs[k]:hi-s.offs[k]], data[lo-start:hi-start])
		b.left--
		if b.left > 0 {
			continue
		}
		delete(s.partial, k)
		s.held -= len(b.data)
		if err := s.w.WriteAt(ctx, s.offs[k], b.data); err != nil {
			return s.writerErr(err)
		}
		s.written.Set(k)
		s.nWritten++
	}
	s.updateDurable()
	return nil
}

// updateDurable estimates the durable stream blocks: the writer counts chunks, the
// downloader blocks; what came since the reload is durable in the proportion of the chunks
// written since that the writer acknowledged.
func (s *Sink) updateDurable() {
	d := s.baseHave
	if s.nWritten > 0 {
		ack := min(max(s.w.Durable()-s.baseDur, 0), s.nWritten)
		d += s.nRecv * ack / s.nWritten
	}
	s.mu.Lock()
	s.durable = max(s.durable, min(d, s.blocks))
	s.mu.Unlock()
}

// writerErr handles the writer's error by the blocksink.Sink contract. A resumed session
// (the writer restarted, or refused a chunk and the link began the session again) reloads
// the writer's chunk bitmap and becomes a ResumedError with the stream blocks to fetch; a
// chunk refused MaxRefusals times ends the download with the refusal.
func (s *Sink) writerErr(err error) error {
	var res *blocksink.ResumedError
	if !errors.As(err, &res) {
		return err
	}
	if status.ReasonOf(res.Cause) == otav1.Reason_REASON_BLOCK_HASH_MISMATCH {
		k := -1
		if e := status.FromError(res.Cause); e != nil {
			if v, perr := strconv.Atoi(e.Meta[MetaChunk]); perr == nil {
				k = v
			}
		}
		s.refusals[k]++
		if s.refusals[k] >= MaxRefusals {
			return fmt.Errorf("chunk sink: chunk %d refused %d times: %w", k, s.refusals[k], res.Cause)
		}
	}
	if rerr := s.reload(res.Missing); rerr != nil {
		return rerr
	}
	return &blocksink.ResumedError{Cause: res.Cause, Missing: s.Missing()}
}

// Refusals is how many times the writer refused chunk k so far.
func (s *Sink) Refusals(k int) int { return s.refusals[k] }

// Sync asks the writer to make the chunks written so far durable.
func (s *Sink) Sync(ctx context.Context) error {
	if err := s.w.Sync(ctx); err != nil {
		return s.writerErr(err)
	}
	return nil
}

// Flush returns once every chunk written is durable. Downloaders call it once every block is
// taken, when no chunk is partial any more; the agent also calls it between two protocols
// (a fallback from MQTT to HTTP), when the blocks of partial chunks stay here, taken, and
// the other protocol fetches the rest.
func (s *Sink) Flush(ctx context.Context) error {
	if err := s.w.Flush(ctx); err != nil {
		return s.writerErr(err)
	}
	if len(s.partial) == 0 {
		s.mu.Lock()
		s.durable = max(s.durable, s.baseHave+s.nRecv)
		s.mu.Unlock()
	}
	return nil
}

// Durable counts stream blocks: those not needed at the reload and those taken since, in
// the proportion of their chunks the writer acknowledged.
func (s *Sink) Durable() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.durable
}

// Close closes the writer's sink.
func (s *Sink) Close() { s.w.Close() }
