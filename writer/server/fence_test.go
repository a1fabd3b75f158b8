package server_test

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/server"
	"github.com/gwota/gwota/writer/writertest"
)

// wireCalls drives the real engine through the gRPC server on a Unix socket and notes each
// outcome as the client sees it ("call: ok" or "call: <reason>").
type wireCalls struct {
	t   *testing.T
	r   *engineRig
	c   *client.Client
	img []byte
	sig []byte
	id  string
	seq uint64
	got []string
}

const wireBlock = 4096

func (w *wireCalls) note(call string, err error) {
	res := "ok"
	if err != nil {
		res = status.Name(status.ReasonOf(err))
	}
	w.got = append(w.got, call+": "+res)
}

func (w *wireCalls) begin(job string) {
	res, err := w.c.Begin(w.t.Context(), &otav1.BeginSessionRequest{JobId: job, FilePath: writertest.Target, FileSize: uint64(len(w.img)), BlockSize: wireBlock,
		SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: w.sig, CertName: certName})
	if err == nil {
		w.id = res.GetSession().GetSessionId()
	}
	w.note("begin "+job, err)
}

// write sends blocks [from, to) one per message (the engine's limit is one block of 4 KiB),
// each asking for durability when sync: the engine reads the boot state before blocks that
// are to become durable are written.
func (w *wireCalls) write(from, to int, sync bool) {
	var err error
	for k := from; k < to && k*wireBlock < len(w.img) && err == nil; k++ {
		w.seq++
		blk := &otav1.Block{Offset: uint64(k * wireBlock), Data: w.img[k*wireBlock : min((k+1)*wireBlock, len(w.img))]}
		_, err = w.c.WriteBatch(w.t.Context(), w.id, w.seq, []*otav1.Block{blk}, sync)
	}
	w.note("write", err)
}

func (w *wireCalls) finish() {
	_, err := w.c.Finish(w.t.Context(), w.id)
	w.note("finish", err)
}

func (w *wireCalls) activate() {
	_, err := w.c.Activate(w.t.Context(), w.id)
	w.note("activate", err)
}

// other switches the boot state behind the writer's back (an operator's fw_setenv).
func (w *wireCalls) other() { w.note("other actor activates b", w.r.boot.Activate(w.t.Context(), "b")) }

// TestNoWriteIntoPendingSlotOverSocket is the order-of-calls table of the engine's fence as
// ota-net meets it: over the socket, no order of calls writes, verifies or activates an image
// in the slot activated for the next boot.
func TestNoWriteIntoPendingSlotOverSocket(t *testing.T) {
	all := func(w *wireCalls) { w.write(0, 9, true) }
	for _, tc := range []struct {
		name string
		run  func(w *wireCalls)
		want []string
		// blocks: how many leading blocks of the image slot b holds afterwards.
		blocks int
	}{{
		name: "activation, then the same job begins again",
		run: func(w *wireCalls) {
			w.begin("j1")
			all(w)
			w.finish()
			w.activate()
			w.begin("j1")
			w.write(0, 1, true)
		},
		want:   []string{"begin j1: ok", "write: ok", "finish: ok", "activate: ok", "begin j1: bad_image_state", "write: bad_file_handle"},
		blocks: 9,
	}, {
		name:   "activation, then another job begins",
		run:    func(w *wireCalls) { w.begin("j1"); all(w); w.finish(); w.activate(); w.begin("j2") },
		want:   []string{"begin j1: ok", "write: ok", "finish: ok", "activate: ok", "begin j2: bad_image_state"},
		blocks: 9,
	}, {
		name:   "slot activated by another actor while the session writes",
		run:    func(w *wireCalls) { w.begin("j1"); w.write(0, 2, true); w.other(); w.write(2, 9, true); w.finish() },
		want:   []string{"begin j1: ok", "write: ok", "other actor activates b: ok", "write: bad_image_state", "finish: bad_file_handle"},
		blocks: 2,
	}, {
		name:   "slot activated by another actor before finish",
		run:    func(w *wireCalls) { w.begin("j1"); all(w); w.other(); w.finish(); w.activate() },
		want:   []string{"begin j1: ok", "write: ok", "other actor activates b: ok", "finish: bad_image_state", "activate: bad_file_handle"},
		blocks: 9,
	}, {
		name:   "slot activated by another actor, the job resumes",
		run:    func(w *wireCalls) { w.begin("j1"); w.write(0, 2, true); w.other(); w.begin("j1"); w.write(2, 9, true) },
		want:   []string{"begin j1: ok", "write: ok", "other actor activates b: ok", "begin j1: bad_image_state", "write: bad_file_handle"},
		blocks: 2,
	}} {
		t.Run(tc.name, func(t *testing.T) {
			r := newEngineRig(t, 4096)
			w := &wireCalls{t: t, r: r, img: randBytes(t, 8*wireBlock+100)}
			var err error
			if w.sig, err = r.id.Sign(w.img); err != nil {
				t.Fatal(err)
			}
			w.c = dial(t, start(t, r.e, server.Options{}, server.ListenConfig{}).Sock)
			tc.run(w)
			if d := cmp.Diff(tc.want, w.got); d != "" {
				t.Fatalf("calls (-want +got):\n%s", d)
			}
			if a, _ := os.ReadFile(filepath.Join(r.dir, "slot_a")); len(a) != 0 {
				t.Error("slot a (running) was written")
			}
			b, _ := os.ReadFile(filepath.Join(r.dir, "slot_b"))
			n := min(tc.blocks*wireBlock, len(w.img))
			if len(b) < n || !bytes.Equal(b[:n], w.img[:n]) || bytes.ContainsFunc(b[n:], func(r rune) bool { return r != 0 }) {
				t.Errorf("slot b holds other than the first %d blocks of the image (%d bytes)", tc.blocks, len(b))
			}
		})
	}
}
