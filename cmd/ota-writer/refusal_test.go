package main

import (
	"bytes"
	"os"
	"strings"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/writertest"

	"github.com/gwota/gwota/test/testenv"
)

// Every hostile or out-of-order request against a real writer process is refused with its
// typed reason, nothing is activated, and the writer keeps serving.
func TestRefusals(t *testing.T) {
	b := newBench(t, "")
	b.serve(t)
	c := writertest.Dial(t, b.sock)
	ctx := t.Context()
	const n = 8
	imgPath, sig := b.image(t, "img", n*testMaxBlock-10)
	img, _ := os.ReadFile(imgPath)

	open := func(t *testing.T, job string, s []byte) string {
		t.Helper()
		req := beginReq(len(img), s)
		req.JobId = job
		r, err := c.Begin(ctx, req)
		if err != nil {
			t.Fatal(err)
		}
		return r.GetSession().GetSessionId()
	}
	writeAll := func(t *testing.T, id string) {
		t.Helper()
		for k := range n {
			if _, err := c.WriteBatch(ctx, id, uint64(k+1), blocksOf(img, testMaxBlock, k, k+1), k == n-1); err != nil {
				t.Fatal(err)
			}
		}
	}
	abort := func(id string) { c.Abort(ctx, id, otav1.Reason_REASON_USER_ABORT) }

	tests := []struct {
		name string
		do   func(t *testing.T) error
		want otav1.Reason
	}{
		{"unknown target", func(t *testing.T) error {
			req := beginReq(len(img), sig)
			req.FilePath = "/not/configured"
			_, err := c.Begin(ctx, req)
			return err
		}, otav1.Reason_REASON_TARGET_UNKNOWN},
		{"image larger than max_size", func(t *testing.T) error {
			req := beginReq(2<<20, sig)
			req.JobId = "big"
			_, err := c.Begin(ctx, req)
			return err
		}, otav1.Reason_REASON_FILE_TOO_LARGE},
		{"offset not on a block boundary", func(t *testing.T) error {
			id := open(t, "j-unaligned", sig)
			defer abort(id)
			_, err := c.WriteBatch(ctx, id, 1, []*otav1.Block{{Offset: 100, Data: img[:testMaxBlock]}}, false)
			return err
		}, otav1.Reason_REASON_BLOCK_OUT_OF_RANGE},
		{"block index past the end", func(t *testing.T) error {
			id := open(t, "j-past", sig)
			defer abort(id)
			_, err := c.WriteBatch(ctx, id, 1, []*otav1.Block{{Offset: n * testMaxBlock, Data: img[:testMaxBlock]}}, false)
			return err
		}, otav1.Reason_REASON_BLOCK_OUT_OF_RANGE},
		{"negative offset (as uint64 from a hostile peer)", func(t *testing.T) error {
			id := open(t, "j-neg", sig)
			defer abort(id)
			neg := int64(-testMaxBlock)
			_, err := c.WriteBatch(ctx, id, 1, []*otav1.Block{{Offset: uint64(neg), Data: img[:testMaxBlock]}}, false)
			return err
		}, otav1.Reason_REASON_BLOCK_OUT_OF_RANGE},
		{"short block that is not the last", func(t *testing.T) error {
			id := open(t, "j-short", sig)
			defer abort(id)
			_, err := c.WriteBatch(ctx, id, 1, []*otav1.Block{{Offset: 0, Data: img[:100]}}, false)
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST},
		{"long block", func(t *testing.T) error {
			id := open(t, "j-long", sig)
			defer abort(id)
			_, err := c.WriteBatch(ctx, id, 1, []*otav1.Block{{Offset: 0, Data: make([]byte, testMaxBlock+1)}}, false)
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST},
		{"block size above the maximum", func(t *testing.T) error {
			req := beginReq(len(img), sig)
			req.JobId, req.BlockSize = "j-bs", testMaxBlock*2
			_, err := c.Begin(ctx, req)
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST},
		{"write to an unknown session", func(t *testing.T) error {
			_, err := c.WriteBatch(ctx, "no-such-session", 1, blocksOf(img, testMaxBlock, 0, 1), false)
			return err
		}, otav1.Reason_REASON_BAD_FILE_HANDLE},
		{"finish with blocks missing", func(t *testing.T) error {
			id := open(t, "j-missing", sig)
			defer abort(id)
			_, err := c.Finish(ctx, id)
			return err
		}, otav1.Reason_REASON_BAD_FILE_HANDLE},
		{"activate before finish", func(t *testing.T) error {
			id := open(t, "j-early", sig)
			defer abort(id)
			writeAll(t, id)
			_, err := c.Activate(ctx, id)
			return err
		}, otav1.Reason_REASON_BAD_IMAGE_STATE},
		{"commit outside a trial", func(t *testing.T) error {
			_, err := c.Commit(ctx, "")
			return err
		}, otav1.Reason_REASON_BAD_IMAGE_STATE},
		{"wrong signature", func(t *testing.T) error {
			bad := bytes.Clone(sig)
			bad[len(bad)-1] ^= 1
			id := open(t, "j-badsig", bad)
			defer abort(id)
			writeAll(t, id)
			_, err := c.Finish(ctx, id)
			if err == nil {
				return nil
			}
			// Not verified, so not activatable.
			if _, aerr := c.Activate(ctx, id); aerr == nil {
				t.Error("activated a session whose signature failed")
			}
			return err
		}, otav1.Reason_REASON_SIG_CHECK_FAILED},
		{"corrupted block", func(t *testing.T) error {
			id := open(t, "j-corrupt", sig)
			defer abort(id)
			blocks := blocksOf(bytes.Clone(img), testMaxBlock, 0, n)
			blocks[3].Data[17] ^= 0x40
			for k, b := range blocks {
				if _, err := c.WriteBatch(ctx, id, uint64(k+1), []*otav1.Block{b}, k == n-1); err != nil {
					t.Fatal(err)
				}
			}
			_, err := c.Finish(ctx, id)
			if _, aerr := c.Activate(ctx, id); aerr == nil {
				t.Error("activated a corrupted image")
			}
			return err
		}, otav1.Reason_REASON_SIG_CHECK_FAILED},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.do(t)
			if err == nil {
				t.Fatalf("accepted, want %s", tt.want)
			}
			reasonIs(t, err, tt.want)
			st, err := c.State(ctx)
			if err != nil {
				t.Fatalf("writer not serving after the refusal: %v", err)
			}
			if st.GetImageState() != otav1.ImageState_IMAGE_STATE_NORMAL {
				t.Errorf("image state %s after a refusal, want normal", st.GetImageState())
			}
		})
	}
}

// The writer closes the connection of a uid that is not configured, before grpc answers
// anything: the CLI tells that from a missing writer (permission_denied, not
// writer_unavailable) and the writer logs who.
func TestForeignUIDRefused(t *testing.T) {
	testenv.NeedRoot(t, "to connect under a uid the writer does not allow")
	b := newBench(t, "")
	os.Chmod(b.dir, 0o755)
	w := b.serve(t)
	writertest.Dial(t, b.sock) // up
	os.Chmod(b.sock, 0o666)
	cmd := cliAs(65534, "status", "--socket", b.sock)
	out, _ := cmd.CombinedOutput()
	t.Logf("status as uid 65534:\n%s", out)
	if cmd.ProcessState.ExitCode() != exitFailed || !strings.Contains(string(out), "reason: permission_denied/3002") ||
		!strings.Contains(string(out), "does not allow uid 65534") {
		t.Errorf("status as uid 65534: exit %d\n%s\nwant exit %d with permission_denied/3002 naming the uid", cmd.ProcessState.ExitCode(), out, exitFailed)
	}
	w.stop(t)
	if !strings.Contains(w.logs.String(), "connection refused: uid not allowed") || !strings.Contains(w.logs.String(), "uid=65534") {
		t.Errorf("writer did not log the refusal with the uid:\n%s", w.logs.String())
	}
}
