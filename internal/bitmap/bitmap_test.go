package bitmap

import (
	"bytes"
	"encoding/hex"
	"encoding/json"
	"slices"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// The bit order of proto/ota/v1/writer.proto (SessionInfo.missing) and docs/PROTOCOL.md:
// block k is byte k>>3, mask 1<<(k&7).
func TestBitOrder(t *testing.T) {
	for _, tc := range []struct {
		name   string
		n      int
		blocks []int
		want   []byte
		hex    string
	}{
		{name: "empty", n: 0, want: []byte{}, hex: "0x"},
		{name: "one block, none set", n: 1, want: []byte{0}, hex: "0x00"},
		{name: "block 0 is the low bit", n: 8, blocks: []int{0}, want: []byte{0x01}, hex: "0x01"},
		{name: "block 7 is the high bit", n: 8, blocks: []int{7}, want: []byte{0x80}, hex: "0x80"},
		{name: "block 8 starts byte 1", n: 9, blocks: []int{8}, want: []byte{0, 0x01}, hex: "0x0001"},
		// docs/PROTOCOL.md: blocks 20, 21, 24, 43 with o = 20 are bits 0, 1, 4, 23.
		{name: "protocol vector", n: 32, blocks: []int{0, 1, 4, 23}, want: []byte{0x13, 0, 0x80, 0}, hex: "0x130080"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := New(tc.n)
			for _, k := range tc.blocks {
				b.Set(k)
			}
			if diff := cmp.Diff(tc.want, []byte(b)); diff != "" {
				t.Errorf("bytes (-want +got):\n%s", diff)
			}
			if diff := cmp.Diff(tc.blocks, b.Blocks()); diff != "" {
				t.Errorf("Blocks (-want +got):\n%s", diff)
			}
			if got := b.Hex(); got != tc.hex {
				t.Errorf("Hex = %q, want %q", got, tc.hex)
			}
		})
	}
}

func TestFullAndComplement(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    Bitmap
		n    int
		want Bitmap
	}{
		{name: "full 31", b: Full(31), n: 31, want: Bitmap{0, 0, 0, 0}},
		{name: "empty 31", b: New(31), n: 31, want: Bitmap{0xFF, 0xFF, 0xFF, 0x7F}},
		{name: "missing 0 and 9 of 10", b: Bitmap{0x01, 0x02}, n: 10, want: Bitmap{0xFE, 0x01}},
		{name: "bits past n ignored", b: Bitmap{0x00, 0xFC}, n: 10, want: Bitmap{0xFF, 0x03}},
		{name: "nil: nothing held", b: nil, n: 10, want: Bitmap{0, 0}},
		{name: "short: the rest counts as missing", b: Bitmap{0x0F}, n: 12, want: Bitmap{0xF0, 0}},
		{name: "zero blocks", b: nil, n: 0, want: Bitmap{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, tc.b.Complement(tc.n)); diff != "" {
				t.Errorf("Complement(%d) of % x (-want +got):\n%s", tc.n, []byte(tc.b), diff)
			}
		})
	}
	if diff := cmp.Diff(Bitmap{0xFF, 0xFF, 0xFF, 0x7F}, Full(31)); diff != "" {
		t.Errorf("Full(31) (-want +got):\n%s", diff)
	}
}

func TestCheck(t *testing.T) {
	for _, tc := range []struct {
		name string
		b    Bitmap
		n    int
		ok   bool
	}{
		{name: "exact", b: Bitmap{0xFF, 0x03}, n: 10, ok: true},
		{name: "whole bytes", b: Bitmap{0xFF}, n: 8, ok: true},
		{name: "empty image", b: Bitmap{}, n: 0, ok: true},
		{name: "bit past the last block", b: Bitmap{0xFF, 0x07}, n: 10},
		{name: "short", b: Bitmap{0xFF}, n: 10},
		{name: "long", b: Bitmap{0xFF, 0, 0}, n: 10},
		{name: "negative count", b: Bitmap{}, n: -1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			if err := tc.b.Check(tc.n); (err == nil) != tc.ok {
				t.Errorf("Check(%d) of % x = %v, want ok %v", tc.n, []byte(tc.b), err, tc.ok)
			}
		})
	}
}

