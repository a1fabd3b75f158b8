package engine

import (
	"bytes"
	"errors"
	"fmt"
	"os"
	"sync"
	"sync/atomic"
	"syscall"
	"testing"

	"github.com/gwota/gwota/internal/bitmap"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/journal"
	"github.com/gwota/gwota/writer/target"
	"github.com/gwota/gwota/writer/target/targettest"
)

// faultRig is a rig whose rootfs media go through a targettest.Medium set up by arm.
type faultRig struct {
	*rig
	mu  sync.Mutex
	med *targettest.Medium
}

// newFaultRig starts a rig (sync every 4 blocks of 4096 bytes) and restarts its engine with
// every rootfs medium wrapped in a targettest.Medium that arm configures.
func newFaultRig(t *testing.T, arm func(m *targettest.Medium)) *faultRig {
	r := &faultRig{rig: newRig(t, func(c *config.Config) { c.SyncBytes = 4 * 4096 })}
	r.e.Close()
	e, err := New(ctx, r.cfg, Deps{Boot: r.boot, Reboot: r.reboot, WrapMedium: func(name string, m target.Medium) target.Medium {
		if name != "rootfs" {
			return m
		}
		fm := targettest.Wrap(m)
		if arm != nil {
			arm(fm)
		}
		r.mu.Lock()
		r.med = fm
		r.mu.Unlock()
		return fm
	}}, testLog(t))
	if err != nil {
		t.Fatal(err)
	}
	r.e = e
	return r
}

func (r *faultRig) medium() *targettest.Medium {
	r.mu.Lock()
	defer r.mu.Unlock()
	return r.med
}

