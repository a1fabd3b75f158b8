package hostile

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/hex"
	"fmt"
	"math"
	"os"
	"path/filepath"
	"strings"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

const (
	rBadHandle   = otav1.Reason_REASON_BAD_FILE_HANDLE
	rBadState    = otav1.Reason_REASON_BAD_IMAGE_STATE
	rInvalid     = otav1.Reason_REASON_INVALID_REQUEST
	rTooLarge    = otav1.Reason_REASON_FILE_TOO_LARGE
	rOutOfRange  = otav1.Reason_REASON_BLOCK_OUT_OF_RANGE
	rSigFailed   = otav1.Reason_REASON_SIG_CHECK_FAILED
	rUntrusted   = otav1.Reason_REASON_UNTRUSTED_SIGNER
	rUnsupported = otav1.Reason_REASON_UNSUPPORTED
	rTarget      = otav1.Reason_REASON_TARGET_UNKNOWN
	rBusy        = otav1.Reason_REASON_SESSION_BUSY
	rProtocol    = otav1.Reason_REASON_PROTOCOL_VERSION
	rDenied      = otav1.Reason_REASON_PERMISSION_DENIED
)

// rawWrite sends one WriteBatch without any client-side check.
func rawWrite(ctx context.Context, w otav1.WriterClient, id string, seq uint64, b []*otav1.Block, sync bool) error {
	_, err := w.WriteBatch(ctx, &otav1.WriteBlocksRequest{SessionId: id, Seq: seq, Blocks: b, Sync: sync})
	return err
}

// writeAll writes img in batches of 16 and syncs.
func writeAll(ctx context.Context, w otav1.WriterClient, id string, img []byte) error {
	n := (len(img) + blockSize - 1) / blockSize
	for k := 0; k < n; k += 16 {
		if err := rawWrite(ctx, w, id, uint64(k+1), blocks(img, k, k+16), k+16 >= n); err != nil {
			return err
		}
	}
	return nil
}

func begin(t *testing.T, ctx context.Context, w otav1.WriterClient, req *otav1.BeginSessionRequest) string {
	t.Helper()
	r, err := w.BeginSession(ctx, req)
	if err != nil {
		t.Fatalf("begin %s: %v", req.GetJobId(), err)
	}
	return r.GetSession().GetSessionId()
}

func abort(ctx context.Context, w otav1.WriterClient, id string) {
	w.AbortSession(ctx, &otav1.AbortSessionRequest{SessionId: id, Reason: otav1.Reason_REASON_USER_ABORT})
}

// noActivation: nothing the attacks did may have armed a slot for the next boot.
func noActivation(t *testing.T, w *writer, s *summary) {
	t.Helper()
	if p := w.pending(t); p != "" {
		s.failed(t, "slot %s is activated for the next boot", p)
	}
}

