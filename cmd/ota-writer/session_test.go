package main

import (
	"bytes"
	"context"
	"encoding/json"
	"net"
	"os"
	"os/exec"
	"strings"
	"syscall"
	"testing"
	"time"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/assemble"
	"github.com/gwota/gwota/writer/writertest"
)

func beginReq(size int, sig []byte) *otav1.BeginSessionRequest {
	return &otav1.BeginSessionRequest{
		JobId: "job-1", FilePath: "/opt/fw/gateway.img", FileSize: uint64(size), BlockSize: testMaxBlock,
		SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: sig, CertName: "pub.pem",
	}
}

// A writer process killed with SIGKILL mid-session loses no block it acknowledged as durable;
// the session resumes, completes, verifies, activates, and after a (simulated) reboot the
// trial is committed with `ota-writer accept`.
func TestKillMidSessionResumeAndCommit(t *testing.T) {
	b := newBench(t, "")
	const nBlocks = 200
	imgPath, sig := b.image(t, "img", nBlocks*testMaxBlock-1000)
	img, _ := os.ReadFile(imgPath)
	ctx := t.Context()

	w := b.serve(t)
	c := writertest.Dial(t, b.sock)
	begin, err := c.Begin(ctx, beginReq(len(img), sig))
	if err != nil {
		t.Fatal(err)
	}
	id := begin.GetSession().GetSessionId()
	st, err := c.OpenBlockStream(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	// One block per message (the writer's message limit is one maximum block), sync every
	// 5th; remember which blocks each seq carried.
	const per = 1
	blocksOfSeq := map[uint64][2]int{}
	var durable []int // blocks acknowledged durable before the kill
	gotAck := make(chan uint64, 64)
	go func() {
		for a := range st.Acks() {
			gotAck <- a.GetDurableSeq()
		}
		close(gotAck)
	}()
	acked := uint64(0)
	for k := 0; k < nBlocks*3/4; k += per {
		seq, err := st.Send(blocksOf(img, testMaxBlock, k, min(k+per, nBlocks)), (k/per)%5 == 4)
		if err != nil {
			t.Fatal(err)
		}
		blocksOfSeq[seq] = [2]int{k, min(k+per, nBlocks)}
	}
	// Wait for a few acks, then kill while unsynced blocks are in flight.
	for acked < 60 {
		select {
		case s, ok := <-gotAck:
			if !ok {
				t.Fatalf("stream ended before acks: %v", st.Wait())
			}
			acked = max(acked, s)
		case <-time.After(20 * time.Second):
			t.Fatal("no acks")
		}
	}
	if _, err := st.Send(blocksOf(img, testMaxBlock, nBlocks*3/4, nBlocks*3/4+per), false); err != nil {
		t.Fatal(err)
	}
	w.kill9()
	for s := range gotAck {
		acked = max(acked, s)
	}
	st.Close()
	for seq, r := range blocksOfSeq {
		if seq <= acked {
			for k := r[0]; k < r[1]; k++ {
				durable = append(durable, k)
			}
		}
	}
	if len(durable) == 0 {
		t.Fatal("no block acknowledged durable before the kill")
	}

	w2 := b.serve(t)
	c2 := writertest.Dial(t, b.sock)
	res, err := c2.Begin(ctx, beginReq(len(img), sig))
	if err != nil {
		t.Fatal(err)
	}
	if !res.GetResumed() || res.GetSession().GetSessionId() == "" {
		t.Fatalf("not resumed: %v", res)
	}
	id = res.GetSession().GetSessionId()
	missing := res.GetSession().GetMissing()
	for _, k := range durable {
		if missingBit(missing, k) {
			t.Fatalf("block %d was acknowledged durable (seq <= %d) but is missing after restart", k, acked)
		}
	}
	var todo []*otav1.Block
	for k := range nBlocks {
		if missingBit(missing, k) {
			todo = append(todo, blocksOf(img, testMaxBlock, k, k+1)...)
		}
	}
	t.Logf("acked seq %d: %d blocks durable before kill, %d missing after restart", acked, len(durable), len(todo))
	for i := 0; i < len(todo); i += per {
		if _, err := c2.WriteBatch(ctx, id, uint64(i+1), todo[i:min(i+per, len(todo))], i+per >= len(todo)); err != nil {
			t.Fatal(err)
		}
	}
	fin, err := c2.Finish(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	if fin.GetSession().GetState() != otav1.SessionState_SESSION_STATE_VERIFIED {
		t.Fatalf("finish: %v", fin)
	}
	act, err := c2.Activate(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	slot := act.GetSlot()
	onSlot, _ := os.ReadFile(map[string]string{"a": b.slotA, "b": b.slotB}[slot])
	if !bytes.Equal(onSlot[:len(img)], img) {
		t.Fatalf("slot %s content differs from the image", slot)
	}
	// Simulated reboot: a new boot ID, and the file backend's Boot runs at writer start.
	w2.stop(t)
	b.reboot(t)
	b.serve(t)
	c3 := writertest.Dial(t, b.sock)
	ds, err := c3.State(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if ds.GetImageState() != otav1.ImageState_IMAGE_STATE_TRIAL {
		t.Fatalf("after reboot image state %s, want trial", ds.GetImageState())
	}
	out, errOut, code := runCLI(t, "accept", "--socket", b.sock)
	if code != 0 {
		t.Fatalf("accept: exit %d: %s%s", code, out, errOut)
	}
	out, errOut, code = runCLI(t, "status", "--socket", b.sock, "--json")
	if code != 0 {
		t.Fatalf("status: exit %d: %s", code, errOut)
	}
	var js struct {
		State struct {
			ImageState string `json:"image_state"`
		} `json:"state"`
	}
	if err := json.Unmarshal([]byte(out), &js); err != nil {
		t.Fatalf("status --json: %v\n%s", err, out)
	}
	if js.State.ImageState != "IMAGE_STATE_NORMAL" {
		t.Errorf("after accept image state %s, want normal", js.State.ImageState)
	}
	_ = context.Background
}

// `serve` takes a listening socket passed the systemd way (LISTEN_FDS, LISTEN_PID, fd 3).
func TestServeSocketActivation(t *testing.T) {
	b := newBench(t, "")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: b.sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	f, err := ln.File()
	if err != nil {
		t.Fatal(err)
	}
	ln.SetUnlinkOnClose(false)
	ln.Close() // the child gets its own copy of the descriptor
	defer f.Close()
	// LISTEN_PID must be the writer's own pid: set it in a shell that then execs the writer.
	cmd := exec.Command("sh", "-c", `LISTEN_PID=$$ LISTEN_FDS=1 exec "$0" serve --config "$1"`, binary, b.cfg)
	cmd.ExtraFiles = []*os.File{f}
	var logs bytes.Buffer
	cmd.Stdout, cmd.Stderr = &logs, &logs
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	done := make(chan error, 1)
	go func() { done <- cmd.Wait() }()
	c := writertest.Dial(t, b.sock)
	if _, err := c.State(t.Context()); err != nil {
		t.Error(err)
	}
	cmd.Process.Signal(syscall.SIGTERM)
	if err := <-done; err != nil {
		t.Errorf("exit: %v", err)
	}
	if !strings.Contains(logs.String(), "using socket passed by systemd") {
		t.Errorf("writer did not use the passed socket:\n%s", logs.String())
	}
}

// A second writer on the same configuration stops at the socket, before its simulated boot
// could count a boot that did not happen.
func TestSecondWriterRefused(t *testing.T) {
	b := newBench(t, "")
	b.serve(t)
	writertest.Dial(t, b.sock)
	bootFile := b.dir + "/state/" + assemble.BootStateFile
	before, err := os.ReadFile(bootFile)
	if err != nil {
		t.Fatal(err)
	}
	_, errOut, code := runCLI(t, "serve", "--config", b.cfg)
	if code != exitUsage || !strings.Contains(errOut, "another writer is serving") {
		t.Fatalf("second serve: exit %d, want %d\n%s", code, exitUsage, errOut)
	}
	after, _ := os.ReadFile(bootFile)
	if !bytes.Equal(before, after) {
		t.Errorf("boot state changed by the refused writer:\n%s\n%s", before, after)
	}
	// The first writer still serves.
	if _, err := writertest.Dial(t, b.sock).State(t.Context()); err != nil {
		t.Error(err)
	}
}
