package manifest

import (
	"bufio"
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"slices"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// DefaultIndexEntries bounds the lookup index: 8 bytes per entry, 4 MiB. A 2 GiB image at
// 4 KiB has at most 512 Ki non-zero blocks, so it is indexed in one pass over the local
// data; a larger one takes one pass per 512 Ki blocks instead of more memory.
const DefaultIndexEntries = 512 << 10

// localReadSize is how much of the local data is read at once (a whole number of blocks).
const localReadSize = 1 << 20

// low masks an index entry's block number; all ones marks an entry already found.
const low = 0xFFFFFFFF

// Match is a block of the manifest that the device already has.
type Match struct {
	Block uint64
	// Zero: the block is all zeros (no local data involved).
	Zero bool
	// LocalOffset is where the block's bytes are in the local data (not for Zero).
	LocalOffset int64
}

// LookupStats counts what FindLocal found.
type LookupStats struct {
	Zero, Found uint64
	// Passes over the local data, and the bytes read from it.
	Passes    int
	BytesRead uint64
}

// FindLocal finds every block of the manifest that is all zeros or that the local data
// (e.g. the running slot, size bytes) holds at any block-aligned offset, and calls fn once
// for each such block: first the zero blocks in order, then the others as the scan meets
// them, with the local bytes (valid during the call only; their SHA-256 equals the
// manifest's, checked in full). Blocks fn is never called for must be downloaded.
//
// Memory: the index holds 8 bytes per non-zero manifest block (the first 4 bytes of its
// hash and its number, sorted), at most maxEntries of them at a time (DefaultIndexEntries
// when 0), plus one read buffer of 1 MiB. A candidate whose 4 bytes match is
// confirmed against the full hash, read from the manifest, before fn sees it.
func (m *Manifest) FindLocal(ctx context.Context, local io.ReaderAt, size int64, maxEntries int, fn func(Match, []byte) error) (LookupStats, error) {
	var st LookupStats
	if maxEntries <= 0 {
		maxEntries = DefaultIndexEntries
	}
	n := m.Blocks()
	for b := range n {
		if m.IsZero(b) {
			st.Zero++
			if err := fn(Match{Block: b, Zero: true}, nil); err != nil {
				return st, err
			}
		}
	}
	if size < 0 {
		return st, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "manifest: negative local size")
	}
	bs := int64(m.BlockSize())
	// Only full blocks can match at an aligned offset; a short last block is downloaded.
	full := n
	if m.BlockLen(n-1) != uint64(bs) {
		full--
	}
	index := make([]uint64, 0, min(uint64(maxEntries), m.h.HashCount))
	hr := bufio.NewReaderSize(io.NewSectionReader(m.r, m.hashOff, int64(m.h.HashCount)*HashSize), 64<<10)
	buf := make([]byte, max(bs, localReadSize/bs*bs))
	rec := make([]byte, HashSize) // scratch for the hash section and candidates' full hashes
	for next := uint64(0); next < full; {
		// Index the next maxEntries non-zero blocks.
		index = index[:0]
		for ; next < full && len(index) < maxEntries; next++ {
			if m.IsZero(next) {
				continue
			}
			if _, err := io.ReadFull(hr, rec); err != nil {
				return st, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "manifest: read hashes: %w", err)
			}
			index = append(index, uint64(binary.BigEndian.Uint32(rec))<<32|next)
		}
		if len(index) == 0 {
			break
		}
		slices.Sort(index)
		st.Passes++
		for off := int64(0); off+bs <= size; {
			if err := ctx.Err(); err != nil {
				return st, err
			}
			want := min(int64(len(buf)), (size-off)/bs*bs)
			got, err := local.ReadAt(buf[:want], off)
			if int64(got) < want {
				if err == nil || errors.Is(err, io.EOF) {
					err = io.ErrUnexpectedEOF
				}
				return st, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "manifest: read local data at %d: %w", off+int64(got), err)
			}
			st.BytesRead += uint64(got)
			for p := int64(0); p < want; p += bs {
				blk := buf[p : p+bs]
				sum := sha256.Sum256(blk)
				key := uint64(binary.BigEndian.Uint32(sum[:4])) << 32
				i, _ := slices.BinarySearch(index, key)
				// The run of this key: entries not yet found first, found ones (low bits
				// all ones, still inside the key's range, so the order stays valid) after.
				j := i
				for j < len(index) && index[j]&^low == key && index[j]&low != low {
					j++
				}
				matched := false
				for t := i; t < j; t++ {
					b := index[t] & low
					if _, err := m.hashInto(b, rec); err != nil {
						return st, err
					}
					if !bytes.Equal(rec, sum[:]) {
						continue
					}
					index[t] = key | low
					matched = true
					st.Found++
					if err := fn(Match{Block: b, LocalOffset: off + p}, blk); err != nil {
						return st, err
					}
				}
				if matched {
					w := i
					for t := i; t < j; t++ {
						if index[t]&low != low {
							index[w] = index[t]
							w++
						}
					}
					for ; w < j; w++ {
						index[w] = key | low
					}
				}
			}
			off += want
		}
	}
	return st, nil
}

// String formats the figures for logs.
func (s LookupStats) String() string {
	return fmt.Sprintf("%d zero, %d found, %d passes, %d bytes read", s.Zero, s.Found, s.Passes, s.BytesRead)
}
