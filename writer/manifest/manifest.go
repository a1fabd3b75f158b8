// Package manifest reads, checks and writes signed update manifests (format in
// proto/ota/v1/manifest.proto): the SHA-256 of every block of an image, a bitmap of its
// all-zero blocks, and the table of the chunk file that carries the image's non-zero blocks
// compressed, chunk by chunk. The writer verifies a manifest's signature (Verify), finds the
// blocks it already holds (FindLocal) and checks every downloaded block (DecodeChunk); the
// publisher writes both files in one pass over the image (Build); ota-net only reads the
// chunk table (Open, unverified) to know what to fetch.
//
// Everything a reader gets is hostile until Verify accepted it: Open checks every field,
// count and size against the others and against fixed limits, and fails with a typed
// *status.Error (REASON_INVALID_REQUEST wrapping ErrFormat) instead of panicking or
// allocating what the input asks for. Memory is bounded by the header (one bit per block and
// a few bytes per chunk); the hash section stays in the file and is read by index.
package manifest

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	"google.golang.org/protobuf/proto"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// Magic opens every manifest file; its last byte is the format version.
const Magic = "GWOTAMF1"

// FormatVersion is the header's format_version of a manifest without delta chunks;
// FormatVersionDelta that of one with delta chunks (which a reader of format 1 refuses).
// This package reads and writes both.
const (
	FormatVersion      = 1
	FormatVersionDelta = 2
)

// HashSize is the size of one record of the hash section.
const HashSize = sha256.Size

// Limits on hostile input. They bound what a reader allocates: the header (zero bitmap, one
// bit per block; chunk table, 8 bytes per chunk in memory) and one chunk's decoded bytes.
const (
	// prefixSize is the magic and the header length.
	prefixSize = len(Magic) + 4
	// MaxHeaderSize bounds the protobuf header (MaxBlocks/8 bytes of bitmap plus at most
	// 10 bytes per chunk, with room to spare).
	MaxHeaderSize = 4 << 20
	// MaxBlocks: 4 Mi blocks is 16 GiB at 4 KiB, 256 GiB at 64 KiB; its bitmap is 512 KiB.
	MaxBlocks = 1 << 22
	// MaxChunks bounds the chunk table (4 MiB in memory; 8 GiB in 16 KiB chunks).
	MaxChunks = 1 << 19
	// MaxChunkRaw bounds one chunk's decoded bytes, which a reader holds at once.
	MaxChunkRaw = 4 << 20
	// MaxImageSize matches the job document's largest file.
	MaxImageSize = 1 << 40
	// MinBlockSize and MaxBlockSize bound the block size (a power of two).
	MinBlockSize = 512
	MaxBlockSize = 1 << 20
	maxNameLen   = 128
	maxCompatLen = 256
)

// ErrFormat is wrapped by every error about a malformed or inconsistent manifest.
var ErrFormat = errors.New("malformed manifest")

// ErrBlockHash is wrapped by the error for a block whose bytes do not match its hash.
var ErrBlockHash = errors.New("block does not match the manifest")

func bad(format string, args ...any) *status.Error {
	return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "manifest: %w: "+format, append([]any{ErrFormat}, args...)...)
}

// Manifest is a parsed, consistent manifest. Methods that read block hashes read them from
// the io.ReaderAt given to Open; everything else is in memory.
type Manifest struct {
	h       *otav1.ManifestHeader
	r       io.ReaderAt
	hashOff int64
	zero    []byte   // the header's bitmap
	rank    []uint32 // non-zero blocks before each 64-block group
	// chunk checkpoints every ckEvery chunks: first block and chunk file offset.
	ckBlock []uint64
	ckOff   []uint64
	// deltaOff[d] is delta chunk d's offset in the chunk file.
	deltaOff []uint64
}

const ckEvery = 64

