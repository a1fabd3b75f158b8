package server

import (
	"context"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// Core is the plain Go writer the gRPC adapter serves (implemented by writer/engine). It
// returns *status.Error values; the adapter converts them to gRPC statuses at one place.
// Every argument comes from a possibly compromised peer: Core validates all of it.
type Core interface {
	Handshake(ctx context.Context, req *otav1.HandshakeRequest) (*otav1.HandshakeResponse, error)
	State(ctx context.Context) (*otav1.DeviceState, error)
	Begin(ctx context.Context, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error)
	// Write places blocks at their offsets (idempotent). When the core's sync policy (bytes or
	// time since the last sync) or sync asks for it, it makes everything written so far
	// durable before returning and reports Synced.
	Write(ctx context.Context, sessionID string, blocks []*otav1.Block, sync bool) (WriteResult, error)
	Finish(ctx context.Context, sessionID string) (*otav1.FinishSessionResponse, error)
	Abort(ctx context.Context, sessionID string, reason otav1.Reason) error
	Activate(ctx context.Context, sessionID string) (*otav1.ActivateResponse, error)
	Reboot(ctx context.Context) error
	SelfTest(ctx context.Context, jobID string) (*otav1.SelfTestResponse, error)
	Commit(ctx context.Context, jobID string) (*otav1.CommitResponse, error)
	Reject(ctx context.Context, jobID string, reason otav1.Reason) (*otav1.RejectResponse, error)
	// Extensions returns the status extension fields in the order they take the
	// statusDetails budget.
	Extensions(ctx context.Context) (status.Fields, error)
	MaxBlockSize() uint32
}

// WriteResult is the session's progress after a Write.
type WriteResult struct {
	// Synced: everything written before and by this call is durable.
	Synced   bool
	Durable  uint64
	Received uint64
	Total    uint64
}