// A Bitmap field encodes in JSON exactly as a []byte field does (the writer's journal keeps
// its durable bitmap that way).
func TestJSONAsBytes(t *testing.T) {
	b := Bitmap{0xFF, 0x03}
	got, err := json.Marshal(struct{ D Bitmap }{b})
	if err != nil {
		t.Fatal(err)
	}
	want, _ := json.Marshal(struct{ D []byte }{[]byte(b)})
	if !bytes.Equal(got, want) {
		t.Fatalf("JSON %s, []byte gives %s", got, want)
	}
	var back struct{ D Bitmap }
	if err := json.Unmarshal(want, &back); err != nil || !bytes.Equal(back.D, b) {
		t.Fatalf("decoded % x, %v", []byte(back.D), err)
	}
}

// FuzzBitmap: Set/Clear/Has/Count/Blocks agree with a plain set, Has is false outside the
// bitmap (negative indices included), Full has exactly n bits, Complement is the rest of the
// n blocks and passes Check, and the JSON hex form decodes back to the bitmap without its
// trailing zero bytes.
func FuzzBitmap(f *testing.F) {
	f.Add(uint16(32), []byte{0, 20, 0, 0, 21, 0, 0, 24, 0, 0, 43, 0, 1, 21, 0})
	f.Add(uint16(1), []byte{0, 0, 0})
	f.Add(uint16(0), []byte{})
	f.Add(uint16(65535), []byte{0, 0xff, 0xff, 1, 0xff, 0xff, 0, 7, 0})
	f.Fuzz(func(t *testing.T, n16 uint16, ops []byte) {
		n := int(n16)
		bm := New(n)
		if len(bm) != (n+7)/8 || len(bm) != Len(n) {
			t.Fatalf("New(%d) has %d bytes", n, len(bm))
		}
		model := map[int]bool{}
		for i := 0; i+2 < len(ops) && n > 0; i += 3 {
			k := (int(ops[i+1]) | int(ops[i+2])<<8) % n
			if ops[i]&1 == 0 {
				bm.Set(k)
				model[k] = true
			} else {
				bm.Clear(k)
				delete(model, k)
			}
			if !bm.Has(k) != !model[k] {
				t.Fatalf("Has(%d) = %v after op %d", k, bm.Has(k), ops[i])
			}
		}
		want := make([]int, 0, len(model))
		for k := range model {
			want = append(want, k)
		}
		slices.Sort(want)
		if got := bm.Blocks(); !slices.Equal(got, want) && !(len(got) == 0 && len(want) == 0) {
			t.Fatalf("Blocks() = %v, want %v", got, want)
		}
		if bm.Count() != len(want) {
			t.Fatalf("Count() = %d, want %d", bm.Count(), len(want))
		}
		for _, k := range []int{-1, -8, -1 << 40, len(bm) * 8, len(bm)*8 + 7, 1 << 40} {
			if bm.Has(k) {
				t.Fatalf("Has(%d) outside a bitmap of %d bytes", k, len(bm))
			}
		}
		if err := bm.Check(n); err != nil {
			t.Fatalf("Check(%d) of a bitmap set below n: %v", n, err)
		}
		rest := bm.Complement(n)
		if rest.Count() != n-len(want) || rest.Check(n) != nil {
			t.Fatalf("Complement(%d) has %d blocks (%v), want %d", n, rest.Count(), rest.Check(n), n-len(want))
		}
		for _, k := range want {
			if rest.Has(k) {
				t.Fatalf("Complement holds block %d of the set", k)
			}
		}
		full := Full(n)
		if full.Count() != n || len(full) != (n+7)/8 {
			t.Fatalf("Full(%d): %d bits in %d bytes", n, full.Count(), len(full))
		}
		if blocks := full.Blocks(); n > 0 && (blocks[0] != 0 || blocks[len(blocks)-1] != n-1) {
			t.Fatalf("Full(%d) spans %d..%d", n, blocks[0], blocks[len(blocks)-1])
		}
		if len(bm) > 0 {
			h := bm.Hex()
			dec, err := hex.DecodeString(strings.TrimPrefix(h, "0x"))
			if err != nil || !strings.HasPrefix(h, "0x") {
				t.Fatalf("Hex = %q: %v", h, err)
			}
			trimmed := bytes.TrimRight(bm, "\x00")
			if len(trimmed) == 0 {
				trimmed = []byte{0}
			}
			if !bytes.Equal(dec, trimmed) {
				t.Fatalf("Hex(% x) = %q", []byte(bm), h)
			}
		}
	})
}