// Open reads and checks the manifest file of size bytes held by r. It does not verify the
// signature (see Verify): ota-net uses Open on the unverified file to read the chunk table.
// The hash section must be exactly hash_count records; r must stay readable while the
// Manifest is used.
func Open(r io.ReaderAt, size int64) (*Manifest, error) {
	if size < int64(prefixSize) || size > MaxFileSize {
		return nil, bad("%d bytes, not in %d..%d", size, prefixSize, MaxFileSize)
	}
	var pre [prefixSize]byte
	if _, err := r.ReadAt(pre[:], 0); err != nil {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "manifest: read: %w", err)
	}
	if string(pre[:len(Magic)]) != Magic {
		if bytes.HasPrefix(pre[:], []byte(Magic[:len(Magic)-1])) {
			return nil, status.Errorf(otav1.Reason_REASON_UNSUPPORTED, "manifest: format %q not supported (this writer reads %q)", pre[:len(Magic)], Magic)
		}
		return nil, bad("no %q magic", Magic)
	}
	hl := binary.BigEndian.Uint32(pre[len(Magic):])
	if hl == 0 || hl > MaxHeaderSize {
		return nil, bad("header of %d bytes (1..%d)", hl, MaxHeaderSize)
	}
	if int64(hl) > size-int64(prefixSize) {
		return nil, bad("header of %d bytes in a file of %d", hl, size)
	}
	hb := make([]byte, hl)
	if _, err := r.ReadAt(hb, int64(prefixSize)); err != nil {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "manifest: read header: %w", err)
	}
	h := &otav1.ManifestHeader{}
	if err := proto.Unmarshal(hb, h); err != nil {
		return nil, bad("header: %v", err)
	}
	m, err := check(h)
	if err != nil {
		return nil, err
	}
	m.r = r
	m.hashOff = int64(prefixSize) + int64(hl)
	if want := m.hashOff + int64(h.HashCount)*HashSize; size != want {
		return nil, bad("file is %d bytes, header and %d hashes make %d", size, h.HashCount, want)
	}
	return m, nil
}

func check(h *otav1.ManifestHeader) (*Manifest, error) {
	if len(h.ProtoReflect().GetUnknown()) != 0 {
		return nil, bad("header has unknown fields")
	}
	if h.FormatVersion != FormatVersion && h.FormatVersion != FormatVersionDelta {
		return nil, status.Errorf(otav1.Reason_REASON_UNSUPPORTED, "manifest: format_version %d not supported (this writer reads %d and %d)", h.FormatVersion, FormatVersion, FormatVersionDelta)
	}
	if err := text("target", h.Target, 1, maxNameLen); err != nil {
		return nil, err
	}
	if err := text("compatible", h.Compatible, 1, maxCompatLen); err != nil {
		return nil, err
	}
	if err := text("version", h.Version, 1, maxNameLen); err != nil {
		return nil, err
	}
	if h.ImageSize == 0 || h.ImageSize > MaxImageSize {
		return nil, bad("image_size %d out of range 1..%d", h.ImageSize, uint64(MaxImageSize))
	}
	if len(h.ImageSha256) != sha256.Size {
		return nil, bad("image_sha256 of %d bytes", len(h.ImageSha256))
	}
	if len(h.BaseSha256) != 0 && len(h.BaseSha256) != sha256.Size {
		return nil, bad("base_sha256 of %d bytes", len(h.BaseSha256))
	}
	bs := uint64(h.BlockSize)
	if bs < MinBlockSize || bs > MaxBlockSize || bs&(bs-1) != 0 {
		return nil, bad("block_size %d is not a power of two in %d..%d", bs, MinBlockSize, MaxBlockSize)
	}
	n := (h.ImageSize + bs - 1) / bs
	if h.BlockCount != n {
		return nil, bad("block_count %d, but %d bytes in blocks of %d are %d", h.BlockCount, h.ImageSize, bs, n)
	}
	if n > MaxBlocks {
		return nil, bad("%d blocks (limit %d)", n, MaxBlocks)
	}
	if uint64(len(h.ZeroBlocks)) != (n+7)/8 {
		return nil, bad("zero_blocks of %d bytes for %d blocks", len(h.ZeroBlocks), n)
	}
	if n%8 != 0 && h.ZeroBlocks[len(h.ZeroBlocks)-1]>>(n%8) != 0 {
		return nil, bad("zero_blocks has bits past the last block")
	}
	m := &Manifest{h: h, zero: h.ZeroBlocks}
	m.rank = make([]uint32, (n+63)/64+1)
	var nz uint64
	for g := uint64(0); g < (n+63)/64; g++ {
		m.rank[g] = uint32(nz)
		for b := g * 64; b < min(n, g*64+64); b++ {
			if !m.IsZero(b) {
				nz++
			}
		}
	}
	m.rank[len(m.rank)-1] = uint32(nz)
	if h.HashCount != nz {
		return nil, bad("hash_count %d, but %d blocks are not all zeros", h.HashCount, nz)
	}
	return m, m.checkChunks()
}

