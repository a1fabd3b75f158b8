package api

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestBufferPool: a buffer has the length asked for and its tier's capacity, comes back from
// Put for the next Get of its tier, and a request above the largest tier is served unpooled.
func TestBufferPool(t *testing.T) {
	tiers := BufferTiers()
	p := NewBufferPool()
	tests := []struct {
		n, wantCap int
	}{
		{1, tiers[0]},
		{4 << 10, 4 << 10},
		{4<<10 + 1, 16 << 10},
		{128<<10 + 100, 128<<10 + 4<<10},
		{tiers[len(tiers)-1] + 1, tiers[len(tiers)-1] + 1},
	}
	for _, tc := range tests {
		b := p.Get(tc.n)
		if diff := cmp.Diff([2]int{tc.n, tc.wantCap}, [2]int{len(*b), cap(*b)}); diff != "" {
			t.Errorf("Get(%d): len, cap (-want +got):\n%s", tc.n, diff)
		}
		p.Put(b)
	}
	b := p.Get(64 << 10)
	(*b)[0] = 7
	p.Put(b)
	// sync.Pool may drop it (a GC in between); when it comes back it is not cleared.
	if c := p.Get(60 << 10); &(*c)[:1][0] == &(*b)[:1][0] && (*c)[0] != 7 {
		t.Errorf("reused buffer was cleared")
	}
}
