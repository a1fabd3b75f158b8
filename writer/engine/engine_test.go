package engine

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"os"
	"path/filepath"
	"sync"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/protobuf/testing/protocmp"

	"github.com/gwota/gwota/internal/bitmap"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/config"
)

var ctx = context.Background()

func slotContent(t *testing.T, p string, n int) []byte {
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b[:n]
}

// writeAll writes every block in batches of 8 and syncs at the end.
func writeAll(t *testing.T, r *rig, id string, img image, bs int) {
	t.Helper()
	n := (len(img.data) + bs - 1) / bs
	for k := 0; k < n; k += 8 {
		if _, err := r.e.Write(ctx, id, blocks(img.data, bs, k, k+8), false); err != nil {
			t.Fatal(err)
		}
	}
	res, err := r.e.Write(ctx, id, nil, true)
	if err != nil || !res.Synced || res.Durable != uint64(n) || res.Total != uint64(n) {
		t.Fatalf("final sync: %+v %v", res, err)
	}
}

func TestHappyPathAB(t *testing.T) {
	r := newRig(t, func(c *config.Config) { c.VersionPolicy, c.AcceptUnsignedVersions = config.VersionNewer, true })
	hs, err := r.e.Handshake(ctx, &otav1.HandshakeRequest{ProtocolVersion: otav1.ProtocolVersion_PROTOCOL_VERSION_1, Client: "test"})
	if err != nil || hs.MaxBlockSize != 131072 || len(hs.SigAlgorithms) != 4 {
		t.Fatalf("handshake: %v %v", hs, err)
	}
	img := newImage(t, 1_000_003)
	// The factory records what runs: without it the "newer" policy has nothing to compare.
	if slot, err := r.e.SetRunningVersion(ctx, "rootfs", "1.0.0"); err != nil || slot != "a" {
		t.Fatalf("set running version: %q %v", slot, err)
	}
	begin, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.Version = "1.2.0" })
	if err != nil {
		t.Fatal(err)
	}
	s := begin.Session
	if begin.Resumed || s.Slot != "b" || s.Target != "rootfs" || s.TotalBlocks != 245 || s.DurableBlocks != 0 {
		t.Fatalf("begin: %v", begin)
	}
	if s.Missing[0] != 0xFF || s.Missing[len(s.Missing)-1] != 0x1F { // 245 = 30*8 + 5
		t.Fatalf("missing bitmap ends %x", s.Missing[len(s.Missing)-1])
	}
	writeAll(t, r, s.SessionId, img, 4096)
	fin, err := r.e.Finish(ctx, s.SessionId)
	if err != nil {
		t.Fatal(err)
	}
	if want := fmt.Sprintf("%x", sha256.Sum256(img.data)); fin.Sha256 != want || fin.Session.State != otav1.SessionState_SESSION_STATE_VERIFIED {
		t.Fatalf("finish: %v, want sha %s", fin, want)
	}
	if !bytes.Equal(slotContent(t, r.slots[1], len(img.data)), img.data) {
		t.Fatal("slot b does not hold the image")
	}
	if a, _ := os.ReadFile(r.slots[0]); !bytes.Equal(a, bytes.Repeat([]byte{0xEE}, slotSize)) {
		t.Fatal("slot a (running) was written")
	}
	if err := r.e.Reboot(ctx); err == nil {
		t.Fatal("reboot before activation allowed")
	}
	act, err := r.e.Activate(ctx, s.SessionId)
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(&otav1.ActivateResponse{RebootRequired: true, Target: "rootfs", Slot: "b"}, act, protocmp.Transform()); d != "" {
		t.Fatal(d)
	}
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	if st.ImageState != otav1.ImageState_IMAGE_STATE_ACTIVATED || len(st.Sessions) != 0 || st.LastUpdate.GetJobId() != "job-1" {
		t.Fatalf("after activation: %v", st)
	}
	if err := r.e.Reboot(ctx); err != nil || r.reboots != 1 {
		t.Fatalf("reboot: %v (%d calls)", err, r.reboots)
	}
	// The device reboots: the bootloader tries slot b, a new writer process starts.
	r.e.Close()
	if err := r.boot.Boot(ctx, ""); err != nil {
		t.Fatal(err)
	}
	r.open()
	st = must[*otav1.DeviceState](t)(r.e.State(ctx))
	want := &otav1.DeviceState{
		ImageState:  otav1.ImageState_IMAGE_STATE_TRIAL,
		BootBackend: "file",
		LastUpdate:  &otav1.UpdateInfo{JobId: "job-1", Target: "rootfs", Slot: "b", Version: "1.2.0"},
		Targets: []*otav1.TargetState{
			{Name: "rootfs", Kind: otav1.TargetKind_TARGET_KIND_AB, ActiveSlot: "b", InactiveSlot: "a", FileTypes: []int32{0},
				Slots: []*otav1.SlotInfo{{Name: "a", Version: "1.0.0"}, {Name: "b", Version: "1.2.0", Active: true}}},
			{Name: "app", Kind: otav1.TargetKind_TARGET_KIND_FILE, ActiveSlot: "file", FileTypes: []int32{1},
				Slots: []*otav1.SlotInfo{{Name: "file", Active: true}}},
		},
	}
	if d := cmp.Diff(want, st, protocmp.Transform()); d != "" {
		t.Fatalf("trial state (-want +got):\n%s", d)
	}
	ext := must[status.Fields](t)(r.e.Extensions(ctx))
	if d := cmp.Diff(status.Pairs("firmware_version", "1.2.0", "boot_slot", "b", "image_state", "trial", "boot_count", "1"), ext); d != "" {
		t.Fatalf("extensions (-want +got):\n%s", d)
	}
	// A new update cannot start while the trial is open (it would overwrite the fallback).
	_, err = r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.JobId = "job-2"; q.Version = "1.3.0" })
	wantReason(t, err, otav1.Reason_REASON_BAD_IMAGE_STATE)
	_, err = r.e.Commit(ctx, "job-other")
	wantReason(t, err, otav1.Reason_REASON_BAD_IMAGE_STATE)
	res, err := r.e.SelfTest(ctx, "job-1")
	if err != nil || !res.Passed {
		t.Fatalf("self test: %v %v", res, err)
	}
	c, err := r.e.Commit(ctx, "job-1")
	if err != nil || c.Committed.GetJobId() != "job-1" || c.Committed.GetSlot() != "b" {
		t.Fatalf("commit: %v %v", c, err)
	}
	st = must[*otav1.DeviceState](t)(r.e.State(ctx))
	if st.ImageState != otav1.ImageState_IMAGE_STATE_NORMAL {
		t.Fatalf("after commit: %v", st.ImageState)
	}
	// A repeated commit (the answer was lost to a crash) confirms the committed update; any
	// other job is still refused.
	if c, err := r.e.Commit(ctx, "job-1"); err != nil || c.Committed.GetJobId() != "job-1" || c.Committed.GetSlot() != "b" {
		t.Fatalf("repeated commit: %v %v", c, err)
	}
	_, err = r.e.Commit(ctx, "job-other")
	wantReason(t, err, otav1.Reason_REASON_BAD_IMAGE_STATE)
	// Version policy "newer": the same version again is refused, a newer one goes to slot a.
	_, err = r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.JobId = "job-2"; q.Version = "1.2.0" })
	wantReason(t, err, otav1.Reason_REASON_VERSION_CHECK)
	_, err = r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.JobId = "job-2"; q.Version = "1.1.9" })
	wantReason(t, err, otav1.Reason_REASON_VERSION_CHECK)
	_, err = r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.JobId = "job-2" })
	wantReason(t, err, otav1.Reason_REASON_VERSION_CHECK)
	b2, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.JobId = "job-2"; q.Version = "1.10.0" })
	if err != nil || b2.Session.Slot != "a" {
		t.Fatalf("next update: %v %v", b2, err)
	}
}

