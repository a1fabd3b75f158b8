package manifest

import (
	"bytes"
	"errors"
	"testing"

	"github.com/gwota/gwota/status"
)

// FuzzOpen: any bytes give a consistent manifest or a typed error, never a panic; for an
// accepted one every chunk lies inside the chunk file, the chunks cover the blocks in order,
// every block hash is readable, and decoding a chunk from arbitrary bytes fails typed.
func FuzzOpen(f *testing.F) {
	img := testImage(21, 40, 333)
	clear(img[8*bs : 16*bs])
	p := params()
	p.TempDir = f.TempDir()
	mf, chunks, _ := build(f, img, p)
	f.Add(mf, chunks[:min(len(chunks), 64)])
	p.ChunkSize = bs
	small, _, _ := build(f, testImage(22, 3, 5), p)
	f.Add(small, []byte{0x28, 0xb5, 0x2f, 0xfd, 0, 0, 0, 0})
	f.Add(mf[:prefixSize+20], []byte(nil))
	f.Add([]byte(Magic+"\x00\x00\x00\x02\x08\x01"), []byte(nil))
	f.Add([]byte{}, []byte(nil))
	dmf, dchunks, _, _ := deltaPair(f)
	f.Add(dmf, dchunks[len(dchunks)-64:])
	f.Fuzz(func(t *testing.T, data, chunk []byte) {
		m, err := Open(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			var se *status.Error
			if !errors.As(err, &se) || m != nil {
				t.Fatalf("untyped error %v", err)
			}
			return
		}
		var next, end uint64
		for k := range m.Chunks() {
			c := m.Chunk(k)
			if c.FirstBlock != next || c.Offset != end || c.Blocks == 0 || c.Raw > MaxChunkRaw {
				t.Fatalf("chunk %d: %+v", k, c)
			}
			next += c.Blocks
			end += c.Size
		}
		for dd := range m.Deltas() {
			c := m.Delta(dd)
			if c.Offset != end || c.Size == 0 || c.DictLen == 0 || c.DictLen > MaxDictSize || c.DictOffset+c.DictLen > m.BaseSize() ||
				c.Unit != m.Chunks()+dd || c.Raw == 0 {
				t.Fatalf("delta chunk %d: %+v", dd, c)
			}
			if u, ok := m.ChunkAt(c.Offset); !ok || u.Unit != c.Unit {
				t.Fatalf("delta chunk %d not found at its offset: %+v", dd, u)
			}
			end += c.Size
		}
		if next != m.Blocks() || end != m.ChunkFileSize() {
			t.Fatalf("chunks cover %d blocks, %d bytes", next, end)
		}
		for b := range min(m.Blocks(), 4096) {
			if _, _, err := m.BlockHash(b); err != nil {
				t.Fatalf("block %d: %v", b, err)
			}
		}
		d, err := m.NewChunkDecoder()
		if err != nil {
			t.Fatal(err)
		}
		defer d.Close()
		k := int(uint(len(chunk)) % uint(m.Chunks()))
		if err := d.Decode(k, chunk, func(uint64, []byte) error { return nil }); err != nil {
			var se *status.Error
			if !errors.As(err, &se) {
				t.Fatalf("untyped decode error %v", err)
			}
		}
		if m.Deltas() > 0 {
			dd := int(uint(len(chunk)) % uint(m.Deltas()))
			dict := make([]byte, m.Delta(dd).DictLen)
			if err := d.DecodeDelta(dd, chunk, dict, func(uint64, []byte) error { return nil }); err != nil {
				var se *status.Error
				if !errors.As(err, &se) {
					t.Fatalf("untyped delta decode error %v", err)
				}
			}
		}
	})
}