func (m *Manifest) checkChunks() error {
	c := m.h.Chunks
	if c == nil {
		return bad("no chunk table")
	}
	if c.Compression != otav1.ChunkCompression_CHUNK_COMPRESSION_ZSTD {
		return status.Errorf(otav1.Reason_REASON_UNSUPPORTED, "manifest: chunk compression %s not supported", c.Compression)
	}
	k := len(c.BlockCounts)
	if k == 0 || k > MaxChunks {
		return bad("%d chunks (1..%d)", k, MaxChunks)
	}
	if len(c.CompressedSizes) != k {
		return bad("%d block counts but %d sizes", k, len(c.CompressedSizes))
	}
	m.ckBlock = make([]uint64, 0, (k+ckEvery-1)/ckEvery)
	m.ckOff = make([]uint64, 0, cap(m.ckBlock))
	var blk, off uint64
	for i := range k {
		if i%ckEvery == 0 {
			m.ckBlock, m.ckOff = append(m.ckBlock, blk), append(m.ckOff, off)
		}
		cnt := uint64(c.BlockCounts[i])
		if cnt == 0 {
			return bad("chunk %d holds no block", i)
		}
		if cnt > m.h.BlockCount-blk {
			return bad("chunk %d ends past the last block", i)
		}
		raw := m.rawBytes(blk, cnt)
		if raw > MaxChunkRaw {
			return bad("chunk %d holds %d bytes (limit %d)", i, raw, MaxChunkRaw)
		}
		sz := uint64(c.CompressedSizes[i])
		switch {
		case raw == 0 && sz != 0:
			return bad("chunk %d holds only zero blocks but has %d bytes", i, sz)
		case raw != 0 && sz == 0:
			return bad("chunk %d holds %d bytes of blocks but has no bytes", i, raw)
		case sz > compressBound(raw):
			return bad("chunk %d of %d bytes for %d bytes of blocks", i, sz, raw)
		}
		blk += cnt
		off += sz
	}
	if blk != m.h.BlockCount {
		return bad("chunks cover %d of %d blocks", blk, m.h.BlockCount)
	}
	return m.checkDeltas(off)
}

// checkDeltas checks the delta chunks that follow the ordinary chunks (off bytes of them).
func (m *Manifest) checkDeltas(off uint64) error {
	h, c := m.h, m.h.Chunks
	nd := len(c.DeltaOf)
	if len(c.DictOffsets) != nd || len(c.DictLengths) != nd || len(c.DeltaSizes) != nd {
		return bad("delta chunk lists of %d, %d, %d and %d entries", nd, len(c.DictOffsets), len(c.DictLengths), len(c.DeltaSizes))
	}
	if h.FormatVersion == FormatVersion {
		if nd != 0 || h.BaseSize != 0 {
			return bad("format_version 1 with delta chunks or base_size")
		}
	} else {
		if nd == 0 {
			return bad("format_version %d without delta chunks", h.FormatVersion)
		}
		if len(h.BaseSha256) == 0 || h.BaseSize == 0 || h.BaseSize > MaxImageSize {
			return bad("delta chunks need base_sha256 and a base_size in 1..%d (%d)", uint64(MaxImageSize), h.BaseSize)
		}
	}
	m.deltaOff = make([]uint64, nd)
	prev := -1
	for d := range nd {
		k := int(c.DeltaOf[d])
		if uint64(c.DeltaOf[d]) >= uint64(len(c.BlockCounts)) || k <= prev {
			return bad("delta chunk %d replaces chunk %d (after %d, of %d)", d, c.DeltaOf[d], prev, len(c.BlockCounts))
		}
		prev = k
		if c.CompressedSizes[k] == 0 {
			return bad("delta chunk %d replaces chunk %d of zeros", d, k)
		}
		dl, do := uint64(c.DictLengths[d]), c.DictOffsets[d]
		if dl == 0 || dl > MaxDictSize || do > h.BaseSize || dl > h.BaseSize-do {
			return bad("delta chunk %d has the dictionary %d+%d (at most %d bytes, inside %d)", d, do, dl, MaxDictSize, h.BaseSize)
		}
		sz := uint64(c.DeltaSizes[d])
		if sz == 0 || sz > compressBound(m.rawOf(k)) {
			return bad("delta chunk %d of %d bytes for %d bytes of blocks", d, sz, m.rawOf(k))
		}
		m.deltaOff[d] = off
		off += sz
	}
	if off != c.FileSize {
		return bad("chunk sizes add up to %d, file_size is %d", off, c.FileSize)
	}
	return nil
}

// rawOf is chunk k's decoded size (k valid).
func (m *Manifest) rawOf(k int) uint64 {
	c := m.Chunk(k)
	return c.Raw
}

