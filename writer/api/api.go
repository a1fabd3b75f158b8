// Package api declares the writer's operations once: the Go interface that writer/engine
// implements, that writer/server serves over gRPC (a thin adapter around any Writer) and that
// writer/client satisfies on the other side of the socket, so the in-process engine
// (`ota-writer flash`, set-version, the status fallback) and the remote writer (ota-net, the
// CLI over the socket) are used through the same method set. It also holds the limits both
// sides of the socket must agree on.
//
// The call order, the session states and what each call refuses are in docs/WRITER-API.md;
// the messages field by field in proto/ota/v1/writer.proto.
//
// Error contract: every error a Writer returns is a *status.Error (or wraps one):
// status.ReasonOf(err) is the writer's typed reason. Over the socket an unreachable writer
// reads as REASON_WRITER_UNAVAILABLE. Every argument may come from a compromised ota-net: an
// implementation validates all of it and changes nothing when it refuses.
//
// This package links no gRPC server code and nothing privileged: ota-net imports it.
package api

import (
	"context"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// Writer is the whole writer API: the session (block) path and the control plane.
type Writer interface {
	// Handshake checks the protocol version and answers the writer's limits (largest block,
	// signature algorithms; over gRPC also the largest message).
	Handshake(ctx context.Context, req *otav1.HandshakeRequest) (*otav1.HandshakeResponse, error)
	Sessions
	Control
}

// Sessions is the block path of one image: begin (or resume), write, finish (verify).
type Sessions interface {
	// Begin opens a session, or resumes the target's matching one (its block size and
	// missing-block bitmap then win over the request's).
	Begin(ctx context.Context, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error)
	// Write places blocks at their offsets (idempotent; a batch is checked whole before any
	// of it is written). When the writer's sync policy or sync asks for it, everything written
	// so far is made durable before it returns, and the result says Synced.
	Write(ctx context.Context, sessionID string, blocks []*otav1.Block, sync bool) (WriteResult, error)
	// Finish flushes, checks that every block is durable, reads the image back from the
	// medium and verifies its signature.
	Finish(ctx context.Context, sessionID string) (*otav1.FinishSessionResponse, error)
}

// Control is the control plane: state, activation, the trial/commit/reject cycle, sessions
// dropped by id, and the status extension fields. ota-net's agent and the CLI's status,
// accept, reject and abort need only this.
type Control interface {
	State(ctx context.Context) (*otav1.DeviceState, error)
	// Abort drops a session; its slot stays inactive.
	Abort(ctx context.Context, sessionID string, reason otav1.Reason) error
	// Activate activates a verified session (A/B: the next boot tries the new slot).
	Activate(ctx context.Context, sessionID string) (*otav1.ActivateResponse, error)
	// Reboot runs the configured reboot command, only when an activation or rejection
	// needs one.
	Reboot(ctx context.Context) error
	// SelfTest runs the configured health checks, in a trial boot only.
	SelfTest(ctx context.Context, jobID string) (*otav1.SelfTestResponse, error)
	// Commit makes the trial slot permanent (after a passed self test in this boot).
	Commit(ctx context.Context, jobID string) (*otav1.CommitResponse, error)
	// Reject rolls back from a trial boot.
	Reject(ctx context.Context, jobID string, reason otav1.Reason) (*otav1.RejectResponse, error)
	// Extensions returns the status extension fields in the order they take the
	// statusDetails budget.
	Extensions(ctx context.Context) (status.Fields, error)
}

// WriteResult is the session's progress after a Write.
type WriteResult struct {
	// Synced: everything written before and by this call is durable.
	Synced bool
	// Durable, Received and Total count blocks, as the writer does.
	Durable  uint64
	Received uint64
	Total    uint64
}
