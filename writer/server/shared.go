package server

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"net"
	"sync"
	"time"

	"golang.org/x/sys/unix"
	"google.golang.org/grpc/mem"
	"google.golang.org/grpc/peer"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/sharedbuf"
)

// Shared block buffers (writer/sharedbuf): sizes and limits of what the writer hands out.
const (
	// minSharedBuffer: a buffer holds at least four of the largest messages, so the client
	// always has room for the next one once a quarter of the buffer is released (below).
	minSharedBuffer = 2 << 20
	// maxSharedBuffers handed out at a time: one per block stream, a few streams at once.
	maxSharedBuffers = 4
	// sniffTimeout bounds the wait for a connection's first byte. There is no bound on how
	// many wait at once (grpc has none either, for its handshakes): a bound would let silent
	// peers lock out the real ota-net (TestAcceptNotStalledByIdlePeers).
	sniffTimeout = 5 * time.Second
)

// sharedBufferSize is the size of the buffers a server with this receive limit hands out.
func sharedBufferSize(maxMsg int) int64 {
	n := max(int64(4*maxMsg), minSharedBuffer)
	return (n + 1<<20 - 1) &^ (1<<20 - 1)
}

// streamBuffer is a WriteBlocks stream's shared buffer, once a message named it.
type streamBuffer struct {
	b     *sharedbuf.Buffer
	token []byte
	// unreleased is what was copied out since the last ack that carried released_seq.
	unreleased int64
}

// bind checks the buffer a message names (if any) against the stream's and binds the first.
func (s *service) bind(ctx context.Context, sb **streamBuffer, req *otav1.WriteBlocksRequest) error {
	tok := req.GetBufferToken()
	if len(tok) == 0 {
		return nil
	}
	if *sb != nil {
		if !bytes.Equal(tok, (*sb).token) {
			return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "one shared buffer per stream: message %d names another", req.GetSeq())
		}
		return nil
	}
	if s.bufs == nil {
		return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "this writer hands out no shared buffers")
	}
	uid, ok := peerUID(ctx)
	if !ok {
		return status.Errorf(otav1.Reason_REASON_PERMISSION_DENIED, "no peer credentials on the stream")
	}
	b, err := s.bufs.Lookup(tok, uid)
	if err != nil {
		return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "message %d: %v", req.GetSeq(), err)
	}
	*sb = &streamBuffer{b: b, token: bytes.Clone(tok)}
	return nil
}

func peerUID(ctx context.Context) (uint32, bool) {
	p, ok := peer.FromContext(ctx)
	if !ok {
		return 0, false
	}
	pc, ok := p.AuthInfo.(PeerCred)
	if !ok || pc.Err != nil {
		return 0, false
	}
	return pc.UID, true
}

// hasRefs reports whether a block of req refers to a shared buffer.
func hasRefs(req *otav1.WriteBlocksRequest) bool {
	for _, b := range req.GetBlocks() {
		if b.GetBufferLength() > 0 || b.GetBufferOffset() > 0 {
			return true
		}
	}
	return false
}

// fill copies the bytes of every block that refers to the stream's buffer into one buffer
// from the receive pool (returned: free it once the engine has written the blocks) and
// points the block's data at its copy. Nothing of the shared buffer is looked at before it
// is copied: what ota-net changes in it afterwards changes nothing here. References are
// checked whole first: within the buffer, data empty, and in all no more than one message
// may carry.
func (s *service) fill(sb *streamBuffer, req *otav1.WriteBlocksRequest) (mem.Buffer, error) {
	if sb == nil {
		return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "message %d refers to a shared buffer the stream has not named", req.GetSeq())
	}
	var total uint64
	for _, b := range req.GetBlocks() {
		if b.GetBufferLength() == 0 {
			if b.GetBufferOffset() != 0 {
				return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "block at offset %d: buffer_offset without buffer_length", b.GetOffset())
			}
			continue
		}
		if len(b.GetData()) > 0 {
			return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "block at offset %d has both data and a shared buffer range", b.GetOffset())
		}
		off, n := b.GetBufferOffset(), uint64(b.GetBufferLength())
		if off > uint64(sb.b.Size()) || n > uint64(sb.b.Size())-off {
			return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "block at offset %d: range [%d, +%d) outside the shared buffer of %d bytes", b.GetOffset(), off, n, sb.b.Size())
		}
		total += n
	}
	if total > uint64(s.maxMsg) {
		return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "message %d refers to %d bytes of the shared buffer, at most %d per message", req.GetSeq(), total, s.maxMsg)
	}
	buf := mem.NewBuffer(recvPool.Get(int(total)), recvPool)
	data := buf.ReadOnlyData()[:total:total] // ours: filled below, nothing else holds it
	var at uint64
	for _, b := range req.GetBlocks() {
		n := uint64(b.GetBufferLength())
		if n == 0 {
			continue
		}
		p := data[at : at+n : at+n]
		if err := sb.b.Read(p, b.GetBufferOffset()); err != nil {
			buf.Free()
			if errors.Is(err, sharedbuf.ErrClosed) {
				return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "message %d: the stream's shared buffer was given back", req.GetSeq())
			}
			return nil, status.Errorf(otav1.Reason_REASON_OTHER, "message %d: reading the shared buffer: %v", req.GetSeq(), err)
		}
		b.Data, b.BufferOffset, b.BufferLength = p, 0, 0
		at += n
	}
	sb.unreleased += int64(total)
	return buf, nil
}

