// Package sharedbuf is the shared block buffer of a WriteBlocks stream: a sealed memfd the
// writer creates and hands to ota-net over a side channel of its own socket, so that block
// data crosses from ota-net to the writer as one write into the buffer and one read out of
// it, instead of through gRPC's framing (a marshal copy, HTTP/2 frames of 16 KiB, the socket
// both ways, the frame and message copies on the writer's side).
//
// The buffer changes nothing of what the writer trusts. It creates the memfd itself, sealed
// against shrinking and growing, and never maps it: it copies a block's bytes out with
// pread into its own memory before anything looks at them, so ota-net changing the buffer
// at any time can only change what it sends (as it can anyway), never what the writer
// checked. References are bounds-checked against the buffer's size. The buffer is handed
// out only on a connection whose peer the writer's socket already allows, and a token names
// it on the stream: a stream can only use a buffer handed to the same uid.
//
// Side channel, on the writer's socket (docs/WRITER-API.md): the client connects and sends
// Magic; the writer answers with Token (16 bytes) and the buffer's size (8 bytes,
// little-endian) in one message carrying the memfd (SCM_RIGHTS). The buffer lives until the
// client closes that connection (or the writer stops).
package sharedbuf

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/binary"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"runtime/debug"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
)

// Magic is what a side-channel connection sends first. Its first byte is not that of
// HTTP/2's client preface ("PRI * HTTP/2.0..."), so one peeked byte tells the two apart.
const Magic = "GWOTA-SHAREDBUF1"

// FirstByte is Magic's first byte.
const FirstByte = 'G'

const (
	tokenLen = 16
	replyLen = tokenLen + 8
	// handshakeTimeout bounds the side channel's exchange, so a silent peer holds nothing.
	handshakeTimeout = 5 * time.Second
)

// ErrClosed is returned by a Buffer whose side channel has ended.
var ErrClosed = errors.New("shared block buffer closed")

// Registry hands out buffers of one size on the side channel and finds them by token.
type Registry struct {
	size int64
	max  int
	log  hclog.Logger

	mu     sync.Mutex
	bufs   map[string]*Buffer
	conns  map[*net.UnixConn]struct{}
	closed bool
}

// NewRegistry hands out buffers of size bytes, at most max at a time.
func NewRegistry(size int64, max int, log hclog.Logger) *Registry {
	return &Registry{size: size, max: max, log: log, bufs: map[string]*Buffer{}, conns: map[*net.UnixConn]struct{}{}}
}

// Size of the buffers handed out.
func (r *Registry) Size() int64 { return r.size }

// Buffer is the writer's side of one shared buffer.
type Buffer struct {
	f    *os.File
	size int64
	uid  uint32
	// mem maps the memfd read-only. Sealed against shrinking, the mapping can never fault
	// (no SIGBUS past a shortened end): copying out of it is a plain memory copy. mu keeps
	// the mapping alive while a copy runs (unmapped only under the write lock).
	mu  sync.RWMutex
	mem []byte // nil once dropped
}

// Size of the buffer.
func (b *Buffer) Size() int64 { return b.size }

// Read copies the buffer's [off, off+len(p)) into p. A range outside the buffer is an
// error; so is a buffer whose side channel ended.
func (b *Buffer) Read(p []byte, off uint64) error {
	if off > uint64(b.size) || uint64(len(p)) > uint64(b.size)-off {
		return fmt.Errorf("range [%d, +%d) outside the shared buffer of %d bytes", off, len(p), b.size)
	}
	b.mu.RLock()
	defer b.mu.RUnlock()
	if b.mem == nil {
		return ErrClosed
	}
	return copyOut(p, b.mem[off:off+uint64(len(p))])
}

// copyOut copies src (in the mapping) into p. Sealed, the memfd cannot shrink under the
// mapping, and holes punched in it read as zeros, so no fault is expected; should the
// kernel still fault the copy (a hardware error in the page), it becomes this stream's
// error instead of a crash of the writer.
func copyOut(p, src []byte) (err error) {
	defer debug.SetPanicOnFault(debug.SetPanicOnFault(true))
	defer func() {
		if r := recover(); r != nil {
			err = fmt.Errorf("fault reading the shared buffer: %v", r)
		}
	}()
	copy(p, src)
	return nil
}

