package stream

import (
	"bytes"
	"encoding/json"
	"errors"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/internal/bitmap"
)

func formatOf(js bool) string {
	if js {
		return FormatJSON
	}
	return FormatCBOR
}

// FuzzDecodeBlock: any data message (CBOR or JSON, from a broker we do not control) decodes to
// a block or to ErrMalformed, never panics; a decoded block survives a re-encode unchanged;
// and a block that Validate accepts for a file is exactly one block of that file.
func FuzzDecodeBlock(f *testing.F) {
	add := func(js bool, b []byte, size int64, bs uint32) { f.Add(js, b, size, bs) }
	for _, blk := range []Block{
		{FileID: 0, Index: 0, Length: 4, Payload: []byte{1, 2, 3, 4}},
		{FileID: 1, Index: 3, Length: 256, Payload: bytes.Repeat([]byte{7}, 256), ClientToken: "tok"},
		{FileID: 255, Index: MaxBlocks - 1, Length: 1, Payload: []byte{9}},
	} {
		c, _ := encMode.Marshal(blk)
		j, _ := json.Marshal(blk)
		add(false, c, 4+3*256, 256)
		add(true, j, 1<<20, 4096)
	}
	// Indefinite-length map and byte string (chunks), as AWS may send them.
	add(false, []byte{0xbf, 0x61, 'f', 0x00, 0x61, 'i', 0x00, 0x61, 'l', 0x02, 0x61, 'p', 0x5f, 0x41, 0xaa, 0x41, 0xbb, 0xff, 0xff}, 2, 256)
	add(false, []byte{0xa2, 0x61, 'f', 0x00, 0x61, 'f', 0x01}, 1, 256)                                // duplicate key
	add(false, []byte{0xa1, 0x61, 'p', 0x5b, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff}, 1, 256) // 2^64-1 bytes
	add(true, []byte(`{"f":0,"i":-1,"l":0,"p":""}`), 1, 256)
	add(true, []byte(`{"f":0,"i":0,"l":1,"p":"!!"}`), 1, 256)
	f.Fuzz(func(t *testing.T, js bool, data []byte, fileSize int64, bs uint32) {
		format := formatOf(js)
		blk, err := DecodeBlock(format, data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("untyped error %v", err)
			}
			if !cmp.Equal(blk, Block{}) {
				t.Fatalf("error with a block %+v", blk)
			}
			return
		}
		var re []byte
		if js {
			re, err = json.Marshal(blk)
		} else {
			re, err = encMode.Marshal(blk)
		}
		if err != nil {
			t.Fatalf("re-encode %+v: %v", blk, err)
		}
		back, err := DecodeBlock(format, re)
		if err != nil || !cmp.Equal(back, blk, cmp.Comparer(func(a, b payload) bool { return bytes.Equal(a, b) })) {
			t.Fatalf("round trip: %+v -> %x -> %+v, %v", blk, re, back, err)
		}
		// Validate against a file the agent could download.
		blockSize := MinBlockSize + int(bs%(MaxBlockSize-MinBlockSize+1))
		if fileSize < 1 {
			fileSize = 1 + (-(fileSize + 1))%int64(blockSize*4)
		}
		fileSize = 1 + (fileSize-1)%(int64(blockSize)*MaxBlocks)
		if err := blk.Validate(blk.FileID, fileSize, blockSize); err != nil {
			if !errors.Is(err, ErrMalformed) {
				t.Fatalf("untyped validate error %v", err)
			}
			return
		}
		n := NumBlocks(fileSize, blockSize)
		off := blk.Index * int64(blockSize)
		if blk.Index < 0 || blk.Index >= int64(n) || off >= fileSize {
			t.Fatalf("block %d accepted for a file of %d blocks", blk.Index, n)
		}
		if want := min(int64(blockSize), fileSize-off); blk.Length != want || int64(len(blk.Payload)) != want {
			t.Fatalf("block %d of %d/%d bytes accepted, want %d", blk.Index, blk.Length, len(blk.Payload), want)
		}
		if blk.Validate(blk.FileID+1, fileSize, blockSize) == nil {
			t.Fatal("block of another file accepted")
		}
	})
}

// FuzzDecodeRejection: a rejected message decodes to a rejection with an error code, or to
// ErrMalformed; it survives a re-encode unchanged.
func FuzzDecodeRejection(f *testing.F) {
	for _, r := range []Rejection{{Code: CodeBlockSizeOutOfBounds, Message: "l"}, {Code: CodeResourceNotFound, ClientToken: "c"}, {Code: "x"}} {
		c, _ := encMode.Marshal(r)
		j, _ := json.Marshal(r)
		f.Add(false, c)
		f.Add(true, j)
	}
	f.Add(false, []byte{0xbf, 0x61, 'o', 0x7f, 0x61, 'A', 0x61, 'B', 0xff, 0xff})
	f.Add(false, []byte{0xa1, 0x61, 'o', 0x60})
	f.Add(true, []byte(`{"o":""}`))
	f.Add(true, []byte(`{"o":1}`))
	f.Add(false, []byte{0xa1, 0x61, 'm', 0x9f, 0x9f, 0x9f, 0x9f, 0x9f, 0x9f})
	f.Fuzz(func(t *testing.T, js bool, data []byte) {
		format := formatOf(js)
		r, err := DecodeRejection(format, data)
		if err != nil {
			if !errors.Is(err, ErrMalformed) || r != (Rejection{}) {
				t.Fatalf("error %v with %+v", err, r)
			}
			return
		}
		if r.Code == "" {
			t.Fatalf("rejection without a code: %+v", r)
		}
		var re []byte
		if js {
			re, err = json.Marshal(r)
		} else {
			re, err = encMode.Marshal(r)
		}
		if err != nil {
			t.Fatal(err)
		}
		back, err := DecodeRejection(format, re)
		if err != nil || back != r {
			// JSON cannot carry invalid UTF-8: encoding/json writes U+FFFD for it.
			if js && err == nil && strings.ToValidUTF8(r.Code, "\uFFFD") == back.Code {
				return
			}
			t.Fatalf("round trip %+v -> %+v, %v", r, back, err)
		}
	})
}

