package client

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

// TestRing: messages are placed one after the other, wrap to the start when the end has no
// room, never overlap a message not yet released, and are freed in order.
func TestRing(t *testing.T) {
	type step struct {
		release uint64 // > 0: release up to this seq first
		seq     uint64
		n       int64
		off     int64 // want; -1: no room
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"in order", []step{{seq: 1, n: 40, off: 0}, {seq: 2, n: 40, off: 40}, {seq: 3, n: 20, off: 80}, {seq: 4, n: 1, off: -1}}},
		{"wrap when the end is short", []step{{seq: 1, n: 40, off: 0}, {seq: 2, n: 40, off: 40}, {release: 1, seq: 3, n: 30, off: 0}, {seq: 4, n: 11, off: -1}, {seq: 4, n: 10, off: 30}}},
		{"no room before the oldest", []step{{seq: 1, n: 50, off: 0}, {seq: 2, n: 50, off: 50}, {release: 1, seq: 3, n: 30, off: 0}, {seq: 4, n: 30, off: -1}}},
		{"empty starts over", []step{{seq: 1, n: 70, off: 0}, {release: 1, seq: 2, n: 60, off: 0}}},
		{"too large", []step{{seq: 1, n: 101, off: -1}, {seq: 1, n: 0, off: -1}}},
		{"exactly full after a wrap", []step{{seq: 1, n: 60, off: 0}, {seq: 2, n: 40, off: 60}, {release: 1, seq: 3, n: 60, off: 0}, {seq: 4, n: 1, off: -1}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			r := ring{size: 100}
			var got, want []int64
			for _, s := range tc.steps {
				if s.release > 0 {
					r.release(s.release)
				}
				off, ok := r.alloc(s.seq, s.n)
				if !ok {
					off = -1
				}
				got, want = append(got, off), append(want, s.off)
			}
			if diff := cmp.Diff(want, got); diff != "" {
				t.Errorf("offsets (-want +got):\n%s", diff)
			}
		})
	}
}
