package writertest_test

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/writertest"
)

// The properties the fake's users rely on: durability only at syncs, Crash losing the rest,
// a resume answering what is missing, Finish needing every block, Activate only after it.
func TestFakeResumeAfterCrash(t *testing.T) {
	ctx := t.Context()
	f := writertest.NewFake(4096)
	req := &otav1.BeginSessionRequest{JobId: "j", FilePath: writertest.Target, FileSize: 4*4096 - 10, BlockSize: 4096}
	b, err := f.Begin(ctx, req)
	if err != nil || b.GetResumed() {
		t.Fatalf("begin: %v, resumed %v", err, b.GetResumed())
	}
	id := b.GetSession().GetSessionId()
	blk := func(i int) *otav1.Block {
		return &otav1.Block{Offset: uint64(i) * 4096, Data: make([]byte, min(4096, 4*4096-10-i*4096))}
	}
	if _, err := f.Write(ctx, id, []*otav1.Block{blk(0), blk(2)}, true); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(ctx, id, []*otav1.Block{blk(3)}, false); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Write(ctx, id, []*otav1.Block{{Offset: 4096, Data: make([]byte, 10)}}, false); status.ReasonOf(err) != otav1.Reason_REASON_BLOCK_OUT_OF_RANGE {
		t.Errorf("short block: %v, want block_out_of_range", err)
	}
	f.Crash()
	b, err = f.Begin(ctx, req)
	if err != nil || !b.GetResumed() {
		t.Fatalf("resume: %v, resumed %v", err, b.GetResumed())
	}
	// Blocks 1 and 3 are missing: 3 was never synced.
	if diff := cmp.Diff([]byte{0b1010}, b.GetSession().GetMissing()); diff != "" {
		t.Errorf("missing (-want +got):\n%s", diff)
	}
	if _, err := f.Activate(ctx, id); status.ReasonOf(err) != otav1.Reason_REASON_BAD_FILE_HANDLE {
		t.Errorf("activate before finish: %v, want bad_file_handle", err)
	}
	if _, err := f.Finish(ctx, id); status.ReasonOf(err) != otav1.Reason_REASON_BAD_FILE_HANDLE {
		t.Errorf("finish with blocks missing: %v, want bad_file_handle", err)
	}
	if _, err := f.Write(ctx, id, []*otav1.Block{blk(1), blk(3)}, false); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Finish(ctx, id); err != nil {
		t.Fatal(err)
	}
	if _, err := f.Activate(ctx, id); err != nil {
		t.Fatal(err)
	}
}
