package stream

import "math/bits"

// Bitmap is a set of block indices in the stream's bit order: bit k is byte k>>3, mask
// 1<<(k&7). The writer's SessionInfo.missing uses the same order.
type Bitmap []byte

// NewBitmap returns an empty bitmap for n blocks.
func NewBitmap(n int) Bitmap { return make(Bitmap, (n+7)/8) }

// FullBitmap returns a bitmap of n blocks with every bit set.
func FullBitmap(n int) Bitmap {
	b := NewBitmap(n)
	for i := range b {
		b[i] = 0xFF
	}
	if r := n & 7; r != 0 {
		b[len(b)-1] = byte(1<<r) - 1
	}
	return b
}

// Has reports whether block i is in the set (false outside the bitmap).
func (b Bitmap) Has(i int) bool {
	return i >= 0 && i>>3 < len(b) && b[i>>3]&(1<<(i&7)) != 0
}

// Set adds block i.
func (b Bitmap) Set(i int) { b[i>>3] |= 1 << (i & 7) }

// Clear removes block i.
func (b Bitmap) Clear(i int) { b[i>>3] &^= 1 << (i & 7) }

// Count is the number of blocks in the set.
func (b Bitmap) Count() int {
	n := 0
	for _, x := range b {
		n += bits.OnesCount8(x)
	}
	return n
}

// Blocks lists the set's blocks in increasing order.
func (b Bitmap) Blocks() []int {
	var out []int
	for i, x := range b {
		for x != 0 {
			k := bits.TrailingZeros8(x)
			out = append(out, i*8+k)
			x &^= 1 << k
		}
	}
	return out
}

// window is one request's choice of blocks: offset o and a bitmap relative to it.
type window struct {
	offset int
	bitmap []byte
	blocks []int // absolute, increasing
}

// nextWindow picks up to max blocks for which want is true, scanning total blocks from
// start and wrapping around once. The window obeys the stream's limits: the offset is at
// most MaxOffset and the bitmap under 12,288 bytes, so the blocks of one request may span at
// most MaxBitmapBytes*8 indices. ok is false when no block is wanted.
func nextWindow(want func(i int) bool, start, total, max int) (w window, ok bool) {
	if start >= total || start < 0 {
		start = 0
	}
	first := -1
	for n, i := 0, start; n < total; n, i = n+1, i+1 {
		if i == total {
			i = 0
		}
		if want(i) {
			first = i
			break
		}
	}
	if first < 0 {
		return window{}, false
	}
	o := min(first, MaxOffset)
	limit := min(total, o+MaxBitmapBytes*8)
	for i := first; i < limit && len(w.blocks) < max; i++ {
		if want(i) {
			w.blocks = append(w.blocks, i)
		}
	}
	if len(w.blocks) == 0 { // beyond the stream's reach; Download refuses such files
		return window{}, false
	}
	last := w.blocks[len(w.blocks)-1] - o
	w.offset = o
	w.bitmap = make([]byte, last/8+1)
	for _, i := range w.blocks {
		k := i - o
		w.bitmap[k>>3] |= 1 << (k & 7)
	}
	return w, true
}
