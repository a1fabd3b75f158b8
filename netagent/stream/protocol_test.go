package stream

import (
	"bytes"
	"encoding/hex"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/internal/bitmap"
)

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// docs/PROTOCOL.md: blocks 20, 21, 24, 43 wanted with o = 20 are bits 0, 1, 4, 23: bytes
// 13 00 80 00, JSON "0x130080", CBOR byte string 44 13 00 80 00.
func TestBitmapVector(t *testing.T) {
	bm := bitmap.New(32)
	for _, b := range []int{20, 21, 24, 43} {
		bm.Set(b - 20)
	}
	if want := unhex(t, "13 00 80 00"); !bytes.Equal(bm, want) {
		t.Fatalf("bitmap % X, want % X", []byte(bm), want)
	}
	if got := bm.Hex(); got != "0x130080" {
		t.Fatalf("hex %q, want 0x130080", got)
	}
	enc, err := encMode.Marshal([]byte(bm))
	if err != nil {
		t.Fatal(err)
	}
	if want := unhex(t, "44 13 00 80 00"); !bytes.Equal(enc, want) {
		t.Fatalf("CBOR % X, want % X", enc, want)
	}

	// The window chooser picks the same blocks and offset from a want set.
	wanted := map[int]bool{20: true, 21: true, 24: true, 43: true}
	w, ok := nextWindow(func(i int) bool { return wanted[i] }, 0, 64, 16)
	if !ok {
		t.Fatal("no window")
	}
	if w.offset != 20 || !bytes.Equal(w.bitmap, unhex(t, "13 00 80")) {
		t.Fatalf("window o=%d b=% X", w.offset, w.bitmap)
	}
	if diff := cmp.Diff([]int{20, 21, 24, 43}, w.blocks); diff != "" {
		t.Fatal(diff)
	}
}

// docs/PROTOCOL.md: a 31-block window all wanted is FF FF FF 7F, CBOR 44 FF FF FF 7F.
func TestFullWindowVector(t *testing.T) {
	bm := bitmap.Full(31)
	if want := unhex(t, "FF FF FF 7F"); !bytes.Equal(bm, want) {
		t.Fatalf("bitmap % X, want % X", []byte(bm), want)
	}
	w, ok := nextWindow(func(int) bool { return true }, 0, 31, 31)
	if !ok || w.offset != 0 || !bytes.Equal(w.bitmap, bm) {
		t.Fatalf("window %+v", w)
	}
}

// docs/PROTOCOL.md: {c:"rdy", f:0, l:2048, o:0, b:h'FFFFFF7F'} encodes as a definite map in
// that key order.
func TestRequestVector(t *testing.T) {
	got, err := EncodeRequest(FormatCBOR, Request{ClientToken: "rdy", FileID: 0, BlockSize: 2048, Offset: 0, Bitmap: unhex(t, "FFFFFF7F")})
	if err != nil {
		t.Fatal(err)
	}
	want := unhex(t, "A5 61 63 63 72 64 79 61 66 00 61 6C 19 08 00 61 6F 00 61 62 44 FF FF FF 7F")
	if !bytes.Equal(got, want) {
		t.Fatalf("request\n got % X\nwant % X", got, want)
	}
	j, err := EncodeRequest(FormatJSON, Request{ClientToken: "rdy", FileID: 0, BlockSize: 2048, Offset: 20, NumBlocks: 4, Bitmap: unhex(t, "13008000")})
	if err != nil {
		t.Fatal(err)
	}
	if want := `{"c":"rdy","f":0,"l":2048,"o":20,"n":4,"b":"0x130080"}`; string(j) != want {
		t.Fatalf("JSON %s, want %s", j, want)
	}
}

func TestEncodeRequestLimits(t *testing.T) {
	if _, err := EncodeRequest(FormatCBOR, Request{ClientToken: strings.Repeat("x", 65), BlockSize: 256, NumBlocks: 1}); err == nil {
		t.Error("65-byte token accepted")
	}
	if _, err := EncodeRequest(FormatCBOR, Request{BlockSize: 256, Bitmap: make([]byte, 12288)}); err == nil {
		t.Error("12,288-byte bitmap accepted")
	}
	if _, err := EncodeRequest(FormatCBOR, Request{BlockSize: 256, Bitmap: make([]byte, 12287)}); err != nil {
		t.Errorf("12,287-byte bitmap refused: %v", err)
	}
}