func TestRejectRollsBack(t *testing.T) {
	r := newRig(t, nil)
	img := newImage(t, 50_000)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
	writeAll(t, r, s.SessionId, img, 4096)
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
	must[*otav1.ActivateResponse](t)(r.e.Activate(ctx, s.SessionId))
	r.boot.Boot(ctx, "")
	_, err := r.e.Reject(ctx, "job-9", otav1.Reason_REASON_SELF_TEST_FAILED)
	wantReason(t, err, otav1.Reason_REASON_BAD_IMAGE_STATE)
	rej, err := r.e.Reject(ctx, "job-1", otav1.Reason_REASON_SELF_TEST_FAILED)
	if err != nil || !rej.RebootRequired {
		t.Fatalf("reject: %v %v", rej, err)
	}
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	if st.ImageState != otav1.ImageState_IMAGE_STATE_ROLLED_BACK || st.LastUpdate.GetReason() != otav1.Reason_REASON_SELF_TEST_FAILED {
		t.Fatalf("after reject: %v", st)
	}
	// Still running the rejected slot: a new session would overwrite the good one.
	_, err = r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.JobId = "job-2" })
	wantReason(t, err, otav1.Reason_REASON_BAD_IMAGE_STATE)
	if err := r.e.Reboot(ctx); err != nil {
		t.Fatal(err)
	}
	r.boot.Boot(ctx, "")
	st = must[*otav1.DeviceState](t)(r.e.State(ctx))
	if st.Targets[0].ActiveSlot != "a" || st.ImageState != otav1.ImageState_IMAGE_STATE_ROLLED_BACK {
		t.Fatalf("after rollback reboot: %v", st)
	}
	if b, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.JobId = "job-2" }); err != nil || b.Session.Slot != "b" {
		t.Fatalf("update after rollback: %v %v", b, err)
	}
}

