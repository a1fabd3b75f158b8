package writerlink

import (
	"context"
	"fmt"
	"sync"

	"github.com/gwota/gwota/internal/crashpoint"
	"github.com/gwota/gwota/netagent/blocksink"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
)

// Sink streams a session's blocks to the writer: the blocksink.Sink of both downloaders,
// with that contract. Blocks are batched into WriteBlocks messages; the writer acknowledges
// durability (journal synced) and Durable/Flush report it. A broken stream with a retryable
// reason (writer_unavailable) is repaired here and reported as a *blocksink.ResumedError.
// Use it from one goroutine (the downloader's); acks are read on a goroutine of its own.
type Sink struct {
	s      *Session
	budget int // block data per message
	// maxAhead and syncBytes start as the link's MaxAheadBytes and SyncBytes (SetMaxAhead).
	maxAhead, syncBytes int64
	onSent              func([]byte) // SetOnSent

	// Owned by the caller's goroutine.
	stream   BlockStream
	batch    []*otav1.Block
	batchLen int
	unsynced int64
	sentSeq  uint64 // last seq sent on the current stream
	sent     int64  // block bytes sent on the current stream
	marks    []syncMark

	mu       sync.Mutex
	acked    uint64 // durable seq on the current stream
	durable  int    // durable blocks as the writer counts them
	ackErr   error  // the stream ended with this (nil: still open)
	ended    bool
	changed  chan struct{}
	streamID int // bumps on reconnect, so a stale ack goroutine is ignored
}

// syncMark is a message that asked for a sync: once its seq is acknowledged, the writer
// holds the first bytes block bytes of the stream durably.
type syncMark struct {
	seq   uint64
	bytes int64
}

// Sink opens the block stream of the session.
func (s *Session) Sink(ctx context.Context) (*Sink, error) {
	k := &Sink{s: s, changed: make(chan struct{})}
	k.bound(s.l.cfg.MaxAheadBytes, s.l.cfg.SyncBytes)
	k.durable = int(s.Info().GetDurableBlocks())
	if err := k.open(ctx); err != nil {
		return nil, err
	}
	return k, nil
}

func (k *Sink) bound(maxAhead, syncBytes int64) {
	k.maxAhead, k.syncBytes = maxAhead, syncBytes
	budget := min(k.s.l.cfg.BatchBytes, k.s.l.MaxBlockSize())
	if maxAhead > 0 {
		// A batch is not durable either: it counts against the bound.
		budget = min(budget, int(syncBytes))
	}
	k.budget = max(budget, k.s.BlockSize())
}

// SetMaxAhead replaces the link's MaxAheadBytes for this sink (0: no bound beyond the link's
// SyncBytes as configured): a downloader for which fetching again is cheap (HTTP, not capped
// by AWS's MQTT quota) lets more be in flight to the writer between syncs, so fewer syncs
// stall it. A sync is then asked every half of it. Call it when nothing is in flight: before
// the first WriteBlock or after a Flush.
func (k *Sink) SetMaxAhead(n int64) {
	sync := k.s.l.syncBytes
	if n > 0 {
		sync = max(min(sync, n/2), 1)
	}
	k.bound(n, sync)
}

// SetOnSent makes the sink hand each block's data to f once it no longer refers to it: after
// the message carrying it was sent (grpc has marshalled it into a buffer of its own). A
// downloader that reads every block into a new buffer reuses them so (httpdl.Downloader.
// Recycle): no garbage in proportion to the image. Blocks lost to a broken stream are not
// handed back. Only for a caller whose buffers nobody else refers to after WriteBlock; nil: none.
func (k *Sink) SetOnSent(f func([]byte)) { k.onSent = f }

// MaxAhead is the sink's bound (SetMaxAhead; 0: none).
func (k *Sink) MaxAhead() int64 { return k.maxAhead }

