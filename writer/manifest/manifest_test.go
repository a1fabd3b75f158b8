package manifest

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/klauspost/compress/zstd"
	"go.uber.org/goleak"
	"google.golang.org/protobuf/proto"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/verify"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

const bs = 4096

// testImage returns an image of n blocks (and tail extra bytes): random blocks, zero runs,
// a block repeated several times, compressible text.
func testImage(seed uint64, n int, tail int) []byte {
	r := rand.New(rand.NewPCG(seed, 1))
	img := make([]byte, n*bs+tail)
	rep := make([]byte, bs)
	for i := range rep {
		rep[i] = byte(r.IntN(256))
	}
	for b := range n {
		blk := img[b*bs : (b+1)*bs]
		switch k := b % 11; {
		case k < 3: // zeros
		case k == 3:
			copy(blk, rep)
		case k < 7:
			for i := range blk {
				blk[i] = "abcdefgh \n"[r.IntN(10)]
			}
		default:
			for i := range blk {
				blk[i] = byte(r.IntN(256))
			}
		}
	}
	for i := n * bs; i < len(img); i++ {
		img[i] = byte(r.IntN(256))
	}
	return img
}

func params() Params {
	// The fastest level keeps the tests quick; TestDeltaDownload uses the default.
	return Params{Target: "rootfs", Compatible: "acme,gw-1", Version: "4.3.0", BlockSize: bs, ChunkSize: 4 * bs, Level: zstd.SpeedFastest}
}

// build returns the manifest file and chunk file of img.
func build(t testing.TB, img []byte, p Params) (mf, chunks []byte, res Result) {
	t.Helper()
	var mb, cb bytes.Buffer
	if p.TempDir == "" {
		p.TempDir = t.TempDir()
	}
	res, err := Build(context.Background(), bytes.NewReader(img), p, &cb, &mb)
	if err != nil {
		t.Fatal(err)
	}
	return mb.Bytes(), cb.Bytes(), res
}

func open(t testing.TB, mf []byte) *Manifest {
	t.Helper()
	m, err := Open(bytes.NewReader(mf), int64(len(mf)))
	if err != nil {
		t.Fatal(err)
	}
	return m
}

// TestBuildRoundTrip: the manifest states the image exactly, and decoding every chunk gives
// back every non-zero block at its place (the zero ones are zeros), so the image is rebuilt
// byte for byte from the chunk file and the zero bitmap.
func TestBuildRoundTrip(t *testing.T) {
	for _, tc := range []struct {
		name        string
		blocks      int
		tail, chunk int
	}{
		{"aligned", 200, 0, 4 * bs},
		{"short last block", 150, 1000, 4 * bs},
		{"one chunk per block", 40, 10, bs},
		{"one short block", 0, 77, 16 * bs},
	} {
		t.Run(tc.name, func(t *testing.T) {
			img := testImage(uint64(tc.blocks), tc.blocks, tc.tail)
			p := params()
			p.ChunkSize = uint32(tc.chunk)
			mf, chunks, res := build(t, img, p)
			m := open(t, mf)
			sum := sha256.Sum256(img)
			if diff := cmp.Diff([]any{uint64(len(img)), sum[:], "rootfs", "acme,gw-1", "4.3.0", uint32(bs)},
				[]any{m.ImageSize(), m.ImageSHA256(), m.Target(), m.Compatible(), m.Version(), m.BlockSize()}); diff != "" {
				t.Error(diff)
			}
			msum := sha256.Sum256(mf)
			if !bytes.Equal(res.ManifestSHA256, msum[:]) || res.ManifestSize != uint64(len(mf)) || res.ChunkFileSize != uint64(len(chunks)) {
				t.Errorf("result %+v does not describe the files (%d, %d bytes)", res, len(mf), len(chunks))
			}
			var zeros uint64
			for b := range m.Blocks() {
				blk := img[b*bs : min(uint64(len(img)), (b+1)*bs)]
				if m.IsZero(b) != allZero(blk) {
					t.Fatalf("block %d: zero mark %v", b, m.IsZero(b))
				}
				if m.IsZero(b) {
					zeros++
				}
				if err := m.CheckBlock(b, blk); err != nil {
					t.Fatalf("block %d: %v", b, err)
				}
			}
			if zeros != m.ZeroBlocks() || zeros == 0 && tc.blocks > 0 {
				t.Errorf("%d zero blocks, manifest says %d", zeros, m.ZeroBlocks())
			}
			got := make([]byte, len(img))
			d, err := m.NewChunkDecoder()
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			var next uint64
			for k := range m.Chunks() {
				c := m.Chunk(k)
				if c.FirstBlock != next || c.Offset+c.Size > uint64(len(chunks)) {
					t.Fatalf("chunk %+v", c)
				}
				next += c.Blocks
				if err := d.Decode(k, chunks[c.Offset:c.Offset+c.Size], func(b uint64, data []byte) error {
					copy(got[b*bs:], data)
					return nil
				}); err != nil {
					t.Fatalf("chunk %d: %v", k, err)
				}
			}
			if !bytes.Equal(got, img) {
				t.Error("the image rebuilt from the chunks differs")
			}
			// Everything missing: every chunk that holds a non-zero block is needed.
			need := m.NeededChunks(func(uint64) bool { return true })
			var sz uint64
			for _, c := range need {
				sz += c.Size
			}
			if sz != uint64(len(chunks)) {
				t.Errorf("needed chunks hold %d of %d bytes", sz, len(chunks))
			}
		})
	}
}

