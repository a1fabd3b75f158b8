// Package blocksinktest is an in-memory blocksink.Sink for the downloaders' own tests; the
// writer link's Sink over a real writer is tested in netagent/writerlink and netagent/agent.
package blocksinktest

import (
	"bytes"
	"context"
	"sync"
	"testing"

	"github.com/gwota/gwota/netagent/blocksink"
)

// Sink keeps the blocks it takes in memory, and what it holds counts as durable at each Sync
// and Flush. A second copy of a block that differs from the first fails the test. Read the
// fields once the download has returned.
type Sink struct {
	t  testing.TB
	mu sync.Mutex

	Blocks  map[int][]byte
	Writes  int
	Flushes int
	Syncs   []int // blocks held at each Sync
	durable int

	// Fail, if set, is called with the blocks held at write number FailAt, which returns
	// its error instead of taking the block: a writer's refusal, or (deleting blocks and
	// returning a *blocksink.ResumedError) a writer restart that lost some.
	FailAt int
	Fail   func(blocks map[int][]byte) error
}

var _ blocksink.Sink = (*Sink)(nil)

// New returns an empty sink.
func New(t testing.TB) *Sink { return &Sink{t: t, Blocks: map[int][]byte{}} }

func (s *Sink) WriteBlock(_ context.Context, i int, data []byte) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Writes++
	if s.Fail != nil && s.Writes == s.FailAt {
		f := s.Fail
		s.Fail = nil
		err := f(s.Blocks)
		s.durable = min(s.durable, len(s.Blocks))
		return err
	}
	if old, ok := s.Blocks[i]; ok && !bytes.Equal(old, data) {
		s.t.Errorf("block %d written twice with different data", i)
	}
	s.Blocks[i] = data
	return nil
}

func (s *Sink) Sync(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Syncs = append(s.Syncs, len(s.Blocks))
	s.durable = len(s.Blocks)
	return nil
}

func (s *Sink) Flush(context.Context) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.Flushes++
	s.durable = len(s.Blocks)
	return nil
}

func (s *Sink) Durable() int {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.durable
}

func (s *Sink) Close() {}

// Check fails the test unless the sink holds blocks from..end of image, in blocks of bs.
func (s *Sink) Check(image []byte, bs, from int) {
	s.t.Helper()
	s.mu.Lock()
	defer s.mu.Unlock()
	for i := from; i*bs < len(image); i++ {
		want := image[i*bs : min(len(image), (i+1)*bs)]
		if !bytes.Equal(s.Blocks[i], want) {
			s.t.Fatalf("block %d: %d bytes, differs from the image", i, len(s.Blocks[i]))
		}
	}
}