// compressBound is the largest zstd frame this package accepts for raw bytes: incompressible
// data is stored in raw blocks of at most 128 KiB with a 3-byte header each, behind a frame
// header and checksum.
func compressBound(raw uint64) uint64 { return raw + raw>>10 + 64 }

// rawBytes is the number of bytes of the non-zero blocks among cnt blocks from first.
func (m *Manifest) rawBytes(first, cnt uint64) uint64 {
	var raw uint64
	for b := first; b < first+cnt; b++ {
		if !m.IsZero(b) {
			raw += m.BlockLen(b)
		}
	}
	return raw
}

func text(name, s string, minLen, maxLen int) error {
	if len(s) < minLen || len(s) > maxLen {
		return bad("%s of %d bytes (%d..%d)", name, len(s), minLen, maxLen)
	}
	if !utf8.ValidString(s) || strings.ContainsFunc(s, func(r rune) bool { return unicode.IsControl(r) || !unicode.IsPrint(r) }) {
		return bad("%s has control or invalid characters", name)
	}
	return nil
}

// Header returns a copy of the header.
func (m *Manifest) Header() *otav1.ManifestHeader { return proto.Clone(m.h).(*otav1.ManifestHeader) }

// Target, Compatible and Version are the signed identity of the image.
func (m *Manifest) Target() string     { return m.h.Target }
func (m *Manifest) Compatible() string { return m.h.Compatible }
func (m *Manifest) Version() string    { return m.h.Version }

// ImageSize, BlockSize and Blocks describe the image.
func (m *Manifest) ImageSize() uint64 { return m.h.ImageSize }
func (m *Manifest) BlockSize() uint32 { return m.h.BlockSize }
func (m *Manifest) Blocks() uint64    { return m.h.BlockCount }

// ImageSHA256 is the digest of the whole image.
func (m *Manifest) ImageSHA256() []byte { return bytes.Clone(m.h.ImageSha256) }

// ZeroBlocks is the number of all-zero blocks.
func (m *Manifest) ZeroBlocks() uint64 { return m.h.BlockCount - m.h.HashCount }

// BlockLen is the length of block b (the last one may be short).
func (m *Manifest) BlockLen(b uint64) uint64 {
	bs := uint64(m.h.BlockSize)
	return min(bs, m.h.ImageSize-b*bs)
}

// IsZero reports whether block b is all zeros. b must be < Blocks().
func (m *Manifest) IsZero(b uint64) bool { return m.zero[b/8]>>(b%8)&1 != 0 }

// record is the index of block b's hash in the hash section (b not zero).
func (m *Manifest) record(b uint64) uint64 {
	r := uint64(m.rank[b/64])
	for i := b &^ 63; i < b; i++ {
		if !m.IsZero(i) {
			r++
		}
	}
	return r
}

// BlockHash returns the SHA-256 of block b, read from the hash section; zero reports an
// all-zero block (which has no record).
func (m *Manifest) BlockHash(b uint64) (sum [HashSize]byte, zero bool, err error) {
	zero, err = m.hashInto(b, sum[:])
	return sum, zero, err
}

// hashInto reads block b's hash into dst (HashSize bytes; the caller's scratch, so the hot
// paths allocate nothing per block).
func (m *Manifest) hashInto(b uint64, dst []byte) (zero bool, err error) {
	if b >= m.h.BlockCount {
		return false, status.Errorf(otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, "manifest: block %d of %d", b, m.h.BlockCount)
	}
	if m.IsZero(b) {
		return true, nil
	}
	if _, err := m.r.ReadAt(dst[:HashSize], m.hashOff+int64(m.record(b))*HashSize); err != nil {
		return false, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "manifest: read hash of block %d: %w", b, err)
	}
	return false, nil
}

// CheckBlock checks that data is block b: the right length and hash (or all zeros). A
// mismatch is REASON_SIG_CHECK_FAILED wrapping ErrBlockHash.
func (m *Manifest) CheckBlock(b uint64, data []byte) error {
	return m.checkBlock(b, data, make([]byte, HashSize))
}

func (m *Manifest) checkBlock(b uint64, data, scratch []byte) error {
	zero, err := m.hashInto(b, scratch)
	if err != nil {
		return err
	}
	if uint64(len(data)) != m.BlockLen(b) {
		return status.Errorf(otav1.Reason_REASON_SIG_CHECK_FAILED, "manifest: %w: block %d is %d bytes, not %d", ErrBlockHash, b, len(data), m.BlockLen(b))
	}
	if zero {
		if !allZero(data) {
			return status.Errorf(otav1.Reason_REASON_SIG_CHECK_FAILED, "manifest: %w: block %d must be zeros", ErrBlockHash, b)
		}
		return nil
	}
	if sum := sha256.Sum256(data); !bytes.Equal(sum[:], scratch[:HashSize]) {
		return status.Errorf(otav1.Reason_REASON_SIG_CHECK_FAILED, "manifest: %w: block %d", ErrBlockHash, b).WithMeta("block", fmt.Sprint(b))
	}
	return nil
}