// TestCheckBlockRefuses: a block with one bit changed, a short one and non-zero bytes for a
// zero block are refused with sig_check_failed wrapping ErrBlockHash.
func TestCheckBlockRefuses(t *testing.T) {
	img := testImage(3, 30, 0)
	m := open(t, first(build(t, img, params())))
	var nz, z uint64
	for b := range m.Blocks() {
		if m.IsZero(b) {
			z = b
		} else {
			nz = b
		}
	}
	flipped := bytes.Clone(img[nz*bs : (nz+1)*bs])
	flipped[100] ^= 1
	notZero := make([]byte, bs)
	notZero[bs-1] = 1
	for name, tc := range map[string]struct {
		b    uint64
		data []byte
	}{
		"bit flipped":      {nz, flipped},
		"short":            {nz, img[nz*bs : (nz+1)*bs-1]},
		"zero block not 0": {z, notZero},
	} {
		err := m.CheckBlock(tc.b, tc.data)
		if !errors.Is(err, ErrBlockHash) || status.ReasonOf(err) != otav1.Reason_REASON_SIG_CHECK_FAILED {
			t.Errorf("%s: %v", name, err)
		}
	}
	if _, _, err := m.BlockHash(m.Blocks()); status.ReasonOf(err) != otav1.Reason_REASON_BLOCK_OUT_OF_RANGE {
		t.Errorf("block past the end: %v", err)
	}
}

func first[A, B, C any](a A, _ B, _ C) A { return a }

