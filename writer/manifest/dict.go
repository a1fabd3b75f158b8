package manifest

import (
	"bufio"
	"os"

	"github.com/klauspost/compress/zstd"

	"context"
	"errors"
	"fmt"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"io"
	"slices"
)

// Delta chunks: a chunk of blocks missing from the delta base is also encoded as one zstd
// frame against a raw dictionary, a byte range of the base image. The publisher finds the
// range without knowing the file system: content-defined anchors (positions where a gear
// rolling hash over the last 64 bytes has its top anchorBits bits zero, one every 2^anchorBits
// bytes on average) are indexed over the base; a new chunk's anchors vote for the base
// offsets where the same 64 bytes are, and the window of at most MaxDictSize bytes with the
// most votes becomes the dictionary. An updated program or library is mostly its old
// version's bytes shifted about, so its old copy in the base is where the votes land.

// MaxDictSize bounds a delta chunk's dictionary: the writer reads it from the running slot
// and holds it with one chunk while it decodes. On the Debian pair (scripts/bench-delta.sh)
// a device on the base downloads 16.77, 16.71, 16.66 and 16.64 MiB with dictionaries of at
// most 0.5, 1, 2 and 4 MiB: 1 MiB keeps the writer's memory small for 0.3 % more.
const MaxDictSize = 1 << 20

const (
	anchorBits = 8
	// anchorMaxDup: a hash seen more often in the base (padding, tables) says nothing about
	// where a chunk came from and is not voted with.
	anchorMaxDup = 8
	// dictMargin is kept before the first and after the last voted anchor: the bytes between
	// anchors match too.
	dictMargin = 16 << 10
)

// gear is the rolling hash's byte table, fixed (splitmix64) so builds are reproducible.
var gear = func() (t [256]uint64) {
	x := uint64(0x9E3779B97F4A7C15)
	for i := range t {
		x += 0x9E3779B97F4A7C15
		z := x
		z = (z ^ z>>30) * 0xBF58476D1CE4E5B9
		z = (z ^ z>>27) * 0x94D049BB133111EB
		t[i] = z ^ z>>31
	}
	return
}()

// anchors calls fn with the position (just past the 64 bytes hashed) and hash of every anchor
// of p. Windows of zeros are no anchors: the base has too many of them.
func anchors(p []byte, fn func(pos int, h uint64)) {
	var h uint64
	zeros := 0
	for i, c := range p {
		h = h<<1 + gear[c]
		if c == 0 {
			zeros++
		} else {
			zeros = 0
		}
		if i >= 63 && h>>(64-anchorBits) == 0 && zeros < 64 {
			fn(i+1, h)
		}
	}
}

// anchorIndex maps anchor hashes to base offsets: one uint64 per anchor, sorted, the 30
// hash bits below the (zero) top anchorBits over the offset in units of 64 bytes (34 bits: up
// to 1 TiB; the dictionary's margins absorb the rounding).
type anchorIndex struct {
	ents []uint64
	size int64
}

const (
	anchorOffBits = 34
	anchorOffUnit = 6 // log2 of the offset's unit
	anchorKeyBits = 30
)

func anchorKey(h uint64) uint64 {
	return h >> (64 - anchorBits - anchorKeyBits) & (1<<anchorKeyBits - 1)
}

// buildAnchorIndex indexes the anchors of base (size bytes). Memory: 8 bytes per anchor,
// about size/32 for data that is not zeros.
func buildAnchorIndex(ctx context.Context, base io.ReaderAt, size int64) (*anchorIndex, error) {
	const chunk = 4 << 20
	ix := &anchorIndex{size: size}
	buf := make([]byte, chunk+64)
	// Each read overlaps the previous one by 63 bytes so anchors across the seam are seen.
	for off := int64(0); off < size; off += chunk {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		start := max(0, off-63)
		n := min(int64(len(buf)), size-start, off+chunk-start)
		got, err := base.ReadAt(buf[:n], start)
		if int64(got) < n {
			if err == nil || errors.Is(err, io.EOF) {
				err = io.ErrUnexpectedEOF
			}
			return nil, fmt.Errorf("read base at %d: %w", start+int64(got), err)
		}
		skip := int(off - start)
		anchors(buf[:n], func(pos int, h uint64) {
			if pos > skip || off == 0 {
				o := (uint64(start) + uint64(pos)) >> anchorOffUnit
				ix.ents = append(ix.ents, anchorKey(h)<<anchorOffBits|o&(1<<anchorOffBits-1))
			}
		})
	}
	slices.Sort(ix.ents)
	return ix, nil
}

