package manifest

import (
	"bufio"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"os"
	"slices"

	"github.com/klauspost/compress/zstd"
	"google.golang.org/protobuf/proto"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

// DefaultChunkSize is the image bytes (zero blocks included) one chunk covers, chosen with
// scripts/bench-delta.sh (4 KiB blocks, zstd "better", no base). On the Debian root file
// system pair (384 MiB, 50 MiB of blocks missing from v1) a device downloads 28.3, 29.1, 30.2,
// 31.0, 34.5 and 44.7 MB (manifest included) at 8, 16, 24, 32, 64 and 256 KiB in exact ranges
// (HTTP), and 45.2, 44.6, 44.4, 44.5, 45.5 and 50.7 MB in the 64 KiB blocks of an MQTT
// stream; on the zeros pair 6.41 and 6.35 MB at 8 and 16 KiB: smaller chunks fetch less that
// the device already holds and gain more than larger ones gain in compression, down to
// 16 KiB, below which the gain is small, streams lose and the chunk table grows (8 bytes per
// chunk in memory, 1 MiB for 2 GiB at 16 KiB).
const DefaultChunkSize = 16 << 10

// DefaultNewChunkSize bounds the image bytes of a chunk of blocks missing from the delta
// base before it is cut to fit DefaultMaxChunkBytes (on the Debian pair 1 and 4 MiB give
// chunks of the same total within 0.2 %: the compressed limit decides).
const DefaultNewChunkSize = 1 << 20

// DefaultMaxChunkBytes bounds a compressed chunk: the writer's default max_block_size
// (writer/config.DefaultMaxBlockSize), since ota-net hands the writer one chunk per block.
const DefaultMaxChunkBytes = 128 << 10

// Params describe the image a manifest is built for.
type Params struct {
	Target, Compatible, Version string
	// BlockSize is the block of the device's verification and reuse: the file system's block
	// (4096 for ext4), since files move by it.
	BlockSize uint32
	// ChunkSize is how many image bytes one chunk covers, a multiple of BlockSize
	// (DefaultChunkSize when 0).
	ChunkSize uint32
	// BaseSHA256 optionally names the delta base image.
	BaseSHA256 []byte
	// Base, BaseSize: optionally the image most devices run (the delta base). Chunks then hold
	// either blocks found in it (at any block-aligned offset) or blocks that are not, and
	// chunks of the latter grow to NewChunkSize: a device on the base downloads dense chunks
	// of new blocks, which compress better; a device on any other base still finds what it
	// holds. The publisher holds 8 bytes per base block.
	Base     io.ReaderAt
	BaseSize int64
	// NewChunkSize bounds chunks of new blocks (DefaultNewChunkSize when 0).
	NewChunkSize uint32
	// MaxChunkBytes bounds every compressed chunk (DefaultMaxChunkBytes when 0): a chunk
	// that compresses to more is cut into smaller ones. The writer's max_block_size must be
	// at least this.
	MaxChunkBytes uint32
	// Level is the zstd level (zstd.SpeedBetterCompression when 0: peak RSS about 20 MiB;
	// SpeedBestCompression makes chunks about 3 % smaller but needs about 60 MiB).
	Level zstd.EncoderLevel
	// TempDir holds the hash section while the image is read (os.TempDir() when "").
	TempDir string
	// DictSize bounds the dictionary of a delta chunk (MaxDictSize when 0; negative: no
	// delta chunks). With Base and BaseSHA256, every chunk of blocks missing from the base is
	// also encoded against the base range most like it (dict.go), and that delta chunk is
	// kept when it is smaller: a device whose running slot is the base fetches it instead.
	// The publisher then holds 8 bytes per anchor of the base (one per 256 bytes that are not
	// zeros on average: about BaseSize/32).
	DictSize int
}

// Result summarises a built manifest.
type Result struct {
	ImageSize, Blocks, ZeroBlocks uint64
	Chunks                        int
	ChunkFileSize, ManifestSize   uint64
	// Deltas is the number of delta chunks, DeltaBytes their bytes in the chunk file.
	Deltas     int
	DeltaBytes uint64
	// ManifestSHA256 is the digest of the manifest file: what its signature signs.
	ManifestSHA256 []byte
	ImageSHA256    []byte
}

// Build reads the image once from img and writes the chunk file to chunks and the manifest
// to out. It holds one chunk of the image and the header in memory; the hash section goes
// through a temporary file.
func Build(ctx context.Context, img io.Reader, p Params, chunks, out io.Writer) (Result, error) {
	var res Result
	if p.ChunkSize == 0 {
		p.ChunkSize = DefaultChunkSize
	}
	if p.Level == 0 {
		p.Level = zstd.SpeedBetterCompression
	}
	bs := uint64(p.BlockSize)
	if bs < MinBlockSize || bs > MaxBlockSize || bs&(bs-1) != 0 {
		return res, fmt.Errorf("block size %d is not a power of two in %d..%d", bs, MinBlockSize, MaxBlockSize)
	}
	if p.ChunkSize%p.BlockSize != 0 || p.ChunkSize > MaxChunkRaw {
		return res, fmt.Errorf("chunk size %d is not a multiple of the block size %d up to %d", p.ChunkSize, bs, MaxChunkRaw)
	}
	for _, f := range []struct {
		name, v string
		max     int
	}{{"target", p.Target, maxNameLen}, {"compatible", p.Compatible, maxCompatLen}, {"version", p.Version, maxNameLen}} {
		if err := text(f.name, f.v, 1, f.max); err != nil {
			return res, err
		}
	}
	if len(p.BaseSHA256) != 0 && len(p.BaseSHA256) != sha256.Size {
		return res, fmt.Errorf("base SHA-256 of %d bytes", len(p.BaseSHA256))
	}
	tmp, err := os.CreateTemp(p.TempDir, "manifest-hashes-*")
	if err != nil {
		return res, err
	}
	defer func() { tmp.Close(); os.Remove(tmp.Name()) }()
	hw := bufio.NewWriterSize(tmp, 64<<10)

	h := &otav1.ManifestHeader{
		FormatVersion: FormatVersion, Target: p.Target, Compatible: p.Compatible, Version: p.Version,
		BlockSize: p.BlockSize, BaseSha256: p.BaseSHA256,
		Chunks: &otav1.ChunkTable{Compression: otav1.ChunkCompression_CHUNK_COMPRESSION_ZSTD},
	}
	var known []uint64
	if p.Base != nil {
		if known, err = baseIndex(ctx, p.Base, p.BaseSize, bs); err != nil {
			return res, err
		}
	}
	newMax := uint64(p.NewChunkSize)
	if newMax == 0 {
		newMax = DefaultNewChunkSize
	}
	if newMax%bs != 0 || newMax > MaxChunkRaw {
		return res, fmt.Errorf("new chunk size %d is not a multiple of the block size %d up to %d", newMax, bs, MaxChunkRaw)
	}
	capBytes := int(p.MaxChunkBytes)
	if capBytes == 0 {
		capBytes = DefaultMaxChunkBytes
	}
	// A chunk of one incompressible block must fit: zstd adds a few bytes per 128 KiB.
	if uint64(capBytes) < bs+bs/1024+64 {
		return res, fmt.Errorf("max chunk bytes %d cannot hold one block of %d", capBytes, bs)
	}
	// The window covers the largest chunk, so matches reach across all of it; each frame
	// states its content size, so a decoder's window is the chunk itself.
	win := max(zstd.MinWindowSize, int(p.ChunkSize))
	if known != nil {
		win = max(win, int(newMax))
	}
	for win&(win-1) != 0 {
		win += win & -win
	}
	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(p.Level), zstd.WithEncoderConcurrency(1),
		zstd.WithWindowSize(win), zstd.WithEncoderCRC(false), zstd.WithLowerEncoderMem(true), zstd.WithSingleSegment(true))
	if err != nil {
		return res, err
	}
	defer enc.Close()
	dz, err := newDeltaBuilder(ctx, p, newMax, win)
	if err != nil {
		return res, err
	}
	if dz != nil {
		defer dz.close()
	}

	imgHash := sha256.New()
	in := bufio.NewReaderSize(img, 1<<20)
	blk := make([]byte, bs)
	raw := make([]byte, 0, max(uint64(p.ChunkSize), newMax))
	var dst []byte
	var blocks, size, hashes uint64
	// The chunk being filled: cnt blocks (span image bytes) from the current block on; isNew
	// tells whether its non-zero blocks are missing from the base (then it may grow to newMax).
	var cnt uint32
	var span uint64
	isNew, typed := false, false
	// zeros[i] tells whether block i of the chunk being filled is all zeros (its bytes are
	// not in raw).
	var zeros []bool
	// emit writes blocks [i, j) of the pending chunk (their non-zero bytes are r) as one
	// chunk, or as several when the compressed bytes exceed capBytes: split in pieces of
	// about equal raw size that fit, so a whole chunk always fits one writer block.
	var emit func(i, j int, r []byte) error
	emit = func(i, j int, r []byte) error {
		var sz int
		if len(r) > 0 {
			dst = enc.EncodeAll(r, dst[:0])
			if len(dst) > capBytes {
				if j-i == 1 {
					return fmt.Errorf("one block compresses to %d bytes, more than the %d of a chunk", len(dst), capBytes)
				}
				pieces := min(j-i, (len(dst)+capBytes-1)/capBytes+1)
				// Cut at block boundaries, each piece about len(r)/pieces raw bytes.
				per := (len(r) + pieces - 1) / pieces
				start, off, acc := i, 0, 0
				for b := i; b < j; b++ {
					if !zeros[b] {
						// Only the image's last block may be short, and it ends r.
						acc = min(acc+int(bs), len(r)-off)
					}
					if acc >= per && b+1 < j || b+1 == j {
						if err := emit(start, b+1, r[off:off+acc]); err != nil {
							return err
						}
						start, off, acc = b+1, off+acc, 0
					}
				}
				return nil
			}
			if _, err := chunks.Write(dst); err != nil {
				return fmt.Errorf("write chunks: %w", err)
			}
			sz = len(dst)
			if dz != nil && typed && isNew {
				if err := dz.add(h.Chunks, len(h.Chunks.BlockCounts), r, sz); err != nil {
					return err
				}
			}
		}
		h.Chunks.BlockCounts = append(h.Chunks.BlockCounts, uint32(j-i))
		h.Chunks.CompressedSizes = append(h.Chunks.CompressedSizes, uint32(sz))
		h.Chunks.FileSize += uint64(sz)
		if len(h.Chunks.BlockCounts) > MaxChunks {
			return fmt.Errorf("image too large for a manifest (limit: %d chunks)", MaxChunks)
		}
		return nil
	}
	flush := func() error {
		if cnt == 0 {
			return nil
		}
		if err := emit(0, int(cnt), raw); err != nil {
			return err
		}
		raw, zeros, cnt, span, typed = raw[:0], zeros[:0], 0, 0, false
		return nil
	}
	for {
		if blocks%1024 == 0 {
			if err := ctx.Err(); err != nil {
				return res, err
			}
		}
		n, rerr := io.ReadFull(in, blk)
		if n == 0 {
			if rerr == io.EOF {
				break
			}
			return res, fmt.Errorf("read image: %w", rerr)
		}
		if rerr != nil && !errors.Is(rerr, io.ErrUnexpectedEOF) {
			return res, fmt.Errorf("read image: %w", rerr)
		}
		b := blk[:n]
		imgHash.Write(b)
		size += uint64(n)
		if blocks%8 == 0 {
			h.ZeroBlocks = append(h.ZeroBlocks, 0)
		}
		zero := allZero(b)
		var sum [sha256.Size]byte
		blockNew := false
		if !zero {
			sum = sha256.Sum256(b)
			blockNew = known != nil && !inIndex(known, sum)
		}
		// Close the chunk when it is full, or (with a base) when a non-zero block of the
		// other kind comes: a device on the base then fetches dense chunks of new blocks.
		limit := uint64(p.ChunkSize)
		if typed && isNew {
			limit = newMax
		}
		if span+uint64(n) > limit || !zero && typed && blockNew != isNew {
			if err := flush(); err != nil {
				return res, err
			}
		}
		zeros = append(zeros, zero)
		if zero {
			h.ZeroBlocks[blocks/8] |= 1 << (blocks % 8)
		} else {
			hw.Write(sum[:])
			hashes++
			raw = append(raw, b...)
			if !typed {
				isNew, typed = blockNew, true
			}
		}
		blocks++
		cnt++
		span += uint64(n)
		if blocks > MaxBlocks || size > MaxImageSize {
			return res, fmt.Errorf("image too large for a manifest (limits: %d blocks, %d bytes)", MaxBlocks, uint64(MaxImageSize))
		}
		if rerr != nil {
			break
		}
	}
	if err := flush(); err != nil {
		return res, err
	}
	if size == 0 {
		return res, errors.New("empty image")
	}
	if err := hw.Flush(); err != nil {
		return res, err
	}
	h.ImageSize, h.BlockCount, h.HashCount, h.ImageSha256 = size, blocks, hashes, imgHash.Sum(nil)
	if dz != nil && len(h.Chunks.DeltaOf) > 0 {
		if err := dz.appendTo(chunks); err != nil {
			return res, err
		}
		h.FormatVersion, h.BaseSize = FormatVersionDelta, uint64(p.BaseSize)
		for _, sz := range h.Chunks.DeltaSizes {
			h.Chunks.FileSize += uint64(sz)
			res.DeltaBytes += uint64(sz)
		}
		res.Deltas = len(h.Chunks.DeltaOf)
	}
	// Check what was built exactly as a reader will.
	if _, err := check(h); err != nil {
		return res, fmt.Errorf("built an invalid manifest: %w", err)
	}
	hb, err := proto.MarshalOptions{Deterministic: true}.Marshal(h)
	if err != nil {
		return res, err
	}
	if len(hb) > MaxHeaderSize {
		return res, fmt.Errorf("header of %d bytes (limit %d)", len(hb), MaxHeaderSize)
	}
	if _, err := tmp.Seek(0, io.SeekStart); err != nil {
		return res, err
	}
	mh := sha256.New()
	cw := &countWriter{w: io.MultiWriter(out, mh)}
	var pre [prefixSize]byte
	copy(pre[:], Magic)
	binary.BigEndian.PutUint32(pre[len(Magic):], uint32(len(hb)))
	cw.Write(pre[:])
	cw.Write(hb)
	if cw.err == nil {
		if _, err := io.Copy(cw, tmp); err != nil && cw.err == nil {
			cw.err = err
		}
	}
	if cw.err != nil {
		return res, fmt.Errorf("write manifest: %w", cw.err)
	}
	return Result{
		ImageSize: size, Blocks: blocks, ZeroBlocks: blocks - hashes, Chunks: len(h.Chunks.BlockCounts),
		ChunkFileSize: h.Chunks.FileSize, ManifestSize: cw.n, ManifestSHA256: mh.Sum(nil), ImageSHA256: h.ImageSha256,
		Deltas: res.Deltas, DeltaBytes: res.DeltaBytes,
	}, nil
}