// TestDecodeRefusesDamagedChunks: a chunk altered in transit, another chunk's bytes, a
// truncated chunk, and a zstd frame that decodes to more than the chunk holds are refused
// before fn sees any block.
func TestDecodeRefusesDamagedChunks(t *testing.T) {
	img := testImage(5, 100, 0)
	mf, chunks, _ := build(t, img, params())
	m := open(t, mf)
	d, err := m.NewChunkDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	var k1, k2 int = -1, -1
	for k := range m.Chunks() {
		if m.Chunk(k).Raw >= 2*bs { // two non-zero blocks at least
			if k1 < 0 {
				k1 = k
			} else if k2 < 0 && m.Chunk(k).Size != m.Chunk(k1).Size {
				k2 = k
			}
		}
	}
	c1, c2 := m.Chunk(k1), m.Chunk(k2)
	orig := chunks[c1.Offset : c1.Offset+c1.Size]
	flipped := bytes.Clone(orig)
	flipped[len(flipped)/2] ^= 0x40
	other := chunks[c2.Offset : c2.Offset+c2.Size]
	// A valid frame of the right size whose last block is wrong: chunk 1's blocks with the
	// last one replaced, recompressed and padded with a skippable frame to chunk 1's size.
	var raw []byte
	if err := d.Decode(k1, orig, func(_ uint64, b []byte) error { raw = append(raw, b...); return nil }); err != nil {
		t.Fatal(err)
	}
	copy(raw[len(raw)-bs:], bytes.Repeat([]byte("a"), bs))
	lastWrong := zstdOf(t, raw)
	if len(lastWrong)+8 > len(orig) {
		t.Fatalf("recompressed chunk of %d bytes does not fit in %d", len(lastWrong), len(orig))
	}
	pad := len(orig) - len(lastWrong) - 8
	lastWrong = binary.LittleEndian.AppendUint32(lastWrong, 0x184D2A50)
	lastWrong = binary.LittleEndian.AppendUint32(lastWrong, uint32(pad))
	lastWrong = append(lastWrong, make([]byte, pad)...)
	for name, data := range map[string][]byte{
		"bit flipped":      flipped,
		"other chunk":      other,
		"truncated":        orig[:len(orig)-1],
		"garbage":          bytes.Repeat([]byte{0x28, 0xb5, 0x2f, 0xfd}, len(orig)/4),
		"padded":           append(bytes.Clone(orig), 0),
		"empty":            nil,
		"decodes larger":   zstdOf(t, make([]byte, 2*c1.Raw)),
		"last block wrong": lastWrong,
	} {
		calls := 0
		err := d.Decode(k1, data, func(uint64, []byte) error { calls++; return nil })
		if !errors.Is(err, ErrBlockHash) || status.ReasonOf(err) != otav1.Reason_REASON_SIG_CHECK_FAILED || calls != 0 {
			t.Errorf("%s: %v, %d blocks delivered", name, err, calls)
		}
	}
	// The decoder is still usable: the real chunk decodes.
	if err := d.Decode(k1, orig, func(uint64, []byte) error { return nil }); err != nil {
		t.Error(err)
	}
	if err := d.Decode(m.Chunks(), nil, nil); status.ReasonOf(err) != otav1.Reason_REASON_BLOCK_OUT_OF_RANGE {
		t.Errorf("chunk past the end: %v", err)
	}
}

// zstdOf compresses data with the zstd command, an encoder other than the package's own.
func zstdOf(t *testing.T, data []byte) []byte {
	t.Helper()
	if _, err := exec.LookPath("zstd"); err != nil {
		if os.Getenv("CI") == "true" {
			t.Fatal("zstd missing (scripts/test.sh installs it)")
		}
		t.Skip("zstd missing")
	}
	cmd := exec.Command("zstd", "-q", "-c")
	cmd.Stdin = bytes.NewReader(data)
	out, err := cmd.Output()
	if err != nil {
		t.Fatal(err)
	}
	return out
}

