package main

import (
	"encoding/json"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"github.com/google/go-cmp/cmp/cmpopts"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/writertest"
)

// statusSessions runs `ota-writer status --json` with args and returns its session summaries.
func statusSessions(t *testing.T, args ...string) []sessionSummary {
	t.Helper()
	out, errOut, code := runCLI(t, append([]string{"status", "--json"}, args...)...)
	if code != 0 {
		t.Fatalf("status %v: exit %d: %s", args, code, errOut)
	}
	var js struct {
		Sessions []sessionSummary `json:"sessions"`
	}
	if err := json.Unmarshal([]byte(out), &js); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	return js.Sessions
}

// startSession begins job-1 on rootfs and makes its first n blocks durable; it returns the
// session info.
func startSession(t *testing.T, b *bench, n int) *otav1.SessionInfo {
	t.Helper()
	imgPath, sig := b.image(t, "img", 20*testMaxBlock)
	img, _ := os.ReadFile(imgPath)
	c := writertest.Dial(t, b.sock)
	resp, err := c.Begin(t.Context(), beginReq(len(img), sig))
	if err != nil {
		t.Fatal(err)
	}
	id := resp.GetSession().GetSessionId()
	for k := range n { // one block per message: the writer's limit is one maximum block
		if _, err := c.WriteBatch(t.Context(), id, uint64(k+1), blocksOf(img, testMaxBlock, k, k+1), true); err != nil {
			t.Fatal(err)
		}
	}
	return resp.GetSession()
}

// A session nobody finishes (its job was canceled while ota-net was down) shows in
// `ota-writer status` with its target, job, age and blocks, is called stale once it made no
// progress for --stale, and `ota-writer abort --target` frees the target for the next job.
func TestStatusAndAbortStuckSession(t *testing.T) {
	b := newBench(t, "")
	b.serve(t)
	info := startSession(t, b, 5)

	want := []sessionSummary{{Target: "rootfs", JobID: "job-1", SessionID: info.GetSessionId(), State: "receiving",
		ReceivedBlocks: 5, DurableBlocks: 5, TotalBlocks: 20, Stale: true}}
	ignoreTimes := cmpopts.IgnoreFields(sessionSummary{}, "AgeSeconds", "IdleSeconds")
	got := statusSessions(t, "--socket", b.sock, "--stale", "0s")
	if d := cmp.Diff(want, got, ignoreTimes); d != "" {
		t.Errorf("status sessions (-want +got):\n%s", d)
	}
	if len(got) == 1 && (got[0].AgeSeconds < 0 || got[0].AgeSeconds > 600 || got[0].IdleSeconds < 0 || got[0].IdleSeconds > got[0].AgeSeconds) {
		t.Errorf("age %d s, idle %d s: want known, small, idle <= age", got[0].AgeSeconds, got[0].IdleSeconds)
	}
	if got := statusSessions(t, "--socket", b.sock); len(got) != 1 || got[0].Stale {
		t.Errorf("with the default stale time a fresh session is not stale: %+v", got)
	}
	out, errOut, code := runCLI(t, "status", "--socket", b.sock, "--stale", "0s")
	for _, s := range []string{"target rootfs: job job-1 file 0, receiving, 5/20 blocks received (5 durable), age ", "STALE", "ota-writer abort --target rootfs"} {
		if code != 0 || !strings.Contains(out, s) {
			t.Errorf("human status lacks %q (exit %d):\n%s%s", s, code, out, errOut)
		}
	}

	// The target is busy for any other job.
	c := writertest.Dial(t, b.sock)
	_, sig2 := b.image(t, "img2", 1000)
	other := beginReq(1000, sig2)
	other.JobId = "job-2"
	_, err := c.Begin(t.Context(), other)
	reasonIs(t, err, otav1.Reason_REASON_SESSION_BUSY)

	// Unknown target: a typed refusal; another job's filter: nothing to do.
	if _, errOut, code := runCLI(t, "abort", "--socket", b.sock, "--target", "nosuch"); code != exitFailed || !strings.Contains(errOut, "reason: target_unknown/3003") {
		t.Errorf("abort of an unknown target: exit %d\n%s", code, errOut)
	}
	if out, errOut, code := runCLI(t, "abort", "--socket", b.sock, "--target", "rootfs", "--job-id", "job-9"); code != 0 || !strings.Contains(out, "no session to abort") {
		t.Errorf("abort of another job's session: exit %d\n%s%s", code, out, errOut)
	}
	if got := statusSessions(t, "--socket", b.sock); len(got) != 1 {
		t.Fatalf("a filtered abort dropped the session: %+v", got)
	}

	out, errOut, code = runCLI(t, "abort", "--socket", b.sock, "--target", "rootfs")
	if code != 0 || !strings.Contains(out, "aborted: target rootfs, job job-1 file 0, session "+info.GetSessionId()+" (5/20 blocks were durable) via socket") {
		t.Fatalf("abort: exit %d\n%s%s", code, out, errOut)
	}
	if got := statusSessions(t, "--socket", b.sock); len(got) != 0 {
		t.Errorf("sessions after abort: %+v", got)
	}
	// The target is free: the next job begins.
	if _, err := c.Begin(t.Context(), other); err != nil {
		t.Errorf("the next job's session after the abort: %v", err)
	}
}

// With no writer running, abort works on the engine in-process: the journaled session is
// dropped, and status (in-process too) shows none.
func TestAbortInProcess(t *testing.T) {
	b := newBench(t, "")
	w := b.serve(t)
	info := startSession(t, b, 3)
	w.stop(t)
	journal := filepath.Join(b.dir, "state", "sessions", "rootfs.session")
	if _, err := os.Stat(journal); err != nil {
		t.Fatalf("the session's journal: %v", err)
	}
	if got := statusSessions(t, "--config", b.cfg); len(got) != 1 || got[0].JobID != "job-1" || got[0].DurableBlocks != 3 {
		t.Fatalf("in-process status sessions: %+v", got)
	}
	out, errOut, code := runCLI(t, "abort", "--config", b.cfg)
	if code != 0 || !strings.Contains(out, "aborted: target rootfs, job job-1 file 0, session "+info.GetSessionId()) || !strings.Contains(out, "via in-process") {
		t.Fatalf("abort in-process: exit %d\n%s%s", code, out, errOut)
	}
	if got := statusSessions(t, "--config", b.cfg); len(got) != 0 {
		t.Errorf("sessions after the in-process abort: %+v", got)
	}
	if _, err := os.Stat(journal); !os.IsNotExist(err) {
		t.Errorf("journal after abort: %v, want gone", err)
	}
}