// FuzzNextWindow: every request window the downloader builds obeys the stream's limits
// (offset <= 98304, bitmap under 12,288 bytes, at most max blocks), asks for wanted blocks
// only, starts at the first wanted block from the cursor (wrapping once), skips no wanted
// block inside its span, and encodes as a valid request. No window means nothing is wanted.
func FuzzNextWindow(f *testing.F) {
	f.Add(uint32(1), int32(0), uint16(1), []byte{1})
	f.Add(uint32(100), int32(50), uint16(31), []byte{0x55})
	f.Add(uint32(MaxBlocks), int32(MaxOffset+5), uint16(256), []byte{0, 0, 0, 0x80})
	f.Add(uint32(MaxBlocks), int32(-7), uint16(0), []byte{0xff})
	f.Add(uint32(4000), int32(3999), uint16(512), []byte{0, 0, 0, 0, 0, 0, 0, 0, 1})
	f.Fuzz(func(t *testing.T, total32 uint32, start32 int32, max16 uint16, pattern []byte) {
		// Download refuses files beyond MaxBlocks, so the window never sees more.
		total := 1 + int(total32%MaxBlocks)
		start, max := int(start32), int(max16%1024)
		if len(pattern) == 0 || len(pattern) > 4096 {
			return
		}
		// A periodic want set: pattern's bits, repeated over the file.
		want := func(i int) bool {
			k := i % (len(pattern) * 8)
			return bitmap.Bitmap(pattern).Has(k)
		}
		any := false
		for i := 0; i < total && !any; i++ {
			any = want(i)
		}
		w, ok := nextWindow(want, start, total, max)
		if !ok {
			if any && max > 0 {
				t.Fatalf("no window although blocks are wanted (total %d, start %d, max %d)", total, start, max)
			}
			return
		}
		if !any || max <= 0 {
			t.Fatalf("window %+v with nothing wanted or max %d", w.offset, max)
		}
		if len(w.blocks) == 0 || len(w.blocks) > max {
			t.Fatalf("%d blocks, max %d", len(w.blocks), max)
		}
		if w.offset < 0 || w.offset > MaxOffset || len(w.bitmap) == 0 || len(w.bitmap) > MaxBitmapBytes || w.bitmap[len(w.bitmap)-1] == 0 {
			t.Fatalf("window offset %d, bitmap of %d bytes", w.offset, len(w.bitmap))
		}
		var fromBitmap []int
		for _, k := range w.bitmap.Blocks() {
			fromBitmap = append(fromBitmap, w.offset+k)
		}
		if !slices.Equal(fromBitmap, w.blocks) {
			t.Fatalf("bitmap names %v, blocks %v", fromBitmap, w.blocks)
		}
		for i, b := range w.blocks {
			if b < 0 || b >= total || !want(b) || (i > 0 && b <= w.blocks[i-1]) {
				t.Fatalf("block %d in window %v", b, w.blocks)
			}
		}
		// The first block is the first wanted one from the cursor, wrapping once.
		s := start
		if s < 0 || s >= total {
			s = 0
		}
		for i := s; i != w.blocks[0]; i = (i + 1) % total {
			if want(i) {
				t.Fatalf("window starts at %d, but %d (from cursor %d) is wanted", w.blocks[0], i, s)
			}
		}
		// No wanted block is skipped inside the span, nor after it when room is left.
		end := w.blocks[len(w.blocks)-1]
		if len(w.blocks) < max {
			end = min(total, w.offset+MaxBitmapBytes*8) - 1
		}
		for i, j := w.blocks[0], 0; i <= end; i++ {
			if j < len(w.blocks) && w.blocks[j] == i {
				j++
				continue
			}
			if want(i) {
				t.Fatalf("wanted block %d skipped (window %d..%d, %d blocks, max %d)", i, w.blocks[0], end, len(w.blocks), max)
			}
		}
		if _, err := EncodeRequest(FormatCBOR, Request{FileID: 0, BlockSize: MinBlockSize, Offset: int64(w.offset), NumBlocks: int64(len(w.blocks)), Bitmap: w.bitmap}); err != nil {
			t.Fatalf("window does not encode: %v", err)
		}
	})
}