// TestVerify signs a manifest with openssl (ECDSA P-256, as for an image) and verifies it
// through the writer's trust store: accepted as signed, refused when one byte of the hash
// section, of the header or of the signature changes, or when the signer is not trusted.
func TestVerify(t *testing.T) {
	dir := t.TempDir()
	mf, _, _ := build(t, testImage(7, 64, 0), params())
	mpath := filepath.Join(dir, "m")
	if err := os.WriteFile(mpath, mf, 0o644); err != nil {
		t.Fatal(err)
	}
	sh := func(args ...string) {
		t.Helper()
		if out, err := exec.Command(args[0], args[1:]...).CombinedOutput(); err != nil {
			t.Fatalf("%v: %v\n%s", args, err, out)
		}
	}
	for _, k := range []string{"signer", "other"} {
		sh("openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", filepath.Join(dir, k+".key"))
		sh("openssl", "ec", "-in", filepath.Join(dir, k+".key"), "-pubout", "-out", filepath.Join(dir, k+".pub.pem"))
	}
	sh("openssl", "dgst", "-sha256", "-sign", filepath.Join(dir, "signer.key"), "-out", filepath.Join(dir, "m.sig"), mpath)
	sig, err := os.ReadFile(filepath.Join(dir, "m.sig"))
	if err != nil {
		t.Fatal(err)
	}
	store, err := verify.Load([]string{filepath.Join(dir, "signer.pub.pem")}, false)
	if err != nil {
		t.Fatal(err)
	}
	other, err := verify.Load([]string{filepath.Join(dir, "other.pub.pem")}, false)
	if err != nil {
		t.Fatal(err)
	}
	ecdsa := otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256
	ctx := context.Background()
	m, err := Verify(ctx, store, bytes.NewReader(mf), int64(len(mf)), ecdsa, sig, "")
	if err != nil {
		t.Fatal(err)
	}
	if m.Version() != "4.3.0" {
		t.Errorf("version %q", m.Version())
	}
	flip := func(i int) []byte { b := bytes.Clone(mf); b[i] ^= 1; return b }
	badSig := bytes.Clone(sig)
	badSig[len(badSig)-1] ^= 1
	for name, tc := range map[string]struct {
		store *verify.Store
		data  []byte
		sig   []byte
		want  otav1.Reason
	}{
		"hash section changed": {store, flip(len(mf) - 1), sig, otav1.Reason_REASON_SIG_CHECK_FAILED},
		"header changed":       {store, flip(prefixSize + 3), sig, otav1.Reason_REASON_SIG_CHECK_FAILED},
		"signature changed":    {store, mf, badSig, otav1.Reason_REASON_SIG_CHECK_FAILED},
		"no signature":         {store, mf, nil, otav1.Reason_REASON_SIG_CHECK_FAILED},
		"untrusted signer":     {other, mf, sig, otav1.Reason_REASON_SIG_CHECK_FAILED},
	} {
		if m, err := Verify(ctx, tc.store, bytes.NewReader(tc.data), int64(len(tc.data)), ecdsa, tc.sig, ""); m != nil || status.ReasonOf(err) != tc.want {
			t.Errorf("%s: %v, want %s", name, err, tc.want)
		}
	}
	empty, err := verify.Load(nil, false)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := Verify(ctx, empty, bytes.NewReader(mf), int64(len(mf)), ecdsa, sig, ""); status.ReasonOf(err) != otav1.Reason_REASON_UNTRUSTED_SIGNER {
		t.Errorf("empty trust store: %v", err)
	}
}

// assemble writes a manifest file from a header and a hash section.
func assemble(h *otav1.ManifestHeader, hashes []byte) []byte {
	hb, err := proto.MarshalOptions{Deterministic: true}.Marshal(h)
	if err != nil {
		panic(err)
	}
	out := append([]byte(Magic), binary.BigEndian.AppendUint32(nil, uint32(len(hb)))...)
	return append(append(out, hb...), hashes...)
}

