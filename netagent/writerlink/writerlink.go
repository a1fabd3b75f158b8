// Package writerlink is ota-net's side of the block path to ota-writer: sessions (begin or
// resume), a Sink (the downloaders' blocksink.Sink) that streams blocks over WriteBlocks and
// tracks the writer's durable acknowledgements, and reconnection when the writer restarts
// (the session is begun again, resumed, and the downloader continues from the writer's
// bitmap). Other writer calls pass through to the Conn (writer/client, or the writer linked
// in-process for benchmarks) unchanged.
//
// Every error keeps the writer's typed reason: status.ReasonOf(err) reads it.
package writerlink

import (
	"context"
	"errors"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/internal/bitmap"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/client"
)

// Defaults.
const (
	// DefaultBatchBytes of block data per WriteBlocks message: large enough that per-message
	// cost (~70 us per unary round, less streamed) is noise, small enough to bound memory.
	DefaultBatchBytes = 256 << 10
	// DefaultSyncBytes: a sync is asked for after this much unsynced data, so a crash of the
	// writer costs at most this much re-download even if its own policy syncs less often.
	DefaultSyncBytes = 16 << 20
	// DefaultReconnectTimeout is how long a restarted writer is waited for.
	DefaultReconnectTimeout = 2 * time.Minute
)

// Config configures a Link.
type Config struct {
	// SocketPath of the writer (Dial only).
	SocketPath string
	// Name is sent in the handshake ("ota-net 1.2.0").
	Name       string
	BatchBytes int
	SyncBytes  int64
	// MaxAheadBytes bounds the block data sent but not yet acknowledged durable (0: no
	// bound beyond SyncBytes). ota-net sets it to its download window, so a writer crash
	// costs at most about one window fetched again; a sync is then asked every half of it.
	MaxAheadBytes    int64
	ReconnectTimeout time.Duration
	Logger           hclog.Logger
}

// Link is a handshaken connection to the writer. The embedded Conn's methods (State,
// Activate, Reboot, SelfTest, Commit, Reject, Extensions, ...) are the pass-through calls.
type Link struct {
	Conn
	cfg Config
	log hclog.Logger
	// syncBytes is Config.SyncBytes before MaxAheadBytes capped it (Sink.SetMaxAhead).
	syncBytes int64

	mu sync.Mutex
	hs *otav1.HandshakeResponse
}

// Dial connects to the writer's socket, waits until it serves (bounded by ctx) and
// handshakes.
func Dial(ctx context.Context, cfg Config) (*Link, error) {
	c, err := client.Dial(ctx, cfg.SocketPath, client.Options{Name: cfg.Name})
	if err != nil {
		return nil, status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "writer link: %w", err)
	}
	l, err := New(ctx, Remote(c), cfg)
	if err != nil {
		c.Close()
		return nil, err
	}
	return l, nil
}

