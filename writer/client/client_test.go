package client_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/server"
	"github.com/gwota/gwota/writer/writertest"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// serve is a fake writer with one session "s-j" of a 1 MiB image in 4 KiB blocks.
func serve(t *testing.T) *client.Client {
	fake := writertest.NewFake(4096)
	c := writertest.Dial(t, writertest.Serve(t, fake, server.Options{}, server.ListenConfig{}, nil).Sock)
	if _, err := c.Begin(t.Context(), &otav1.BeginSessionRequest{JobId: "j", FilePath: writertest.Target, FileSize: 1 << 20, BlockSize: 4096}); err != nil {
		t.Fatal(err)
	}
	return c
}

const session = "s-j"

var block = make([]byte, 4096)

// The writer's refusal ends the stream: Acks closes, and both Send and Wait report the
// typed reason.
func TestBlockStreamError(t *testing.T) {
	c := serve(t)
	st, err := c.OpenBlockStream(t.Context(), session)
	if err != nil {
		t.Fatal(err)
	}
	if seq, err := st.Send([]*otav1.Block{{Offset: 0, Data: block}}, true); err != nil || seq != 1 {
		t.Fatalf("send: seq %d err %v", seq, err)
	}
	if a := <-st.Acks(); a.GetDurableSeq() != 1 {
		t.Fatalf("ack %v, want durable_seq 1", a)
	}
	if _, err := st.Send([]*otav1.Block{{Offset: 2 << 20, Data: block}}, true); err != nil {
		t.Fatal(err) // the refusal arrives asynchronously
	}
	for range st.Acks() {
	}
	if r := status.ReasonOf(st.Wait()); r != otav1.Reason_REASON_BLOCK_OUT_OF_RANGE {
		t.Errorf("Wait reason %s, want block_out_of_range", status.String(r))
	}
	if _, err := st.Send(nil, true); status.ReasonOf(err) != otav1.Reason_REASON_BLOCK_OUT_OF_RANGE {
		t.Errorf("Send after the refusal: %v, want block_out_of_range", err)
	}
	st.Close()
}

// Close without reading acks releases everything (goleak checks at exit).
func TestBlockStreamCloseUndrained(t *testing.T) {
	c := serve(t)
	st, err := c.OpenBlockStream(t.Context(), session)
	if err != nil {
		t.Fatal(err)
	}
	for range 40 { // more than the ack buffer
		if _, err := st.Send([]*otav1.Block{{Offset: 0, Data: block}}, true); err != nil {
			t.Fatal(err)
		}
	}
	st.Close()
	if err := st.Wait(); status.ReasonOf(err) != otav1.Reason_REASON_USER_ABORT {
		t.Errorf("Wait after Close: %v, want user_abort (canceled)", err)
	}
}

func TestDialEmptyPath(t *testing.T) {
	if _, err := client.Dial(t.Context(), "", client.Options{}); err == nil {
		t.Fatal("no error")
	}
}

// A socket that takes connections and closes them without a byte is how the writer refuses a
// peer uid at accept: WaitReady says permission_denied at once. One that takes them and stays
// silent (a writer still starting) is waited for. (The real refusal, ota-net under a uid the
// writer does not allow, is driven by test/e2e TestEveryReason.)
func TestWaitReadyTellsRefusalFromSilence(t *testing.T) {
	for _, tc := range []struct {
		name  string
		close bool
		want  otav1.Reason
	}{
		{"closed at accept", true, otav1.Reason_REASON_PERMISSION_DENIED},
		{"silent", false, otav1.Reason_REASON_WRITER_UNAVAILABLE},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir, err := os.MkdirTemp("", "owc")
			if err != nil {
				t.Fatal(err)
			}
			defer os.RemoveAll(dir)
			sock := filepath.Join(dir, "w.sock")
			ln, err := net.Listen("unix", sock)
			if err != nil {
				t.Fatal(err)
			}
			done := make(chan struct{})
			go func() {
				defer close(done)
				var held []net.Conn
				defer func() {
					for _, c := range held {
						c.Close()
					}
				}()
				for {
					c, err := ln.Accept()
					if err != nil {
						return
					}
					if tc.close {
						c.Close()
					} else {
						held = append(held, c)
					}
				}
			}()
			defer func() { ln.Close(); <-done }()
			c, err := client.Dial(t.Context(), sock, client.Options{})
			if err != nil {
				t.Fatal(err)
			}
			defer c.Close()
			ctx, cancel := context.WithTimeout(t.Context(), 8*time.Second)
			defer cancel()
			err = c.WaitReady(ctx)
			if got := status.ReasonOf(err); got != tc.want {
				t.Fatalf("WaitReady: %v (%s), want %s", err, status.Name(got), status.Name(tc.want))
			}
		})
	}
}

// Write is the api.Writer form of WriteBatch: Synced when the writer synced, asked or by its
// own policy (here every third write), with its block counts.
func TestWrite(t *testing.T) {
	fake := writertest.NewFake(4096)
	fake.SyncEvery = 3
	c := writertest.Dial(t, writertest.Serve(t, fake, server.Options{}, server.ListenConfig{}, nil).Sock)
	if _, err := c.Begin(t.Context(), &otav1.BeginSessionRequest{JobId: "j", FilePath: writertest.Target, FileSize: 1 << 20, BlockSize: 4096}); err != nil {
		t.Fatal(err)
	}
	for i, tc := range []struct {
		sync bool
		want api.WriteResult
	}{
		{false, api.WriteResult{Synced: false, Durable: 0, Received: 1, Total: 256}},
		{true, api.WriteResult{Synced: true, Durable: 2, Received: 2, Total: 256}},
		{false, api.WriteResult{Synced: false, Durable: 2, Received: 3, Total: 256}},
		{false, api.WriteResult{Synced: false, Durable: 2, Received: 4, Total: 256}},
		{false, api.WriteResult{Synced: true, Durable: 5, Received: 5, Total: 256}}, // the writer's own sync
	} {
		got, err := c.Write(t.Context(), session, []*otav1.Block{{Offset: uint64(i) * 4096, Data: block}}, tc.sync)
		if err != nil {
			t.Fatal(err)
		}
		if diff := cmp.Diff(tc.want, got); diff != "" {
			t.Errorf("write %d, sync %v (-want +got):\n%s", i, tc.sync, diff)
		}
	}
	if _, err := c.Write(t.Context(), session, []*otav1.Block{{Offset: 2 << 20, Data: block}}, true); status.ReasonOf(err) != otav1.Reason_REASON_BLOCK_OUT_OF_RANGE {
		t.Errorf("write past the end: %v, want block_out_of_range", err)
	}
}