func (k *Sink) open(ctx context.Context) error {
	// The stream lives as long as the sink, not as the call that opened it.
	st, err := k.s.l.OpenBlockStream(context.WithoutCancel(ctx), k.s.ID())
	if err != nil {
		return err
	}
	if sh, ok := st.(interface{ SharedBuffer() (bool, error) }); ok {
		// Whether blocks cross through the writer's shared buffer or inside the messages
		// (slower on fast links): worth a line when the writer offered one and it failed.
		if used, why := sh.SharedBuffer(); why != nil {
			k.s.l.log.Warn("no shared block buffer from the writer; blocks go inside the messages", "error", why)
		} else {
			k.s.l.log.Debug("block stream opened", "session", k.s.ID(), "shared_buffer", used)
		}
	}
	k.mu.Lock()
	k.streamID++
	id := k.streamID
	k.acked, k.ackErr, k.ended = 0, nil, false
	k.mu.Unlock()
	k.stream, k.sentSeq, k.unsynced, k.sent, k.marks = st, 0, 0, 0, nil
	k.batch, k.batchLen = nil, 0
	go k.readAcks(st, id)
	return nil
}

func (k *Sink) readAcks(st BlockStream, id int) {
	for a := range st.Acks() {
		k.mu.Lock()
		if id == k.streamID && a.GetDurableSeq() > k.acked {
			k.acked = a.GetDurableSeq()
			k.durable = int(a.GetDurableBlocks())
			k.notifyLocked()
		}
		k.mu.Unlock()
	}
	err := st.Wait()
	k.mu.Lock()
	if id == k.streamID {
		k.ended, k.ackErr = true, err
		k.notifyLocked()
	}
	k.mu.Unlock()
}

func (k *Sink) notifyLocked() {
	close(k.changed)
	k.changed = make(chan struct{})
}

var _ blocksink.Sink = (*Sink)(nil)

// WriteBlock queues block i (data is kept until sent, not copied).
func (k *Sink) WriteBlock(ctx context.Context, i int, data []byte) error {
	return k.WriteAt(ctx, uint64(i)*uint64(k.s.BlockSize()), data)
}

// WriteAt queues data at byte offset off of the file: a CHUNKS session's whole chunk at the
// chunk's offset (netagent/chunksink). data is kept until sent, not copied.
func (k *Sink) WriteAt(ctx context.Context, off uint64, data []byte) error {
	if k.stream == nil {
		return errClosed
	}
	if err := k.streamErr(); err != nil {
		return k.recover(ctx, err)
	}
	if len(k.batch) > 0 && (k.batchLen+len(data) > k.budget || len(k.batch) == api.MaxBlocksPerMessage) {
		if err := k.send(ctx, false); err != nil {
			return err
		}
	}
	if err := k.holdBack(ctx, int64(len(data))); err != nil {
		return err
	}
	k.batch = append(k.batch, &otav1.Block{Offset: off, Data: data})
	k.batchLen += len(data)
	if k.batchLen >= k.budget {
		if err := k.send(ctx, false); err != nil {
			return err
		}
	}
	crashpoint.Hit(crashpoint.NetBlock) // the block is the writer link's now
	return nil
}

// send sends the batch (possibly empty, to ask for a sync).
func (k *Sink) send(ctx context.Context, sync bool) error {
	if len(k.batch) == 0 && !sync {
		return nil
	}
	k.unsynced += int64(k.batchLen)
	if k.unsynced >= k.syncBytes {
		sync = true
	}
	seq, err := k.stream.Send(k.batch, sync)
	if err != nil {
		return k.recover(ctx, err)
	}
	k.sentSeq = seq
	k.sent += int64(k.batchLen)
	if k.onSent != nil {
		for _, b := range k.batch {
			k.onSent(b.Data)
		}
	}
	k.batch, k.batchLen = nil, 0
	if sync {
		k.unsynced = 0
		k.marks = append(k.marks, syncMark{seq: seq, bytes: k.sent})
	}
	return nil
}