func TestFileTarget(t *testing.T) {
	r := newRig(t, nil)
	os.WriteFile(r.appPath, []byte("old bundle"), 0o644)
	img := newImage(t, 70_000)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 1, func(q *otav1.BeginSessionRequest) { q.BlockSize = 1024; q.Version = "7" })).Session
	if s.Target != "app" || s.Slot != "file" {
		t.Fatalf("%v", s)
	}
	writeAll(t, r, s.SessionId, img, 1024)
	if b, _ := os.ReadFile(r.appPath); string(b) != "old bundle" {
		t.Fatal("destination changed before activation")
	}
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
	act := must[*otav1.ActivateResponse](t)(r.e.Activate(ctx, s.SessionId))
	if act.RebootRequired {
		t.Fatal("file target asks for a reboot")
	}
	if b, _ := os.ReadFile(r.appPath); !bytes.Equal(b, img.data) {
		t.Fatal("destination does not hold the image")
	}
	if err := r.e.Reboot(ctx); err == nil {
		t.Fatal("reboot allowed after a file activation")
	}
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	if st.ImageState != otav1.ImageState_IMAGE_STATE_NORMAL || st.Targets[1].Slots[0].Version != "7" || st.LastUpdate.GetJobId() != "job-1" {
		t.Fatalf("state: %v", st)
	}
}

