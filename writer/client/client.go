// Package client is the writer's gRPC client (used by ota-net and the ota-writer CLI): a
// Client is an api.Writer on the other side of the socket (the GRPCClient of hashicorp/go-plugin's
// model). It does not link the server: the privileged code stays out of the network agent.
//
// Every error a method returns is a *status.Error (or wraps one), so status.ReasonOf(err)
// gives the writer's typed reason; transport failures read as REASON_WRITER_UNAVAILABLE.
package client

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"sync/atomic"
	"syscall"
	"time"

	"google.golang.org/grpc"
	"google.golang.org/grpc/backoff"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/protobuf/proto"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
)

var _ api.Writer = (*Client)(nil)

// Options configure Dial.
type Options struct {
	// Name is sent in the handshake for the writer's logs ("ota-net 1.2.0").
	Name string
	// MaxMessageSize bounds what the client sends until the handshake tells the writer's
	// limit; api.DefaultMaxMessageSize when 0.
	MaxMessageSize int
	// NoSharedBuffer: send block data inside the WriteBlocks messages even when the writer
	// offers a shared buffer (writer/sharedbuf).
	NoSharedBuffer bool
}

// Client talks to the writer over its Unix socket.
type Client struct {
	cc     *grpc.ClientConn
	w      otav1.WriterClient
	health healthpb.HealthClient
	name   string
	sock   string
	// sendMax is the writer's receive limit once the handshake told it, else maxMsg.
	sendMax atomic.Int64
	// shared is the size of the shared buffers the writer offered in the handshake (0: none,
	// or Options.NoSharedBuffer).
	shared   atomic.Int64
	noShared bool
}

// Dial prepares a client for the writer's socket. Like grpc.NewClient it does no I/O: the
// connection is made on first use. Use WaitReady to wait for a writer that is starting.
func Dial(ctx context.Context, socketPath string, opts Options) (*Client, error) {
	if socketPath == "" {
		return nil, errors.New("client: empty socket path")
	}
	maxMsg := opts.MaxMessageSize
	if maxMsg <= 0 {
		maxMsg = api.DefaultMaxMessageSize
	}
	cc, err := grpc.NewClient("unix://"+socketPath,
		grpc.WithTransportCredentials(insecure.NewCredentials()),
		grpc.WithDefaultCallOptions(grpc.MaxCallRecvMsgSize(api.MaxResponseSize), grpc.MaxCallSendMsgSize(maxMsg)),
		// A local socket: reconnect fast after a writer restart instead of grpc's 1 s base.
		grpc.WithConnectParams(grpc.ConnectParams{Backoff: backoff.Config{BaseDelay: 50 * time.Millisecond, Multiplier: 1.6, Jitter: 0.2, MaxDelay: 2 * time.Second}, MinConnectTimeout: 5 * time.Second}),
	)
	if err != nil {
		return nil, fmt.Errorf("client: %w", err)
	}
	c := &Client{cc: cc, w: otav1.NewWriterClient(cc), health: healthpb.NewHealthClient(cc), name: opts.Name, sock: socketPath, noShared: opts.NoSharedBuffer}
	c.sendMax.Store(int64(maxMsg))
	return c, nil
}

// Close closes the connection.
func (c *Client) Close() error { return c.cc.Close() }

// Raw is the generated client, for callers that need call options.
func (c *Client) Raw() otav1.WriterClient { return c.w }

// wrap makes every error a *status.Error carrying the reason (kept as a plain error so a nil
// error stays a nil interface). status.FromError is the one decoder of gRPC statuses.
func wrap(err error) error {
	if err == nil {
		return nil
	}
	return status.FromError(err)
}