// Chunk is one entry of the chunk table.
type Chunk struct {
	Index      int
	FirstBlock uint64
	Blocks     uint64
	// Offset and Size are the chunk's byte range in the chunk file; Size 0: all zeros.
	Offset uint64
	Size   uint64
	// Raw is the size of the chunk's non-zero blocks, decoded.
	Raw uint64
	// Unit is the chunk's index among the units of the chunk file: the ordinary chunks
	// (Unit == Index) then the delta chunks (Unit == Chunks() + D).
	Unit int
	// Delta: this is delta chunk D, an alternate encoding of ordinary chunk Index (whose
	// blocks FirstBlock, Blocks and Raw describe); Offset and Size are the delta chunk's, and
	// DictOffset, DictLen its dictionary's range in the base image.
	Delta               bool
	D                   int
	DictOffset, DictLen uint64
}

// Chunks is the number of chunks; ChunkFileSize the chunk file's size.
func (m *Manifest) Chunks() int           { return len(m.h.Chunks.BlockCounts) }
func (m *Manifest) ChunkFileSize() uint64 { return m.h.Chunks.FileSize }

// Chunk returns chunk k (0 <= k < Chunks()).
func (m *Manifest) Chunk(k int) Chunk {
	c := m.h.Chunks
	blk, off := m.ckBlock[k/ckEvery], m.ckOff[k/ckEvery]
	for i := k - k%ckEvery; i < k; i++ {
		blk += uint64(c.BlockCounts[i])
		off += uint64(c.CompressedSizes[i])
	}
	cnt := uint64(c.BlockCounts[k])
	return Chunk{Index: k, Unit: k, FirstBlock: blk, Blocks: cnt, Offset: off, Size: uint64(c.CompressedSizes[k]), Raw: m.rawBytes(blk, cnt)}
}

// Deltas is the number of delta chunks.
func (m *Manifest) Deltas() int { return len(m.h.Chunks.DeltaOf) }

// Units is the number of units of the chunk file: Chunks() + Deltas().
func (m *Manifest) Units() int { return m.Chunks() + m.Deltas() }

// BaseSHA256 and BaseSize name the delta base: delta chunks apply to a device whose running
// slot starts with BaseSize bytes of that digest.
func (m *Manifest) BaseSHA256() []byte { return bytes.Clone(m.h.BaseSha256) }
func (m *Manifest) BaseSize() uint64   { return m.h.BaseSize }

// Delta returns delta chunk d (0 <= d < Deltas()).
func (m *Manifest) Delta(d int) Chunk {
	t := m.h.Chunks
	c := m.Chunk(int(t.DeltaOf[d]))
	c.Unit, c.Delta, c.D = m.Chunks()+d, true, d
	c.Offset, c.Size = m.deltaOff[d], uint64(t.DeltaSizes[d])
	c.DictOffset, c.DictLen = t.DictOffsets[d], uint64(t.DictLengths[d])
	return c
}

// Unit returns unit u (0 <= u < Units()): chunk u or delta chunk u-Chunks().
func (m *Manifest) Unit(u int) Chunk {
	if u < m.Chunks() {
		return m.Chunk(u)
	}
	return m.Delta(u - m.Chunks())
}

// DeltaOf returns the delta chunk of ordinary chunk k, if it has one.
func (m *Manifest) DeltaOf(k int) (int, bool) {
	return slices.BinarySearch(m.h.Chunks.DeltaOf, uint32(k))
}

// NeededChunks returns the chunks holding at least one non-zero block for which missing
// reports true, in order: what a device must download.
func (m *Manifest) NeededChunks(missing func(block uint64) bool) []Chunk {
	var out []Chunk
	for k := range m.Chunks() {
		c := m.Chunk(k)
		for b := c.FirstBlock; b < c.FirstBlock+c.Blocks; b++ {
			if !m.IsZero(b) && missing(b) {
				out = append(out, c)
				break
			}
		}
	}
	return out
}

func allZero(p []byte) bool {
	for len(p) >= 8 {
		if binary.LittleEndian.Uint64(p) != 0 {
			return false
		}
		p = p[8:]
	}
	for _, c := range p {
		if c != 0 {
			return false
		}
	}
	return true
}
