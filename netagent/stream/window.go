package stream

import "github.com/gwota/gwota/internal/bitmap"

// window is one request's choice of blocks: offset o and a bitmap relative to it.
type window struct {
	offset int
	bitmap bitmap.Bitmap
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
	w.bitmap = bitmap.New(last + 1)
	for _, i := range w.blocks {
		w.bitmap.Set(i - o)
	}
	return w, true
}
