package manifest

import (
	"github.com/klauspost/compress/zstd"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// ChunkDecoder decodes chunks of one manifest, checking every block against its hash. It
// holds one decoded chunk (at most MaxChunkRaw bytes) and is not safe for concurrent use.
type ChunkDecoder struct {
	m       *Manifest
	dec     *zstd.Decoder
	ddec    *zstd.Decoder // delta chunks, its dictionary set per chunk
	buf     []byte
	scratch []byte
}

// NewChunkDecoder returns a decoder whose zstd window and output are bounded by the
// manifest's largest chunk (never more than MaxChunkRaw), whatever a frame declares.
func (m *Manifest) NewChunkDecoder() (*ChunkDecoder, error) {
	dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
		zstd.WithDecoderMaxMemory(MaxChunkRaw), zstd.WithDecoderMaxWindow(MaxChunkRaw))
	if err != nil {
		return nil, err
	}
	return &ChunkDecoder{m: m, dec: dec, scratch: make([]byte, HashSize)}, nil
}

// Close releases the decoder.
func (d *ChunkDecoder) Close() {
	d.dec.Close()
	if d.ddec != nil {
		d.ddec.Close()
	}
}

// Decode decodes chunk k from its compressed bytes and calls fn with each of its non-zero
// blocks, in order, after checking the block's hash; the data passed to fn is only valid
// during the call. Nothing is passed to fn unless the whole chunk decodes to exactly the
// expected size and every block matches: a damaged chunk is REASON_SIG_CHECK_FAILED
// wrapping ErrBlockHash and delivers nothing, so a caller refetches it whole.
func (d *ChunkDecoder) Decode(k int, compressed []byte, fn func(block uint64, data []byte) error) error {
	m := d.m
	if k < 0 || k >= m.Chunks() {
		return status.Errorf(otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, "manifest: chunk %d of %d", k, m.Chunks())
	}
	return d.decode(m.Chunk(k), compressed, d.dec, fn)
}

// DecodeDelta decodes delta chunk dd like Decode, with dict: the bytes of the base image's
// range [Delta(dd).DictOffset, +DictLen) as the device holds them. A wrong dictionary (a
// device not on the base) decodes to blocks that do not match: REASON_SIG_CHECK_FAILED
// wrapping ErrBlockHash, nothing delivered. Memory: the decoder holds dict besides the
// chunk.
func (d *ChunkDecoder) DecodeDelta(dd int, compressed, dict []byte, fn func(block uint64, data []byte) error) error {
	m := d.m
	if dd < 0 || dd >= m.Deltas() {
		return status.Errorf(otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, "manifest: delta chunk %d of %d", dd, m.Deltas())
	}
	c := m.Delta(dd)
	if uint64(len(dict)) != c.DictLen {
		return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "manifest: delta chunk %d: a dictionary of %d bytes, not %d", dd, len(dict), c.DictLen)
	}
	if d.ddec == nil {
		dec, err := zstd.NewReader(nil, zstd.WithDecoderConcurrency(1), zstd.WithDecoderLowmem(true),
			zstd.WithDecoderMaxMemory(MaxChunkRaw), zstd.WithDecoderMaxWindow(MaxChunkRaw))
		if err != nil {
			return status.Errorf(otav1.Reason_REASON_OTHER, "manifest: delta decoder: %w", err)
		}
		d.ddec = dec
	}
	// The dictionary is registered under id 0, the id of frames that name none: the
	// publisher writes none (deltaDictID).
	if err := d.ddec.ResetWithOptions(nil, zstd.WithDecoderDictRaw(deltaDictID, dict)); err != nil {
		return status.Errorf(otav1.Reason_REASON_OTHER, "manifest: delta decoder: %w", err)
	}
	defer d.ddec.ResetWithOptions(nil, zstd.WithDecoderDictDelete(deltaDictID))
	return d.decode(c, compressed, d.ddec, fn)
}

func (d *ChunkDecoder) decode(c Chunk, compressed []byte, dec *zstd.Decoder, fn func(block uint64, data []byte) error) error {
	m, k := d.m, c.Index
	if uint64(len(compressed)) != c.Size {
		return status.Errorf(otav1.Reason_REASON_SIG_CHECK_FAILED, "manifest: %w: chunk %d is %d bytes, not %d", ErrBlockHash, k, len(compressed), c.Size)
	}
	if c.Raw == 0 {
		return nil
	}
	if cap(d.buf) < int(c.Raw) {
		d.buf = make([]byte, 0, c.Raw)
	}
	out, err := dec.DecodeAll(compressed, d.buf[:0])
	if err != nil || uint64(len(out)) != c.Raw {
		if len(out) <= cap(d.buf) {
			d.buf = out[:0]
		}
		return status.Errorf(otav1.Reason_REASON_SIG_CHECK_FAILED, "manifest: %w: chunk %d does not decode to its %d bytes (%d, %v)", ErrBlockHash, k, c.Raw, len(out), err)
	}
	// Check every block before delivering any.
	off := uint64(0)
	for b := c.FirstBlock; b < c.FirstBlock+c.Blocks; b++ {
		if m.IsZero(b) {
			continue
		}
		n := m.BlockLen(b)
		if err := m.checkBlock(b, out[off:off+n], d.scratch); err != nil {
			return err
		}
		off += n
	}
	off = 0
	for b := c.FirstBlock; b < c.FirstBlock+c.Blocks; b++ {
		if m.IsZero(b) {
			continue
		}
		n := m.BlockLen(b)
		if err := fn(b, out[off:off+n]); err != nil {
			return err
		}
		off += n
	}
	return nil
}