func TestDecodeBlock(t *testing.T) {
	tests := []struct {
		name    string
		format  string
		in      string // hex, or JSON text
		want    Block
		wantErr bool
	}{
		{name: "definite map", format: FormatCBOR, in: "A4 61 66 00 61 69 05 61 6C 03 61 70 43 01 02 03",
			want: Block{FileID: 0, Index: 5, Length: 3, Payload: []byte{1, 2, 3}}},
		{name: "indefinite map", format: FormatCBOR, in: "BF 61 66 01 61 69 18 2A 61 6C 02 61 70 42 AA BB FF",
			want: Block{FileID: 1, Index: 42, Length: 2, Payload: []byte{0xAA, 0xBB}}},
		{name: "indefinite map with token and indefinite byte string", format: FormatCBOR,
			in:   "BF 61 63 63 72 64 79 61 66 00 61 69 00 61 6C 02 61 70 5F 41 AA 41 BB FF FF",
			want: Block{ClientToken: "rdy", Index: 0, Length: 2, Payload: []byte{0xAA, 0xBB}}},
		{name: "unknown key ignored", format: FormatCBOR, in: "A5 61 66 00 61 69 00 61 6C 01 61 70 41 07 61 7A 00",
			want: Block{Length: 1, Payload: []byte{7}}},
		{name: "json", format: FormatJSON, in: `{"f":0,"i":3,"l":3,"p":"AQID"}`,
			want: Block{Index: 3, Length: 3, Payload: []byte{1, 2, 3}}},
		{name: "truncated", format: FormatCBOR, in: "A4 61 66 00 61 69", wantErr: true},
		{name: "unterminated indefinite map", format: FormatCBOR, in: "BF 61 66 00", wantErr: true},
		{name: "duplicate key", format: FormatCBOR, in: "A5 61 66 00 61 69 00 61 69 01 61 6C 01 61 70 41 07", wantErr: true},
		{name: "index is text", format: FormatCBOR, in: "A4 61 66 00 61 69 61 30 61 6C 01 61 70 41 07", wantErr: true},
		{name: "not a map", format: FormatCBOR, in: "83 01 02 03", wantErr: true},
		{name: "trailing bytes", format: FormatCBOR, in: "A1 61 66 00 00", wantErr: true},
		{name: "bad json", format: FormatJSON, in: `{"f":0,`, wantErr: true},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			in := []byte(tc.in)
			if tc.format == FormatCBOR {
				in = unhex(t, tc.in)
			}
			got, err := DecodeBlock(tc.format, in)
			if tc.wantErr {
				if !errors.Is(err, ErrMalformed) {
					t.Fatalf("err = %v, want ErrMalformed (got %+v)", err, got)
				}
				return
			}
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Fatal(diff)
			}
		})
	}
}

func TestValidate(t *testing.T) {
	// File of 2.5 blocks of 256 bytes: blocks 0, 1 full, block 2 has 128 bytes.
	const size, bs = 640, 256
	full := make([]byte, 256)
	tests := []struct {
		name string
		b    Block
		ok   bool
	}{
		{"first", Block{FileID: 7, Index: 0, Length: 256, Payload: full}, true},
		{"short last", Block{FileID: 7, Index: 2, Length: 128, Payload: full[:128]}, true},
		{"wrong file", Block{FileID: 8, Index: 0, Length: 256, Payload: full}, false},
		{"negative index", Block{FileID: 7, Index: -1, Length: 256, Payload: full}, false},
		{"index past end", Block{FileID: 7, Index: 3, Length: 256, Payload: full}, false},
		{"last with full length", Block{FileID: 7, Index: 2, Length: 256, Payload: full}, false},
		{"short middle", Block{FileID: 7, Index: 1, Length: 128, Payload: full[:128]}, false},
		{"declared length lies", Block{FileID: 7, Index: 1, Length: 256, Payload: full[:255]}, false},
		{"no payload", Block{FileID: 7, Index: 0, Length: 256}, false},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			err := tc.b.Validate(7, size, bs)
			if (err == nil) != tc.ok {
				t.Fatalf("Validate = %v, want ok=%v", err, tc.ok)
			}
			if err != nil && !errors.Is(err, ErrMalformed) {
				t.Fatalf("error %v is not ErrMalformed", err)
			}
		})
	}
}

