package manifest

import (
	"bytes"
	"crypto/sha256"
	"errors"
	"math/rand/v2"
	"testing"

	"google.golang.org/protobuf/proto"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// deltaPair returns the manifest and chunk file of a new image built against a base, and
// both images. The new image holds an "updated program": a random (incompressible) stretch
// of the base with a few bytes inserted every 5000 bytes, so none of its 4 KiB blocks is
// in the base, but its bytes are, shifted.
func deltaPair(t testing.TB) (mf, chunks, base, img []byte) {
	t.Helper()
	r := rand.New(rand.NewPCG(77, 1))
	base = testImage(76, 300, 0)
	prog := make([]byte, 160*bs)
	for i := range prog {
		prog[i] = byte(r.IntN(256))
	}
	copy(base[100*bs:], prog)
	var upd []byte
	for i := 0; i < len(prog); i += 5000 {
		upd = append(upd, prog[i:min(i+5000, len(prog))]...)
		upd = append(upd, "v2!"...)
	}
	img = bytes.Clone(base[:40*bs])
	img = append(img, upd...)
	img = append(img, make([]byte, (bs-len(upd)%bs)%bs)...)
	img = append(img, base[40*bs:100*bs]...)
	img = append(img, base[260*bs:]...)
	clear(img[len(img)-16*bs : len(img)-8*bs]) // a chunk of zeros
	p := params()
	sum := sha256.Sum256(base)
	p.Base, p.BaseSize, p.BaseSHA256 = bytes.NewReader(base), int64(len(base)), sum[:]
	p.NewChunkSize = 32 * bs
	mf, chunks, _ = build(t, img, p)
	return mf, chunks, base, img
}

// TestDeltaChunks: built against a base, the chunks of new blocks get delta chunks, much
// smaller than the ordinary ones, after them in the chunk file; each decodes with its
// dictionary read from the base to exactly the ordinary chunk's blocks, so the image is
// rebuilt from delta chunks where there are some; with a wrong dictionary (a device not on
// the base) a delta chunk is refused typed (ErrBlockHash) and delivers nothing. Without
// BaseSHA256 or with DictSize < 0 no delta chunk is made and the format stays 1.
func TestDeltaChunks(t *testing.T) {
	mf, chunks, base, img := deltaPair(t)
	m := open(t, mf)
	if m.Deltas() == 0 || m.Header().FormatVersion != FormatVersionDelta || m.BaseSize() != uint64(len(base)) {
		t.Fatalf("%d delta chunks, format %d, base_size %d", m.Deltas(), m.Header().FormatVersion, m.BaseSize())
	}
	if uint64(len(chunks)) != m.ChunkFileSize() || len(m.ChunkSizes()) != m.Units() {
		t.Fatalf("chunk file of %d bytes, manifest says %d; %d sizes for %d units", len(chunks), m.ChunkFileSize(), len(m.ChunkSizes()), m.Units())
	}
	d, err := m.NewChunkDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, len(img))
	var plain, delta uint64
	for k := range m.Chunks() {
		c := m.Chunk(k)
		dd, ok := m.DeltaOf(k)
		if !ok {
			if err := d.Decode(k, chunks[c.Offset:c.Offset+c.Size], func(b uint64, data []byte) error { copy(got[b*bs:], data); return nil }); err != nil {
				t.Fatal(err)
			}
			continue
		}
		dc := m.Delta(dd)
		if dc.Index != k || dc.FirstBlock != c.FirstBlock || dc.Raw != c.Raw || dc.Offset < m.Chunk(m.Chunks()-1).Offset {
			t.Fatalf("delta chunk %d: %+v, chunk %+v", dd, dc, c)
		}
		if u, ok := m.ChunkAt(dc.Offset); !ok || u.Unit != m.Chunks()+dd || !u.Delta {
			t.Fatalf("ChunkAt(%d) = %+v, %v", dc.Offset, u, ok)
		}
		plain += c.Size
		delta += dc.Size
		data := chunks[dc.Offset : dc.Offset+dc.Size]
		calls := 0
		wrong := bytes.Clone(base[dc.DictOffset : dc.DictOffset+dc.DictLen])
		wrong[len(wrong)/2] ^= 1
		for _, bad := range [][]byte{make([]byte, dc.DictLen), wrong} {
			err := d.DecodeDelta(dd, data, bad, func(uint64, []byte) error { calls++; return nil })
			if !errors.Is(err, ErrBlockHash) || status.ReasonOf(err) != otav1.Reason_REASON_SIG_CHECK_FAILED {
				t.Errorf("delta chunk %d with a wrong dictionary: %v", dd, err)
			}
		}
		if calls != 0 {
			t.Errorf("a wrong dictionary delivered %d blocks", calls)
		}
		if err := d.DecodeDelta(dd, data, base[dc.DictOffset:dc.DictOffset+dc.DictLen-1], nil); status.ReasonOf(err) != otav1.Reason_REASON_INVALID_REQUEST {
			t.Errorf("short dictionary: %v", err)
		}
		if err := d.DecodeDelta(dd, data, base[dc.DictOffset:dc.DictOffset+dc.DictLen], func(b uint64, data []byte) error { copy(got[b*bs:], data); return nil }); err != nil {
			t.Fatalf("delta chunk %d: %v", dd, err)
		}
		// The ordinary decoder still decodes the ordinary chunk after a delta one.
		if err := d.Decode(k, chunks[c.Offset:c.Offset+c.Size], func(uint64, []byte) error { return nil }); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, img) {
		t.Error("ordinary and delta chunks do not rebuild the image")
	}
	if delta*4 > plain {
		t.Errorf("delta chunks of %d bytes for ordinary chunks of %d", delta, plain)
	}
	if err := d.DecodeDelta(m.Deltas(), nil, nil, nil); status.ReasonOf(err) != otav1.Reason_REASON_BLOCK_OUT_OF_RANGE {
		t.Errorf("delta chunk past the last: %v", err)
	}

	p := params()
	p.Base, p.BaseSize, p.NewChunkSize = bytes.NewReader(base), int64(len(base)), 32*bs
	for name, p := range map[string]Params{"no base_sha256": p, "dict size -1": func() Params {
		sum := sha256.Sum256(base)
		p.BaseSHA256, p.DictSize = sum[:], -1
		return p
	}()} {
		mf, _, res := build(t, img, p)
		if m := open(t, mf); m.Deltas() != 0 || res.Deltas != 0 || m.Header().FormatVersion != FormatVersion {
			t.Errorf("%s: %d delta chunks, format %d", name, m.Deltas(), m.Header().FormatVersion)
		}
	}
}

