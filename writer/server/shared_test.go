package server_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"testing"
	"time"

	"golang.org/x/sys/unix"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/server"
	"github.com/gwota/gwota/writer/sharedbuf"
	"github.com/gwota/gwota/writer/writertest"
)

// TestSharedBufferRefusals: ota-net is hostile to the writer. Every malformed reference to
// a shared buffer ends the stream with invalid_request and writes nothing of the message.
func TestSharedBufferRefusals(t *testing.T) {
	core := writertest.NewFake(4096)
	const bs = rigBlock
	rig := newSharedRig(t, core, 16*bs)
	c, id, sb, ctx := rig.c, rig.id, rig.sb, t.Context()
	other := dialBuffer(t, rig.sock)
	if err := sb.Write(0, [][]byte{bytes.Repeat([]byte{7}, 64*bs)}); err != nil {
		t.Fatal(err)
	}
	size := uint64(sb.Size())
	tok := sb.Token()
	ref := func(off uint64, n uint32) *otav1.Block {
		return &otav1.Block{Offset: 0, BufferOffset: off, BufferLength: n}
	}
	msg := func(seq uint64, token []byte, blocks ...*otav1.Block) *otav1.WriteBlocksRequest {
		return &otav1.WriteBlocksRequest{SessionId: id, Seq: seq, BufferToken: token, Blocks: blocks}
	}
	many := make([]*otav1.Block, 0, 16)
	for i := range 16 {
		many = append(many, &otav1.Block{Offset: uint64(i) * bs, BufferOffset: uint64(i) * bs, BufferLength: bs})
	}
	tests := []struct {
		name string
		msgs []*otav1.WriteBlocksRequest
	}{
		{"reference without a token", []*otav1.WriteBlocksRequest{msg(1, nil, ref(0, bs))}},
		{"unknown token", []*otav1.WriteBlocksRequest{msg(1, bytes.Repeat([]byte{1}, 16), ref(0, bs))}},
		{"range past the end", []*otav1.WriteBlocksRequest{msg(1, tok, ref(size-bs/2, bs))}},
		{"offset past the end", []*otav1.WriteBlocksRequest{msg(1, tok, ref(size+1, 1))}},
		{"offset that overflows", []*otav1.WriteBlocksRequest{msg(1, tok, ref(1<<64-10, bs))}},
		{"data and a reference", []*otav1.WriteBlocksRequest{msg(1, tok, &otav1.Block{Data: make([]byte, bs), BufferLength: bs})}},
		{"offset without a length", []*otav1.WriteBlocksRequest{msg(1, tok, &otav1.Block{Data: make([]byte, bs), BufferOffset: 5})}},
		{"more than a message may carry", []*otav1.WriteBlocksRequest{msg(1, tok, many...)}},
		{"another token later", []*otav1.WriteBlocksRequest{msg(1, tok), msg(2, other.Token(), ref(0, bs))}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			st, err := c.Raw().WriteBlocks(ctx)
			if err != nil {
				t.Fatal(err)
			}
			for _, m := range tc.msgs {
				if err := st.Send(m); err != nil {
					break
				}
			}
			st.CloseSend()
			for err == nil {
				_, err = st.Recv()
			}
			if got := status.ReasonOf(err); got != otav1.Reason_REASON_INVALID_REQUEST {
				t.Errorf("stream ended with %v (%s), want invalid_request", err, status.String(got))
			}
			if n := core.Durable(id); n != 0 {
				t.Errorf("%d blocks durable after a refused message", n)
			}
			if img := core.Image(id); len(img) != 0 {
				t.Errorf("%d bytes written after a refused message", len(img))
			}
		})
	}
	t.Run("unary call", func(t *testing.T) {
		_, err := c.Raw().WriteBatch(ctx, msg(1, tok, ref(0, bs)))
		if got := status.ReasonOf(err); got != otav1.Reason_REASON_INVALID_REQUEST {
			t.Errorf("WriteBatch with a reference: %v, want invalid_request", err)
		}
	})
}