func TestDecodeRejection(t *testing.T) {
	// {"o":"BlockSizeOutOfBounds","m":"x","c":"rdy"} as an indefinite map.
	in := append([]byte{0xBF, 0x61, 'o', 0x74}, "BlockSizeOutOfBounds"...)
	in = append(in, 0x61, 'm', 0x61, 'x', 0x61, 'c', 0x63, 'r', 'd', 'y', 0xFF)
	got, err := DecodeRejection(FormatCBOR, in)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(Rejection{Code: CodeBlockSizeOutOfBounds, Message: "x", ClientToken: "rdy"}, got); diff != "" {
		t.Fatal(diff)
	}
	if _, err := DecodeRejection(FormatCBOR, []byte{0xA0}); !errors.Is(err, ErrMalformed) {
		t.Fatalf("empty map: %v", err)
	}
}

func TestNextWindowLimits(t *testing.T) {
	all := func(int) bool { return true }
	tests := []struct {
		name             string
		want             func(int) bool
		start, total, mx int
		offset           int
		blocks           []int
		bitmapLen        int
	}{
		{name: "first window", want: all, total: 100, mx: 4, blocks: []int{0, 1, 2, 3}, bitmapLen: 1},
		{name: "from cursor", want: all, start: 10, total: 100, mx: 2, offset: 10, blocks: []int{10, 11}, bitmapLen: 1},
		{name: "wraps to lost block", want: func(i int) bool { return i == 3 }, start: 50, total: 100, mx: 8, offset: 3, blocks: []int{3}, bitmapLen: 1},
		{name: "beyond C agent 4 MiB (1024 x 4 KiB)", want: func(i int) bool { return i == 5000 || i == 5001 }, total: 6000, mx: 32, offset: 5000, blocks: []int{5000, 5001}, bitmapLen: 1},
		{name: "offset capped at 98304", want: func(i int) bool { return i >= 100000 }, total: 100010, mx: 3,
			offset: MaxOffset, blocks: []int{100000, 100001, 100002}, bitmapLen: (100002-MaxOffset)/8 + 1},
		{name: "span capped by bitmap size", want: func(i int) bool { return i == 0 || i == MaxBitmapBytes*8 }, total: MaxBitmapBytes*8 + 1, mx: 4,
			blocks: []int{0}, bitmapLen: 1},
		{name: "last reachable block", want: func(i int) bool { return i == MaxBlocks-1 }, total: MaxBlocks, mx: 4,
			offset: MaxOffset, blocks: []int{MaxBlocks - 1}, bitmapLen: MaxBitmapBytes},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			w, ok := nextWindow(tc.want, tc.start, tc.total, tc.mx)
			if !ok {
				t.Fatal("no window")
			}
			if w.offset != tc.offset || len(w.bitmap) != tc.bitmapLen {
				t.Fatalf("offset %d bitmap %d bytes, want %d and %d", w.offset, len(w.bitmap), tc.offset, tc.bitmapLen)
			}
			if diff := cmp.Diff(tc.blocks, w.blocks); diff != "" {
				t.Fatal(diff)
			}
			if diff := cmp.Diff(tc.blocks, shift(w.bitmap.Blocks(), w.offset)); diff != "" {
				t.Fatalf("bitmap disagrees with blocks: %s", diff)
			}
			if len(w.bitmap) > MaxBitmapBytes || w.offset > MaxOffset {
				t.Fatal("window beyond stream limits")
			}
		})
	}
	if _, ok := nextWindow(func(int) bool { return false }, 0, 10, 4); ok {
		t.Fatal("window with nothing wanted")
	}
}

func shift(b []int, o int) []int {
	for i := range b {
		b[i] += o
	}
	return b
}

// The payload aliases the message (no copy), and stays correct when the message is a CBOR
// definite byte string with each header width.
func TestPayloadNoCopy(t *testing.T) {
	for _, n := range []int{0, 23, 24, 255, 256, 65535, 65536} {
		p := make([]byte, n)
		for i := range p {
			p[i] = byte(i)
		}
		msg, err := encMode.Marshal(Block{FileID: 1, Index: 2, Length: int64(n), Payload: p})
		if err != nil {
			t.Fatal(err)
		}
		b, err := DecodeBlock(FormatCBOR, msg)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b.Payload, p) || b.Length != int64(n) {
			t.Fatalf("%d bytes: payload differs", n)
		}
		if n > 0 && &b.Payload[0] != &msg[len(msg)-n] {
			t.Fatalf("%d bytes: payload was copied", n)
		}
	}
}
