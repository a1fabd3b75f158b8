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

	"github.com/klauspost/compress/zstd"
	"google.golang.org/protobuf/proto"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

// DefaultChunkSize is the image bytes (zero blocks included) one chunk covers, chosen with
// scripts/bench-delta.sh (4 KiB blocks, zstd "better"): on an upgrade of a 40 MiB ext4 image
// the device downloads 3.58, 3.61, 3.73, 3.99 and 4.19 MB of chunks at 16, 32, 64, 128 and
// 256 KiB in exact ranges (HTTP), but 4.60, 4.39, 4.39, 4.36 and 4.32 MB in the 64 KiB
// blocks of an MQTT stream. 64 KiB is within 4 % of the best of either, with a quarter of
// the chunk table of 16 KiB.
const DefaultChunkSize = 64 << 10

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
	// Level is the zstd level (zstd.SpeedBetterCompression when 0: peak RSS about 20 MiB;
	// SpeedBestCompression makes chunks a few percent smaller but needs about 50 MiB).
	Level zstd.EncoderLevel
	// TempDir holds the hash section while the image is read (os.TempDir() when "").
	TempDir string
}

// Result summarises a built manifest.
type Result struct {
	ImageSize, Blocks, ZeroBlocks uint64
	Chunks                        int
	ChunkFileSize, ManifestSize   uint64
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

	enc, err := zstd.NewWriter(nil, zstd.WithEncoderLevel(p.Level), zstd.WithEncoderConcurrency(1),
		zstd.WithWindowSize(max(zstd.MinWindowSize, int(p.ChunkSize))), zstd.WithEncoderCRC(false), zstd.WithLowerEncoderMem(true))
	if err != nil {
		return res, err
	}
	defer enc.Close()

	h := &otav1.ManifestHeader{
		FormatVersion: FormatVersion, Target: p.Target, Compatible: p.Compatible, Version: p.Version,
		BlockSize: p.BlockSize, BaseSha256: p.BaseSHA256,
		Chunks: &otav1.ChunkTable{Compression: otav1.ChunkCompression_CHUNK_COMPRESSION_ZSTD},
	}
	imgHash := sha256.New()
	buf := make([]byte, p.ChunkSize)
	var dst []byte
	var blocks, size, hashes uint64
	for {
		if err := ctx.Err(); err != nil {
			return res, err
		}
		n, rerr := io.ReadFull(img, buf)
		if n == 0 {
			if rerr == io.EOF {
				break
			}
			return res, fmt.Errorf("read image: %w", rerr)
		}
		if rerr != nil && !errors.Is(rerr, io.ErrUnexpectedEOF) {
			return res, fmt.Errorf("read image: %w", rerr)
		}
		imgHash.Write(buf[:n])
		size += uint64(n)
		// Keep the non-zero blocks, compacted to the front of buf (w <= off).
		w, cnt := 0, uint32(0)
		for off := 0; off < n; off += int(bs) {
			blk := buf[off:min(n, off+int(bs))]
			if blocks%8 == 0 {
				h.ZeroBlocks = append(h.ZeroBlocks, 0)
			}
			if allZero(blk) {
				h.ZeroBlocks[blocks/8] |= 1 << (blocks % 8)
			} else {
				sum := sha256.Sum256(blk)
				hw.Write(sum[:])
				hashes++
				w += copy(buf[w:], blk)
			}
			blocks++
			cnt++
		}
		var sz int
		if w > 0 {
			dst = enc.EncodeAll(buf[:w], dst[:0])
			if _, err := chunks.Write(dst); err != nil {
				return res, fmt.Errorf("write chunks: %w", err)
			}
			sz = len(dst)
		}
		h.Chunks.BlockCounts = append(h.Chunks.BlockCounts, cnt)
		h.Chunks.CompressedSizes = append(h.Chunks.CompressedSizes, uint32(sz))
		h.Chunks.FileSize += uint64(sz)
		if blocks > MaxBlocks || len(h.Chunks.BlockCounts) > MaxChunks || size > MaxImageSize {
			return res, fmt.Errorf("image too large for a manifest (limits: %d blocks, %d chunks, %d bytes)", MaxBlocks, MaxChunks, uint64(MaxImageSize))
		}
		if rerr != nil {
			break
		}
	}
	if size == 0 {
		return res, errors.New("empty image")
	}
	if err := hw.Flush(); err != nil {
		return res, err
	}
	h.ImageSize, h.BlockCount, h.HashCount, h.ImageSha256 = size, blocks, hashes, imgHash.Sum(nil)
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
