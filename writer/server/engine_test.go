package server_test

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/hashicorp/go-hclog"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/sign"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/engine"
	"github.com/gwota/gwota/writer/server"
	"github.com/gwota/gwota/writer/writertest"
)

// BenchmarkBlockPathEngine is BenchmarkBlockPath with the real engine behind the socket:
// blocks land in a file-backed slot, with the engine's sync policy (fdatasync + journal every
// 8 MiB) and a final sync.
//
//	go test -run '^$' -bench BlockPathEngine -benchtime 2s ./writer/server/
func BenchmarkBlockPathEngine(b *testing.B) {
	const maxBlock = 128 << 10
	for _, bs := range []int{4 << 10, 64 << 10} {
		for _, per := range []int{1, maxBlock / bs} {
			for _, mode := range []string{"stream", "unary"} {
				b.Run(fmt.Sprintf("%s/block=%dKiB/per_msg=%d", mode, bs>>10, per), func(b *testing.B) {
					benchBlockPath(b, newBenchEngine(b, maxBlock), mode, bs, per)
				})
			}
		}
	}
}

func newBenchEngine(b testing.TB, maxBlock uint32) *engine.Engine {
	e, _, _ := newEngineWithKey(b, maxBlock)
	return e
}

// newEngineWithKey returns an engine over file-backed slots in a temporary directory, the
// private key it trusts, and that directory.
func newEngineWithKey(b testing.TB, maxBlock uint32) (*engine.Engine, *sign.Identity, string) {
	r := newEngineRig(b, maxBlock)
	return r.e, r.id, r.dir
}

// engineRig is an engine over file-backed slots with the file boot backend it drives.
type engineRig struct {
	e    *engine.Engine
	id   *sign.Identity
	dir  string
	boot *boot.File
}

// certName names the engine's trusted key in a job (its file base name).
const certName = "pub.pem"

func newEngineRig(b testing.TB, maxBlock uint32) *engineRig {
	dir := b.TempDir()
	id, err := sign.NewIdentity("ota-signer")
	if err != nil {
		b.Fatal(err)
	}
	pub := filepath.Join(dir, "pub.pem")
	if err := id.WritePublicKey(pub); err != nil {
		b.Fatal(err)
	}
	for _, s := range []string{"a", "b"} {
		os.WriteFile(filepath.Join(dir, "slot_"+s), nil, 0o600)
	}
	cfg, err := config.Parse(fmt.Appendf(nil, `
state_dir = %q
trusted_keys = [%q]
max_block_size = %d
[[target]]
name = "mem"
kind = "ab"
file_paths = ["/fw"]
slots = [%q, %q]
`, filepath.Join(dir, "state"), pub, maxBlock, filepath.Join(dir, "slot_a"), filepath.Join(dir, "slot_b")))
	if err != nil {
		b.Fatal(err)
	}
	os.MkdirAll(cfg.StateDir, 0o700)
	bt, err := boot.NewFile(filepath.Join(cfg.StateDir, "boot.json"), 3, nil)
	if err != nil {
		b.Fatal(err)
	}
	e, err := engine.New(b.Context(), cfg, engine.Deps{Boot: bt}, hclog.NewNullLogger())
	if err != nil {
		b.Fatal(err)
	}
	b.Cleanup(func() { e.Close() })
	return &engineRig{e: e, id: id, dir: dir, boot: bt}
}

// A session with small blocks has a missing-block bitmap far larger than the block message
// limit; BeginSession and GetState must still reach the client.
func TestLargeBitmapOverSocket(t *testing.T) {
	r := start(t, newBenchEngine(t, 4096), server.Options{}, server.ListenConfig{})
	c := dial(t, r.Sock)
	const size, bs = 64 << 20, 256
	res, err := c.Begin(t.Context(), &otav1.BeginSessionRequest{JobId: "big", FilePath: writertest.Target, FileSize: size, BlockSize: bs,
		SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: fakeSig, CertName: certName})
	if err != nil {
		t.Fatal(err)
	}
	if got, limit := len(res.GetSession().GetMissing()), api.MaxMessageSize(4096); got != size/bs/8 || got <= limit {
		t.Fatalf("bitmap of %d bytes, want %d (above the %d-byte request limit)", got, size/bs/8, limit)
	}
	st, err := c.State(t.Context())
	if err != nil {
		t.Fatal(err)
	}
	if len(st.GetSessions()) != 1 || len(st.GetSessions()[0].GetMissing()) != size/bs/8 {
		t.Errorf("GetState sessions: %d", len(st.GetSessions()))
	}
}