type countWriter struct {
	w   io.Writer
	n   uint64
	err error
}

func (c *countWriter) Write(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	n, err := c.w.Write(p)
	c.n += uint64(n)
	c.err = err
	return n, err
}

// baseIndex returns the sorted first 8 bytes of the SHA-256 of every non-zero block of the
// base at block-aligned offsets.
func baseIndex(ctx context.Context, base io.ReaderAt, size int64, bs uint64) ([]uint64, error) {
	var idx []uint64
	buf := make([]byte, max(bs, 1<<20/bs*bs))
	for off := int64(0); off+int64(bs) <= size; {
		if err := ctx.Err(); err != nil {
			return nil, err
		}
		want := min(int64(len(buf)), (size-off)/int64(bs)*int64(bs))
		if _, err := base.ReadAt(buf[:want], off); err != nil && !(errors.Is(err, io.EOF) && want == 0) {
			return nil, fmt.Errorf("read base: %w", err)
		}
		for p := int64(0); p < want; p += int64(bs) {
			b := buf[p : p+int64(bs)]
			if !allZero(b) {
				sum := sha256.Sum256(b)
				idx = append(idx, binary.BigEndian.Uint64(sum[:8]))
			}
		}
		off += want
	}
	slices.Sort(idx)
	return idx, nil
}

func inIndex(idx []uint64, sum [sha256.Size]byte) bool {
	_, ok := slices.BinarySearch(idx, binary.BigEndian.Uint64(sum[:8]))
	return ok
}
