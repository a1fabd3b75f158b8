package client_test

import (
	"context"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	"go.uber.org/goleak"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/server"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// failCore syncs every write and refuses the message that carries an offset past 1 MiB.
type failCore struct{ server.Core }

func (failCore) MaxBlockSize() uint32 { return 4096 }
func (failCore) Handshake(context.Context, *otav1.HandshakeRequest) (*otav1.HandshakeResponse, error) {
	return &otav1.HandshakeResponse{ProtocolVersion: otav1.ProtocolVersion_PROTOCOL_VERSION_1}, nil
}
func (failCore) Write(_ context.Context, _ string, blocks []*otav1.Block, sync bool) (server.WriteResult, error) {
	for _, b := range blocks {
		if b.GetOffset() >= 1<<20 {
			return server.WriteResult{}, status.Errorf(otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, "offset %d", b.GetOffset())
		}
	}
	return server.WriteResult{Synced: sync}, nil
}

func serve(t *testing.T) string {
	dir, err := os.MkdirTemp("", "owc")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	sock := filepath.Join(dir, "w.sock")
	ln, err := server.Listen(sock, server.ListenConfig{})
	if err != nil {
		t.Fatal(err)
	}
	srv := server.New(failCore{}, server.Options{})
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	t.Cleanup(func() {
		srv.GracefulStop(context.Background())
		<-done
	})
	return sock
}

func dial(t *testing.T, sock string) *client.Client {
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, sock, client.Options{Name: "client-test"})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Handshake(ctx); err != nil {
		t.Fatal(err)
	}
	return c
}

// The writer's refusal ends the stream: Acks closes, and both Send and Wait report the
// typed reason.
func TestBlockStreamError(t *testing.T) {
	c := dial(t, serve(t))
	st, err := c.OpenBlockStream(t.Context(), "s")
	if err != nil {
		t.Fatal(err)
	}
	if seq, err := st.Send([]*otav1.Block{{Offset: 0}}, true); err != nil || seq != 1 {
		t.Fatalf("send: seq %d err %v", seq, err)
	}
	if a := <-st.Acks(); a.GetDurableSeq() != 1 {
		t.Fatalf("ack %v, want durable_seq 1", a)
	}
	if _, err := st.Send([]*otav1.Block{{Offset: 2 << 20}}, true); err != nil {
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
	c := dial(t, serve(t))
	st, err := c.OpenBlockStream(t.Context(), "s")
	if err != nil {
		t.Fatal(err)
	}
	for range 40 { // more than the ack buffer
		if _, err := st.Send([]*otav1.Block{{Offset: 0}}, true); err != nil {
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