// TestOpenRefusesDeltas: every inconsistency of the delta chunk lists is refused typed
// (invalid_request wrapping ErrFormat).
func TestOpenRefusesDeltas(t *testing.T) {
	mf, _, _, _ := deltaPair(t)
	m := open(t, mf)
	good := m.Header()
	hashes := mf[m.hashOff:]
	if len(good.Chunks.DeltaOf) < 2 {
		t.Fatalf("%d delta chunks", len(good.Chunks.DeltaOf))
	}
	mut := func(f func(h *otav1.ManifestHeader, c *otav1.ChunkTable)) []byte {
		h := proto.Clone(good).(*otav1.ManifestHeader)
		f(h, h.Chunks)
		return assemble(h, hashes)
	}
	zeroK := -1
	for k := range m.Chunks() {
		if m.Chunk(k).Size == 0 {
			zeroK = k
		}
	}
	cases := map[string][]byte{
		"format 1":       mut(func(h *otav1.ManifestHeader, _ *otav1.ChunkTable) { h.FormatVersion = FormatVersion }),
		"no base_sha256": mut(func(h *otav1.ManifestHeader, _ *otav1.ChunkTable) { h.BaseSha256 = nil }),
		"no base_size":   mut(func(h *otav1.ManifestHeader, _ *otav1.ChunkTable) { h.BaseSize = 0 }),
		"huge base_size": mut(func(h *otav1.ManifestHeader, _ *otav1.ChunkTable) { h.BaseSize = 1 << 62 }),
		"lists differ":   mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) { c.DictLengths = c.DictLengths[1:] }),
		"sizes short":    mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) { c.DeltaSizes = c.DeltaSizes[1:] }),
		"not increasing": mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) { c.DeltaOf[1] = c.DeltaOf[0] }),
		"past the chunks": mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) {
			c.DeltaOf[len(c.DeltaOf)-1] = uint32(len(c.BlockCounts))
		}),
		"huge index": mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) { c.DeltaOf[len(c.DeltaOf)-1] = 1<<32 - 1 }),
		"of a zero chunk": mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) {
			c.DeltaOf = []uint32{uint32(zeroK)}
			c.DictOffsets, c.DictLengths, c.DeltaSizes = c.DictOffsets[:1], c.DictLengths[:1], c.DeltaSizes[:1]
		}),
		"dict empty":     mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) { c.DictLengths[0] = 0 }),
		"dict too large": mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) { c.DictLengths[0] = MaxDictSize + 1 }),
		"dict past base": mut(func(h *otav1.ManifestHeader, c *otav1.ChunkTable) {
			c.DictOffsets[0] = h.BaseSize - uint64(c.DictLengths[0]) + 1
		}),
		"dict offset wrap": mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) { c.DictOffsets[0] = 1<<64 - 1 }),
		"delta size 0": mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) {
			c.FileSize -= uint64(c.DeltaSizes[0])
			c.DeltaSizes[0] = 0
		}),
		"delta over bound": mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) {
			c.FileSize += 1<<30 - uint64(c.DeltaSizes[0])
			c.DeltaSizes[0] = 1 << 30
		}),
		"file_size -1": mut(func(_ *otav1.ManifestHeader, c *otav1.ChunkTable) { c.FileSize-- }),
	}
	if zeroK < 0 {
		t.Fatal("no chunk of zeros in the test image")
	}
	for name, data := range cases {
		m, err := Open(bytes.NewReader(data), int64(len(data)))
		if m != nil || status.ReasonOf(err) != otav1.Reason_REASON_INVALID_REQUEST || !errors.Is(err, ErrFormat) {
			t.Errorf("%s: %v, want invalid_request", name, err)
		}
	}
}