// TestResumeAfterCrash: the writer dies without closing anything; a new engine on the same
// state dir resumes, and no block acknowledged as durable is reported missing.
func TestResumeAfterCrash(t *testing.T) {
	r := newRig(t, func(c *config.Config) { c.SyncBytes = 1 << 30; c.SyncInterval = 1 << 40 })
	img := newImage(t, 300_000)
	const bs = 4096
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
	// Blocks 0..39 in two synced batches, then 40..59 without sync.
	for _, span := range [][2]int{{0, 20}, {20, 40}} {
		res, err := r.e.Write(ctx, s.SessionId, blocks(img.data, bs, span[0], span[1]), true)
		if err != nil || !res.Synced {
			t.Fatalf("%v %v", res, err)
		}
	}
	res, err := r.e.Write(ctx, s.SessionId, blocks(img.data, bs, 40, 60), false)
	if err != nil || res.Synced || res.Durable != 40 || res.Received != 60 {
		t.Fatalf("unsynced write: %+v %v", res, err)
	}
	old := r.e // crashed: never closed until the end of the test
	defer old.Close()
	r.open()
	b, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.BlockSize = 8192 })
	if err != nil {
		t.Fatal(err)
	}
	if !b.Resumed || b.Session.SessionId != s.SessionId || b.Session.BlockSize != bs || b.Session.DurableBlocks != 40 {
		t.Fatalf("resume: %v", b)
	}
	for k := 0; k < int(b.Session.TotalBlocks); k++ {
		missing := bitmap.Bitmap(b.Session.Missing).Has(k)
		if missing != (k >= 40) {
			t.Fatalf("block %d missing=%v", k, missing)
		}
	}
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	if len(st.Sessions) != 1 || !bytes.Equal(st.Sessions[0].Missing, b.Session.Missing) {
		t.Fatalf("state sessions: %v", st.Sessions)
	}
	// Writing everything again is harmless: durable blocks are skipped.
	writeAll(t, r, s.SessionId, img, bs)
	fin, err := r.e.Finish(ctx, s.SessionId)
	if err != nil {
		t.Fatal(err)
	}
	// Crash again after verification: the verified session survives and is activated after
	// a second read-back.
	r.open()
	b, err = r.begin(img, 0, nil)
	if err != nil || !b.Resumed || b.Session.State != otav1.SessionState_SESSION_STATE_VERIFIED {
		t.Fatalf("verified resume: %v %v", b, err)
	}
	if _, err := r.e.Activate(ctx, fin.Session.SessionId); err != nil {
		t.Fatal(err)
	}
}

func TestCorruptJournalDropped(t *testing.T) {
	r := newRig(t, nil)
	img := newImage(t, 40_000)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
	must[any](t)(r.e.Write(ctx, s.SessionId, blocks(img.data, 4096, 0, 5), true))
	r.e.Close()
	p := filepath.Join(r.cfg.StateDir, "sessions", "rootfs.session")
	b, _ := os.ReadFile(p)
	b[len(b)-3] ^= 0x20
	os.WriteFile(p, b, 0o600)
	r.open()
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	if len(st.Sessions) != 0 {
		t.Fatalf("corrupt session trusted: %v", st.Sessions)
	}
	nb := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil))
	if nb.Resumed || nb.Session.DurableBlocks != 0 {
		t.Fatalf("%v", nb)
	}
}

func TestSignatureFailures(t *testing.T) {
	for _, tc := range []struct {
		name    string
		corrupt func(r *rig, img *image)
	}{
		{"block corrupted on the medium", func(r *rig, img *image) {
			f, _ := os.OpenFile(r.slots[1], os.O_RDWR, 0)
			f.WriteAt([]byte{img.data[5000] ^ 1}, 5000)
			f.Close()
		}},
		{"signature of another image", func(r *rig, img *image) {}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newRig(t, nil)
			img := newImage(t, 30_000)
			if tc.name == "signature of another image" {
				img.sig = newImage(t, 30_000).sig
			}
			s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
			writeAll(t, r, s.SessionId, img, 4096)
			tc.corrupt(r, &img)
			_, err := r.e.Finish(ctx, s.SessionId)
			wantReason(t, err, otav1.Reason_REASON_SIG_CHECK_FAILED)
			_, err = r.e.Activate(ctx, s.SessionId)
			wantReason(t, err, otav1.Reason_REASON_BAD_FILE_HANDLE)
			st := must[*otav1.DeviceState](t)(r.e.State(ctx))
			if st.ImageState != otav1.ImageState_IMAGE_STATE_NORMAL || len(st.Sessions) != 0 {
				t.Fatalf("after failed verification: %v", st)
			}
			bs := must[any](t)(r.boot.State(ctx))
			if fmt.Sprint(bs) != "{a a  false false 0}" {
				t.Fatalf("boot state changed: %v", bs)
			}
			// The target is free again and a good image goes through.
			good := newImage(t, 30_000)
			s = must[*otav1.BeginSessionResponse](t)(r.begin(good, 0, nil)).Session
			writeAll(t, r, s.SessionId, good, 4096)
			must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
		})
	}
}

