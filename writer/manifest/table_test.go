package manifest

import (
	"testing"

	"github.com/google/go-cmp/cmp"
)

// ChunkAt finds a chunk by its offset in the chunk file, exactly: every offset of the file
// and a few past it, against the table walked chunk by chunk, in images whose runs of
// chunks of zeros (no bytes, so sharing their offset) span several checkpoints. ChunkSizes is
// the table's sizes in order.
func TestChunkAt(t *testing.T) {
	for _, tc := range []struct {
		name        string
		img         []byte
		chunkBlocks uint32
	}{
		{"mixed, 4-block chunks", testImage(7, 600, 0), 4},
		{"mixed, 1-block chunks, short last block", testImage(8, 500, 100), 1},
		{"long zero runs", func() []byte {
			img := testImage(9, 900, 0)
			clear(img[10*bs : 400*bs]) // 390 chunks of zeros: 6 checkpoints at one offset
			clear(img[600*bs:])        // zeros to the end
			return img
		}(), 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := params()
			p.ChunkSize = tc.chunkBlocks * bs
			mf, chunks, _ := build(t, tc.img, p)
			m := open(t, mf)
			want := map[uint64]Chunk{}
			var sizes []uint32
			for k := range m.Chunks() {
				c := m.Chunk(k)
				sizes = append(sizes, uint32(c.Size))
				if c.Size > 0 {
					want[c.Offset] = c
				}
			}
			if d := cmp.Diff(sizes, m.ChunkSizes()); d != "" {
				t.Fatalf("ChunkSizes (-want +got):\n%s", d)
			}
			got := map[uint64]Chunk{}
			for off := uint64(0); off < uint64(len(chunks))+3; off++ {
				if c, ok := m.ChunkAt(off); ok {
					got[off] = c
				}
			}
			for _, off := range []uint64{1 << 40, ^uint64(0)} {
				if c, ok := m.ChunkAt(off); ok {
					t.Errorf("offset %d: chunk %d", off, c.Index)
				}
			}
			if d := cmp.Diff(want, got); d != "" {
				t.Fatalf("ChunkAt (-table +got):\n%s", d)
			}
		})
	}
}