// Lookup finds the buffer token names, handed to uid.
func (r *Registry) Lookup(token []byte, uid uint32) (*Buffer, error) {
	r.mu.Lock()
	b := r.bufs[string(token)]
	r.mu.Unlock()
	if b == nil || b.uid != uid {
		// The same answer for both: a token of another uid's buffer is not confirmed.
		return nil, errors.New("no shared block buffer has this token")
	}
	return b, nil
}

// Serve runs the side channel on conn, whose peer (uid) the socket allows and whose first
// byte is FirstByte: it hands out one buffer and keeps it until the peer closes conn.
func (r *Registry) Serve(conn *net.UnixConn, uid uint32) {
	defer conn.Close()
	if !r.track(conn) {
		return
	}
	defer r.untrack(conn)
	_ = conn.SetDeadline(time.Now().Add(handshakeTimeout))
	var m [len(Magic)]byte
	if _, err := io.ReadFull(conn, m[:]); err != nil || string(m[:]) != Magic {
		r.log.Warn("side channel: not a shared buffer request; closed", "uid", uid, "error", err)
		return
	}
	b, token, err := r.create(uid)
	if err != nil {
		r.log.Warn("side channel: no shared buffer handed out", "uid", uid, "error", err)
		return
	}
	defer r.drop(token, b)
	reply := make([]byte, 0, replyLen)
	reply = append(reply, token...)
	reply = binary.LittleEndian.AppendUint64(reply, uint64(b.size))
	n, _, err := conn.WriteMsgUnix(reply, unix.UnixRights(int(b.f.Fd())), nil)
	if err != nil || n != len(reply) {
		r.log.Warn("side channel: handing out the shared buffer failed", "uid", uid, "error", err)
		return
	}
	_ = conn.SetDeadline(time.Time{})
	r.log.Info("shared block buffer handed out", "uid", uid, "bytes", b.size)
	// The peer sends nothing more; whatever it sends, or its close, ends the buffer.
	var one [1]byte
	_, _ = conn.Read(one[:])
	r.log.Debug("side channel: shared buffer released", "uid", uid)
}

func (r *Registry) track(c *net.UnixConn) bool {
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed {
		return false
	}
	r.conns[c] = struct{}{}
	return true
}

func (r *Registry) untrack(c *net.UnixConn) {
	r.mu.Lock()
	delete(r.conns, c)
	r.mu.Unlock()
}

func (r *Registry) create(uid uint32) (*Buffer, []byte, error) {
	r.mu.Lock()
	n := len(r.bufs)
	r.mu.Unlock()
	if n >= r.max {
		return nil, nil, fmt.Errorf("%d shared buffers already handed out, at most %d", n, r.max)
	}
	fd, err := unix.MemfdCreate("gwota-shared-blocks", unix.MFD_CLOEXEC|unix.MFD_ALLOW_SEALING)
	if err != nil {
		return nil, nil, fmt.Errorf("memfd_create: %w", err)
	}
	f := os.NewFile(uintptr(fd), "gwota-shared-blocks")
	if err := f.Truncate(r.size); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("size the memfd: %w", err)
	}
	// Sealed: its size is fixed for good, whatever the peer does with its descriptor.
	if _, err := unix.FcntlInt(uintptr(fd), unix.F_ADD_SEALS, unix.F_SEAL_SHRINK|unix.F_SEAL_GROW|unix.F_SEAL_SEAL); err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("seal the memfd: %w", err)
	}
	token := make([]byte, tokenLen)
	if _, err := rand.Read(token); err != nil {
		f.Close()
		return nil, nil, err
	}
	mem, err := unix.Mmap(fd, 0, int(r.size), unix.PROT_READ, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return nil, nil, fmt.Errorf("map the memfd: %w", err)
	}
	b := &Buffer{f: f, size: r.size, uid: uid, mem: mem}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.closed || len(r.bufs) >= r.max {
		b.unmap()
		return nil, nil, fmt.Errorf("at most %d shared buffers", r.max)
	}
	r.bufs[string(token)] = b
	return b, token, nil
}

func (r *Registry) drop(token []byte, b *Buffer) {
	r.mu.Lock()
	delete(r.bufs, string(token))
	r.mu.Unlock()
	b.unmap()
}

// unmap waits for copies in progress, then unmaps and closes the memfd.
func (b *Buffer) unmap() {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.mem != nil {
		_ = unix.Munmap(b.mem)
		b.mem = nil
	}
	b.f.Close()
}

// Close ends every side channel (their buffers are dropped) and hands out no more.
func (r *Registry) Close() {
	r.mu.Lock()
	r.closed = true
	conns := make([]*net.UnixConn, 0, len(r.conns))
	for c := range r.conns {
		conns = append(conns, c)
	}
	r.mu.Unlock()
	for _, c := range conns {
		c.Close()
	}
}