// TestRefusals: hostile or out-of-order requests get their typed reason and change nothing;
// the engine completes an update afterwards.
func TestRefusals(t *testing.T) {
	r := newRig(t, nil)
	img := newImage(t, 10_000) // 3 blocks of 4096: 4096, 4096, 1808
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
	id := s.SessionId
	ft := func(v int32) *int32 { return &v }
	for _, tc := range []struct {
		name string
		call func() error
		want otav1.Reason
	}{
		{"protocol version", func() error {
			_, err := r.e.Handshake(ctx, &otav1.HandshakeRequest{ProtocolVersion: 2})
			return err
		}, otav1.Reason_REASON_PROTOCOL_VERSION},
		{"oversize for max_size", func() error {
			_, err := r.begin(img, 1, func(q *otav1.BeginSessionRequest) { q.FileSize = 1<<20 + 1 })
			return err
		}, otav1.Reason_REASON_FILE_TOO_LARGE},
		{"absurd size", func() error {
			_, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.FileSize = ^uint64(0) })
			return err
		}, otav1.Reason_REASON_FILE_TOO_LARGE},
		{"unknown file type", func() error {
			_, err := r.begin(img, 7, nil)
			return err
		}, otav1.Reason_REASON_TARGET_UNKNOWN},
		{"no selection", func() error {
			_, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.FileType = nil; q.FilePath = "/etc/shadow" })
			return err
		}, otav1.Reason_REASON_TARGET_UNKNOWN},
		{"type and path disagree", func() error {
			_, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.FileType = ft(1) })
			return err
		}, otav1.Reason_REASON_TARGET_UNKNOWN},
		{"bad job id", func() error {
			_, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.JobId = "../../x" })
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST},
		{"empty job id", func() error {
			_, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.JobId = "" })
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST},
		{"block size too small", func() error {
			_, err := r.begin(img, 1, func(q *otav1.BeginSessionRequest) { q.BlockSize = 128 })
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST},
		{"block size too large", func() error {
			_, err := r.begin(img, 1, func(q *otav1.BeginSessionRequest) { q.BlockSize = 1 << 20 })
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST},
		{"zero size", func() error {
			_, err := r.begin(img, 1, func(q *otav1.BeginSessionRequest) { q.FileSize = 0 })
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST},
		{"no signature", func() error {
			_, err := r.begin(img, 1, func(q *otav1.BeginSessionRequest) { q.Signature = nil })
			return err
		}, otav1.Reason_REASON_SIG_CHECK_FAILED},
		{"untrusted cert", func() error {
			_, err := r.begin(img, 1, func(q *otav1.BeginSessionRequest) { q.CertName = "evil.crt.pem" })
			return err
		}, otav1.Reason_REASON_UNTRUSTED_SIGNER},
		{"sha1 refused", func() error {
			_, err := r.begin(img, 1, func(q *otav1.BeginSessionRequest) { q.SigAlgorithm = otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1 })
			return err
		}, otav1.Reason_REASON_UNSUPPORTED},
		{"busy target", func() error {
			_, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.JobId = "job-2" })
			return err
		}, otav1.Reason_REASON_SESSION_BUSY},
		{"same job other size", func() error {
			_, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.FileSize = 9999 })
			return err
		}, otav1.Reason_REASON_SESSION_BUSY},
		{"offset past the end", func() error {
			_, err := r.e.Write(ctx, id, []*otav1.Block{{Offset: 12288, Data: make([]byte, 4096)}}, false)
			return err
		}, otav1.Reason_REASON_BLOCK_OUT_OF_RANGE},
		{"negative offset", func() error {
			_, err := r.e.Write(ctx, id, []*otav1.Block{{Offset: uint64(1<<64 - 4096), Data: make([]byte, 4096)}}, false)
			return err
		}, otav1.Reason_REASON_BLOCK_OUT_OF_RANGE},
		{"misaligned offset", func() error {
			_, err := r.e.Write(ctx, id, []*otav1.Block{{Offset: 100, Data: make([]byte, 4096)}}, false)
			return err
		}, otav1.Reason_REASON_BLOCK_OUT_OF_RANGE},
		{"short block", func() error {
			_, err := r.e.Write(ctx, id, []*otav1.Block{{Offset: 0, Data: make([]byte, 4095)}}, false)
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST},
		{"long last block", func() error {
			_, err := r.e.Write(ctx, id, []*otav1.Block{{Offset: 8192, Data: make([]byte, 4096)}}, false)
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST},
		{"bad block after a good one", func() error {
			_, err := r.e.Write(ctx, id, []*otav1.Block{{Offset: 0, Data: img.data[:4096]}, {Offset: 4096, Data: nil}}, false)
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST},
		{"unknown session", func() error {
			_, err := r.e.Write(ctx, "nope", blocks(img.data, 4096, 0, 1), false)
			return err
		}, otav1.Reason_REASON_BAD_FILE_HANDLE},
		{"finish with blocks missing", func() error {
			_, err := r.e.Finish(ctx, id)
			return err
		}, otav1.Reason_REASON_BAD_FILE_HANDLE},
		{"activate before finish", func() error {
			_, err := r.e.Activate(ctx, id)
			return err
		}, otav1.Reason_REASON_BAD_IMAGE_STATE},
		{"activate unknown", func() error {
			_, err := r.e.Activate(ctx, "x")
			return err
		}, otav1.Reason_REASON_BAD_FILE_HANDLE},
		{"commit outside a trial", func() error {
			_, err := r.e.Commit(ctx, "")
			return err
		}, otav1.Reason_REASON_BAD_IMAGE_STATE},
		{"reject outside a trial", func() error {
			_, err := r.e.Reject(ctx, "", otav1.Reason_REASON_SELF_TEST_FAILED)
			return err
		}, otav1.Reason_REASON_BAD_IMAGE_STATE},
		{"self test outside a trial", func() error {
			_, err := r.e.SelfTest(ctx, "")
			return err
		}, otav1.Reason_REASON_BAD_IMAGE_STATE},
		{"reboot without activation", func() error { return r.e.Reboot(ctx) }, otav1.Reason_REASON_BAD_IMAGE_STATE},
		{"abort unknown", func() error { return r.e.Abort(ctx, "x", 0) }, otav1.Reason_REASON_BAD_FILE_HANDLE},
	} {
		t.Run(tc.name, func(t *testing.T) { wantReason(t, tc.call(), tc.want) })
	}
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	if len(st.Sessions) != 1 || st.Sessions[0].DurableBlocks != 0 || r.reboots != 0 {
		t.Fatalf("refusals changed state: %v", st)
	}
	// The engine is still usable: finish this update.
	writeAll(t, r, id, img, 4096)
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, id))
	// Writing into a verified image is refused.
	_, err := r.e.Write(ctx, id, blocks(img.data, 4096, 0, 1), false)
	wantReason(t, err, otav1.Reason_REASON_BAD_FILE_HANDLE)
	must[*otav1.ActivateResponse](t)(r.e.Activate(ctx, id))
}