// WaitReady waits until the writer answers SERVING on its health service, or ctx ends. A
// refusal (permission denied) returns at once: waiting would not change it.
func (c *Client) WaitReady(ctx context.Context) error {
	backoff := 20 * time.Millisecond
	refusals := 0
	for {
		attempt, cancel := context.WithTimeout(ctx, 2*time.Second)
		resp, err := c.health.Check(attempt, &healthpb.HealthCheckRequest{Service: api.ServiceName}, grpc.WaitForReady(true))
		cancel()
		if err == nil && resp.GetStatus() == healthpb.HealthCheckResponse_SERVING {
			return nil
		}
		if err != nil {
			if e := status.FromError(err); e.Reason == otav1.Reason_REASON_PERMISSION_DENIED {
				return e
			}
			if c.refused() {
				refusals++
			} else {
				refusals = 0
			}
			// Twice in a row, so a writer that crashed right after an accept is not taken
			// for a refusal.
			if refusals >= 2 {
				return status.Errorf(otav1.Reason_REASON_PERMISSION_DENIED,
					"the writer on %s closes the connection without answering: it does not allow uid %d (only root and the peer_uids/peer_users of its configuration)",
					c.sock, os.Geteuid())
			}
		}
		select {
		case <-ctx.Done():
			if err == nil {
				err = fmt.Errorf("writer not serving (%s)", resp.GetStatus())
			}
			return status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "waiting for writer: %v: %w", err, ctx.Err())
		case <-time.After(backoff):
		}
		backoff = min(backoff*2, 500*time.Millisecond)
	}
}

// refused tells whether the writer refuses this process's uid. The writer closes the
// connection of a peer it does not allow at accept, before grpc can answer anything (so grpc
// only sees an unavailable server); a writer that takes a connection sends its HTTP/2
// SETTINGS at once. End of stream before any byte is a refusal; a byte, no listener, or
// silence (a writer still starting under socket activation) is not.
func (c *Client) refused() bool {
	conn, err := net.DialTimeout("unix", c.sock, time.Second)
	if err != nil {
		return false
	}
	defer conn.Close()
	conn.SetReadDeadline(time.Now().Add(time.Second))
	n, err := conn.Read(make([]byte, 1))
	return n == 0 && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET))
}

// Handshake checks the protocol version and learns the writer's limits; the client adopts
// the writer's maximum message size for sending. req nil sends this client's own request
// (protocol version 1, Options.Name).
func (c *Client) Handshake(ctx context.Context, req *otav1.HandshakeRequest) (*otav1.HandshakeResponse, error) {
	if req == nil {
		req = &otav1.HandshakeRequest{ProtocolVersion: otav1.ProtocolVersion_PROTOCOL_VERSION_1, Client: c.name}
	}
	resp, err := c.w.Handshake(ctx, req)
	if err != nil {
		return nil, wrap(err)
	}
	if resp.GetProtocolVersion() != otav1.ProtocolVersion_PROTOCOL_VERSION_1 {
		return nil, status.Errorf(otav1.Reason_REASON_PROTOCOL_VERSION, "writer speaks protocol %s, client %s", resp.GetProtocolVersion(), otav1.ProtocolVersion_PROTOCOL_VERSION_1)
	}
	if m := int64(resp.GetMaxMessageSize()); m > 0 && m < c.sendMax.Load() {
		c.sendMax.Store(m)
	}
	if !c.noShared {
		c.shared.Store(int64(resp.GetSharedBufferSize()))
	}
	return resp, nil
}

// State returns the device state.
func (c *Client) State(ctx context.Context) (*otav1.DeviceState, error) {
	r, err := c.w.GetState(ctx, &otav1.GetStateRequest{})
	return r, wrap(err)
}

// Begin opens or resumes a session.
func (c *Client) Begin(ctx context.Context, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error) {
	r, err := c.w.BeginSession(ctx, req)
	return r, wrap(err)
}

// Write writes blocks in one unary call (WriteBatch); for a stream of them see
// OpenBlockStream.
func (c *Client) Write(ctx context.Context, sessionID string, blocks []*otav1.Block, sync bool) (api.WriteResult, error) {
	// seq 1: the ack names it when the writer synced.
	a, err := c.WriteBatch(ctx, sessionID, 1, blocks, sync)
	if err != nil {
		return api.WriteResult{}, err
	}
	return api.WriteResult{Synced: a.GetDurableSeq() == 1, Durable: a.GetDurableBlocks(), Received: a.GetReceivedBlocks(), Total: a.GetTotalBlocks()}, nil
}