// Client is ota-net's side of one shared buffer: the memfd to write blocks into, and the
// token that names it on a WriteBlocks stream. Close it when the stream is done.
type Client struct {
	conn  *net.UnixConn
	f     *os.File
	token []byte
	size  int64
	mu    sync.RWMutex // Write against Close: the mapping stays while a copy runs
	mem   []byte       // the memfd mapped read-write; nil once closed
}

// Dial asks the writer serving on socketPath for a shared buffer.
func Dial(ctx context.Context, socketPath string) (*Client, error) {
	var d net.Dialer
	c, err := d.DialContext(ctx, "unix", socketPath)
	if err != nil {
		return nil, fmt.Errorf("shared buffer: %w", err)
	}
	uc := c.(*net.UnixConn)
	fail := func(err error) (*Client, error) {
		uc.Close()
		return nil, fmt.Errorf("shared buffer: %w", err)
	}
	deadline := time.Now().Add(handshakeTimeout)
	if dl, ok := ctx.Deadline(); ok && dl.Before(deadline) {
		deadline = dl
	}
	_ = uc.SetDeadline(deadline)
	if _, err := uc.Write([]byte(Magic)); err != nil {
		return fail(err)
	}
	reply := make([]byte, replyLen)
	oob := make([]byte, unix.CmsgSpace(4*4)) // room for more than one: extra ones are closed
	n, oobn, _, _, err := uc.ReadMsgUnix(reply, oob)
	if err != nil {
		return fail(err)
	}
	fds, perr := rights(oob[:oobn])
	if perr != nil || len(fds) != 1 {
		for _, fd := range fds {
			unix.Close(fd)
		}
		if perr == nil {
			perr = fmt.Errorf("%d descriptors passed, want 1", len(fds))
		}
		return fail(perr)
	}
	f := os.NewFile(uintptr(fds[0]), "gwota-shared-blocks")
	if _, err := io.ReadFull(uc, reply[n:]); err != nil {
		f.Close()
		return fail(err)
	}
	_ = uc.SetDeadline(time.Time{})
	size := int64(binary.LittleEndian.Uint64(reply[tokenLen:]))
	if fi, err := f.Stat(); err != nil || fi.Size() != size || size <= 0 {
		f.Close()
		return fail(fmt.Errorf("buffer of %d bytes announced, descriptor does not match (%v)", size, err))
	}
	mem, err := unix.Mmap(int(f.Fd()), 0, int(size), unix.PROT_READ|unix.PROT_WRITE, unix.MAP_SHARED)
	if err != nil {
		f.Close()
		return fail(fmt.Errorf("map the buffer: %w", err))
	}
	return &Client{conn: uc, f: f, token: bytes.Clone(reply[:tokenLen]), size: size, mem: mem}, nil
}

func rights(oob []byte) ([]int, error) {
	msgs, err := unix.ParseSocketControlMessage(oob)
	if err != nil {
		return nil, err
	}
	var fds []int
	for _, m := range msgs {
		got, err := unix.ParseUnixRights(&m)
		if err != nil {
			continue
		}
		fds = append(fds, got...)
	}
	return fds, nil
}

// Token names the buffer on a WriteBlocks stream.
func (c *Client) Token() []byte { return c.token }

// Size of the buffer.
func (c *Client) Size() int64 { return c.size }

// Fd is the memfd's descriptor (to check its seals).
func (c *Client) Fd() uintptr { return c.f.Fd() }

// Write copies the pieces one after the other into the buffer at off.
func (c *Client) Write(off int64, pieces [][]byte) error {
	c.mu.RLock()
	defer c.mu.RUnlock()
	if c.mem == nil {
		return fmt.Errorf("shared buffer: write: %w", ErrClosed)
	}
	for _, p := range pieces {
		if off < 0 || int64(len(p)) > c.size-off {
			return fmt.Errorf("shared buffer: write of %d bytes at %d past its %d bytes", len(p), off, c.size)
		}
		off += int64(copy(c.mem[off:], p))
	}
	return nil
}

// Close gives the buffer back. Safe to call more than once.
func (c *Client) Close() error {
	c.mu.Lock()
	if c.mem != nil {
		_ = unix.Munmap(c.mem)
		c.mem = nil
	}
	c.mu.Unlock()
	c.f.Close()
	return c.conn.Close()
}
