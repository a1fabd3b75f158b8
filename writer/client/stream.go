package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"sync"

	"google.golang.org/grpc"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/sharedbuf"
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

	// recv's side: it queues durable acks for forward (qmu) and ends with recvErr.
	recvDone chan struct{}
	recvErr  error // valid after recvDone is closed
	qmu      sync.Mutex
	queue    []*otav1.WriteAck
	queued   chan struct{}

	mu  sync.Mutex // Send
	seq uint64

	// The shared buffer (nil: blocks travel in the messages) and where in it the messages
	// not yet released are (ring, guarded by rmu; space is waited for on roomy).
	sb        *sharedbuf.Client
	sbErr     error // why there is none although the writer offered one
	tokenSent bool
	rmu       sync.Mutex
	roomy     *sync.Cond
	ring      ring
}

// OpenBlockStream starts a WriteBlocks stream for sessionID, through a shared buffer of
// the writer's when it offers one (SharedBuffer tells). Drain Acks (or close the stream):
// acks are queued until read (at most one per message sent), and the stream ends only once
// they are read. An unread ack holds back nothing else: not the shared buffer's releases,
// which Send may be waiting for.
func (c *Client) OpenBlockStream(ctx context.Context, sessionID string) (*BlockStream, error) {
	ctx, cancel := context.WithCancel(ctx)
	st, err := c.w.WriteBlocks(ctx, blockCallOption())
	if err != nil {
		cancel()
		return nil, wrap(err)
	}
	b := &BlockStream{sessionID: sessionID, stream: st, cancel: cancel, c: c, acks: make(chan *otav1.WriteAck, 16), done: make(chan struct{}),
		recvDone: make(chan struct{}), queued: make(chan struct{}, 1)}
	b.roomy = sync.NewCond(&b.rmu)
	if size := c.shared.Load(); size > 0 {
		// The writer offered a shared buffer: use it unless it cannot be had (an older
		// writer, a refusal), then the blocks go in the messages as before.
		sb, err := sharedbuf.Dial(ctx, c.sock)
		switch {
		case err != nil:
			b.sbErr = err
		case sb.Size() < 4*c.sendMax.Load():
			// Room for four of the largest messages, or a full buffer could wait forever
			// for a release (the writer releases every quarter).
			sb.Close()
			b.sbErr = fmt.Errorf("shared buffer of %d bytes is less than 4 messages of %d", sb.Size(), c.sendMax.Load())
		default:
			b.sb, b.ring.size = sb, sb.Size()
		}
	}
	go b.recv()
	go b.forward(ctx)
	return b, nil
}

// SharedBuffer reports whether the stream's blocks go through the writer's shared buffer,
// and if not although the writer offered one, why.
func (b *BlockStream) SharedBuffer() (bool, error) { return b.sb != nil, b.sbErr }

// recv reads the writer's acks. Releases are taken at once; durable acks are queued for
// forward, so that a caller slow to read Acks never holds back the releases its own Send
// may be waiting for (acks are at most one per message sent: the queue stays small).
func (b *BlockStream) recv() {
	defer close(b.recvDone)
	defer func() {
		b.rmu.Lock()
		b.ring.closed = true
		b.roomy.Broadcast()
		b.rmu.Unlock()
	}()
	for {
		a, err := b.stream.Recv()
		if errors.Is(err, io.EOF) {
			return
		}
		if err != nil {
			b.recvErr = wrap(err)
			return
		}
		if r := a.GetReleasedSeq(); r > 0 {
			b.rmu.Lock()
			b.ring.release(r)
			b.roomy.Broadcast()
			b.rmu.Unlock()
		}
		if a.GetDurableSeq() == 0 {
			continue // a release only: nothing for the acks' reader
		}
		b.qmu.Lock()
		b.queue = append(b.queue, a)
		b.qmu.Unlock()
		select {
		case b.queued <- struct{}{}:
		default:
		}
	}
}

// forward delivers the queued acks in order on Acks, and ends the stream (Acks closed, then
// done) once recv has ended and everything it queued was delivered.
func (b *BlockStream) forward(ctx context.Context) {
	defer close(b.done)
	defer close(b.acks)
	ended := false
	for {
		b.qmu.Lock()
		q := b.queue
		b.queue = nil
		b.qmu.Unlock()
		for _, a := range q {
			select {
			case b.acks <- a:
			case <-ctx.Done():
				<-b.recvDone // the stream's context is done: recv ends too
				b.err = b.recvErr
				if b.err == nil {
					b.err = wrap(ctx.Err())
				}
				return
			}
		}
		if ended && len(q) == 0 {
			b.err = b.recvErr
			return
		}
		select {
		case <-b.queued:
		case <-b.recvDone:
			ended = true // deliver what is left, then end
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
	if b.sb != nil {
		if err := b.share(req); err != nil {
			return 0, err
		}
	}
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
	if len(req.GetBufferToken()) > 0 {
		b.tokenSent = true
	}
	return b.seq, nil
}

// share writes req's block data into the shared buffer (one pwritev) and replaces its
// blocks by references to it. It waits for room: the writer releases what it copied out.
func (b *BlockStream) share(req *otav1.WriteBlocksRequest) error {
	var total int64
	for _, bl := range req.GetBlocks() {
		total += int64(len(bl.GetData()))
	}
	if total == 0 {
		return nil
	}
	if max := b.c.sendMax.Load(); total > max {
		return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "write message of %d block bytes exceeds the limit of %d", total, max)
	}
	b.rmu.Lock()
	off, ok := b.ring.alloc(req.GetSeq(), total)
	for !ok && !b.ring.closed {
		b.roomy.Wait()
		off, ok = b.ring.alloc(req.GetSeq(), total)
	}
	b.rmu.Unlock()
	if !ok {
		<-b.recvDone
		if b.recvErr != nil {
			return b.recvErr
		}
		return status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "block stream ended")
	}
	pieces := make([][]byte, 0, len(req.GetBlocks()))
	refs := make([]*otav1.Block, len(req.GetBlocks()))
	at := off
	for i, bl := range req.GetBlocks() {
		n := int64(len(bl.GetData()))
		refs[i] = &otav1.Block{Offset: bl.GetOffset()}
		if n > 0 {
			refs[i].BufferOffset, refs[i].BufferLength = uint64(at), uint32(n)
			pieces = append(pieces, bl.GetData())
			at += n
		}
	}
	if err := b.sb.Write(off, pieces); err != nil {
		return status.Errorf(otav1.Reason_REASON_OTHER, "block stream: %v", err)
	}
	req.Blocks = refs
	if !b.tokenSent {
		req.BufferToken = b.sb.Token()
	}
	return nil
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
	if b.sb != nil {
		b.sb.Close()
	}
}
