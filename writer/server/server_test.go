package server_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/server"
	"github.com/gwota/gwota/writer/writertest"
)

// helperEnv makes the test binary act as a client (run under another uid by the peer tests).
const helperEnv = "OTA_SERVER_TEST_CLIENT_SOCKET"

func TestMain(m *testing.M) {
	if sock := os.Getenv(helperEnv); sock != "" {
		os.Exit(helperClient(sock))
	}
	if sock := os.Getenv(authzEnv); sock != "" {
		os.Exit(authzHelper(sock))
	}
	goleak.VerifyTestMain(m)
}

// helperClient handshakes and prints "ok" or "reason=<name/code> code=<grpc code>".
func helperClient(sock string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, sock, client.Options{Name: "helper"})
	if err != nil {
		fmt.Println("dial:", err)
		return 2
	}
	defer c.Close()
	_, err = c.Handshake(ctx, nil)
	if err == nil {
		fmt.Println("ok")
		return 0
	}
	st, _ := grpcstatus.FromError(err)
	fmt.Printf("reason=%s code=%s\n", status.String(status.ReasonOf(err)), st.Code())
	return 1
}

func start(t testing.TB, impl api.Writer, opts server.Options, lc server.ListenConfig) *writertest.Server {
	t.Helper()
	return writertest.Serve(t, impl, opts, lc, nil)
}

func dial(t testing.TB, sock string) *client.Client {
	t.Helper()
	return writertest.Dial(t, sock)
}

