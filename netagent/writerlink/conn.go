package writerlink

import (
	"context"
	"io"
	"sync"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/client"
)

// Conn is the writer as a Link drives it: the writer API, waiting until the writer serves,
// and block streams. Remote is ota-net's: writer/client over the writer's Unix socket. Local
// is an api.Writer linked into the same process, for the benchmark build of ota-net that
// prices the gRPC hop (cmd/ota-net/inproc.go); nothing shipped uses it.
type Conn interface {
	api.Writer
	WaitReady(ctx context.Context) error
	OpenBlockStream(ctx context.Context, sessionID string) (BlockStream, error)
	Close() error
}

// BlockStream is one session's stream of block messages and the writer's durability
// acknowledgements, as client.BlockStream documents it: a WriteAck with DurableSeq n means
// every message sent with seq <= n is durable; the first error ends the stream. Once Send
// returns the stream no longer refers to the blocks' data (Sink.SetOnSent recycles it).
type BlockStream interface {
	Send(blocks []*otav1.Block, sync bool) (uint64, error)
	Acks() <-chan *otav1.WriteAck
	Wait() error
	Close()
}

// Remote is the writer behind c, over its socket.
func Remote(c *client.Client) Conn { return remote{c} }

type remote struct{ *client.Client }

func (r remote) OpenBlockStream(ctx context.Context, sessionID string) (BlockStream, error) {
	return r.Client.OpenBlockStream(ctx, sessionID)
}

// Local is w linked into this process: no socket, no gRPC. A block stream is a goroutine that
// calls w.Write for each message in order and acknowledges the synced ones, as writer/server's
// WriteBlocks handler does, so the writer writes while the downloader goes on, as it does over
// the socket. Send copies the blocks' data into pooled buffers (as the socket path copies them
// into the writer's shared buffer, or grpc marshals them), so the caller may reuse its
// buffers at once. Close closes w when it is an io.Closer.
func Local(w api.Writer) Conn { return local{w} }

type local struct{ api.Writer }

func (local) WaitReady(context.Context) error { return nil }

func (l local) Close() error {
	if c, ok := l.Writer.(io.Closer); ok {
		return c.Close()
	}
	return nil
}

// localQueue is how many messages a local stream holds before Send waits: the sink's
// MaxAheadBytes bounds the bytes in flight anyway, as it does over the socket.
const localQueue = 16

// localBufs are the copies of block data a local stream holds until written.
var localBufs = sync.Pool{New: func() any { return new([]byte) }}

func (l local) OpenBlockStream(ctx context.Context, sessionID string) (BlockStream, error) {
	ctx, cancel := context.WithCancel(ctx)
	s := &localStream{id: sessionID, cancel: cancel, msgs: make(chan localMsg, localQueue),
		acks: make(chan *otav1.WriteAck, 16), done: make(chan struct{})}
	go s.run(ctx, l.Writer)
	return s, nil
}

type localMsg struct {
	seq    uint64
	blocks []*otav1.Block
	sync   bool
}

type localStream struct {
	id     string
	cancel context.CancelFunc
	msgs   chan localMsg
	acks   chan *otav1.WriteAck
	done   chan struct{}
	err    error // valid after done is closed

	mu  sync.Mutex // Send
	seq uint64
}

func (s *localStream) run(ctx context.Context, w api.Writer) {
	defer close(s.done)
	defer close(s.acks)
	for {
		var m localMsg
		select {
		case m = <-s.msgs:
		case <-ctx.Done():
			s.err = status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "local block stream closed: %w", ctx.Err())
			return
		}
		if n := len(m.blocks); n > api.MaxBlocksPerMessage {
			s.err = status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "%d blocks in one message, at most %d", n, api.MaxBlocksPerMessage)
			return
		}
		r, err := w.Write(ctx, s.id, m.blocks, m.sync)
		for _, b := range m.blocks {
			// The writer keeps nothing of a message once Write returns (as over grpc, where
			// the server's receive buffer is reused).
			localBufs.Put(&b.Data)
		}
		if err != nil {
			s.err = err
			return
		}
		if !r.Synced {
			continue
		}
		a := &otav1.WriteAck{SessionId: s.id, DurableSeq: m.seq, DurableBlocks: r.Durable, TotalBlocks: r.Total, ReceivedBlocks: r.Received}
		select {
		case s.acks <- a:
		case <-ctx.Done():
			s.err = status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "local block stream closed: %w", ctx.Err())
			return
		}
	}
}

func (s *localStream) Send(blocks []*otav1.Block, sync bool) (uint64, error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	select {
	case <-s.done:
		return 0, s.err
	default:
	}
	own := make([]*otav1.Block, len(blocks))
	for i, b := range blocks {
		buf := localBufs.Get().(*[]byte)
		*buf = append((*buf)[:0], b.GetData()...)
		own[i] = &otav1.Block{Offset: b.GetOffset(), Data: *buf}
	}
	select {
	case s.msgs <- localMsg{seq: s.seq + 1, blocks: own, sync: sync}:
	case <-s.done:
		return 0, s.err
	}
	s.seq++
	return s.seq, nil
}

func (s *localStream) Acks() <-chan *otav1.WriteAck { return s.acks }

func (s *localStream) Wait() error {
	<-s.done
	return s.err
}

func (s *localStream) Close() {
	s.cancel()
	go func() {
		for range s.acks {
		}
	}()
	<-s.done
}