// TestOpenRefuses: every inconsistency between fields, counts and sizes is refused with a
// typed error (invalid_request wrapping ErrFormat, or unsupported for another version).
func TestOpenRefuses(t *testing.T) {
	img := testImage(9, 40, 100)
	clear(img[8*bs : 16*bs]) // two chunks of zeros
	mf, _, _ := build(t, img, params())
	m := open(t, mf)
	hashes := mf[m.hashOff:]
	good := m.Header()
	if _, err := Open(bytes.NewReader(assemble(good, hashes)), int64(len(mf))); err != nil {
		t.Fatalf("re-assembled manifest refused: %v", err)
	}
	invalid, unsupported := otav1.Reason_REASON_INVALID_REQUEST, otav1.Reason_REASON_UNSUPPORTED
	mut := func(f func(h *otav1.ManifestHeader)) []byte {
		h := proto.Clone(good).(*otav1.ManifestHeader)
		f(h)
		return assemble(h, hashes)
	}
	n := len(good.Chunks.BlockCounts)
	cases := map[string]struct {
		data []byte
		want otav1.Reason
	}{
		"empty":             {nil, invalid},
		"no magic":          {append([]byte("GWOTAXX1"), mf[8:]...), invalid},
		"format 2 magic":    {append([]byte("GWOTAMF2"), mf[8:]...), unsupported},
		"header length 0":   {append(append([]byte(Magic), 0, 0, 0, 0), mf[12:]...), invalid},
		"header too long":   {append(append([]byte(Magic), 0xff, 0, 0, 0), mf[12:]...), invalid},
		"header past end":   {mf[:prefixSize+10], invalid},
		"hash cut":          {mf[:len(mf)-1], invalid},
		"hash extra":        {append(bytes.Clone(mf), 0), invalid},
		"header garbage":    {append(append([]byte(Magic), 0, 0, 0, 4), 0xff, 0xff, 0xff, 0xff), invalid},
		"format_version 3":  {mut(func(h *otav1.ManifestHeader) { h.FormatVersion = 3 }), unsupported},
		"format_version 2":  {mut(func(h *otav1.ManifestHeader) { h.FormatVersion = 2 }), invalid}, // without delta chunks
		"v1 base_size":      {mut(func(h *otav1.ManifestHeader) { h.BaseSize = 1 }), invalid},
		"no target":         {mut(func(h *otav1.ManifestHeader) { h.Target = "" }), invalid},
		"control in target": {mut(func(h *otav1.ManifestHeader) { h.Target = "a\nb" }), invalid},
		"bad utf-8 version": {bytes.Replace(mut(func(h *otav1.ManifestHeader) { h.Version = "V~V~V" }), []byte("V~V~V"), []byte("V\xffV\xffV"), 1), invalid},
		"no compatible":     {mut(func(h *otav1.ManifestHeader) { h.Compatible = "" }), invalid},
		"long version":      {mut(func(h *otav1.ManifestHeader) { h.Version = string(make([]byte, 129)) }), invalid},
		"image_size 0":      {mut(func(h *otav1.ManifestHeader) { h.ImageSize = 0 }), invalid},
		"image_size +1":     {mut(func(h *otav1.ManifestHeader) { h.ImageSize += bs }), invalid},
		"image_size huge":   {mut(func(h *otav1.ManifestHeader) { h.ImageSize = 1 << 62 }), invalid},
		"image_sha256 31":   {mut(func(h *otav1.ManifestHeader) { h.ImageSha256 = h.ImageSha256[:31] }), invalid},
		"base_sha256 5":     {mut(func(h *otav1.ManifestHeader) { h.BaseSha256 = []byte{1, 2, 3, 4, 5} }), invalid},
		"block_size 1000":   {mut(func(h *otav1.ManifestHeader) { h.BlockSize = 1000 }), invalid},
		"block_size 256":    {mut(func(h *otav1.ManifestHeader) { h.BlockSize = 256 }), invalid},
		"block_size 8192":   {mut(func(h *otav1.ManifestHeader) { h.BlockSize = 8192 }), invalid},
		"block_count -1":    {mut(func(h *otav1.ManifestHeader) { h.BlockCount-- }), invalid},
		"bitmap short":      {mut(func(h *otav1.ManifestHeader) { h.ZeroBlocks = h.ZeroBlocks[1:] }), invalid},
		"bitmap padding":    {mut(func(h *otav1.ManifestHeader) { h.ZeroBlocks[len(h.ZeroBlocks)-1] |= 0x80 }), invalid},
		"bitmap bit":        {mut(func(h *otav1.ManifestHeader) { h.ZeroBlocks[0] ^= 1 }), invalid},
		"hash_count +1":     {mut(func(h *otav1.ManifestHeader) { h.HashCount++ }), invalid},
		"no chunk table":    {mut(func(h *otav1.ManifestHeader) { h.Chunks = nil }), invalid},
		"no compression":    {mut(func(h *otav1.ManifestHeader) { h.Chunks.Compression = 0 }), unsupported},
		"no chunks": {mut(func(h *otav1.ManifestHeader) {
			h.Chunks.BlockCounts, h.Chunks.CompressedSizes, h.Chunks.FileSize = nil, nil, 0
		}), invalid},
		"sizes short":  {mut(func(h *otav1.ManifestHeader) { h.Chunks.CompressedSizes = h.Chunks.CompressedSizes[1:] }), invalid},
		"chunk 0 long": {mut(func(h *otav1.ManifestHeader) { h.Chunks.BlockCounts[0]++ }), invalid},
		"chunks short": {mut(func(h *otav1.ManifestHeader) { h.Chunks.BlockCounts[n-1]-- }), invalid},
		"empty chunk": {mut(func(h *otav1.ManifestHeader) {
			h.Chunks.BlockCounts = append(h.Chunks.BlockCounts, 0)
			h.Chunks.CompressedSizes = append(h.Chunks.CompressedSizes, 0)
		}), invalid},
		"overlap": {mut(func(h *otav1.ManifestHeader) { // chunk 1 also claims chunk 2's blocks
			h.Chunks.BlockCounts[1] += h.Chunks.BlockCounts[2]
		}), invalid},
		"file_size +1":       {mut(func(h *otav1.ManifestHeader) { h.Chunks.FileSize++ }), invalid},
		"chunk over bound":   {mut(func(h *otav1.ManifestHeader) { h.Chunks.CompressedSizes[1] = 1 << 30; h.Chunks.FileSize += 1 << 30 }), invalid},
		"zero chunk w/bytes": {mut(func(h *otav1.ManifestHeader) { zeroChunk(t, m, h, true) }), invalid},
		"data chunk empty":   {mut(func(h *otav1.ManifestHeader) { zeroChunk(t, m, h, false) }), invalid},
		"unknown field": {func() []byte {
			h := proto.Clone(good).(*otav1.ManifestHeader)
			h.ProtoReflect().SetUnknown([]byte{0xf8, 0x01, 0x01}) // field 31, varint 1
			return assemble(h, hashes)
		}(), invalid},
	}
	for name, tc := range cases {
		m, err := Open(bytes.NewReader(tc.data), int64(len(tc.data)))
		if m != nil || status.ReasonOf(err) != tc.want || tc.want == invalid && !errors.Is(err, ErrFormat) {
			t.Errorf("%s: %v, want %s", name, err, tc.want)
		}
	}
}

