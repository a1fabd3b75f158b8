package engine

import (
	"os"
	"path/filepath"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/test/tinyfs"
	"github.com/gwota/gwota/writer/config"
)

// TestStateDirFull: the state directory (journal, record, boot state) on a real tmpfs that
// fills up. Every save that finds no space answers storage_full, not file_write_failed or
// other, loses nothing already durable, and the writer goes on once space is freed.
func TestStateDirFull(t *testing.T) {
	state := tinyfs.Tmpfs(t, 256<<10)
	r := newRig(t, func(c *config.Config) { c.StateDir = state })
	img := newImage(t, 64<<10)
	b, err := r.begin(img, 0, nil)
	if err != nil {
		t.Fatal(err)
	}
	id := b.Session.SessionId
	if _, err := r.e.Write(ctx, id, blocks(img.data, 4096, 0, 8), true); err != nil {
		t.Fatal(err)
	}

	// A journal save at a sync.
	tinyfs.Fill(t, state)
	_, err = r.e.Write(ctx, id, blocks(img.data, 4096, 8, 16), true)
	wantReason(t, err, otav1.Reason_REASON_STORAGE_FULL)
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	if got := st.Sessions[0].DurableBlocks; got != 8 {
		t.Fatalf("durable blocks after the failed save: %d, want the 8 saved before", got)
	}
	// A journal save at Begin (another target).
	app := newImage(t, 8<<10)
	_, err = r.begin(app, 1, func(q *otav1.BeginSessionRequest) { q.JobId = "job-app" })
	wantReason(t, err, otav1.Reason_REASON_STORAGE_FULL)

	tinyfs.Free(t, state)
	writeAll(t, r, id, img, 4096)
	if _, err := r.e.Finish(ctx, id); err != nil {
		t.Fatal(err)
	}

	// The record save at activation: nothing is switched.
	tinyfs.Fill(t, state)
	_, err = r.e.Activate(ctx, id)
	wantReason(t, err, otav1.Reason_REASON_STORAGE_FULL)
	if bs, _ := r.boot.State(ctx); bs.Pending != "" {
		t.Fatalf("boot state after the failed activation: %+v, want nothing pending", bs)
	}
	tinyfs.Free(t, state)
	if _, err := r.e.Activate(ctx, id); err != nil {
		t.Fatalf("activation once space is free: %v", err)
	}
}

// TestMediaFull: a slot file or a file target's directory on a full filesystem refuses the
// image at Begin with storage_full: the space is reserved before any block is written.
func TestMediaFull(t *testing.T) {
	media := tinyfs.Tmpfs(t, 256<<10)
	slots := [2]string{filepath.Join(media, "slot-a.img"), filepath.Join(media, "slot-b.img")}
	for _, p := range slots {
		if err := os.WriteFile(p, nil, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	r := newRig(t, func(c *config.Config) {
		c.Targets[0].Slots = slots[:]
		c.Targets[1].Path = filepath.Join(media, "bundle.tar")
	})
	tinyfs.Fill(t, media)
	img := newImage(t, 64<<10)
	_, err := r.begin(img, 0, nil)
	wantReason(t, err, otav1.Reason_REASON_STORAGE_FULL)
	_, err = r.begin(img, 1, func(q *otav1.BeginSessionRequest) { q.JobId = "job-app" })
	wantReason(t, err, otav1.Reason_REASON_STORAGE_FULL)
}