// New makes a Link of an existing connection (Remote or Local): waits for the writer and
// handshakes.
func New(ctx context.Context, c Conn, cfg Config) (*Link, error) {
	if cfg.BatchBytes <= 0 {
		cfg.BatchBytes = DefaultBatchBytes
	}
	if cfg.SyncBytes <= 0 {
		cfg.SyncBytes = DefaultSyncBytes
	}
	syncBytes := cfg.SyncBytes
	if cfg.MaxAheadBytes > 0 && cfg.SyncBytes > cfg.MaxAheadBytes/2 {
		cfg.SyncBytes = max(cfg.MaxAheadBytes/2, 1)
	}
	if cfg.ReconnectTimeout <= 0 {
		cfg.ReconnectTimeout = DefaultReconnectTimeout
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	l := &Link{Conn: c, cfg: cfg, log: cfg.Logger, syncBytes: syncBytes}
	if err := l.hello(ctx); err != nil {
		return nil, err
	}
	return l, nil
}

func (l *Link) hello(ctx context.Context) error {
	if err := l.WaitReady(ctx); err != nil {
		return err
	}
	h, err := l.Handshake(ctx, &otav1.HandshakeRequest{ProtocolVersion: otav1.ProtocolVersion_PROTOCOL_VERSION_1, Client: l.cfg.Name})
	if err != nil {
		return err
	}
	l.mu.Lock()
	l.hs = h
	l.mu.Unlock()
	return nil
}

// MaxBlockSize is the largest block the writer accepts.
func (l *Link) MaxBlockSize() int {
	l.mu.Lock()
	defer l.mu.Unlock()
	return int(l.hs.GetMaxBlockSize())
}

// Session is an open writer session for one file of a job.
type Session struct {
	l   *Link
	req *otav1.BeginSessionRequest

	mu      sync.Mutex
	info    *otav1.SessionInfo
	chunks  []uint32
	resumed bool
}

// Begin opens a session, or resumes the writer's matching one (its block size then wins:
// read BlockSize and Missing from the session).
func (l *Link) Begin(ctx context.Context, req *otav1.BeginSessionRequest) (*Session, error) {
	resp, err := l.Conn.Begin(ctx, req)
	if err != nil {
		return nil, err
	}
	s := &Session{l: l, req: req}
	if err := s.set(resp); err != nil {
		return nil, err
	}
	return s, nil
}

// set checks what the writer answered: ota-net does not trust it blindly either, a bitmap
// of the wrong size would make the downloader skip blocks.
func (s *Session) set(resp *otav1.BeginSessionResponse) error {
	info := resp.GetSession()
	bs := uint64(info.GetBlockSize())
	if info.GetSessionId() == "" || bs == 0 || info.GetFileSize() != s.req.GetFileSize() {
		return status.Errorf(otav1.Reason_REASON_OTHER, "writer link: writer answered an unusable session (id %q, block size %d, size %d)",
			info.GetSessionId(), bs, info.GetFileSize())
	}
	total := (info.GetFileSize() + bs - 1) / bs
	chunks := resp.GetChunkSizes()
	if s.req.GetKind() == otav1.SessionKind_SESSION_KIND_CHUNKS {
		// A CHUNKS session's units are chunks: the bitmap has one bit per chunk, and the
		// chunk sizes add up to the file.
		var sum uint64
		for _, n := range chunks {
			sum += uint64(n)
		}
		total = uint64(len(chunks))
		if total == 0 || sum != info.GetFileSize() || info.GetTotalBlocks() != total {
			return status.Errorf(otav1.Reason_REASON_OTHER, "writer link: chunks session with %d chunks of %d bytes (%d units) for a file of %d bytes",
				len(chunks), sum, info.GetTotalBlocks(), info.GetFileSize())
		}
	}
	if uint64(len(info.GetMissing())) != uint64(bitmap.Len(int(total))) {
		return status.Errorf(otav1.Reason_REASON_OTHER, "writer link: missing bitmap of %d bytes for %d blocks", len(info.GetMissing()), total)
	}
	s.mu.Lock()
	s.info, s.resumed, s.chunks = info, resp.GetResumed(), chunks
	s.mu.Unlock()
	return nil
}

// Info is the writer's view of the session (as of Begin or the last resume).
func (s *Session) Info() *otav1.SessionInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.info
}

// ID is the session id.
func (s *Session) ID() string { return s.Info().GetSessionId() }

// BlockSize is the session's block size.
func (s *Session) BlockSize() int { return int(s.Info().GetBlockSize()) }

// Missing is the bitmap of blocks the writer does not hold durably.
func (s *Session) Missing() bitmap.Bitmap { return s.Info().GetMissing() }

// ChunkSizes is a CHUNKS session's compressed size of every chunk (nil for other kinds).
func (s *Session) ChunkSizes() []uint32 {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.chunks
}

// Resumed tells whether Begin resumed an existing session.
func (s *Session) Resumed() bool {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.resumed
}

// Finish flushes and verifies the image.
func (s *Session) Finish(ctx context.Context) (*otav1.FinishSessionResponse, error) {
	return s.l.Finish(ctx, s.ID())
}

// Abort drops the session with a reason.
func (s *Session) Abort(ctx context.Context, reason otav1.Reason) error {
	return s.l.Abort(ctx, s.ID(), reason)
}

// reconnect waits for the writer to come back and begins the session again (resume).
func (s *Session) reconnect(ctx context.Context) error {
	ctx, cancel := context.WithTimeout(ctx, s.l.cfg.ReconnectTimeout)
	defer cancel()
	if err := s.l.hello(ctx); err != nil {
		return err
	}
	resp, err := s.l.Conn.Begin(ctx, s.req)
	if err != nil {
		return err
	}
	return s.set(resp)
}

// retryable tells whether a block-stream error is the link's (writer restarting, socket
// gone) rather than the writer refusing the data.
func retryable(err error) bool {
	return status.IsClass(err, status.ClassUnavailable)
}

var errClosed = errors.New("writer link: sink closed")