func TestAbortFreesTarget(t *testing.T) {
	r := newRig(t, nil)
	img := newImage(t, 20_000)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 1, nil)).Session
	must[any](t)(r.e.Write(ctx, s.SessionId, blocks(img.data, 4096, 0, 2), true))
	b, err := r.begin(img, 1, func(q *otav1.BeginSessionRequest) { q.JobId = "job-2" })
	wantReason(t, err, otav1.Reason_REASON_SESSION_BUSY)
	_ = b
	if err := r.e.Abort(ctx, s.SessionId, otav1.Reason_REASON_NEWER_JOB); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(filepath.Join(filepath.Dir(r.appPath), ".bundle.tar.ota-new")); !os.IsNotExist(err) {
		t.Fatalf("temporary file left after abort: %v", err)
	}
	_, err = r.e.Write(ctx, s.SessionId, blocks(img.data, 4096, 2, 3), false)
	wantReason(t, err, otav1.Reason_REASON_BAD_FILE_HANDLE)
	if b, err := r.begin(img, 1, func(q *otav1.BeginSessionRequest) { q.JobId = "job-2" }); err != nil || b.Resumed {
		t.Fatalf("after abort: %v %v", b, err)
	}
}

func TestNoTrustedKeyFailsClosed(t *testing.T) {
	r := newRig(t, func(c *config.Config) { c.TrustedKeys = nil })
	img := newImage(t, 5000)
	_, err := r.begin(img, 0, nil)
	wantReason(t, err, otav1.Reason_REASON_UNTRUSTED_SIGNER)
}

