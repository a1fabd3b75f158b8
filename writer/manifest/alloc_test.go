package manifest

import (
	"bytes"
	"context"
	"testing"
)

// TestLookupAllocatesNothingPerBlock: FindLocal's allocations do not grow with the number of
// blocks it finds (the index and buffers are allocated once), so its heap stays flat as
// images grow.
func TestLookupAllocatesNothingPerBlock(t *testing.T) {
	allocs := func(blocks int) float64 {
		img := testImage(31, blocks, 0)
		m := open(t, first(build(t, img, params())))
		return testing.AllocsPerRun(3, func() {
			if _, err := m.FindLocal(context.Background(), bytes.NewReader(img), int64(len(img)), 0, func(Match, []byte) error { return nil }); err != nil {
				t.Fatal(err)
			}
		})
	}
	small, large := allocs(100), allocs(3000)
	if large > small+2 {
		t.Errorf("%v allocations for 100 blocks, %v for 3000", small, large)
	}
}
