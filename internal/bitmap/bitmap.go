// Package bitmap is the set of block indices that both processes exchange and keep: the
// writer's missing blocks (otav1.SessionInfo.missing), its journal of durable blocks, the
// downloaders' view of what they hold and what they asked for, and the bitmap of an AWS
// stream request. All use one bit order, documented with SessionInfo.missing in
// proto/ota/v1/writer.proto: block k is bit k&7 of byte k>>3 (least significant first).
//
// A Bitmap is a plain []byte (a []byte converts to it, and JSON encodes it as base64 like any
// []byte, so the journal's on-disk form does not depend on this type).
package bitmap

import (
	"encoding/hex"
	"fmt"
	"math/bits"
)

// Bitmap is a set of block indices: block k is byte k>>3, mask 1<<(k&7).
type Bitmap []byte

// Len is the number of bytes of a bitmap of n blocks.
func Len(n int) int { return (n + 7) / 8 }

// New returns an empty bitmap of n blocks.
func New(n int) Bitmap { return make(Bitmap, Len(n)) }

// Full returns a bitmap of n blocks with every block set.
func Full(n int) Bitmap {
	b := New(n)
	for i := range b {
		b[i] = 0xFF
	}
	if r := n & 7; r != 0 {
		b[len(b)-1] = byte(1)<<r - 1
	}
	return b
}

// Has reports whether block i is in the set (false outside the bitmap, negative i included).
func (b Bitmap) Has(i int) bool {
	return i >= 0 && i>>3 < len(b) && b[i>>3]&(1<<(i&7)) != 0
}

// Set adds block i, which must lie inside the bitmap.
func (b Bitmap) Set(i int) { b[i>>3] |= 1 << (i & 7) }

// Clear removes block i, which must lie inside the bitmap.
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

// Complement returns the blocks below n that b does not hold, as a bitmap of n blocks.
// Blocks past the end of a short b count as held by it: read as a bitmap of missing blocks
// (the writer's), a short or nil one never makes a block look present, so it is fetched
// again rather than skipped.
func (b Bitmap) Complement(n int) Bitmap {
	out := New(n)
	for i := range out {
		x := byte(0xFF)
		if i < len(b) {
			x = b[i]
		}
		out[i] = ^x
	}
	if r := n & 7; r != 0 {
		out[len(out)-1] &= byte(1)<<r - 1
	}
	return out
}

// Check tells whether b is exactly a bitmap of n blocks: Len(n) bytes and no block at n or
// beyond (such a bit would count a block the image does not have).
func (b Bitmap) Check(n int) error {
	if n < 0 || len(b) != Len(n) {
		return fmt.Errorf("bitmap of %d bytes for %d blocks", len(b), n)
	}
	if r := n & 7; r != 0 && b[len(b)-1]>>r != 0 {
		return fmt.Errorf("bitmap names blocks past block %d", n-1)
	}
	return nil
}

// Hex is the form of a bitmap in an AWS stream request in JSON: "0x" and hex digits,
// trailing zero bytes dropped (bytes 13 00 80 00 are "0x130080"); an empty bitmap is "0x".
func (b Bitmap) Hex() string {
	n := len(b)
	for n > 1 && b[n-1] == 0 {
		n--
	}
	return "0x" + hex.EncodeToString(b[:n])
}
