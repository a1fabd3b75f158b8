package server_test

import (
	"context"
	"fmt"
	"sync"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/server"
)

// memCore is a small in-memory Core for the adapter's own tests (transport, auth, error
// boundary). The writer's behaviour itself is tested with the real engine.
type memCore struct {
	maxBlock uint32

	mu       sync.Mutex
	sessions map[string]*memSession
	// discard: keep nothing (transport benchmarks).
	discard bool
	// panicOn makes Extensions panic (tests the adapter's recovery).
	panicOn bool
}

type memSession struct {
	size      uint64
	blockSize uint32
	blocks    map[uint64][]byte
	durable   int
}

func newMemCore(maxBlock uint32) *memCore {
	return &memCore{maxBlock: maxBlock, sessions: map[string]*memSession{}}
}

func (c *memCore) MaxBlockSize() uint32 { return c.maxBlock }

func (c *memCore) Handshake(_ context.Context, req *otav1.HandshakeRequest) (*otav1.HandshakeResponse, error) {
	if req.GetProtocolVersion() != otav1.ProtocolVersion_PROTOCOL_VERSION_1 {
		return nil, status.Errorf(otav1.Reason_REASON_PROTOCOL_VERSION, "protocol %s", req.GetProtocolVersion())
	}
	return &otav1.HandshakeResponse{ProtocolVersion: otav1.ProtocolVersion_PROTOCOL_VERSION_1, MaxBlockSize: c.maxBlock}, nil
}

func (c *memCore) State(context.Context) (*otav1.DeviceState, error) {
	return &otav1.DeviceState{ImageState: otav1.ImageState_IMAGE_STATE_NORMAL, BootBackend: "mem"}, nil
}

func (c *memCore) Begin(_ context.Context, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error) {
	if req.GetFilePath() != "mem" {
		return nil, status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "no target %q", req.GetFilePath())
	}
	if req.GetBlockSize() == 0 || req.GetBlockSize() > c.maxBlock {
		return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "block size %d", req.GetBlockSize())
	}
	c.mu.Lock()
	defer c.mu.Unlock()
	id := "s-" + req.GetJobId()
	if _, ok := c.sessions[id]; !ok {
		c.sessions[id] = &memSession{size: req.GetFileSize(), blockSize: req.GetBlockSize(), blocks: map[uint64][]byte{}}
	}
	s := c.sessions[id]
	return &otav1.BeginSessionResponse{Session: &otav1.SessionInfo{SessionId: id, BlockSize: s.blockSize, FileSize: s.size, TotalBlocks: s.total()}}, nil
}

func (s *memSession) total() uint64 { return (s.size + uint64(s.blockSize) - 1) / uint64(s.blockSize) }

func (c *memCore) Write(_ context.Context, id string, blocks []*otav1.Block, sync bool) (server.WriteResult, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s, ok := c.sessions[id]
	if !ok {
		return server.WriteResult{}, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "no session %q", id)
	}
	for _, b := range blocks {
		if b.GetOffset()%uint64(s.blockSize) != 0 || b.GetOffset() >= s.size {
			return server.WriteResult{}, status.Errorf(otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, "offset %d", b.GetOffset())
		}
		if !c.discard {
			s.blocks[b.GetOffset()/uint64(s.blockSize)] = append([]byte(nil), b.GetData()...)
		} else {
			s.blocks[b.GetOffset()/uint64(s.blockSize)] = nil
		}
	}
	if sync {
		s.durable = len(s.blocks)
	}
	return server.WriteResult{Synced: sync, Durable: uint64(s.durable), Received: uint64(len(s.blocks)), Total: s.total()}, nil
}

func (c *memCore) image(id string) []byte {
	c.mu.Lock()
	defer c.mu.Unlock()
	s := c.sessions[id]
	out := make([]byte, 0, s.size)
	for i := range s.total() {
		out = append(out, s.blocks[i]...)
	}
	return out
}

func (c *memCore) Finish(_ context.Context, id string) (*otav1.FinishSessionResponse, error) {
	c.mu.Lock()
	defer c.mu.Unlock()
	s, ok := c.sessions[id]
	if !ok {
		return nil, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "no session %q", id)
	}
	if uint64(len(s.blocks)) != s.total() {
		return nil, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "%d of %d blocks", len(s.blocks), s.total())
	}
	return &otav1.FinishSessionResponse{Session: &otav1.SessionInfo{SessionId: id, State: otav1.SessionState_SESSION_STATE_VERIFIED}}, nil
}

func (c *memCore) Abort(context.Context, string, otav1.Reason) error { return nil }
func (c *memCore) Activate(context.Context, string) (*otav1.ActivateResponse, error) {
	return nil, fmt.Errorf("plain error, not typed")
}
func (c *memCore) Reboot(context.Context) error { return nil }
func (c *memCore) SelfTest(context.Context, string) (*otav1.SelfTestResponse, error) {
	return &otav1.SelfTestResponse{Passed: true}, nil
}
func (c *memCore) Commit(context.Context, string) (*otav1.CommitResponse, error) {
	return nil, status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "not in a trial boot")
}
func (c *memCore) Reject(context.Context, string, otav1.Reason) (*otav1.RejectResponse, error) {
	return &otav1.RejectResponse{}, nil
}
func (c *memCore) Extensions(context.Context) (status.Fields, error) {
	if c.panicOn {
		panic("boom")
	}
	return status.Pairs("k", "v"), nil
}