func outOfOrder(t *testing.T, ctx context.Context, w *writer, s *summary, n int) {
	const cat = "out_of_order"
	c := w.client(t).Raw()
	_, err := c.Handshake(ctx, &otav1.HandshakeRequest{})
	expect(t, s, cat, "handshake without version", err, rProtocol)
	_, err = c.Handshake(ctx, &otav1.HandshakeRequest{ProtocolVersion: 99})
	expect(t, s, cat, "handshake of a future version", err, rProtocol)

	id := begin(t, ctx, c, w.beginReq("ooo-1"))
	_, err = c.Activate(ctx, &otav1.ActivateRequest{SessionId: id})
	expect(t, s, cat, "activate before any block", err, rBadState)
	_, err = c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id})
	expect(t, s, cat, "finish before any block", err, rBadHandle)
	if err := rawWrite(ctx, c, id, 1, blocks(w.image, 0, 3), true); err != nil {
		t.Fatal(err)
	}
	_, err = c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id})
	expect(t, s, cat, "finish with blocks missing", err, rBadHandle)
	_, err = c.Activate(ctx, &otav1.ActivateRequest{SessionId: id})
	expect(t, s, cat, "activate a receiving session", err, rBadState)
	_, err = c.Commit(ctx, &otav1.CommitRequest{})
	expect(t, s, cat, "commit outside a trial", err, rBadState)
	_, err = c.Commit(ctx, &otav1.CommitRequest{JobId: "ooo-1"})
	expect(t, s, cat, "commit of the job being written", err, rBadState)
	_, err = c.Reject(ctx, &otav1.RejectRequest{JobId: "ooo-1"})
	expect(t, s, cat, "reject outside a trial", err, rBadState)
	_, err = c.SelfTest(ctx, &otav1.SelfTestRequest{JobId: "ooo-1"})
	expect(t, s, cat, "self test outside a trial", err, rBadState)
	_, err = c.Reboot(ctx, &otav1.RebootRequest{})
	expect(t, s, cat, "reboot without activation", err, rBadState)
	_, err = c.BeginSession(ctx, w.beginReq("ooo-2"))
	expect(t, s, cat, "begin another job on a busy target", err, rBusy)

	// Stream order: seq must increase, one session per stream.
	for _, tc := range []struct {
		what string
		reqs []*otav1.WriteBlocksRequest
	}{
		{"stream seq going back", []*otav1.WriteBlocksRequest{{SessionId: id, Seq: 5, Blocks: blocks(w.image, 3, 4)}, {SessionId: id, Seq: 5, Blocks: blocks(w.image, 4, 5)}}},
		{"stream switching sessions", []*otav1.WriteBlocksRequest{{SessionId: id, Seq: 1}, {SessionId: "other", Seq: 2}}},
	} {
		st, err := c.WriteBlocks(ctx)
		if err != nil {
			t.Fatal(err)
		}
		for _, r := range tc.reqs {
			if err := st.Send(r); err != nil {
				break
			}
		}
		st.CloseSend()
		var rerr error
		for rerr == nil {
			_, rerr = st.Recv()
		}
		expect(t, s, cat, tc.what, rerr, rInvalid)
	}

	// After verification the session takes no more blocks; after abort it is gone.
	if err := writeAll(ctx, c, id, w.image); err != nil {
		t.Fatal(err)
	}
	if _, err := c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id}); err != nil {
		t.Fatalf("finish: %v", err)
	}
	err = rawWrite(ctx, c, id, 99, blocks(w.image, 0, 1), true)
	expect(t, s, cat, "write after verification", err, rBadHandle)
	if _, err := c.AbortSession(ctx, &otav1.AbortSessionRequest{SessionId: id}); err != nil {
		t.Fatal(err)
	}
	_, err = c.AbortSession(ctx, &otav1.AbortSessionRequest{SessionId: id})
	expect(t, s, cat, "abort twice", err, rBadHandle)
	_, err = c.Activate(ctx, &otav1.ActivateRequest{SessionId: id})
	expect(t, s, cat, "activate an aborted session", err, rBadHandle)
	err = rawWrite(ctx, c, id, 100, blocks(w.image, 0, 1), false)
	expect(t, s, cat, "write to an aborted session", err, rBadHandle)
	_, err = c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id})
	expect(t, s, cat, "finish an aborted session", err, rBadHandle)
	noActivation(t, w, s)
}