// WriteBatch writes blocks in one unary call; with sync the ack's DurableSeq is seq.
func (c *Client) WriteBatch(ctx context.Context, sessionID string, seq uint64, blocks []*otav1.Block, sync bool) (*otav1.WriteAck, error) {
	req := &otav1.WriteBlocksRequest{SessionId: sessionID, Seq: seq, Blocks: blocks, Sync: sync}
	if err := c.checkSize(req); err != nil {
		return nil, err
	}
	r, err := c.w.WriteBatch(ctx, req, blockCallOption())
	return r, wrap(err)
}

// MaxMessageSize is the largest message the client will send.
func (c *Client) MaxMessageSize() int { return int(c.sendMax.Load()) }

// checkSize refuses locally, with a typed reason, what the writer would refuse as oversized.
func (c *Client) checkSize(req *otav1.WriteBlocksRequest) error {
	if n, max := proto.Size(req), c.sendMax.Load(); int64(n) > max {
		return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "write message of %d bytes exceeds the limit of %d", n, max)
	}
	return nil
}

// Finish flushes and verifies the session's image.
func (c *Client) Finish(ctx context.Context, sessionID string) (*otav1.FinishSessionResponse, error) {
	r, err := c.w.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: sessionID})
	return r, wrap(err)
}

// Abort drops a session.
func (c *Client) Abort(ctx context.Context, sessionID string, reason otav1.Reason) error {
	_, err := c.w.AbortSession(ctx, &otav1.AbortSessionRequest{SessionId: sessionID, Reason: reason})
	return wrap(err)
}

// Activate activates a verified session.
func (c *Client) Activate(ctx context.Context, sessionID string) (*otav1.ActivateResponse, error) {
	r, err := c.w.Activate(ctx, &otav1.ActivateRequest{SessionId: sessionID})
	return r, wrap(err)
}

// Reboot runs the writer's configured reboot command.
func (c *Client) Reboot(ctx context.Context) error {
	_, err := c.w.Reboot(ctx, &otav1.RebootRequest{})
	return wrap(err)
}

// SelfTest runs the configured health checks in a trial boot.
func (c *Client) SelfTest(ctx context.Context, jobID string) (*otav1.SelfTestResponse, error) {
	r, err := c.w.SelfTest(ctx, &otav1.SelfTestRequest{JobId: jobID})
	return r, wrap(err)
}

// Commit makes the trial slot permanent.
func (c *Client) Commit(ctx context.Context, jobID string) (*otav1.CommitResponse, error) {
	r, err := c.w.Commit(ctx, &otav1.CommitRequest{JobId: jobID})
	return r, wrap(err)
}

// Reject rolls back from a trial boot.
func (c *Client) Reject(ctx context.Context, jobID string, reason otav1.Reason) (*otav1.RejectResponse, error) {
	r, err := c.w.Reject(ctx, &otav1.RejectRequest{JobId: jobID, Reason: reason})
	return r, wrap(err)
}

// Extensions returns the writer's status extension fields in the order they take the
// statusDetails budget (an older writer sends only the unordered map: key order then).
func (c *Client) Extensions(ctx context.Context) (status.Fields, error) {
	r, err := c.w.GetExtensions(ctx, &otav1.GetExtensionsRequest{})
	if err != nil {
		return nil, wrap(err)
	}
	if len(r.GetFields()) == 0 {
		return status.SortedFields(r.GetValues()), nil
	}
	out := make(status.Fields, 0, len(r.GetFields()))
	for _, f := range r.GetFields() {
		out = append(out, status.Field{Key: f.GetKey(), Value: f.GetValue()})
	}
	return out, nil
}