// zeroChunk edits h so that a chunk of only zero blocks has bytes (bytes=true), or a chunk
// with data has none.
func zeroChunk(t *testing.T, m *Manifest, h *otav1.ManifestHeader, bytes bool) {
	for k := range m.Chunks() {
		c := m.Chunk(k)
		if bytes && c.Size == 0 {
			h.Chunks.CompressedSizes[k] = 10
			h.Chunks.FileSize += 10
			return
		}
		if !bytes && c.Size > 0 {
			h.Chunks.CompressedSizes[k] = 0
			h.Chunks.FileSize -= c.Size
			return
		}
	}
	t.Fatal("no such chunk in the test image")
}

// TestFindLocal: a device holding v1 finds exactly the blocks of v2 whose bytes v1 holds at
// some block-aligned offset (brute force over full hashes says which), plus the zero ones,
// each once, with bytes equal to v2's; the same with a tiny index taking many passes.
func TestFindLocal(t *testing.T) {
	v1 := testImage(11, 300, 0)
	// v2: v1 shifted by 3 blocks (a file moved), 20 new random blocks, a duplicated block
	// and v1's tail, then a short last block.
	r := rand.New(rand.NewPCG(12, 1))
	var v2 []byte
	v2 = append(v2, v1[100*bs:250*bs]...)
	for range 20 * bs {
		v2 = append(v2, byte(r.IntN(256)))
	}
	v2 = append(v2, v1[7*bs:8*bs]...)
	v2 = append(v2, v1[7*bs:8*bs]...)
	v2 = append(v2, v1[3*bs+17:90*bs+17]...) // not aligned: found only where zeros
	v2 = append(v2, v1[250*bs:]...)
	v2 = append(v2, v1[:1000]...)
	m := open(t, first(build(t, v2, params())))

	local := map[[32]byte]bool{}
	for o := 0; o+bs <= len(v1); o += bs {
		local[sha256.Sum256(v1[o:o+bs])] = true
	}
	want := map[uint64]bool{}
	for b := range m.Blocks() {
		blk := v2[b*bs : min(uint64(len(v2)), (b+1)*bs)]
		if allZero(blk) || len(blk) == bs && local[sha256.Sum256(blk)] {
			want[b] = true
		}
	}
	for _, entries := range []int{0, 7, 1} {
		got := map[uint64]bool{}
		st, err := m.FindLocal(context.Background(), bytes.NewReader(v1), int64(len(v1)), entries, func(mt Match, data []byte) error {
			if got[mt.Block] {
				t.Errorf("block %d reported twice", mt.Block)
			}
			got[mt.Block] = true
			blk := v2[mt.Block*bs : min(uint64(len(v2)), (mt.Block+1)*bs)]
			switch {
			case mt.Zero && (data != nil || !allZero(blk)):
				t.Errorf("block %d reported zero", mt.Block)
			case !mt.Zero && (!bytes.Equal(data, blk) || !bytes.Equal(v1[mt.LocalOffset:mt.LocalOffset+bs], blk)):
				t.Errorf("block %d: wrong bytes from local offset %d", mt.Block, mt.LocalOffset)
			}
			return nil
		})
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(want, got); diff != "" {
			t.Errorf("entries %d: found blocks (-want +got):\n%s", entries, diff)
		}
		if st.Zero+st.Found != uint64(len(want)) || entries == 7 && st.Passes < 10 {
			t.Errorf("entries %d: stats %v", entries, st)
		}
	}
	if len(want) == int(m.Blocks()) || len(want) < int(m.Blocks())/2 {
		t.Fatalf("test image: %d of %d blocks local", len(want), m.Blocks())
	}
	// An error from fn stops the lookup and is returned.
	stop := errors.New("stop")
	if _, err := m.FindLocal(context.Background(), bytes.NewReader(v1), int64(len(v1)), 0, func(mt Match, _ []byte) error {
		if !mt.Zero {
			return stop
		}
		return nil
	}); !errors.Is(err, stop) {
		t.Errorf("fn error: %v", err)
	}
	// Local data shorter than it claims is a read error, not a short scan.
	if _, err := m.FindLocal(context.Background(), bytes.NewReader(v1[:len(v1)-bs]), int64(len(v1)), 0,
		func(Match, []byte) error { return nil }); status.ReasonOf(err) != otav1.Reason_REASON_FILE_CLOSE_FAILED {
		t.Errorf("short local data: %v", err)
	}
}

