package writerlink_test

import (
	"context"
	"sync"

	"github.com/gwota/gwota/internal/bitmap"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/server"
)

// memCore is an in-memory writer core behind the real gRPC adapter (writer/server), for the
// link's tests until the writer's engine lands. It models what the link relies on: idempotent
// block writes, durability only at syncs (every syncEvery writes or when asked), and resume
// from durable state after a crash (crash drops what was not durable).
type memCore struct {
	maxBlock  uint32
	syncEvery int

	mu        sync.Mutex
	sessions  map[string]*memSession
	failWrite error
	writes    int
}

type memSession struct {
	req     *otav1.BeginSessionRequest
	bs      uint32
	blocks  map[uint64][]byte // written
	durable map[uint64]bool
	since   int // writes since the last sync
}

func newMemCore() *memCore {
	return &memCore{maxBlock: 1 << 20, syncEvery: 8, sessions: map[string]*memSession{}}
}

func (s *memSession) total() uint64 { return (s.req.GetFileSize() + uint64(s.bs) - 1) / uint64(s.bs) }

func (s *memSession) info(id string) *otav1.SessionInfo {
	n := s.total()
	missing := bitmap.New(int(n))
	for i := range int(n) {
		if !s.durable[uint64(i)] {
			missing.Set(i)
		}
	}
	return &otav1.SessionInfo{SessionId: id, JobId: s.req.GetJobId(), FileSize: s.req.GetFileSize(), BlockSize: s.bs,
		TotalBlocks: n, DurableBlocks: uint64(len(s.durable)), Missing: missing, State: otav1.SessionState_SESSION_STATE_RECEIVING}
}

// crash forgets everything not durable, like a writer killed and restarted.
func (c *memCore) crash() {
	c.mu.Lock()
	defer c.mu.Unlock()
	for _, s := range c.sessions {
		for i := range s.blocks {
			if !s.durable[i] {
				delete(s.blocks, i)
			}
		}
		s.since = 0
	}
}

func (c *memCore) image(id string) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.sessions[id]
	var out []byte
	for i := uint64(0); i < s.total(); i++ {
		out = append(out, s.blocks[i]...)
	}
	return out
}

func (c *memCore) MaxBlockSize() uint32 { return c.maxBlock }

func (c *memCore) Handshake(context.Context, *otav1.HandshakeRequest) (*otav1.HandshakeResponse, error) {
	return &otav1.HandshakeResponse{ProtocolVersion: otav1.ProtocolVersion_PROTOCOL_VERSION_1, MaxBlockSize: c.maxBlock,
		MaxMessageSize: uint32(server.MaxMessageSize(c.maxBlock))}, nil
}

func (c *memCore) State(context.Context) (*otav1.DeviceState, error) {
	return &otav1.DeviceState{}, nil
}

func (c *memCore) Begin(_ context.Context, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error) {
	if req.GetFilePath() != "/fw" {
		return nil, status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "no target for %q", req.GetFilePath())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	id := "s-" + req.GetJobId()
	if s, ok := c.sessions[id]; ok && s.req.GetFileSize() == req.GetFileSize() {
		return &otav1.BeginSessionResponse{Session: s.info(id), Resumed: true}, nil
	}
	s := &memSession{req: req, bs: req.GetBlockSize(), blocks: map[uint64][]byte{}, durable: map[uint64]bool{}}
	c.sessions[id] = s
	return &otav1.BeginSessionResponse{Session: s.info(id)}, nil
}

func (c *memCore) Write(_ context.Context, id string, blocks []*otav1.Block, sync bool) (server.WriteResult, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	if c.failWrite != nil {
		return server.WriteResult{}, c.failWrite
	}
	s, ok := c.sessions[id]
	if !ok {
		return server.WriteResult{}, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "no session %q", id)
	}
	for _, b := range blocks {
		i := b.GetOffset() / uint64(s.bs)
		want := min(uint64(s.bs), s.req.GetFileSize()-min(s.req.GetFileSize(), b.GetOffset()))
		if b.GetOffset()%uint64(s.bs) != 0 || i >= s.total() || uint64(len(b.GetData())) != want {
			return server.WriteResult{}, status.Errorf(otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, "block at %d", b.GetOffset())
		}
		s.blocks[i] = append([]byte(nil), b.GetData()...)
		c.writes++
	}
	s.since++
	res := server.WriteResult{Received: uint64(len(s.blocks)), Total: s.total()}
	if sync || s.since >= c.syncEvery {
		for i := range s.blocks {
			s.durable[i] = true
		}
		s.since = 0
		res.Synced = true
	}
	res.Durable = uint64(len(s.durable))
	return res, nil
}

func (c *memCore) Finish(_ context.Context, id string) (*otav1.FinishSessionResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s, ok := c.sessions[id]
	if !ok {
		return nil, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "no session %q", id)
	}
	if uint64(len(s.durable)) != s.total() {
		return nil, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "%d of %d blocks", len(s.durable), s.total())
	}
	return &otav1.FinishSessionResponse{Session: s.info(id)}, nil
}

func (c *memCore) Abort(_ context.Context, id string, _ otav1.Reason) error {
	c.mu.Lock()
	defer c.mu.Unlock()
	delete(c.sessions, id)
	return nil
}

func (c *memCore) Activate(context.Context, string) (*otav1.ActivateResponse, error) {
	return &otav1.ActivateResponse{}, nil
}
func (c *memCore) Reboot(context.Context) error { return nil }
func (c *memCore) SelfTest(context.Context, string) (*otav1.SelfTestResponse, error) {
	return &otav1.SelfTestResponse{Passed: true}, nil
}
func (c *memCore) Commit(context.Context, string) (*otav1.CommitResponse, error) {
	return &otav1.CommitResponse{}, nil
}
func (c *memCore) Reject(context.Context, string, otav1.Reason) (*otav1.RejectResponse, error) {
	return &otav1.RejectResponse{}, nil
}
func (c *memCore) Extensions(context.Context) (status.Fields, error) {
	return status.Pairs("fw", "1"), nil
}
