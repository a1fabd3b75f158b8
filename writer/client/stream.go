package client

import (
	"context"
	"errors"
	"io"
	"sync"

	"google.golang.org/grpc"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

// BlockStream sends blocks of one session over a WriteBlocks stream and delivers the
// writer's durability acknowledgements. A WriteAck with DurableSeq n means every block sent
// with seq <= n is durable. The first error ends the stream; open a new one to go on.
type BlockStream struct {
	sessionID string
	stream    grpc.BidiStreamingClient[otav1.WriteBlocksRequest, otav1.WriteAck]
	cancel    context.CancelFunc
	c         *Client
	acks      chan *otav1.WriteAck
	done      chan struct{}
	err       error // valid after done is closed

	mu  sync.Mutex // Send
	seq uint64
}

// OpenBlockStream starts a WriteBlocks stream for sessionID. Acks must be drained (or the
// stream closed): an unread ack holds back the next ones.
func (c *Client) OpenBlockStream(ctx context.Context, sessionID string) (*BlockStream, error) {
	ctx, cancel := context.WithCancel(ctx)
	st, err := c.w.WriteBlocks(ctx, blockCallOption())
	if err != nil {
		cancel()
		return nil, wrap(err)
	}
	b := &BlockStream{sessionID: sessionID, stream: st, cancel: cancel, c: c, acks: make(chan *otav1.WriteAck, 16), done: make(chan struct{})}
	go b.recv(ctx)
	return b, nil
}

func (b *BlockStream) recv(ctx context.Context) {
	defer close(b.done)
	defer close(b.acks)
	for {
		a, err := b.stream.Recv()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			b.err = wrap(err)
			return
		}
		select {
		case b.acks <- a:
		case <-ctx.Done():
			b.err = wrap(ctx.Err())
			return
		}
	}
}

// Acks delivers acknowledgements; it is closed when the stream ends (see Wait for why).
func (b *BlockStream) Acks() <-chan *otav1.WriteAck { return b.acks }

// Send sends one message of blocks and returns its seq (1, 2, ... per stream). With sync the
// writer makes everything so far durable and acknowledges this seq.
func (b *BlockStream) Send(blocks []*otav1.Block, sync bool) (uint64, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	req := &otav1.WriteBlocksRequest{SessionId: b.sessionID, Seq: b.seq + 1, Blocks: blocks, Sync: sync}
	if err := b.c.checkSize(req); err != nil {
		return 0, err
	}
	if err := b.stream.Send(req); err != nil {
		if errors.Is(err, io.EOF) {
			// The stream ended; the real status comes from the receive side.
			<-b.done
			if b.err != nil {
				return 0, b.err
			}
		}
		return 0, wrap(err)
	}
	b.seq++
	return b.seq, nil
}

// CloseSend tells the writer no more blocks follow; pending acks still arrive. Wait then
// returns when the writer has answered everything.
func (b *BlockStream) CloseSend() error {
	b.mu.Lock()
	defer b.mu.Unlock()
	return wrap(b.stream.CloseSend())
}

// Wait blocks until the stream has ended (after CloseSend, an error, or Close) and returns
// its error: nil for a clean end, else an error whose status.ReasonOf is the writer's reason.
// The stream ends only once its acks are read: range over Acks until it is closed first.
func (b *BlockStream) Wait() error {
	<-b.done
	return b.err
}

// Close cancels the stream and releases its goroutine.
func (b *BlockStream) Close() {
	b.cancel()
	go func() {
		for range b.acks {
		}
	}()
	<-b.done
}