func TestPairFiles(t *testing.T) {
	for _, tc := range []struct {
		paths []string
		want  []Pair
		err   otav1.Reason
	}{
		{[]string{"rootfs.gwota-manifest", "rootfs"}, []Pair{{0, 1}}, 0},
		{[]string{"/opt/fw/app.img", "rootfs", "/opt/fw/app.img.gwota-manifest"}, []Pair{{2, 0}}, 0},
		{[]string{"rootfs", "boot"}, nil, 0},
		{[]string{"rootfs.gwota-manifest"}, nil, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{[]string{".gwota-manifest", ""}, nil, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{[]string{"rootfs", "rootfs"}, nil, 0}, // plain images: as before manifests
		{[]string{"rootfs.gwota-manifest", "rootfs", "rootfs"}, nil, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{[]string{"rootfs.gwota-manifest", "rootfs", "rootfs.gwota-manifest"}, nil, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{[]string{"boot", "rootfs.gwota-manifest", "rootfs", "boot"}, []Pair{{1, 2}}, 0},
		{[]string{"a.gwota-manifest", "a.gwota-manifest.gwota-manifest"}, nil, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
	} {
		got, err := PairFiles(tc.paths)
		if status.ReasonOf(err) != tc.err || tc.err == 0 && err != nil {
			t.Errorf("%q: %v, want %v", tc.paths, err, tc.err)
		}
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("%q: %s", tc.paths, diff)
		}
	}
}

// TestUnsignedChunkFileRefusedAsImage: the chunk file carries no signature, and the check the
// writer makes when a session begins (verify.Store.Check, writer/engine) refuses an image
// without one, so a writer that took a chunk file for an image would never install it.
func TestUnsignedChunkFileRefusedAsImage(t *testing.T) {
	dir := t.TempDir()
	key := filepath.Join(dir, "k")
	for _, args := range [][]string{
		{"ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out", key},
		{"ec", "-in", key, "-pubout", "-out", key + ".pub.pem"},
	} {
		if out, err := exec.Command("openssl", args...).CombinedOutput(); err != nil {
			t.Fatalf("%v\n%s", err, out)
		}
	}
	store, err := verify.Load([]string{key + ".pub.pem"}, false)
	if err != nil {
		t.Fatal(err)
	}
	err = store.Check(otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, nil, "")
	if status.ReasonOf(err) != otav1.Reason_REASON_SIG_CHECK_FAILED {
		t.Errorf("unsigned file: %v", err)
	}
}

// TestBuildWithBase: with a delta base, every chunk holds either non-zero blocks the base has
// (at some block-aligned offset) or blocks it lacks, never both; chunks of new blocks grow
// past the chunk size (up to NewChunkSize); the chunk file still rebuilds the image.
func TestBuildWithBase(t *testing.T) {
	base := testImage(41, 200, 0)
	r := rand.New(rand.NewPCG(42, 1))
	img := bytes.Clone(base[:120*bs])
	for range 30 * bs { // a run of new blocks
		img = append(img, byte(r.IntN(256)))
	}
	img = append(img, base[120*bs:]...)
	copy(img[10*bs:], bytes.Repeat([]byte{7}, bs)) // one new block among known ones
	p := params()
	p.Base, p.BaseSize, p.NewChunkSize = bytes.NewReader(base), int64(len(base)), 16*bs
	mf, chunks, _ := build(t, img, p)
	m := open(t, mf)
	known := map[[32]byte]bool{}
	for o := 0; o+bs <= len(base); o += bs {
		known[sha256.Sum256(base[o:o+bs])] = true
	}
	big := 0
	got := make([]byte, len(img))
	d, err := m.NewChunkDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	for k := range m.Chunks() {
		c := m.Chunk(k)
		kinds := map[bool]int{}
		for b := c.FirstBlock; b < c.FirstBlock+c.Blocks; b++ {
			if !m.IsZero(b) {
				kinds[known[sha256.Sum256(img[b*bs:(b+1)*bs])]]++
			}
		}
		if len(kinds) > 1 {
			t.Errorf("chunk %d mixes known and new blocks: %v", k, kinds)
		}
		if c.Blocks*bs > uint64(p.ChunkSize) {
			big++
			if kinds[true] > 0 || c.Blocks > 16 {
				t.Errorf("chunk %d of %d blocks: %v", k, c.Blocks, kinds)
			}
		}
		if err := d.Decode(k, chunks[c.Offset:c.Offset+c.Size], func(b uint64, data []byte) error {
			copy(got[b*bs:], data)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if big == 0 {
		t.Error("no chunk of new blocks grew past the chunk size")
	}
	if !bytes.Equal(got, img) {
		t.Error("the chunk file does not rebuild the image")
	}
}

// TestChunksFitMaxChunkBytes: a chunk that compresses to more than MaxChunkBytes is cut into
// chunks that fit (ota-net hands the writer one chunk per block of at most its
// max_block_size), at block boundaries, with or without a base, and the chunk file still
// rebuilds the image; a limit below one block is refused.
func TestChunksFitMaxChunkBytes(t *testing.T) {
	img := testImage(51, 300, 100)
	base := testImage(52, 50, 0)
	for _, tc := range []struct {
		name     string
		base     bool
		chunk    uint32
		maxBytes uint32
	}{
		{"fixed chunks larger than the limit", false, 64 * bs, 5 * bs},
		{"new chunks larger than the limit", true, 4 * bs, 3*bs + bs/2},
		{"limit of one block", false, 16 * bs, bs + 128},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p := params()
			p.ChunkSize, p.MaxChunkBytes = tc.chunk, tc.maxBytes
			if tc.base {
				p.Base, p.BaseSize, p.NewChunkSize = bytes.NewReader(base), int64(len(base)), 64*bs
			}
			mf, chunks, _ := build(t, img, p)
			m := open(t, mf)
			d, err := m.NewChunkDecoder()
			if err != nil {
				t.Fatal(err)
			}
			defer d.Close()
			got := make([]byte, len(img))
			split := false
			for k := range m.Chunks() {
				c := m.Chunk(k)
				if c.Size > uint64(tc.maxBytes) {
					t.Errorf("chunk %d: %d bytes, limit %d", k, c.Size, tc.maxBytes)
				}
				if c.Blocks*bs < uint64(tc.chunk) && k < m.Chunks()-1 && c.Size > 0 {
					split = true
				}
				if err := d.Decode(k, chunks[c.Offset:c.Offset+c.Size], func(b uint64, data []byte) error {
					copy(got[b*bs:], data)
					return nil
				}); err != nil {
					t.Fatal(err)
				}
			}
			if !split {
				t.Error("no chunk was cut to fit the limit")
			}
			if !bytes.Equal(got, img) {
				t.Error("the chunk file does not rebuild the image")
			}
		})
	}
	p := params()
	p.MaxChunkBytes = bs
	var mb, cb bytes.Buffer
	if _, err := Build(context.Background(), bytes.NewReader(img), p, &cb, &mb); err == nil {
		t.Error("a limit below one block was accepted")
	}
}