// dictRange returns the base range [off, off+n) to use as data's dictionary, n <= maxDict,
// and the number of data's anchors found in it (0: none, no dictionary).
func (ix *anchorIndex) dictRange(data []byte, maxDict int) (off, n uint64, votes int) {
	var pos []uint64
	anchors(data, func(_ int, h uint64) {
		k := anchorKey(h)
		i, _ := slices.BinarySearch(ix.ents, k<<anchorOffBits)
		j := i
		for j < len(ix.ents) && ix.ents[j]>>anchorOffBits == k {
			j++
		}
		if j == i || j-i > anchorMaxDup {
			return
		}
		for _, e := range ix.ents[i:j] {
			pos = append(pos, (e&(1<<anchorOffBits-1))<<anchorOffUnit)
		}
	})
	if len(pos) == 0 {
		return 0, 0, 0
	}
	slices.Sort(pos)
	// The window of width maxDict-2*dictMargin holding the most anchors.
	w := uint64(max(maxDict-2*dictMargin, maxDict/2))
	best, bi, bj := 0, 0, 0
	j := 0
	for i := range pos {
		for j < len(pos) && pos[j]-pos[i] < w {
			j++
		}
		if j-i > best {
			best, bi, bj = j-i, i, j
		}
	}
	lo := pos[bi] - min(pos[bi], dictMargin+64)
	hi := min(uint64(ix.size), pos[bj-1]+dictMargin)
	if hi-lo > uint64(maxDict) {
		hi = lo + uint64(maxDict)
	}
	return lo, hi - lo, best
}

// deltaDictID is the dictionary id of delta chunks: 0, which a frame does not write (a
// delta chunk is a plain frame; only its dictionary makes it decode right).
const deltaDictID = 0

// deltaBuilder encodes delta chunks while Build cuts the ordinary ones and keeps them in a
// temporary file until the ordinary chunks are written.
type deltaBuilder struct {
	ix      *anchorIndex
	base    io.ReaderAt
	maxDict int
	enc     *zstd.Encoder
	dict    []byte
	dst     []byte
	tmp     *os.File
	w       *bufio.Writer
}

// newDeltaBuilder returns nil when p asks for no delta chunks. newMax bounds a chunk's raw
// bytes; win is the ordinary chunks' zstd window.
func newDeltaBuilder(ctx context.Context, p Params, newMax uint64, win int) (*deltaBuilder, error) {
	if p.Base == nil || len(p.BaseSHA256) == 0 || p.DictSize < 0 {
		return nil, nil
	}
	maxDict := p.DictSize
	if maxDict == 0 {
		maxDict = MaxDictSize
	}
	if maxDict > MaxDictSize {
		return nil, fmt.Errorf("dictionary size %d above %d", maxDict, MaxDictSize)
	}
	if p.BaseSize <= 0 || uint64(p.BaseSize) > MaxImageSize {
		return nil, fmt.Errorf("base of %d bytes", p.BaseSize)
	}
	ix, err := buildAnchorIndex(ctx, p.Base, p.BaseSize)
	if err != nil {
		return nil, err
	}
	// Matches reach the whole dictionary and the chunk.
	w := max(win, maxDict+int(newMax))
	for w&(w-1) != 0 {
		w += w & -w
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(p.Level), zstd.WithEncoderConcurrency(1),
		zstd.WithWindowSize(w), zstd.WithEncoderCRC(false), zstd.WithLowerEncoderMem(true), zstd.WithSingleSegment(true))
	if err != nil {
		return nil, err
	}
	tmp, err := os.CreateTemp(p.TempDir, "manifest-deltas-*")
	if err != nil {
		enc.Close()
		return nil, err
	}
	return &deltaBuilder{ix: ix, base: p.Base, maxDict: maxDict, enc: enc, dict: make([]byte, 0, maxDict), tmp: tmp,
		w: bufio.NewWriterSize(tmp, 256<<10)}, nil
}

func (b *deltaBuilder) close() {
	b.enc.Close()
	b.tmp.Close()
	os.Remove(b.tmp.Name())
}

// add encodes chunk k (raw: its non-zero blocks; plain: its ordinary size) against the base
// range most like it and records it in t when it is smaller.
func (b *deltaBuilder) add(t *otav1.ChunkTable, k int, raw []byte, plain int) error {
	off, n, votes := b.ix.dictRange(raw, b.maxDict)
	if votes == 0 {
		return nil
	}
	dict := b.dict[:n]
	if _, err := b.base.ReadAt(dict, int64(off)); err != nil {
		return fmt.Errorf("read base at %d: %w", off, err)
	}
	if err := b.enc.ResetWithOptions(nil, zstd.WithEncoderDictRaw(deltaDictID, dict)); err != nil {
		return err
	}
	b.dst = b.enc.EncodeAll(raw, b.dst[:0])
	if len(b.dst) >= plain {
		return nil
	}
	if _, err := b.w.Write(b.dst); err != nil {
		return fmt.Errorf("write delta chunks: %w", err)
	}
	t.DeltaOf = append(t.DeltaOf, uint32(k))
	t.DictOffsets = append(t.DictOffsets, off)
	t.DictLengths = append(t.DictLengths, uint32(n))
	t.DeltaSizes = append(t.DeltaSizes, uint32(len(b.dst)))
	return nil
}

// appendTo writes the delta chunks after the ordinary ones.
func (b *deltaBuilder) appendTo(w io.Writer) error {
	if err := b.w.Flush(); err != nil {
		return fmt.Errorf("write delta chunks: %w", err)
	}
	if _, err := b.tmp.Seek(0, io.SeekStart); err != nil {
		return err
	}
	if _, err := io.Copy(w, b.tmp); err != nil {
		return fmt.Errorf("write chunks: %w", err)
	}
	return nil
}