// releaseDue reports whether an ack should tell the client now that the buffer's ranges
// are free: every quarter of the buffer. With messages of at most a quarter of it (the
// buffer holds four), the client always finds room once it has this ack.
func (sb *streamBuffer) releaseDue() bool {
	return sb != nil && sb.unreleased >= sb.b.Size()/4
}

// sniffListener routes the connections of inner (already allowed by peerListener): those
// that begin with sharedbuf.FirstByte are side channels served by side, the rest are
// grpc's. The first byte is peeked, not read, so grpc reads the connection from its start,
// and each connection waits in a goroutine of its own, so a silent peer holds up no other.
type sniffListener struct {
	net.Listener
	side  func(*net.UnixConn)
	conns chan net.Conn
	done  chan struct{}
	once  sync.Once
	mu    sync.Mutex
	err   error
}

func newSniffListener(inner net.Listener, side func(*net.UnixConn)) *sniffListener {
	l := &sniffListener{Listener: inner, side: side, conns: make(chan net.Conn), done: make(chan struct{})}
	go l.loop()
	return l
}

func (l *sniffListener) loop() {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			l.mu.Lock()
			l.err = err
			l.mu.Unlock()
			l.once.Do(func() { close(l.done) })
			return
		}
		go l.route(c)
	}
}

func (l *sniffListener) route(c net.Conn) {
	uc, ok := c.(*net.UnixConn)
	if ok {
		first, err := peekByte(uc)
		if err != nil {
			c.Close()
			return
		}
		if first == sharedbuf.FirstByte {
			go l.side(uc) // no longer pending: its own limits apply (sharedbuf.Registry)
			return
		}
	}
	select {
	case l.conns <- c:
	case <-l.done:
		c.Close()
	}
}

// peekByte waits (at most sniffTimeout) for the connection's first byte and returns it
// without consuming it.
func peekByte(uc *net.UnixConn) (byte, error) {
	raw, err := uc.SyscallConn()
	if err != nil {
		return 0, err
	}
	_ = uc.SetReadDeadline(time.Now().Add(sniffTimeout))
	defer uc.SetReadDeadline(time.Time{})
	var b [1]byte
	var n int
	var rerr error
	err = raw.Read(func(fd uintptr) bool {
		n, _, rerr = unix.Recvfrom(int(fd), b[:], unix.MSG_PEEK|unix.MSG_DONTWAIT)
		return rerr != unix.EAGAIN
	})
	if err != nil {
		return 0, err
	}
	if rerr != nil {
		return 0, rerr
	}
	if n == 0 {
		return 0, fmt.Errorf("closed before its first byte")
	}
	return b[0], nil
}

func (l *sniffListener) Accept() (net.Conn, error) {
	select {
	case c := <-l.conns:
		return c, nil
	case <-l.done:
		l.mu.Lock()
		defer l.mu.Unlock()
		if l.err == nil {
			return nil, net.ErrClosed
		}
		return nil, l.err
	}
}

func (l *sniffListener) Close() error {
	err := l.Listener.Close()
	l.once.Do(func() { close(l.done) })
	return err
}
