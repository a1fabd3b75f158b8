// Package server is the thin gRPC adapter of the writer: it serves an api.Writer
// (writer/engine) on a Unix socket, checks the peer credentials of each connection (at accept) and of each
// request, and converts the writer's typed errors to gRPC statuses at one boundary (the
// interceptors). Handlers never build statuses.
package server

import (
	"context"
	"fmt"
	"net"
	"runtime/debug"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/experimental"
	"google.golang.org/grpc/health"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/keepalive"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/sharedbuf"
)

// Options configure a Server.
type Options struct {
	// AllowedUIDs may call the writer besides root.
	AllowedUIDs []uint32
	// MaxBlockSize is the writer's largest block (the engine's max_block_size): it sizes the
	// receive limit (api.MaxMessageSize). 0: api.DefaultMaxMessageSize.
	MaxBlockSize uint32
	// NoSharedBuffer: hand out no shared block buffers (writer/sharedbuf); blocks then
	// travel only inside the WriteBlocks messages.
	NoSharedBuffer bool
}

// Server serves an api.Writer over gRPC.
type Server struct {
	impl   api.Writer
	log    hclog.Logger
	grpc   *grpc.Server
	health *health.Server
	auth   *authorizer
	maxMsg int
	codec  *blockCodec
	bufs   *sharedbuf.Registry // nil: none handed out
}

// recvPool holds receive buffers, sized for block messages (see api.BufferTiers).
var recvPool = api.NewBufferPool()

// New builds a server for impl, the writer (writer/engine). Call Serve with a listener
// (Listen, or one passed by systemd). log is the process's logger (nil: none); the server logs
// under its own name.
func New(impl api.Writer, opts Options, log hclog.Logger) *Server {
	if log == nil {
		log = hclog.NewNullLogger()
	}
	log = log.Named("server")
	maxMsg := api.DefaultMaxMessageSize
	if opts.MaxBlockSize > 0 {
		maxMsg = api.MaxMessageSize(opts.MaxBlockSize)
	}
	s := &Server{impl: impl, log: log, health: health.NewServer(), maxMsg: maxMsg, codec: newBlockCodec(recvPool)}
	if !opts.NoSharedBuffer {
		s.bufs = sharedbuf.NewRegistry(sharedBufferSize(maxMsg), maxSharedBuffers, log.Named("sharedbuf"))
	}
	auth := newAuthorizer(opts.AllowedUIDs, log.Named("auth"))
	s.auth = auth
	s.grpc = grpc.NewServer(
		grpc.Creds(PeerCredentials()),
		grpc.MaxRecvMsgSize(s.maxMsg),
		// Responses carry missing-block bitmaps (up to 8 MiB per session with small blocks):
		// they are bounded by the writer's own state, not by the block size.
		grpc.MaxSendMsgSize(api.MaxResponseSize),
		// Errors become statuses outermost, so the authorizer's typed refusal is converted too.
		grpc.ChainUnaryInterceptor(s.unaryErrors, auth.unary),
		grpc.ChainStreamInterceptor(s.streamErrors, auth.stream),
		// A hostile peer must not pin unbounded handler goroutines.
		grpc.MaxConcurrentStreams(64),
		grpc.KeepaliveEnforcementPolicy(keepalive.EnforcementPolicy{MinTime: 10 * time.Second, PermitWithoutStream: true}),
		experimental.BufferPool(recvPool),
		grpc.ForceServerCodecV2(s.codec),
	)
	otav1.RegisterWriterServer(s.grpc, &service{impl: impl, log: log, maxMsg: s.maxMsg, codec: s.codec, bufs: s.bufs})
	healthpb.RegisterHealthServer(s.grpc, s.health)
	return s
}

// Serve accepts connections on ln until Stop or GracefulStop. It reports SERVING on the
// health service while it runs. A connection from a peer that is not allowed is closed at
// accept, before grpc reads anything from it.
func (s *Server) Serve(ln net.Listener) error {
	var l net.Listener = &peerListener{Listener: ln, auth: s.auth}
	if s.bufs != nil {
		l = newSniffListener(l, func(c *net.UnixConn) {
			// peerListener let it in; its credentials are read again for the buffer's owner.
			pc := readPeerCred(c)
			if pc.Err != nil {
				c.Close()
				return
			}
			s.bufs.Serve(c, pc.UID)
		})
	}
	return s.serve(l)
}

func (s *Server) serve(ln net.Listener) error {
	s.health.SetServingStatus("", healthpb.HealthCheckResponse_SERVING)
	s.health.SetServingStatus(api.ServiceName, healthpb.HealthCheckResponse_SERVING)
	s.log.Info("serving", "addr", ln.Addr().String(), "max_message", s.maxMsg)
	if err := s.grpc.Serve(ln); err != nil {
		return fmt.Errorf("serve: %w", err)
	}
	return nil
}

// GracefulStop reports NOT_SERVING, stops accepting, and waits for running calls to end. If
// ctx ends first, remaining calls are cut off.
func (s *Server) GracefulStop(ctx context.Context) {
	s.health.Shutdown()
	defer s.closeBuffers()
	done := make(chan struct{})
	go func() {
		s.grpc.GracefulStop()
		close(done)
	}()
	select {
	case <-done:
	case <-ctx.Done():
		s.log.Warn("graceful stop timed out; closing remaining calls")
		s.grpc.Stop()
		<-done
	}
	s.log.Info("stopped")
}

// Stop closes all connections at once.
func (s *Server) Stop() {
	s.health.Shutdown()
	defer s.closeBuffers()
	s.grpc.Stop()
}

func (s *Server) closeBuffers() {
	if s.bufs != nil {
		s.bufs.Close()
	}
}

// The one boundary where errors become gRPC statuses. A panic in a handler is a bug, but
// must not take the privileged writer down with it: it becomes REASON_OTHER.
func (s *Server) unaryErrors(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (resp any, err error) {
	if r, ok := req.(*otav1.WriteBlocksRequest); ok {
		// Its blocks alias a received buffer (blockCodec): released whatever the call did,
		// a refusal by the authorizer included.
		defer s.codec.release(r)
	}
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("panic in handler", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
			resp, err = nil, status.Errorf(otav1.Reason_REASON_OTHER, "internal error")
		}
		if err != nil {
			s.logErr(info.FullMethod, err)
			err = status.ToGRPC(err)
		}
	}()
	return handler(ctx, req)
}

func (s *Server) streamErrors(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) (err error) {
	defer func() {
		if r := recover(); r != nil {
			s.log.Error("panic in handler", "method", info.FullMethod, "panic", r, "stack", string(debug.Stack()))
			err = status.Errorf(otav1.Reason_REASON_OTHER, "internal error")
		}
		if err != nil {
			s.logErr(info.FullMethod, err)
			err = status.ToGRPC(err)
		}
	}()
	return handler(srv, ss)
}

func (s *Server) logErr(method string, err error) {
	e := status.FromError(err)
	switch {
	case e.Reason == otav1.Reason_REASON_PERMISSION_DENIED:
		return // the authorizer logged who and why
	case method == otav1.Writer_AbortSession_FullMethodName && e.Class() == status.ClassGone:
		// The session is closed already (verification refused it, its slot became active):
		// the abort had nothing left to do. The caller still gets bad_file_handle.
		s.log.Debug("abort: session already closed", "error", err)
		return
	}
	s.log.Info("call failed", "method", method, "reason", status.String(e.Reason), "error", err)
}