// holdBack keeps the blocks that are not yet durable within MaxAheadBytes: what a writer
// crash can lose, and ota-net must fetch again, stays bounded (by the download window when
// ota-net sets it so). It asks for a sync and waits for the acknowledgement when the next
// block would go past the bound.
func (k *Sink) holdBack(ctx context.Context, n int64) error {
	limit := k.maxAhead
	if limit <= 0 {
		return nil
	}
	for {
		k.mu.Lock()
		acked, ended, aerr, ch := k.acked, k.ended, k.ackErr, k.changed
		k.mu.Unlock()
		var durable int64
		for len(k.marks) > 0 && k.marks[0].seq <= acked {
			durable = k.marks[0].bytes
			k.marks = k.marks[1:]
		}
		if durable > 0 {
			k.sent -= durable
			for i := range k.marks {
				k.marks[i].bytes -= durable
			}
		}
		if k.sent+int64(k.batchLen)+n <= limit {
			return nil
		}
		if ended {
			if aerr == nil {
				aerr = status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "writer ended the block stream")
			}
			return k.recover(ctx, aerr)
		}
		if len(k.marks) == 0 || k.batchLen > 0 {
			// Nothing asked to be synced yet (or more is batched): ask now.
			if err := k.send(ctx, true); err != nil {
				return err
			}
			continue
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("writer link: waiting for durable blocks: %w", ctx.Err())
		}
	}
}

func (k *Sink) streamErr() error {
	k.mu.Lock()
	defer k.mu.Unlock()
	if k.ended {
		if k.ackErr == nil {
			return status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "writer ended the block stream")
		}
		return k.ackErr
	}
	return nil
}

// recover handles a stream failure: the writer's own refusal is returned with its reason;
// a broken link is repaired (wait for the writer, begin the session again, new stream) and
// reported as a *blocksink.ResumedError carrying the writer's bitmap. A chunk the writer
// refused as altered in transit (block_hash_mismatch) is repaired the same way: the stream
// ended with the refusal, what was sent after it is lost, and the writer's bitmap says what
// to fetch again (netagent/chunksink counts the refusals).
func (k *Sink) recover(ctx context.Context, err error) error {
	if !retryable(err) && status.ReasonOf(err) != otav1.Reason_REASON_BLOCK_HASH_MISMATCH {
		k.close()
		return err
	}
	k.s.l.log.Warn("writer block stream broke; resuming the session", "error", err)
	k.close()
	if rerr := k.s.reconnect(ctx); rerr != nil {
		return fmt.Errorf("writer link: resume after %v: %w", err, rerr)
	}
	if oerr := k.open(ctx); oerr != nil {
		k.stream = nil
		return oerr
	}
	k.mu.Lock()
	k.durable = int(k.s.Info().GetDurableBlocks())
	k.mu.Unlock()
	return &blocksink.ResumedError{Cause: err, Missing: k.s.Missing()}
}

// Sync asks the writer to make everything sent so far durable, without waiting.
func (k *Sink) Sync(ctx context.Context) error {
	if k.stream == nil {
		return errClosed
	}
	if err := k.streamErr(); err != nil {
		return k.recover(ctx, err)
	}
	if len(k.batch) == 0 && k.unsynced == 0 {
		return nil
	}
	return k.send(ctx, true)
}

// Flush sends what is batched with a sync and waits until the writer acknowledged all of it
// as durable.
func (k *Sink) Flush(ctx context.Context) error {
	if k.stream == nil {
		return errClosed
	}
	if err := k.streamErr(); err != nil {
		return k.recover(ctx, err)
	}
	if len(k.batch) > 0 || k.unsynced > 0 || k.sentSeq == 0 {
		if err := k.send(ctx, true); err != nil {
			return err
		}
	}
	want := k.sentSeq
	for {
		k.mu.Lock()
		acked, ended, aerr, ch := k.acked, k.ended, k.ackErr, k.changed
		k.mu.Unlock()
		if acked >= want {
			return nil
		}
		if ended {
			if aerr == nil {
				aerr = status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "writer ended the block stream before acknowledging seq %d", want)
			}
			return k.recover(ctx, aerr)
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return fmt.Errorf("writer link: waiting for durable blocks: %w", ctx.Err())
		}
	}
}

// Durable is the number of blocks the writer last reported durable.
func (k *Sink) Durable() int {
	k.mu.Lock()
	defer k.mu.Unlock()
	return k.durable
}

// Close ends the stream without waiting for acknowledgements (call Flush first to keep
// everything). Safe to call more than once.
func (k *Sink) Close() {
	k.close()
	k.stream = nil
}

func (k *Sink) close() {
	if k.stream != nil {
		k.stream.Close()
	}
}
