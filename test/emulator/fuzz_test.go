package emulator

import (
	"bytes"
	"slices"
	"testing"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/netagent/stream"
)

func fmtOf(js bool) string {
	if js {
		return FormatJSON
	}
	return FormatCBOR
}

// FuzzDecodeGetStreamRequest: whatever a device publishes on .../get decodes to a request or
// an error (the emulator answers a rejection), never a panic; a decoded request re-encodes to
// the same request.
func FuzzDecodeGetStreamRequest(f *testing.F) {
	tok := "c1"
	one, l, o := int64(1), int64(256), int64(20)
	for _, r := range []GetStreamRequest{
		{ClientToken: &tok, FileID: &one, BlockSize: &l, Offset: &o, NumBlocks: &one, Bitmap: []byte{0x13, 0, 0x80}},
		{FileID: &one, BlockSize: &l},
		{},
	} {
		c, _ := Marshal(FormatCBOR, r)
		j, _ := Marshal(FormatJSON, r)
		f.Add(false, c)
		f.Add(true, j)
	}
	f.Add(true, []byte(`{"f":0,"l":256,"o":0,"b":"0x1"}`))
	f.Add(true, []byte(`{"f":0,"l":256,"o":0,"b":"0xzz"}`))
	f.Add(false, []byte{0xbf, 0x61, 'f', 0x00, 0x61, 'b', 0x5f, 0x41, 0x01, 0xff, 0xff})
	f.Fuzz(func(t *testing.T, js bool, data []byte) {
		format := fmtOf(js)
		r, err := DecodeGetStreamRequest(format, data)
		if err != nil {
			return
		}
		re, err := Marshal(format, r)
		if err != nil {
			t.Fatalf("re-encode %+v: %v", r, err)
		}
		back, err := DecodeGetStreamRequest(format, re)
		if err != nil {
			t.Fatalf("re-decode %x: %v", re, err)
		}
		// JSON drops the bitmap's trailing zero bytes (BitmapHex) and cannot carry invalid
		// UTF-8; compare what the format can say.
		if js {
			r.Bitmap = trimBitmap(r.Bitmap)
			back.Bitmap = trimBitmap(back.Bitmap)
		}
		if !cmp.Equal(r, back, cmp.Comparer(func(a, b []byte) bool { return bytes.Equal(a, b) })) {
			t.Fatalf("round trip %+v -> %+v", r, back)
		}
	})
}

func trimBitmap(b []byte) []byte {
	if b == nil {
		return nil
	}
	t := bytes.TrimRight(b, "\x00")
	if len(t) == 0 {
		return []byte{0}
	}
	return t
}

// FuzzRequestInterop: every request the device's encoder (netagent/stream) produces, the
// emulator reads back with the same fields, in both formats; and the bitmap it asks for names
// the same blocks on both sides.
func FuzzRequestInterop(f *testing.F) {
	f.Add(false, "", int64(0), int64(256), int64(20), int64(4), []byte{0x13, 0, 0x80, 0})
	f.Add(true, "tok", int64(255), int64(131072), int64(98304), int64(1), []byte{1})
	f.Add(true, "", int64(-1), int64(0), int64(-5), int64(0), []byte(nil))
	f.Fuzz(func(t *testing.T, js bool, token string, fileID, bs, off, n int64, bm []byte) {
		if !utf8.ValidString(token) {
			return // a Go string from the agent is always a client token it made: ASCII
		}
		req := stream.Request{ClientToken: token, FileID: fileID, BlockSize: bs, Offset: off, NumBlocks: n, Bitmap: bm}
		format := fmtOf(js)
		b, err := stream.EncodeRequest(format, req)
		if err != nil {
			if len(token) <= 64 && len(bm) <= stream.MaxBitmapBytes {
				t.Fatalf("encode %+v: %v", req, err)
			}
			return
		}
		got, err := DecodeGetStreamRequest(format, b)
		if err != nil {
			t.Fatalf("emulator cannot read %q: %v", b, err)
		}
		deref := func(p *int64) int64 {
			if p == nil {
				return 0
			}
			return *p
		}
		if got.FileID == nil || *got.FileID != fileID || got.BlockSize == nil || *got.BlockSize != bs || got.Offset == nil || *got.Offset != off || deref(got.NumBlocks) != n {
			t.Fatalf("sent %+v, emulator read f=%v l=%v o=%v n=%v", req, got.FileID, got.BlockSize, got.Offset, got.NumBlocks)
		}
		if (got.ClientToken == nil && token != "") || (got.ClientToken != nil && *got.ClientToken != token) {
			t.Fatalf("client token %q read as %v", token, got.ClientToken)
		}
		if len(bm) > 0 {
			want := bitmap.Bitmap(bm).Blocks()
			for i := range want {
				want[i] += int(off)
			}
			if g := BitmapBlocks(int(off), got.Bitmap); !slices.Equal(g, want) {
				t.Fatalf("bitmap % x: device asks %v, emulator reads %v", bm, want, g)
			}
		}
	})
}

// FuzzBitmapFor: the emulator's bitmap builder and reader are inverse for blocks at or after
// the offset.
func FuzzBitmapFor(f *testing.F) {
	f.Add(uint16(20), []byte{20, 21, 24, 43}, uint8(0))
	f.Add(uint16(0), []byte{}, uint8(3))
	f.Fuzz(func(t *testing.T, off16 uint16, raw []byte, size uint8) {
		off := int(off16)
		var blocks []int
		for _, b := range raw {
			blocks = append(blocks, off+int(b))
		}
		bm := BitmapFor(off, blocks, int(size))
		if len(bm) < int(size) {
			t.Fatalf("bitmap of %d bytes, asked %d", len(bm), size)
		}
		slices.Sort(blocks)
		blocks = slices.Compact(blocks)
		if got := BitmapBlocks(off, bm); !slices.Equal(got, blocks) && len(got)+len(blocks) > 0 {
			t.Fatalf("BitmapFor(%d, %v) = % x reads back %v", off, blocks, bm, got)
		}
		if len(bm) > 0 {
			p, err := ParseBitmapHex(BitmapHex(bm))
			if err != nil || !bytes.Equal(p, trimBitmap(bm)) {
				t.Fatalf("hex round trip of % x: % x, %v", bm, p, err)
			}
		}
	})
}
