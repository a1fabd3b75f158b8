package emulator

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"errors"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func unhex(t *testing.T, s string) []byte {
	t.Helper()
	b, err := hex.DecodeString(strings.ReplaceAll(s, " ", ""))
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func ptr[T any](v T) *T { return &v }

func TestBitmapVectors(t *testing.T) {
	tests := []struct {
		name    string
		offset  int
		blocks  []int
		size    int
		bytes   string
		jsonHex string
		cbor    string
	}{
		{"blocks 20 21 24 43", 20, []int{20, 21, 24, 43}, 4, "13 00 80 00", "0x130080", "44 13 00 80 00"},
		{"31-block window", 0, seq(0, 31), 4, "FF FF FF 7F", "0xffffff7f", "44 FF FF FF 7F"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			bm := BitmapFor(tt.offset, tt.blocks, tt.size)
			if diff := cmp.Diff(unhex(t, tt.bytes), bm); diff != "" {
				t.Fatalf("bitmap bytes (-want +got):\n%s", diff)
			}
			if got := BitmapHex(bm); got != tt.jsonHex {
				t.Errorf("JSON hex = %q, want %q", got, tt.jsonHex)
			}
			enc, err := cborEnc.Marshal(bm)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(unhex(t, tt.cbor), enc); diff != "" {
				t.Errorf("CBOR (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tt.blocks, BitmapBlocks(tt.offset, bm)); diff != "" {
				t.Errorf("decoded blocks (-want +got):\n%s", diff)
			}
			back, err := ParseBitmapHex(tt.jsonHex)
			if err != nil {
				t.Fatal(err)
			}
			if diff := cmp.Diff(tt.blocks, BitmapBlocks(tt.offset, back)); diff != "" {
				t.Errorf("blocks from JSON hex (-want +got):\n%s", diff)
			}
		})
	}
}

func seq(from, n int) []int {
	out := make([]int, n)
	for i := range out {
		out[i] = from + i
	}
	return out
}

func TestParseBitmapHexRejectsBadInput(t *testing.T) {
	for _, s := range []string{"0x1", "0xzz", "0x13008"} {
		if _, err := ParseBitmapHex(s); err == nil {
			t.Errorf("ParseBitmapHex(%q) accepted", s)
		}
	}
}

const requestVector = "A5 61 63 63 72 64 79 61 66 00 61 6C 19 08 00 61 6F 00 61 62 44 FF FF FF 7F"

func TestGetStreamRequestVector(t *testing.T) {
	req := GetStreamRequest{
		ClientToken: ptr("rdy"),
		FileID:      ptr[int64](0),
		BlockSize:   ptr[int64](2048),
		Offset:      ptr[int64](0),
		Bitmap:      unhex(t, "FFFFFF7F"),
	}
	enc, err := Marshal(FormatCBOR, req)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(unhex(t, requestVector), enc); diff != "" {
		t.Fatalf("encoding (-want +got):\n%s", diff)
	}
	dec, err := DecodeGetStreamRequest(FormatCBOR, unhex(t, requestVector))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(req, dec); diff != "" {
		t.Errorf("decoding (-want +got):\n%s", diff)
	}
}

func TestGetStreamRequestJSON(t *testing.T) {
	body := `{"c":"t1","s":1,"f":0,"l":256,"o":20,"n":4,"b":"0x130080"}`
	got, err := DecodeGetStreamRequest(FormatJSON, []byte(body))
	if err != nil {
		t.Fatal(err)
	}
	want := GetStreamRequest{ptr("t1"), ptr[int64](1), ptr[int64](0), ptr[int64](256), ptr[int64](20), ptr[int64](4), unhex(t, "130080")}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("(-want +got):\n%s", diff)
	}
	enc, err := Marshal(FormatJSON, want)
	if err != nil {
		t.Fatal(err)
	}
	if string(enc) != body {
		t.Errorf("JSON encoding = %s, want %s", enc, body)
	}
}

func TestDecodeIndefiniteLengthBlock(t *testing.T) {
	// {_ "f": 0, "i": 3, "l": 4, "p": h'01020304'} as an indefinite-length map.
	b := unhex(t, "BF 61 66 00 61 69 03 61 6C 04 61 70 44 01 02 03 04 FF")
	got, err := DecodeDataBlock(FormatCBOR, b)
	if err != nil {
		t.Fatal(err)
	}
	want := DataBlock{FileID: 0, BlockID: 3, Length: 4, Payload: []byte{1, 2, 3, 4}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("(-want +got):\n%s", diff)
	}
	// An indefinite-length request is accepted too.
	req, err := DecodeGetStreamRequest(FormatCBOR, unhex(t, "BF 61 66 01 61 6C 19 01 00 61 6F 02 61 6E 03 FF"))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(GetStreamRequest{FileID: ptr[int64](1), BlockSize: ptr[int64](256), Offset: ptr[int64](2), NumBlocks: ptr[int64](3)}, req); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestDataBlockJSONIsBase64(t *testing.T) {
	enc, err := Marshal(FormatJSON, DataBlock{FileID: 1, BlockID: 2, Length: 3, Payload: []byte{0xff, 0, 1}})
	if err != nil {
		t.Fatal(err)
	}
	var m map[string]any
	if err := json.Unmarshal(enc, &m); err != nil {
		t.Fatal(err)
	}
	if m["p"] != "/wAB" {
		t.Errorf("p = %v, want base64 /wAB", m["p"])
	}
}

func TestDecodeErrorsAreClassified(t *testing.T) {
	tests := []struct {
		format string
		body   string
		syntax bool
	}{
		{FormatCBOR, "A1 61", true},                 // truncated
		{FormatCBOR, "A1 61 66 63 61 62 63", false}, // "f": "abc": well-formed, wrong type
		{FormatJSON, `{"f":`, true},
		{FormatJSON, `{"f":"x"}`, false},
		{FormatJSON, `{"f":0,"b":"0xq1"}`, false},
	}
	for _, tt := range tests {
		body := []byte(tt.body)
		if tt.format == FormatCBOR {
			body = unhex(t, tt.body)
		}
		_, err := DecodeGetStreamRequest(tt.format, body)
		if err == nil {
			t.Errorf("%s %q: accepted", tt.format, tt.body)
			continue
		}
		if got := errors.Is(err, errSyntax); got != tt.syntax {
			t.Errorf("%s %q: syntax error = %v, want %v (%v)", tt.format, tt.body, got, tt.syntax, err)
		}
	}
}

// The data message built around a block read in place is byte for byte what Marshal makes.
func TestCBORBlockHeaderMatchesMarshal(t *testing.T) {
	for _, n := range []int{0, 1, 23, 24, 255, 256, 4096, 65535, 65536, 128 << 10} {
		for _, tok := range []string{"", "rdy", strings.Repeat("t", 64)} {
			blk := DataBlock{ClientToken: tok, FileID: int64(n % 256), BlockID: int64(n) * 3, Length: int64(n)}
			data := make([]byte, n)
			for i := range data {
				data[i] = byte(i*7 + n)
			}
			got, err := cborBlockHeader(blk, n)
			if err != nil {
				t.Fatal(err)
			}
			copy(got[len(got)-n:], data)
			blk.Payload = data
			want, err := Marshal(FormatCBOR, blk)
			if err != nil {
				t.Fatal(err)
			}
			if !bytes.Equal(got, want) {
				t.Fatalf("n=%d token %q:\n got % x\nwant % x", n, tok, got[:min(len(got), 40)], want[:min(len(want), 40)])
			}
		}
	}
}