func sizesAndOffsets(t *testing.T, ctx context.Context, w *writer, s *summary, n int) {
	const cat = "sizes_offsets"
	c := w.client(t).Raw()
	for _, tc := range []struct {
		what string
		mod  func(r *otav1.BeginSessionRequest)
		want []otav1.Reason
	}{
		{"file size 0", func(r *otav1.BeginSessionRequest) { r.FileSize = 0 }, []otav1.Reason{rInvalid}},
		{"file size 2^64-1", func(r *otav1.BeginSessionRequest) { r.FileSize = 1<<64 - 1 }, []otav1.Reason{rTooLarge}},
		{"file size 2^62+1", func(r *otav1.BeginSessionRequest) { r.FileSize = 1<<62 + 1 }, []otav1.Reason{rTooLarge}},
		{"file size max_size+1", func(r *otav1.BeginSessionRequest) { r.FileSize = slotMax + 1 }, []otav1.Reason{rTooLarge}},
		{"block size 0", func(r *otav1.BeginSessionRequest) { r.BlockSize = 0 }, []otav1.Reason{rInvalid}},
		{"block size 1", func(r *otav1.BeginSessionRequest) { r.BlockSize = 1 }, []otav1.Reason{rInvalid}},
		{"block size 255", func(r *otav1.BeginSessionRequest) { r.BlockSize = 255 }, []otav1.Reason{rInvalid}},
		{"block size max+1", func(r *otav1.BeginSessionRequest) { r.BlockSize = 131073 }, []otav1.Reason{rInvalid}},
		{"block size 2^32-1", func(r *otav1.BeginSessionRequest) { r.BlockSize = 1<<32 - 1 }, []otav1.Reason{rInvalid}},
		{"signature of 2000 bytes", func(r *otav1.BeginSessionRequest) { r.Signature = make([]byte, 2000) }, []otav1.Reason{rInvalid}},
		{"signature of 1 MiB", func(r *otav1.BeginSessionRequest) { r.Signature = make([]byte, 1<<20) }, []otav1.Reason{rInvalid}},
		{"empty job id", func(r *otav1.BeginSessionRequest) { r.JobId = "" }, []otav1.Reason{rInvalid}},
		{"job id of 65", func(r *otav1.BeginSessionRequest) { r.JobId = strings.Repeat("j", 65) }, []otav1.Reason{rInvalid}},
		{"job id with NUL", func(r *otav1.BeginSessionRequest) { r.JobId = "job\x00" }, []otav1.Reason{rInvalid}},
		{"version with a slash", func(r *otav1.BeginSessionRequest) { r.Version = "1/2" }, []otav1.Reason{rInvalid}},
		{"version of 100", func(r *otav1.BeginSessionRequest) { r.Version = strings.Repeat("1", 100) }, []otav1.Reason{rInvalid}},
		{"cert name of 300", func(r *otav1.BeginSessionRequest) { r.CertName = strings.Repeat("c", 300) }, []otav1.Reason{rInvalid}},
		{"file path of 5000", func(r *otav1.BeginSessionRequest) { r.FilePath = strings.Repeat("/x", 2500) }, []otav1.Reason{rInvalid}},
	} {
		req := w.beginReq("sizes-begin")
		tc.mod(req)
		_, err := c.BeginSession(ctx, req)
		expect(t, s, cat, tc.what, err, tc.want...)
	}

	// A session that takes hostile blocks, then the real ones: a refused batch loses
	// nothing and writes nothing.
	id := begin(t, ctx, c, w.beginReq("sizes-1"))
	defer abort(ctx, c, id)
	last := uint64((nBlocks() - 1) * blockSize)
	good := w.image[:blockSize]
	for _, tc := range []struct {
		what string
		b    []*otav1.Block
		want otav1.Reason
	}{
		{"offset not on a block", []*otav1.Block{{Offset: 1, Data: good}}, rOutOfRange},
		{"offset at the file size", []*otav1.Block{{Offset: imageSize, Data: good}}, rOutOfRange},
		{"offset past the end, aligned", []*otav1.Block{{Offset: last + blockSize, Data: good}}, rOutOfRange},
		{"offset 2^64-block (overflowing end)", []*otav1.Block{{Offset: math.MaxUint64 - blockSize + 1, Data: good}}, rOutOfRange},
		{"offset 2^63", []*otav1.Block{{Offset: 1 << 63, Data: good}}, rOutOfRange},
		{"empty block", []*otav1.Block{{Offset: 0}}, rInvalid},
		{"short block", []*otav1.Block{{Offset: 0, Data: good[:blockSize-1]}}, rInvalid},
		{"long block", []*otav1.Block{{Offset: 0, Data: append(bytes.Clone(good), 0)}}, rInvalid},
		{"full-size last block", []*otav1.Block{{Offset: last, Data: good}}, rInvalid},
		{"good block then a bad one", []*otav1.Block{{Offset: 0, Data: good}, {Offset: 3, Data: good}}, rOutOfRange},
		{"257 blocks in one message", manyBlocks(257), rInvalid},
		{"1 MiB block", []*otav1.Block{{Offset: 0, Data: make([]byte, 1<<20)}}, rInvalid},
		{"4 MiB message", []*otav1.Block{{Offset: 0, Data: make([]byte, 4<<20)}}, rInvalid},
	} {
		err := rawWrite(ctx, c, id, 1, tc.b, true)
		expect(t, s, cat, tc.what, err, tc.want)
	}
	st, err := c.GetState(ctx, &otav1.GetStateRequest{})
	if err != nil {
		t.Fatal(err)
	}
	for _, ss := range st.GetSessions() {
		if ss.GetSessionId() == id && ss.GetDurableBlocks() != 0 {
			s.failed(t, "refused batches left %d blocks durable", ss.GetDurableBlocks())
		}
	}
	// The same session then takes the real image and verifies it.
	if err := writeAll(ctx, c, id, w.image); err != nil {
		s.failed(t, "real blocks after refusals: %v", err)
		return
	}
	if _, err := c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id}); err != nil {
		s.failed(t, "finish after refusals: %v", err)
	}
	noActivation(t, w, s)
}

