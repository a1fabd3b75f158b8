package main

import (
	"bytes"
	"crypto/sha256"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"testing"

	"github.com/gwota/gwota/internal/bitmap"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/manifest"
	"github.com/gwota/gwota/writer/writertest"
)

// A delta update end to end through the real binaries: `ota-writer manifest` makes and signs
// the manifest and the chunk file, a serving `ota-writer` process takes the manifest, then
// only the chunks its running slot cannot supply, over its Unix socket, verifies and
// activates; the slot records the manifest's version.
func TestDeltaUpdateThroughServe(t *testing.T) {
	b := newBench(t, "compatible = \"acme,gw-1\"\n")
	ctx := t.Context()
	// Text-like blocks (two letters): every 16 KiB chunk compresses below the bench's
	// max_block_size of 4 KiB.
	rng := rand.New(rand.NewPCG(11, 12))
	v1 := make([]byte, 128*testMaxBlock)
	for i := range v1 {
		v1[i] = "ab"[rng.IntN(2)]
	}
	clear(v1[40*testMaxBlock : 60*testMaxBlock])
	v2 := bytes.Clone(v1)
	for _, k := range []int{5, 90, 91} {
		for i := k * testMaxBlock; i < (k+1)*testMaxBlock; i++ {
			v2[i] = "ab"[rng.IntN(2)]
		}
	}
	if err := os.WriteFile(b.slotA, v1, 0o600); err != nil {
		t.Fatal(err)
	}
	img, mf, chunks := filepath.Join(b.dir, "v2.img"), filepath.Join(b.dir, "v2.gwota-manifest"), filepath.Join(b.dir, "v2.chunks")
	if err := os.WriteFile(img, v2, 0o600); err != nil {
		t.Fatal(err)
	}
	if _, stderr, code := runCLI(t, "manifest", "--image", img, "--version", "2.0", "--target", "rootfs", "--compatible", "acme,gw-1",
		"--block-size", "4096", "--chunk-size", "16384", "--key", b.key, "-o", mf, "--chunks", chunks); code != exitOK {
		t.Fatalf("manifest: exit %d: %s", code, stderr)
	}
	mfData, _ := os.ReadFile(mf)
	sig, _ := os.ReadFile(mf + ".sig")
	chunkData, _ := os.ReadFile(chunks)
	m, err := manifest.Open(bytes.NewReader(mfData), int64(len(mfData)))
	if err != nil {
		t.Fatal(err)
	}

	b.serve(t)
	c := writertest.Dial(t, b.sock)
	res, err := c.Begin(ctx, &otav1.BeginSessionRequest{JobId: "job-d", FileIndex: 0, Kind: otav1.SessionKind_SESSION_KIND_MANIFEST,
		FilePath: "/opt/fw/gateway.img" + manifest.PathSuffix, FileSize: uint64(len(mfData)), BlockSize: testMaxBlock,
		SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: sig, CertName: "pub.pem"})
	if err != nil {
		t.Fatal(err)
	}
	for k := 0; k*testMaxBlock < len(mfData); k++ {
		if _, err := c.Write(ctx, res.GetSession().GetSessionId(), blocksOf(mfData, testMaxBlock, k, k+1), false); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := c.Finish(ctx, res.GetSession().GetSessionId()); err != nil {
		t.Fatal(err)
	}
	res, err = c.Begin(ctx, &otav1.BeginSessionRequest{JobId: "job-d", FileIndex: 1, Kind: otav1.SessionKind_SESSION_KIND_CHUNKS,
		ManifestFileIndex: 0, FilePath: "/opt/fw/gateway.img", FileSize: uint64(len(chunkData)), BlockSize: testMaxBlock})
	if err != nil {
		t.Fatal(err)
	}
	s := res.GetSession()
	var off uint64
	sent := 0
	for k, size := range res.GetChunkSizes() {
		if bitmap.Bitmap(s.GetMissing()).Has(k) {
			if _, err := c.Write(ctx, s.GetSessionId(), []*otav1.Block{{Offset: off, Data: chunkData[off : off+uint64(size)]}}, false); err != nil {
				t.Fatalf("chunk %d: %v", k, err)
			}
			sent++
		}
		off += uint64(size)
	}
	// Blocks 5, 90 and 91 changed: chunk 1 (blocks 4..7) and chunk 22 (88..91).
	if sent != 2 || m.Chunks() != 32 || s.GetDelta().GetZeroBlocks() != 20 || s.GetDelta().GetReusedBlocks() != 128-20-3 {
		t.Fatalf("%d of %d chunks sent, delta %v", sent, m.Chunks(), s.GetDelta())
	}
	fin, err := c.Finish(ctx, s.GetSessionId())
	if err != nil {
		t.Fatal(err)
	}
	if fin.GetSha256() != fmt.Sprintf("%x", sha256.Sum256(v2)) {
		t.Fatalf("read back %s", fin.GetSha256())
	}
	if act, err := c.Activate(ctx, s.GetSessionId()); err != nil || act.GetSlot() != "b" {
		t.Fatalf("activate: %v %v", act, err)
	}
	st, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if got := st.GetLastUpdate().GetVersion(); got != "2.0" {
		t.Fatalf("recorded version %q, want the manifest's 2.0", got)
	}
}