// journalDurable is the rootfs session's durable bitmap as the journal on disk holds it now
// (nil when there is no session file).
func journalDurable(t testing.TB, stateDir string) []byte {
	t.Helper()
	j, err := journal.Open(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	ss, dropped, err := j.LoadSessions()
	if err != nil || len(dropped) > 0 {
		t.Fatalf("journal: %v %v", err, dropped)
	}
	for _, s := range ss {
		if s.Target == "rootfs" {
			return s.Durable
		}
	}
	return nil
}

// checkJournalBehindMedium fails t if the journal names a block whose bytes the slot does
// not hold: the journal must never be ahead of the data.
func checkJournalBehindMedium(t testing.TB, r *rig, img image, bs int) int {
	t.Helper()
	durable := journalDurable(t, r.cfg.StateDir)
	slot, err := os.ReadFile(r.slots[1])
	if err != nil {
		t.Fatal(err)
	}
	n := 0
	for k := 0; k*bs < len(img.data); k++ {
		if !bitmap.Bitmap(durable).Has(k) {
			continue
		}
		n++
		end := min((k+1)*bs, len(img.data))
		if !bytes.Equal(slot[k*bs:end], img.data[k*bs:end]) {
			t.Fatalf("the journal names block %d durable but the slot does not hold it", k)
		}
	}
	return n
}

func popcountT(b []byte) int { return bitmap.Bitmap(b).Count() }

// TestSyncThenJournal proves the order of a sync: at the moment the medium's flush starts,
// and again once the data is durable but before Sync returns, the journal on disk still names
// only the blocks of earlier syncs; once Write returns synced, it names the new ones.
func TestSyncThenJournal(t *testing.T) {
	var r *faultRig
	var lastDurable int // durable blocks after the previous sync, as WriteSession reported them
	var checks int
	check := func(when string) {
		t.Helper()
		checks++
		if got := popcountT(journalDurable(t, r.cfg.StateDir)); got != lastDurable {
			t.Errorf("%s: the journal names %d durable blocks, want the %d of the previous sync", when, got, lastDurable)
		}
	}
	r = newFaultRig(t, func(m *targettest.Medium) {
		m.SyncErr = func(n int) error { check(fmt.Sprintf("sync %d, before the flush", n)); return nil }
		m.AfterFlush = func(n int) error { check(fmt.Sprintf("sync %d, data durable", n)); return nil }
	})
	img := newImage(t, 30*4096+100)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
	for k := 0; k < 31; k += 3 {
		res, err := r.e.Write(ctx, s.SessionId, blocks(img.data, 4096, k, k+3), k+3 >= 31)
		if err != nil {
			t.Fatal(err)
		}
		if got := popcountT(journalDurable(t, r.cfg.StateDir)); res.Synced && got != int(res.Durable) {
			t.Fatalf("after a synced write the journal names %d blocks, the writer reported %d", got, res.Durable)
		}
		lastDurable = int(res.Durable)
	}
	_, syncs, _ := r.medium().Counts()
	if syncs < 5 || checks != 2*syncs {
		t.Fatalf("%d syncs, %d checks: the sync points were not exercised", syncs, checks)
	}
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
}

// TestPowerCutLeavesJournalBehind cuts the power at every write and at every sync (before
// the flush, and between the flush and the journal save), restarts the writer on what is
// left, and checks that every block the journal names is on the medium, that the resumed
// session asks for the rest, and that it then completes and verifies.
func TestPowerCutLeavesJournalBehind(t *testing.T) {
	const bs, nBlocks = 4096, 20
	img := newImage(t, nBlocks*bs-10)
	type point struct {
		name string
		k    int
	}
	var points []point
	for k := 0; k < nBlocks; k += 3 {
		points = append(points, point{"write", k})
	}
	for k := 0; k < 6; k++ {
		points = append(points, point{"sync before flush", k}, point{"sync after flush", k})
	}
	for _, p := range points {
		t.Run(fmt.Sprintf("%s %d", p.name, p.k), func(t *testing.T) {
			var cut *targettest.Medium
			r := newFaultRig(t, func(m *targettest.Medium) {
				cut = m
				switch p.name {
				case "write":
					m.WriteErr = func(n int, _ int64, _ []byte) error {
						if n == p.k {
							m.PowerCut()
						}
						return nil
					}
				case "sync before flush":
					m.SyncErr = func(n int) error {
						if n == p.k {
							m.PowerCut()
							return targettest.ErrPowerCut
						}
						return nil
					}
				case "sync after flush":
					m.AfterFlush = func(n int) error {
						if n == p.k {
							m.PowerCut()
						}
						return nil
					}
				}
			})
			s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
			var writeErr error
			for k := 0; k < nBlocks && writeErr == nil; k += 2 {
				_, writeErr = r.e.Write(ctx, s.SessionId, blocks(img.data, bs, k, k+2), false)
			}
			if writeErr == nil {
				_, writeErr = r.e.Finish(ctx, s.SessionId)
			}
			if !errors.Is(writeErr, targettest.ErrPowerCut) {
				t.Fatalf("the power cut was not hit: %v (medium cut: %v)", writeErr, cut != nil)
			}
			// The process dies here: nothing more reaches the journal or the medium.
			r.e.Close()
			r.open()
			named := checkJournalBehindMedium(t, r.rig, img, bs)
			res := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil))
			if !res.Resumed || int(res.Session.DurableBlocks) != named {
				t.Fatalf("resumed %v with %d durable blocks, the journal names %d", res.Resumed, res.Session.DurableBlocks, named)
			}
			var missing []*otav1.Block
			for k := 0; k < nBlocks; k++ {
				if bitmap.Bitmap(res.Session.Missing).Has(k) {
					missing = append(missing, blocks(img.data, bs, k, k+1)...)
				}
			}
			if len(missing) != nBlocks-named {
				t.Fatalf("%d blocks missing, want %d", len(missing), nBlocks-named)
			}
			if _, err := r.e.Write(ctx, s.SessionId, missing, true); err != nil {
				t.Fatal(err)
			}
			must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
		})
	}
}