// slotHolds reports whether slot b starts with img.
func (w *writer) slotHolds(img []byte) bool {
	b, err := os.ReadFile(w.slotB)
	return err == nil && len(b) >= len(img) && bytes.Equal(b[:len(img)], img)
}

func overlappingBlocks(t *testing.T, ctx context.Context, w *writer, s *summary, n int) {
	const cat = "overlapping_blocks"
	c := w.client(t).Raw()
	evil := bytes.Clone(w.image[:blockSize])
	evil[100] ^= 0x55

	// A corrupted block 5 first, the real one after: the first write stands (blocks are
	// idempotent), so verification fails and the session is gone.
	id := begin(t, ctx, c, w.beginReq("overlap-1"))
	s.tried(cat, 1)
	if err := rawWrite(ctx, c, id, 1, []*otav1.Block{{Offset: 5 * blockSize, Data: evil}}, true); err != nil {
		t.Fatal(err)
	}
	if err := writeAll(ctx, c, id, w.image); err != nil {
		t.Fatal(err)
	}
	_, err := c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id})
	expect(t, s, cat, "verify with a corrupted block written first", err, rSigFailed)
	_, err = c.Activate(ctx, &otav1.ActivateRequest{SessionId: id})
	expect(t, s, cat, "activate after a failed verification", err, rBadHandle)

	// The real block first, then other contents for the same offset, in one batch and in
	// later batches, in every block: none lands, the image verifies as signed.
	id = begin(t, ctx, c, w.beginReq("overlap-2"))
	for k := 0; k < nBlocks(); k += 8 {
		var batch []*otav1.Block
		for _, b := range blocks(w.image, k, k+8) {
			bad := bytes.Clone(b.Data)
			bad[0] ^= 0xFF
			batch = append(batch, b, &otav1.Block{Offset: b.Offset, Data: bad})
		}
		if err := rawWrite(ctx, c, id, uint64(k+1), batch, false); err != nil {
			s.failed(t, "batch with duplicates: %v", err)
		}
		s.tried(cat, len(batch)/2)
	}
	for k := 0; k < nBlocks(); k++ {
		bad := bytes.Clone(blocks(w.image, k, k+1)[0].Data)
		bad[len(bad)-1] ^= 0x01
		if err := rawWrite(ctx, c, id, uint64(100+k), []*otav1.Block{{Offset: uint64(k * blockSize), Data: bad}}, k == nBlocks()-1); err != nil {
			s.failed(t, "rewrite of block %d: %v", k, err)
		}
		s.tried(cat, 1)
	}
	fin, err := c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id})
	if err != nil {
		s.failed(t, "finish after overlapping writes: %v", err)
	} else if !w.slotHolds(w.image) {
		s.failed(t, "verified (%s) but slot b does not hold the signed image", fin.GetSha256())
	}
	abort(ctx, c, id)
	noActivation(t, w, s)
}