func randBytes(t testing.TB, n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// TestSessionOverStream runs a session's blocks through the shared buffer (the writer offers
// one and the client takes it) and inside the messages (either side declines it).
func TestSessionOverStream(t *testing.T) {
	for _, tc := range []struct {
		name                   string
		serverNo, clientNo     bool
		wantShared, wantReason bool
	}{
		{name: "shared buffer", wantShared: true},
		{name: "writer offers none", serverNo: true},
		{name: "client declines", clientNo: true},
	} {
		t.Run(tc.name, func(t *testing.T) {
			core := writertest.NewFake(4096)
			r := start(t, core, server.Options{NoSharedBuffer: tc.serverNo}, server.ListenConfig{})
			c := writertest.DialOptions(t, r.Sock, client.Options{Name: "test", NoSharedBuffer: tc.clientNo})
			sessionOverStream(t, core, c, 1024, 10*1024+100, tc.wantShared)
		})
	}
}

// TestSharedBufferWrapsAround sends three times the shared buffer's size through it: the
// client waits for the writer's releases and reuses the buffer from its start.
func TestSharedBufferWrapsAround(t *testing.T) {
	core := writertest.NewFake(4096)
	r := start(t, core, server.Options{}, server.ListenConfig{})
	c := writertest.DialOptions(t, r.Sock, client.Options{Name: "test"})
	resp, err := c.Handshake(t.Context(), nil)
	if err != nil {
		t.Fatal(err)
	}
	size := int(resp.GetSharedBufferSize())
	if size < 2<<20 || size < 4*int(resp.GetMaxMessageSize()) {
		t.Fatalf("shared buffer of %d bytes offered, want at least 2 MiB and four messages of %d", size, resp.GetMaxMessageSize())
	}
	sessionOverStream(t, core, c, 2048, 3*size+3000, true)
}

func sessionOverStream(t *testing.T, core *writertest.Fake, c *client.Client, bs, size int, wantShared bool) {
	ctx := t.Context()

	if got, want := c.MaxMessageSize(), api.MaxMessageSize(4096); got != want {
		t.Errorf("client send limit after handshake = %d, want the writer's %d", got, want)
	}
	img := randBytes(t, size) // a short last block
	begin, err := c.Begin(ctx, &otav1.BeginSessionRequest{JobId: "j1", FilePath: writertest.Target, FileSize: uint64(len(img)), BlockSize: uint32(bs)})
	if err != nil {
		t.Fatal(err)
	}
	id := begin.GetSession().GetSessionId()
	bstream, err := c.OpenBlockStream(ctx, id)
	if err != nil {
		t.Fatal(err)
	}
	defer bstream.Close()
	if shared, why := bstream.SharedBuffer(); shared != wantShared || why != nil {
		t.Fatalf("stream uses a shared buffer: %v (why not: %v), want %v", shared, why, wantShared)
	}
	// Three blocks per message, sync on every second message and on the last.
	var msgs [][]*otav1.Block
	for off := 0; off < len(img); off += 3 * bs {
		var m []*otav1.Block
		for o := off; o < min(off+3*bs, len(img)); o += bs {
			m = append(m, &otav1.Block{Offset: uint64(o), Data: img[o:min(o+bs, len(img))]})
		}
		msgs = append(msgs, m)
	}
	var wantSeqs []uint64
	for i, m := range msgs {
		sync := i%2 == 1 || i == len(msgs)-1
		seq, err := bstream.Send(m, sync)
		if err != nil {
			t.Fatal(err)
		}
		if sync {
			wantSeqs = append(wantSeqs, seq)
		}
	}
	if err := bstream.CloseSend(); err != nil {
		t.Fatal(err)
	}
	var gotSeqs []uint64
	var last *otav1.WriteAck
	for a := range bstream.Acks() {
		gotSeqs = append(gotSeqs, a.GetDurableSeq())
		last = a
	}
	if err := bstream.Wait(); err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(wantSeqs, gotSeqs); diff != "" {
		t.Errorf("acked seqs (-want +got):\n%s", diff)
	}
	if n := uint64((size + bs - 1) / bs); last.GetDurableBlocks() != n || last.GetTotalBlocks() != n {
		t.Errorf("last ack %v, want %d/%d durable", last, n, n)
	}
	if _, err := c.Finish(ctx, id); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(core.Image(id), img) {
		t.Error("image differs from what was sent")
	}
}

func TestWriteBatch(t *testing.T) {
	core := writertest.NewFake(4096)
	r := start(t, core, server.Options{}, server.ListenConfig{})
	c := dial(t, r.Sock)
	ctx := t.Context()
	begin, err := c.Begin(ctx, &otav1.BeginSessionRequest{JobId: "j2", FilePath: writertest.Target, FileSize: 8192, BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	id := begin.GetSession().GetSessionId()
	a, err := c.WriteBatch(ctx, id, 7, []*otav1.Block{{Offset: 0, Data: randBytes(t, 4096)}}, false)
	if err != nil {
		t.Fatal(err)
	}
	if a.GetDurableSeq() != 0 || a.GetReceivedBlocks() != 1 {
		t.Errorf("unsynced ack %v: want durable_seq 0, received 1", a)
	}
	a, err = c.WriteBatch(ctx, id, 8, []*otav1.Block{{Offset: 4096, Data: randBytes(t, 4096)}}, true)
	if err != nil {
		t.Fatal(err)
	}
	if a.GetDurableSeq() != 8 || a.GetDurableBlocks() != 2 {
		t.Errorf("synced ack %v: want durable_seq 8, durable 2", a)
	}
}

// Every refusal arrives typed, with the table's gRPC code, and the writer keeps serving.
func TestTypedErrors(t *testing.T) {
	core := writertest.NewFake(4096)
	core.Panic("Extensions")
	core.Fail("Activate", writertest.ErrUntyped)
	r := start(t, core, server.Options{}, server.ListenConfig{})
	c := dial(t, r.Sock)
	ctx := t.Context()
	begin, err := c.Begin(ctx, &otav1.BeginSessionRequest{JobId: "j3", FilePath: writertest.Target, FileSize: 8192, BlockSize: 1024})
	if err != nil {
		t.Fatal(err)
	}
	id := begin.GetSession().GetSessionId()

	streamErr := func(msgs ...*otav1.WriteBlocksRequest) error {
		st, err := c.Raw().WriteBlocks(ctx, grpc.MaxCallSendMsgSize(1<<22))
		if err != nil {
			return err
		}
		for _, m := range msgs {
			if err := st.Send(m); err != nil {
				break
			}
		}
		st.CloseSend()
		for {
			if _, err := st.Recv(); err != nil {
				return err
			}
		}
	}
	manyBlocks := make([]*otav1.Block, api.MaxBlocksPerMessage+1)
	for i := range manyBlocks {
		manyBlocks[i] = &otav1.Block{Offset: uint64(i%8) * 1024}
	}
	tests := []struct {
		name   string
		call   func() error
		reason otav1.Reason
		code   codes.Code
	}{
		{"unknown target", func() error {
			_, err := c.Begin(ctx, &otav1.BeginSessionRequest{JobId: "x", FilePath: "nope", FileSize: 1, BlockSize: 1024})
			return err
		}, otav1.Reason_REASON_TARGET_UNKNOWN, codes.NotFound},
		{"unknown session", func() error {
			_, err := c.WriteBatch(ctx, "nope", 1, nil, true)
			return err
		}, otav1.Reason_REASON_BAD_FILE_HANDLE, codes.NotFound},
		{"commit outside trial", func() error { _, err := c.Commit(ctx, ""); return err },
			otav1.Reason_REASON_BAD_IMAGE_STATE, codes.FailedPrecondition},
		{"untyped writer error", func() error { _, err := c.Activate(ctx, id); return err },
			otav1.Reason_REASON_OTHER, codes.Internal},
		{"panic in the writer", func() error { _, err := c.Extensions(ctx); return err },
			otav1.Reason_REASON_OTHER, codes.Internal},
		{"stream: block out of range", func() error {
			return streamErr(&otav1.WriteBlocksRequest{SessionId: id, Seq: 1, Blocks: []*otav1.Block{{Offset: 1 << 20}}})
		}, otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, codes.OutOfRange},
		{"stream: seq not increasing", func() error {
			return streamErr(&otav1.WriteBlocksRequest{SessionId: id, Seq: 2}, &otav1.WriteBlocksRequest{SessionId: id, Seq: 2})
		}, otav1.Reason_REASON_INVALID_REQUEST, codes.InvalidArgument},
		{"stream: session changes", func() error {
			return streamErr(&otav1.WriteBlocksRequest{SessionId: id, Seq: 1}, &otav1.WriteBlocksRequest{SessionId: "other", Seq: 2})
		}, otav1.Reason_REASON_INVALID_REQUEST, codes.InvalidArgument},
		{"stream: message over the size limit (refused by grpc itself)", func() error {
			return streamErr(&otav1.WriteBlocksRequest{SessionId: id, Seq: 1, Blocks: []*otav1.Block{{Offset: 0, Data: make([]byte, 64<<10)}}})
		}, otav1.Reason_REASON_INVALID_REQUEST, codes.ResourceExhausted},
		{"client: message over the writer's limit reads as invalid_request", func() error {
			// A client that skipped the handshake does not know the limit.
			raw, err := client.Dial(ctx, r.Sock, client.Options{MaxMessageSize: 1 << 22})
			if err != nil {
				return err
			}
			defer raw.Close()
			_, err = raw.WriteBatch(ctx, id, 1, []*otav1.Block{{Offset: 0, Data: make([]byte, 64<<10)}}, true)
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST, codes.ResourceExhausted},
		{"stream: too many blocks", func() error {
			return streamErr(&otav1.WriteBlocksRequest{SessionId: id, Seq: 1, Blocks: manyBlocks})
		}, otav1.Reason_REASON_INVALID_REQUEST, codes.InvalidArgument},
		{"client refuses an oversize batch locally", func() error {
			_, err := c.WriteBatch(ctx, id, 1, []*otav1.Block{{Offset: 0, Data: make([]byte, 64<<10)}}, true)
			return err
		}, otav1.Reason_REASON_INVALID_REQUEST, codes.Unknown},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			err := tt.call()
			if err == nil {
				t.Fatal("no error")
			}
			if got := status.ReasonOf(err); got != tt.reason {
				t.Errorf("reason %s, want %s (err: %v)", status.String(got), status.String(tt.reason), err)
			}
			if st, _ := grpcstatus.FromError(err); st.Code() != tt.code {
				t.Errorf("gRPC code %s, want %s", st.Code(), tt.code)
			}
			// Still serving.
			if _, err := c.State(ctx); err != nil {
				t.Errorf("writer not serving after the refusal: %v", err)
			}
		})
	}
}

func TestListen(t *testing.T) {
	t.Run("path too long", func(t *testing.T) {
		p := filepath.Join(writertest.ShortDir(t), strings.Repeat("x", 110))
		_, err := server.Listen(p, server.ListenConfig{})
		if err == nil || !strings.Contains(err.Error(), "sun_path") {
			t.Fatalf("err = %v, want a sun_path length error", err)
		}
	})
	t.Run("regular file is not removed", func(t *testing.T) {
		p := filepath.Join(writertest.ShortDir(t), "w.sock")
		os.WriteFile(p, []byte("keep"), 0o600)
		if _, err := server.Listen(p, server.ListenConfig{}); err == nil {
			t.Fatal("listened over a regular file")
		}
		if b, _ := os.ReadFile(p); string(b) != "keep" {
			t.Error("regular file was touched")
		}
	})
	t.Run("live socket is not taken over", func(t *testing.T) {
		p := filepath.Join(writertest.ShortDir(t), "w.sock")
		ln, err := server.Listen(p, server.ListenConfig{})
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		if _, err := server.Listen(p, server.ListenConfig{}); err == nil || !strings.Contains(err.Error(), "in use") {
			t.Fatalf("err = %v, want in use", err)
		}
	})
	t.Run("stale socket is replaced; mode and group", func(t *testing.T) {
		p := filepath.Join(writertest.ShortDir(t), "w.sock")
		stale, err := net.ListenUnix("unix", &net.UnixAddr{Name: p, Net: "unix"})
		if err != nil {
			t.Fatal(err)
		}
		stale.SetUnlinkOnClose(false)
		stale.Close() // a dead writer's socket file stays behind
		ln, err := server.Listen(p, server.ListenConfig{Group: "65534"})
		if err != nil {
			t.Fatal(err)
		}
		fi, err := os.Stat(p)
		if err != nil {
			t.Fatal(err)
		}
		if fi.Mode().Perm() != 0o660 || fi.Mode().Type() != os.ModeSocket {
			t.Errorf("mode %v, want socket 0660", fi.Mode())
		}
		if gid := fi.Sys().(*syscall.Stat_t).Gid; gid != 65534 {
			t.Errorf("gid %d, want 65534", gid)
		}
		if c, err := net.Dial("unix", p); err != nil {
			t.Errorf("connect: %v", err)
		} else {
			c.Close()
		}
		ln.Close()
		if _, err := os.Lstat(p); !errors.Is(err, os.ErrNotExist) {
			t.Errorf("socket file left after Close: %v", err)
		}
	})
}

// A process under a uid that is not allowed has its connection closed by the writer (the
// client sees the writer as unavailable); the same uid passes once configured.
func TestPeerUID(t *testing.T) {
	requireRoot(t)
	const nobody = 65534
	bin := helperBinary(t)
	for _, tt := range []struct {
		name    string
		allowed []uint32
		serve   func(*server.Server, net.Listener) error
		want    string
	}{
		{"not allowed", nil, (*server.Server).Serve, "reason=writer_unavailable/3001 code=Unavailable"},
		{"allowed", []uint32{nobody}, (*server.Server).Serve, "ok"},
		// Defence in depth: without the check at accept, each request is still refused.
		{"not allowed, no check at accept", nil, server.ServeWithoutConnCheck, "reason=permission_denied/3002 code=PermissionDenied"},
	} {
		t.Run(tt.name, func(t *testing.T) {
			r := writertest.ServeWith(t, writertest.NewFake(4096), server.Options{AllowedUIDs: tt.allowed}, server.ListenConfig{Mode: 0o666}, nil, tt.serve)
			os.Chmod(filepath.Dir(r.Sock), 0o755)
			cmd := exec.Command(bin, "-test.run=^$")
			cmd.Env = append(os.Environ(), helperEnv+"="+r.Sock)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
			out, _ := cmd.CombinedOutput()
			if got := strings.TrimSpace(string(out)); got != tt.want {
				t.Errorf("client under uid %d: %q, want %q", nobody, got, tt.want)
			}
			// Root is always allowed.
			c := dial(t, r.Sock)
			if _, err := c.State(t.Context()); err != nil {
				t.Errorf("root refused: %v", err)
			}
		})
	}
}

func TestWaitReadyWaitsForStart(t *testing.T) {
	sock := filepath.Join(writertest.ShortDir(t), "w.sock")
	c, err := client.Dial(t.Context(), sock, client.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	ctx, cancel := context.WithTimeout(t.Context(), 150*time.Millisecond)
	defer cancel()
	if err := c.WaitReady(ctx); status.ReasonOf(err) != otav1.Reason_REASON_WRITER_UNAVAILABLE {
		t.Fatalf("no writer: err %v, want writer_unavailable", err)
	}
	// Start the writer while a WaitReady is waiting.
	ready := make(chan error, 1)
	go func() {
		ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
		defer cancel()
		ready <- c.WaitReady(ctx)
	}()
	ln, err := server.Listen(sock, server.ListenConfig{})
	if err != nil {
		t.Fatal(err)
	}
	srv := server.New(writertest.NewFake(4096), server.Options{}, nil)
	done := make(chan error, 1)
	go func() { done <- srv.Serve(ln) }()
	if err := <-ready; err != nil {
		t.Errorf("WaitReady: %v", err)
	}
	srv.GracefulStop(t.Context())
	<-done
}