// TestSharedBufferSealed: the buffer ota-net gets cannot be shrunk or grown (the writer's
// mapping can never fault), nor its seals changed.
func TestSharedBufferSealed(t *testing.T) {
	r := start(t, writertest.NewFake(4096), server.Options{}, server.ListenConfig{})
	sb := dialBuffer(t, r.Sock)
	fd := int(sb.Fd())
	seals, err := unix.FcntlInt(uintptr(fd), unix.F_GET_SEALS, 0)
	if err != nil {
		t.Fatal(err)
	}
	if want := unix.F_SEAL_SHRINK | unix.F_SEAL_GROW | unix.F_SEAL_SEAL; seals&want != want {
		t.Errorf("seals %#x, want %#x set", seals, want)
	}
	for _, n := range []int64{0, sb.Size() / 2, sb.Size() * 2} {
		if err := unix.Ftruncate(fd, n); !errors.Is(err, unix.EPERM) {
			t.Errorf("ftruncate to %d: %v, want EPERM", n, err)
		}
	}
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_WRITE); !errors.Is(err, unix.EPERM) {
		t.Errorf("adding a seal: %v, want EPERM", err)
	}
}

// TestSideChannelRefusals: a connection that does not send the magic gets no buffer, and no
// more than the limit are handed out at once; grpc on the same socket goes on serving.
func TestSideChannelRefusals(t *testing.T) {
	r := start(t, writertest.NewFake(4096), server.Options{}, server.ListenConfig{})
	ctx := t.Context()
	t.Run("wrong magic", func(t *testing.T) {
		conn, err := net.Dial("unix", r.Sock)
		if err != nil {
			t.Fatal(err)
		}
		defer conn.Close()
		conn.SetDeadline(time.Now().Add(10 * time.Second))
		if _, err := conn.Write([]byte("GWOTA-SOMETHING!")); err != nil {
			t.Fatal(err)
		}
		if n, err := conn.Read(make([]byte, 64)); err != io.EOF {
			t.Errorf("read %d bytes, %v; want the writer to close (EOF)", n, err)
		}
	})
	t.Run("limit", func(t *testing.T) {
		var got []*sharedbuf.Client
		defer func() {
			for _, b := range got {
				b.Close()
			}
		}()
		for {
			b, err := sharedbuf.Dial(ctx, r.Sock)
			if err != nil {
				break
			}
			got = append(got, b)
			if len(got) > 16 {
				t.Fatalf("%d buffers handed out at once", len(got))
			}
		}
		if len(got) != 4 {
			t.Fatalf("%d buffers handed out at once, want the limit of 4", len(got))
		}
		// grpc still serves beside the side channels.
		if _, err := dial(t, r.Sock).State(ctx); err != nil {
			t.Fatal(err)
		}
	})
}

// gateWriter stops in Write until the test lets it go on, and reports the first block's data
// as the engine sees it then.
type gateWriter struct {
	api.Writer
	entered chan struct{}
	proceed chan struct{}
	got     chan []byte
}

func (w *gateWriter) Write(ctx context.Context, id string, blocks []*otav1.Block, sync bool) (api.WriteResult, error) {
	if len(blocks) > 0 && len(blocks[0].GetData()) > 0 {
		w.entered <- struct{}{}
		<-w.proceed
		w.got <- bytes.Clone(blocks[0].GetData())
	}
	return w.Writer.Write(ctx, id, blocks, sync)
}

// TestSharedBufferCopiedBeforeUse: ota-net rewrites the buffer while the engine holds the
// blocks of a message that referred to it. The engine still sees, and writes, the bytes that
// were there when the message was taken: what it got is the handler's own copy.
func TestSharedBufferCopiedBeforeUse(t *testing.T) {
	core := writertest.NewFake(4096)
	w := &gateWriter{Writer: core, entered: make(chan struct{}), proceed: make(chan struct{}), got: make(chan []byte, 1)}
	const bs = rigBlock
	rig := newSharedRig(t, w, bs)
	c, id, sb, ctx := rig.c, rig.id, rig.sb, t.Context()
	sent, later := bytes.Repeat([]byte{0xaa}, bs), bytes.Repeat([]byte{0x55}, bs)
	if err := sb.Write(0, [][]byte{sent}); err != nil {
		t.Fatal(err)
	}
	st, err := c.Raw().WriteBlocks(ctx)
	if err != nil {
		t.Fatal(err)
	}
	if err := st.Send(&otav1.WriteBlocksRequest{SessionId: id, Seq: 1, Sync: true, BufferToken: sb.Token(),
		Blocks: []*otav1.Block{{Offset: 0, BufferOffset: 0, BufferLength: bs}}}); err != nil {
		t.Fatal(err)
	}
	<-w.entered
	if err := sb.Write(0, [][]byte{later}); err != nil {
		t.Fatal(err)
	}
	close(w.proceed)
	if got := <-w.got; !bytes.Equal(got, sent) {
		t.Errorf("the engine saw %x... after ota-net rewrote the buffer, want the bytes sent (%x...)", got[:4], sent[:4])
	}
	if _, err := st.Recv(); err != nil {
		t.Fatal(err)
	}
	st.CloseSend()
	if img := core.Image(id); !bytes.Equal(img, sent) {
		t.Errorf("written %x..., want the bytes sent", img[:min(4, len(img))])
	}
}