func sessionIDs(t *testing.T, ctx context.Context, w *writer, s *summary, n int) {
	const cat = "session_ids"
	c := w.client(t).Raw()
	live := begin(t, ctx, c, w.beginReq("ids-1"))
	defer abort(ctx, c, live)
	stale := begin(t, ctx, c, &otav1.BeginSessionRequest{JobId: "ids-stale", FileType: ptr(int32(1)), FileSize: 1000, BlockSize: 256,
		SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: w.sig, CertName: w.trusted.CertName})
	abort(ctx, c, stale)

	ids := []string{stale, "", strings.ToUpper(live), live + "0", live[:31], live[1:] + live[:1], strings.Repeat("0", 32),
		"../../state/sessions/rootfs", strings.Repeat("a", 10<<10), "\x00", "🙂"}
	flipped := []byte(live)
	flipped[7] ^= 1
	ids = append(ids, string(flipped))
	for range 100 * n {
		var b [16]byte
		rand.Read(b[:])
		ids = append(ids, hex.EncodeToString(b[:]))
	}
	for _, id := range ids {
		if id == live {
			continue
		}
		label := fmt.Sprintf("id %.40q", id)
		err := rawWrite(ctx, c, id, 1, blocks(w.image, 0, 1), true)
		expect(t, s, cat, "write with "+label, err, rBadHandle)
		_, err = c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id})
		expect(t, s, cat, "finish with "+label, err, rBadHandle)
		_, err = c.Activate(ctx, &otav1.ActivateRequest{SessionId: id})
		expect(t, s, cat, "activate with "+label, err, rBadHandle)
		_, err = c.AbortSession(ctx, &otav1.AbortSessionRequest{SessionId: id})
		expect(t, s, cat, "abort with "+label, err, rBadHandle)
	}
	// The live session was not disturbed by any of it.
	st, err := c.GetState(ctx, &otav1.GetStateRequest{})
	if err != nil {
		t.Fatal(err)
	}
	found := false
	for _, ss := range st.GetSessions() {
		found = found || ss.GetSessionId() == live
	}
	if !found {
		s.failed(t, "the live session is gone after the guesses")
	}
	noActivation(t, w, s)
}

func ptr[T any](v T) *T { return &v }

func manyBlocks(n int) []*otav1.Block {
	out := make([]*otav1.Block, n)
	for i := range out {
		out[i] = &otav1.Block{Offset: uint64(i * blockSize)}
	}
	return out
}

func untrustedKeys(t *testing.T, ctx context.Context, w *writer, s *summary, n int) {
	const cat = "untrusted_keys"
	c := w.client(t).Raw()
	for _, tc := range []struct {
		what string
		mod  func(r *otav1.BeginSessionRequest)
		want otav1.Reason
	}{
		{"certificate not in the trust store", func(r *otav1.BeginSessionRequest) { r.CertName, r.Signature = w.evil.CertName, w.evilSig }, rUntrusted},
		{"untrusted signer's common name", func(r *otav1.BeginSessionRequest) { r.CertName, r.Signature = "evil-signer", w.evilSig }, rUntrusted},
		{"RSA algorithm for an ECDSA key", func(r *otav1.BeginSessionRequest) {
			r.SigAlgorithm = otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256
		}, rUntrusted},
		{"Ed25519 algorithm for an ECDSA key", func(r *otav1.BeginSessionRequest) {
			r.SigAlgorithm = otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256
		}, rUntrusted},
		{"SHA-1 not allowed", func(r *otav1.BeginSessionRequest) { r.SigAlgorithm = otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1 }, rUnsupported},
		{"unknown algorithm", func(r *otav1.BeginSessionRequest) { r.SigAlgorithm = 99 }, rUnsupported},
		{"no algorithm", func(r *otav1.BeginSessionRequest) { r.SigAlgorithm = 0 }, rUnsupported},
		{"no signature", func(r *otav1.BeginSessionRequest) { r.Signature = nil }, rSigFailed},
	} {
		req := w.beginReq("untrusted-begin")
		tc.mod(req)
		_, err := c.BeginSession(ctx, req)
		expect(t, s, cat, tc.what, err, tc.want)
	}
	// Naming no certificate at all is refused at once: the writer does not pick "any
	// trusted key" unless its configuration says so.
	{
		req := w.beginReq("untrusted-sig")
		req.CertName, req.Signature = "", w.evilSig
		_, err := c.BeginSession(ctx, req)
		expect(t, s, cat, "attacker's signature with no cert name", err, rUntrusted)
	}
	// Signed by the attacker but naming the trusted certificate (or an unknown one): the whole
	// image is taken, verification against the trust store fails, nothing is activated.
	for _, cert := range []string{w.trusted.CertName, "hostile-signer"} {
		req := w.beginReq("untrusted-sig")
		req.CertName, req.Signature = cert, w.evilSig
		id := begin(t, ctx, c, req)
		if err := writeAll(ctx, c, id, w.image); err != nil {
			t.Fatal(err)
		}
		_, err := c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id})
		expect(t, s, cat, fmt.Sprintf("attacker's signature with cert %q", cert), err, rSigFailed)
		_, err = c.Activate(ctx, &otav1.ActivateRequest{SessionId: id})
		expect(t, s, cat, "activate after it", err, rBadHandle)
	}
	// A valid signature of another image.
	other := bytes.Clone(w.image)
	other[len(other)-1] ^= 1
	id := begin(t, ctx, c, w.beginReq("untrusted-other"))
	if err := writeAll(ctx, c, id, other); err != nil {
		t.Fatal(err)
	}
	_, err := c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id})
	expect(t, s, cat, "trusted signature of another image", err, rSigFailed)
	noActivation(t, w, s)
}