// TestMediumFaults: what each fault of the medium does to a session.
func TestMediumFaults(t *testing.T) {
	const bs = 4096
	img := newImage(t, 12*bs+5)
	for _, tc := range []struct {
		name string
		arm  func(m *targettest.Medium)
		// writeErr: the reason of the first failing WriteSession (unspecified: none fails);
		// finishErr: the reason of FinishSession after every block was sent again.
		writeErr, finishErr otav1.Reason
	}{
		{"write error", func(m *targettest.Medium) {
			m.WriteErr = func(n int, _ int64, _ []byte) error {
				if n == 5 {
					return syscall.EIO
				}
				return nil
			}
		}, otav1.Reason_REASON_FILE_WRITE_FAILED, otav1.Reason_REASON_UNSPECIFIED},
		{"medium full", func(m *targettest.Medium) {
			m.WriteErr = func(n int, _ int64, _ []byte) error {
				if n == 5 {
					return syscall.ENOSPC
				}
				return nil
			}
		}, otav1.Reason_REASON_STORAGE_FULL, otav1.Reason_REASON_UNSPECIFIED},
		{"sync error", func(m *targettest.Medium) {
			m.SyncErr = func(n int) error {
				if n == 1 {
					return syscall.EIO
				}
				return nil
			}
		}, otav1.Reason_REASON_FILE_WRITE_FAILED, otav1.Reason_REASON_UNSPECIFIED},
		{"lost write", func(m *targettest.Medium) {
			m.LoseWrite = func(n int, _ int64, _ []byte) bool { return n == 7 }
		}, otav1.Reason_REASON_UNSPECIFIED, otav1.Reason_REASON_SIG_CHECK_FAILED},
	} {
		t.Run(tc.name, func(t *testing.T) {
			r := newFaultRig(t, tc.arm)
			s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
			var first error
			for k := 0; k < 13; k++ {
				before := popcountT(journalDurable(t, r.cfg.StateDir))
				_, err := r.e.Write(ctx, s.SessionId, blocks(img.data, bs, k, k+1), false)
				if err != nil && first == nil {
					first = err
					if after := popcountT(journalDurable(t, r.cfg.StateDir)); after != before {
						t.Fatalf("a failed write changed the journal from %d to %d blocks", before, after)
					}
				}
				if tc.finishErr == otav1.Reason_REASON_UNSPECIFIED { // a lying medium is caught by verification only
					checkJournalBehindMedium(t, r.rig, img, bs)
				}
			}
			if tc.writeErr == otav1.Reason_REASON_UNSPECIFIED {
				if first != nil {
					t.Fatalf("write: %v", first)
				}
			} else {
				wantReason(t, first, tc.writeErr)
			}
			// The client sends what the writer still misses again, as ota-net does.
			res, err := r.e.Write(ctx, s.SessionId, nil, true)
			if err != nil {
				t.Fatal(err)
			}
			if res.Durable < res.Total {
				info := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
				var again []*otav1.Block
				for k := 0; k < 13; k++ {
					if bitmap.Bitmap(info.Missing).Has(k) {
						again = append(again, blocks(img.data, bs, k, k+1)...)
					}
				}
				must[api.WriteResult](t)(r.e.Write(ctx, s.SessionId, again, true))
			}
			_, err = r.e.Finish(ctx, s.SessionId)
			if tc.finishErr == otav1.Reason_REASON_UNSPECIFIED {
				if err != nil {
					t.Fatal(err)
				}
				checkJournalBehindMedium(t, r.rig, img, bs)
				return
			}
			wantReason(t, err, tc.finishErr)
		})
	}
}

// TestReverifyAfterRestart: a session verified by an earlier process is verified again from
// the medium before activation; a block that changed in between is refused and nothing boots.
func TestReverifyAfterRestart(t *testing.T) {
	r := newRig(t, nil)
	img := newImage(t, 30_000)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
	writeAll(t, r, s.SessionId, img, 4096)
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
	r.e.Close()
	targettest.Overwrite(t, r.slots[1], 9000, []byte{img.data[9000] ^ 0x80})
	r.open()
	_, err := r.e.Activate(ctx, s.SessionId)
	wantReason(t, err, otav1.Reason_REASON_SIG_CHECK_FAILED)
	if st := must[any](t)(r.boot.State(ctx)); fmt.Sprint(st) != "{a a  false false 0}" {
		t.Fatalf("boot state changed: %v", st)
	}
}

// TestReadBackFailureKeepsSession: a read-back that fails is of class retryable: the session
// stays open with every block durable, and FinishSession repeated verifies the image, which
// is then activated. A refused signature (class fatal) drops the session instead.
func TestReadBackFailureKeepsSession(t *testing.T) {
	const bs = 4096
	var fail atomic.Bool
	r := newFaultRig(t, func(m *targettest.Medium) {
		m.SyncErr = func(int) error {
			if fail.CompareAndSwap(true, false) {
				return syscall.EIO
			}
			return nil
		}
	})
	img := newImage(t, 12*bs+5)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 0, nil)).Session
	writeAll(t, r.rig, s.SessionId, img, bs)
	must[api.WriteResult](t)(r.e.Write(ctx, s.SessionId, nil, true))
	fail.Store(true)
	_, err := r.e.Finish(ctx, s.SessionId)
	wantReason(t, err, otav1.Reason_REASON_FILE_CLOSE_FAILED)
	if !status.IsClass(err, status.ClassRetryable) {
		t.Fatalf("read-back failure %v is not retryable", err)
	}
	st := must[*otav1.DeviceState](t)(r.e.State(ctx))
	if len(st.Sessions) != 1 || st.Sessions[0].DurableBlocks != st.Sessions[0].TotalBlocks {
		t.Fatalf("sessions after a failed read-back: %v", st.Sessions)
	}
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))
	must[*otav1.ActivateResponse](t)(r.e.Activate(ctx, s.SessionId))
}