// FuzzSharedBufferRefs sends messages whose blocks refer to the shared buffer with offsets,
// lengths, inline data and tokens from the fuzzer. Each ends accepted or refused with a typed
// reason the client can act on (never a panic's other, never a broken writer), and the
// writer goes on serving.
// go test -run '^$' -fuzz FuzzSharedBufferRefs ./writer/server/
func FuzzSharedBufferRefs(f *testing.F) {
	const bs = rigBlock
	rig := newSharedRig(f, writertest.NewFake(4096), 64*bs)
	c, id, sb, ctx := rig.c, rig.id, rig.sb, f.Context()
	size := uint64(sb.Size())
	f.Add([]byte{0, 0, 4, 0, 0, 0, 0, 0, 0, 0, 0}, uint8(0))
	f.Add([]byte{1, 0, 4, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xf0, 2, 0, 4, 0, 0, 0, 0, 0, 0, 0x10, 0}, uint8(1))
	f.Add([]byte{0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 5}, uint8(2))
	f.Fuzz(func(t *testing.T, spec []byte, tokenKind uint8) {
		// 11 bytes a block: block index (1), length (2, LE), buffer offset (8, LE; taken
		// modulo twice the buffer's size unless its top byte is 0xff, then as is).
		var blocks []*otav1.Block
		for len(spec) >= 11 && len(blocks) < 300 {
			n := uint32(spec[1]) | uint32(spec[2])<<8
			off := uint64(0)
			for i := 10; i >= 3; i-- {
				off = off<<8 | uint64(spec[i])
			}
			if spec[10] != 0xff {
				off %= 2 * size
			}
			b := &otav1.Block{Offset: uint64(spec[0]%80) * bs, BufferOffset: off, BufferLength: n}
			if spec[0]&0x80 != 0 {
				b.Data = make([]byte, n%(2*bs))
			}
			blocks = append(blocks, b)
			spec = spec[11:]
		}
		var token []byte
		switch tokenKind % 3 {
		case 0:
			token = sb.Token()
		case 1:
			token = bytes.Repeat([]byte{tokenKind}, 16)
		}
		st, err := c.Raw().WriteBlocks(ctx)
		if err != nil {
			t.Fatal(err)
		}
		err = st.Send(&otav1.WriteBlocksRequest{SessionId: id, Seq: 1, Sync: true, BufferToken: token, Blocks: blocks})
		st.CloseSend()
		for err == nil {
			_, err = st.Recv()
		}
		switch reason := status.ReasonOf(err); {
		case errors.Is(err, io.EOF):
		case reason == otav1.Reason_REASON_INVALID_REQUEST, reason == otav1.Reason_REASON_BLOCK_OUT_OF_RANGE:
		default:
			t.Fatalf("stream ended with %v (%s)", err, status.String(reason))
		}
		if _, err := c.State(ctx); err != nil {
			t.Fatalf("writer after the message: %v", err)
		}
	})
}

// sharedRig is a served writer (impl) with a client, a session of blocks of 1 KiB over
// fileSize bytes, and a shared buffer from the writer, given back when the test ends.
type sharedRig struct {
	sock string
	c    *client.Client
	id   string
	sb   *sharedbuf.Client
}

const rigBlock = 1024

func newSharedRig(t testing.TB, impl api.Writer, fileSize uint64) sharedRig {
	t.Helper()
	r := start(t, impl, server.Options{}, server.ListenConfig{})
	c := dial(t, r.Sock)
	begin, err := c.Begin(t.Context(), &otav1.BeginSessionRequest{JobId: "j", FilePath: writertest.Target, FileSize: fileSize, BlockSize: rigBlock})
	if err != nil {
		t.Fatal(err)
	}
	return sharedRig{sock: r.Sock, c: c, id: begin.GetSession().GetSessionId(), sb: dialBuffer(t, r.Sock)}
}

func dialBuffer(t testing.TB, sock string) *sharedbuf.Client {
	t.Helper()
	sb, err := sharedbuf.Dial(t.Context(), sock)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { sb.Close() })
	return sb
}