func pathTraversal(t *testing.T, ctx context.Context, w *writer, s *summary, n int) {
	const cat = "path_traversal"
	c := w.client(t).Raw()
	before := snapshot(t, w.dir)
	passwd, _ := os.Stat("/etc/passwd")

	// Certificate names: the trust store is the configuration's files, selected by name;
	// a path never opens a file.
	for _, cert := range []string{"../../../../etc/passwd", "/etc/shadow", "/etc/ssl/certs/ca-certificates.crt",
		filepath.Join(w.attackerDir, w.evil.CertName), "../attacker/" + w.evil.CertName, "..", ".", "/", "\x00", "keys/../../etc/passwd"} {
		req := w.beginReq("traversal-cert")
		req.CertName, req.Signature = cert, w.evilSig
		_, err := c.BeginSession(ctx, req)
		expect(t, s, cat, fmt.Sprintf("cert name %q", cert), err, rUntrusted)
	}
	// A path whose base name is the trusted certificate's, pointing at the attacker's copy:
	// it selects the configured key, never the file, so the attacker's signature fails.
	for _, cert := range []string{filepath.Join(w.attackerDir, w.trusted.CertName), "../../../../" + w.attackerDir + "/" + w.trusted.CertName} {
		req := w.beginReq("traversal-cert2")
		req.CertName, req.Signature = cert, w.evilSig
		id := begin(t, ctx, c, req)
		if err := writeAll(ctx, c, id, w.image); err != nil {
			t.Fatal(err)
		}
		_, err := c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id})
		expect(t, s, cat, fmt.Sprintf("cert path %q to the attacker's copy", cert), err, rSigFailed)
	}
	// Target selection: only exact configured file types and paths.
	for _, fp := range []string{"../../../../etc/passwd", "/opt/fw/../fw/gateway.img", "/opt/fw/gateway.img/", "/opt/fw/gateway.img\x00",
		"/opt/fw//gateway.img", w.appDest, w.slotB, "/dev/sda", "rootfs", "app", "/OPT/FW/GATEWAY.IMG"} {
		req := w.beginReq("traversal-path")
		req.FileType = nil
		req.FilePath = fp
		_, err := c.BeginSession(ctx, req)
		expect(t, s, cat, fmt.Sprintf("file path %q", fp), err, rTarget)
	}
	for _, ft := range []int32{-1, 2, 7, 1 << 30, -1 << 31} {
		req := w.beginReq("traversal-type")
		req.FileType, req.FilePath = ptr(ft), ""
		_, err := c.BeginSession(ctx, req)
		expect(t, s, cat, fmt.Sprintf("file type %d", ft), err, rTarget)
	}
	req := w.beginReq("traversal-mix")
	req.FileType = ptr(int32(1)) // selects app, the path selects rootfs
	_, err := c.BeginSession(ctx, req)
	expect(t, s, cat, "file type and path disagree", err, rTarget)
	for _, job := range []string{"../../state/sessions/rootfs", "..", "a/b", "job\\x"} {
		req := w.beginReq(job)
		_, err := c.BeginSession(ctx, req)
		expect(t, s, cat, fmt.Sprintf("job id %q", job), err, rInvalid)
	}
	// Nothing appeared or changed outside the writer's own state and slot b.
	after := snapshot(t, w.dir)
	for p, m := range after {
		if strings.HasPrefix(p, w.stateDir) || p == w.slotB || p == w.log {
			continue
		}
		if bm, ok := before[p]; !ok || bm != m {
			s.failed(t, "%s appeared or changed", p)
		}
	}
	if p2, _ := os.Stat("/etc/passwd"); passwd != nil && (p2 == nil || !p2.ModTime().Equal(passwd.ModTime())) {
		s.failed(t, "/etc/passwd changed")
	}
	noActivation(t, w, s)
}