// TestConcurrent drives one session from several goroutines, with State and Extensions
// calls in between (run with -race).
func TestConcurrent(t *testing.T) {
	r := newRig(t, func(c *config.Config) { c.SyncBytes = 64 << 10 })
	img := newImage(t, 2<<20)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
	const workers = 4
	n := int(s.TotalBlocks)
	var wg sync.WaitGroup
	errs := make(chan error, workers*2)
	for w := 0; w < workers; w++ {
		wg.Add(2)
		go func(w int) {
			defer wg.Done()
			// Each worker writes every block of its stripe, and its neighbour's too (duplicates).
			for k := w; k < n; k += workers {
				for _, kk := range []int{k, (k + 1) % n} {
					if _, err := r.e.Write(ctx, s.SessionId, blocks(img.data, 4096, kk, kk+1), false); err != nil {
						errs <- err
						return
					}
				}
			}
		}(w)
		go func() {
			defer wg.Done()
			for i := 0; i < 20; i++ {
				if _, err := r.e.State(ctx); err != nil {
					errs <- err
					return
				}
				r.e.Extensions(ctx)
			}
		}()
	}
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Fatal(err)
	}
	res := must[any](t)(r.e.Write(ctx, s.SessionId, nil, true))
	t.Log(res)
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
}

func TestCompareVersions(t *testing.T) {
	for _, tc := range []struct {
		a, b string
		want int
	}{
		{"1.2.0", "1.2.0", 0}, {"1.10.0", "1.9.9", 1}, {"v2", "1.99", 1}, {"1.2", "1.2.1", -1},
		{"1.2.0-rc1", "1.2.0-rc2", -1}, {"010", "9", 1}, {"1.a", "1.b", -1},
	} {
		if got := CompareVersions(tc.a, tc.b); got != tc.want {
			t.Errorf("CompareVersions(%q, %q) = %d, want %d", tc.a, tc.b, got, tc.want)
		}
	}
}

// TestCrashAfterBootSwitch: the writer died after the bootloader was switched but before the
// session was closed. The restarted writer does not offer the activated slot for writing.
func TestCrashAfterBootSwitch(t *testing.T) {
	r := newRig(t, nil)
	img := newImage(t, 9000)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
	writeAll(t, r, s.SessionId, img, 4096)
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
	if err := r.boot.Activate(ctx, "b"); err != nil { // what Activate does, then "crash"
		t.Fatal(err)
	}
	old := r.e
	defer old.Close()
	r.open()
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	if st.ImageState != otav1.ImageState_IMAGE_STATE_ACTIVATED || len(st.Sessions) != 0 {
		t.Fatalf("state: %v", st)
	}
	_, err := r.begin(img, 0, nil)
	wantReason(t, err, otav1.Reason_REASON_BAD_IMAGE_STATE)
	if err := r.e.Reboot(ctx); err != nil {
		t.Fatalf("reboot into the activated slot: %v", err)
	}
}