// The whole session through the client, the socket and the real engine: stream, durable
// acks, verification of an ECDSA signature, activation.
func TestEngineSessionOverStream(t *testing.T) {
	eng, signer, dir := newEngineWithKey(t, 4096)
	r := start(t, eng, server.Options{}, server.ListenConfig{})
	c := dial(t, r.Sock)
	ctx := t.Context()
	img := randBytes(t, 75*4096+321)
	sum := sha256.Sum256(img)
	sig, err := signer.Sign(img)
	if err != nil {
		t.Fatal(err)
	}
	begin, err := c.Begin(ctx, &otav1.BeginSessionRequest{JobId: "happy", FilePath: writertest.Target, FileSize: uint64(len(img)), BlockSize: 4096,
		SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: sig, CertName: certName})
	if err != nil {
		t.Fatal(err)
	}
	id := begin.GetSession().GetSessionId()
	st, err := c.OpenBlockStream(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	var last uint64
	for k := 0; k*4096 < len(img); k++ {
		blk := &otav1.Block{Offset: uint64(k * 4096), Data: img[k*4096 : min((k+1)*4096, len(img))]}
		if last, err = st.Send([]*otav1.Block{blk}, k%8 == 7); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := st.Send(nil, true); err != nil {
		t.Fatal(err)
	}
	last++
	st.CloseSend()
	var final *otav1.WriteAck
	for a := range st.Acks() {
		final = a
	}
	if err := st.Wait(); err != nil {
		t.Fatal(err)
	}
	if final.GetDurableSeq() != last || final.GetDurableBlocks() != 76 || final.GetTotalBlocks() != 76 {
		t.Fatalf("final ack %v, want seq %d and 76/76 durable", final, last)
	}
	fin, err := c.Finish(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if fin.GetSha256() != hex.EncodeToString(sum[:]) {
		t.Errorf("read-back sha256 %s, want %x", fin.GetSha256(), sum)
	}
	act, err := c.Activate(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	onSlot, _ := os.ReadFile(filepath.Join(dir, "slot_"+act.GetSlot()))
	if len(onSlot) < len(img) || !bytes.Equal(onSlot[:len(img)], img) {
		t.Error("slot does not hold the image")
	}
	ds, err := c.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ds.GetImageState() != otav1.ImageState_IMAGE_STATE_ACTIVATED {
		t.Errorf("image state %s, want activated", ds.GetImageState())
	}
}

// heldWriter is the engine with a look at the server's held block buffers during each Write.
type heldWriter struct {
	api.Writer
	srv     func() *server.Server
	mu      sync.Mutex
	minHeld int
	writes  int
}

func (w *heldWriter) Write(ctx context.Context, id string, blocks []*otav1.Block, sync bool) (api.WriteResult, error) {
	n := server.HeldBlockBuffers(w.srv())
	w.mu.Lock()
	if w.writes == 0 || n < w.minHeld {
		w.minHeld = n
	}
	w.writes++
	w.mu.Unlock()
	return w.Writer.Write(ctx, id, blocks, sync)
}

// The blocks of a WriteBlocks message are slices of the received buffer (writer/server's
// blockCodec): the buffer is held while the engine writes them and released after every
// call, whether the stream or call succeeded or the engine refused the blocks, so the image
// still arrives whole and nothing accumulates.
func TestBlockBuffersHeldUntilWritten(t *testing.T) {
	eng, signer, dir := newEngineWithKey(t, 64<<10)
	var srv *server.Server
	w := &heldWriter{Writer: eng, srv: func() *server.Server { return srv }}
	r := writertest.ServeWith(t, w, server.Options{}, server.ListenConfig{}, nil, func(s *server.Server, ln net.Listener) error {
		srv = s
		return s.Serve(ln)
	})
	// The blocks inside the messages: what the codec holds is what this test is about (blocks
	// from the shared buffer are copies of the handler's own, TestSharedBufferCopiedBeforeUse).
	c := writertest.DialOptions(t, r.Sock, client.Options{Name: "test", NoSharedBuffer: true})
	ctx := t.Context()
	const bs = 64 << 10
	img := randBytes(t, 40*bs+123)
	sig, err := signer.Sign(img)
	if err != nil {
		t.Fatal(err)
	}
	begin, err := c.Begin(ctx, &otav1.BeginSessionRequest{JobId: "held", FilePath: writertest.Target, FileSize: uint64(len(img)), BlockSize: bs,
		SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: sig, CertName: certName})
	if err != nil {
		t.Fatal(err)
	}
	id := begin.GetSession().GetSessionId()
	block := func(k int) *otav1.Block {
		return &otav1.Block{Offset: uint64(k * bs), Data: img[k*bs : min((k+1)*bs, len(img))]}
	}
	// Blocks 0..29 on a stream, two per message (messages of many HTTP/2 frames).
	st, err := c.OpenBlockStream(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	for k := 0; k < 30; k += 2 {
		if _, err := st.Send([]*otav1.Block{block(k), block(k + 1)}, k%8 == 6); err != nil {
			t.Fatal(err)
		}
	}
	if _, err := st.Send(nil, true); err != nil {
		t.Fatal(err)
	}
	st.CloseSend()
	for range st.Acks() {
	}
	if err := st.Wait(); err != nil {
		t.Fatal(err)
	}
	// A stream the engine refuses (a block of the wrong size), then the rest as unary calls,
	// one of them refused too.
	bad, err := c.OpenBlockStream(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	bad.Send([]*otav1.Block{{Offset: 30 * bs, Data: img[:bs-1]}}, false)
	for range bad.Acks() {
	}
	if err := bad.Wait(); status.ReasonOf(err) != otav1.Reason_REASON_INVALID_REQUEST {
		t.Fatalf("short block on a stream: %v, want invalid_request", err)
	}
	if _, err := c.WriteBatch(ctx, id, 1, []*otav1.Block{{Offset: 1 << 30, Data: img[:bs]}}, false); status.ReasonOf(err) != otav1.Reason_REASON_BLOCK_OUT_OF_RANGE {
		t.Fatalf("block out of range: %v, want block_out_of_range", err)
	}
	for k := 30; k*bs < len(img); k++ {
		if _, err := c.WriteBatch(ctx, id, uint64(k), []*otav1.Block{block(k)}, true); err != nil {
			t.Fatal(err)
		}
	}
	fin, err := c.Finish(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if sum := sha256.Sum256(img); fin.GetSha256() != hex.EncodeToString(sum[:]) {
		t.Errorf("read-back sha256 %s, want %x", fin.GetSha256(), sum)
	}
	act, err := c.Activate(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if onSlot, _ := os.ReadFile(filepath.Join(dir, "slot_"+act.GetSlot())); len(onSlot) < len(img) || !bytes.Equal(onSlot[:len(img)], img) {
		t.Error("slot does not hold the image")
	}
	w.mu.Lock()
	writes, minHeld := w.writes, w.minHeld
	w.mu.Unlock()
	if writes < 20 || minHeld < 1 {
		t.Errorf("%d writes, at least %d buffer held during each: want >= 20 writes, each with its buffer held", writes, minHeld)
	}
	if n := server.HeldBlockBuffers(srv); n != 0 {
		t.Errorf("%d block buffers held after every call returned, want 0", n)
	}
}