// snapshot maps every file under dir to its size and modification time.
func snapshot(t *testing.T, dir string) map[string]string {
	t.Helper()
	out := map[string]string{}
	filepath.Walk(dir, func(p string, fi os.FileInfo, err error) error {
		if err == nil && !fi.IsDir() {
			out[p] = fmt.Sprintf("%d %d", fi.Size(), fi.ModTime().UnixNano())
		}
		return nil
	})
	return out
}

func beginAbortCycles(t *testing.T, ctx context.Context, w *writer, s *summary, n int) {
	const cat = "begin_abort_cycles"
	c := w.client(t).Raw()
	if _, err := c.GetState(ctx, &otav1.GetStateRequest{}); err != nil { // connected
		t.Fatal(err)
	}
	_, _, fds0 := w.procStatus(t)
	cycles := 1000 * n
	for i := range cycles {
		var req *otav1.BeginSessionRequest
		if i%2 == 0 {
			req = w.beginReq(fmt.Sprintf("cycle-%d", i))
		} else {
			req = &otav1.BeginSessionRequest{JobId: fmt.Sprintf("cycle-%d", i), FileType: ptr(int32(1)), FileSize: uint64(len(w.image)), BlockSize: blockSize,
				SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: w.sig, CertName: w.trusted.CertName}
		}
		r, err := c.BeginSession(ctx, req)
		if err != nil {
			s.failed(t, "cycle %d: begin: %v", i, err)
			return
		}
		if i%10 == 0 { // a block now and then, so an abort has something to drop
			if err := rawWrite(ctx, c, r.GetSession().GetSessionId(), 1, blocks(w.image, 0, 1), i%20 == 0); err != nil {
				s.failed(t, "cycle %d: write: %v", i, err)
			}
		}
		if _, err := c.AbortSession(ctx, &otav1.AbortSessionRequest{SessionId: r.GetSession().GetSessionId(), Reason: otav1.Reason(i)}); err != nil {
			s.failed(t, "cycle %d: abort: %v", i, err)
			return
		}
		s.tried(cat, 1)
	}
	st, err := c.GetState(ctx, &otav1.GetStateRequest{})
	if err != nil {
		t.Fatal(err)
	}
	if len(st.GetSessions()) != 0 {
		s.failed(t, "%d sessions left after %d begin/abort cycles", len(st.GetSessions()), cycles)
	}
	if ents, _ := os.ReadDir(filepath.Join(w.stateDir, "sessions")); len(ents) != 0 {
		s.failed(t, "journal keeps %d files", len(ents))
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(w.appDest), ".bundle.tar.ota-new")); err == nil {
		s.failed(t, "file target's temporary file left behind")
	}
	if _, _, fds := w.procStatus(t); fds > fds0 {
		s.failed(t, "%d open files after the cycles, %d before", fds, fds0)
	}
	noActivation(t, w, s)
}
