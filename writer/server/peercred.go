package server

import (
	"context"
	"fmt"
	"net"
	"slices"

	"github.com/hashicorp/go-hclog"
	"golang.org/x/sys/unix"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/peer"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// PeerCred is the AuthInfo of a connection: the kernel's SO_PEERCRED of the process that
// connected. Err is set when they could not be read (not a Unix socket, getsockopt failed);
// the server's listener closes such connections, and the per-request check refuses them.
type PeerCred struct {
	credentials.CommonAuthInfo
	UID, GID uint32
	PID      int32
	Err      error
}

// AuthType implements credentials.AuthInfo.
func (PeerCred) AuthType() string { return "peercred" }

// peerCredentials is a TransportCredentials that does no transport security (the socket's
// file mode and the kernel do) but records who is on the other end of each connection.
type peerCredentials struct{}

// PeerCredentials returns the server transport credentials that read SO_PEERCRED.
func PeerCredentials() credentials.TransportCredentials { return peerCredentials{} }

func (peerCredentials) ClientHandshake(_ context.Context, _ string, conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, PeerCred{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}, nil
}

func (peerCredentials) ServerHandshake(conn net.Conn) (net.Conn, credentials.AuthInfo, error) {
	return conn, readPeerCred(conn), nil
}

func (peerCredentials) Info() credentials.ProtocolInfo {
	return credentials.ProtocolInfo{SecurityProtocol: "peercred"}
}
func (p peerCredentials) Clone() credentials.TransportCredentials { return p }

// OverrideServerName is deprecated in grpc-go and unused here.
func (peerCredentials) OverrideServerName(string) error { return nil }

func readPeerCred(conn net.Conn) PeerCred {
	pc := PeerCred{CommonAuthInfo: credentials.CommonAuthInfo{SecurityLevel: credentials.NoSecurity}}
	uc, ok := conn.(*net.UnixConn)
	if !ok {
		pc.Err = fmt.Errorf("connection is %T, not a Unix socket", conn)
		return pc
	}
	raw, err := uc.SyscallConn()
	if err != nil {
		pc.Err = fmt.Errorf("raw conn: %w", err)
		return pc
	}
	var ucred *unix.Ucred
	var serr error
	if err := raw.Control(func(fd uintptr) {
		ucred, serr = unix.GetsockoptUcred(int(fd), unix.SOL_SOCKET, unix.SO_PEERCRED)
	}); err != nil {
		pc.Err = fmt.Errorf("raw conn control: %w", err)
		return pc
	}
	if serr != nil {
		pc.Err = fmt.Errorf("SO_PEERCRED: %w", serr)
		return pc
	}
	pc.UID, pc.GID, pc.PID = ucred.Uid, ucred.Gid, ucred.Pid
	return pc
}

// authorizer decides from the connection's peer credentials, like tailscale's LocalAPI: root
// and the configured uids pass. Everyone else is closed at accept (peerListener); a request
// that still arrives from such a peer gets a typed PermissionDenied. Both log through one
// rate-limited refusal log.
type authorizer struct {
	allowed  []uint32
	log      hclog.Logger
	refusals *refusalLog
}

func newAuthorizer(allowed []uint32, log hclog.Logger) *authorizer {
	allowed = append([]uint32(nil), allowed...)
	return &authorizer{allowed: allowed, log: log, refusals: newRefusalLog(log, allowed)}
}

func (a *authorizer) allows(uid uint32) bool { return uid == 0 || slices.Contains(a.allowed, uid) }

func (a *authorizer) check(ctx context.Context, method string) error {
	p, ok := peer.FromContext(ctx)
	if !ok {
		a.log.Warn("refused: no peer in context", "method", method)
		return status.Errorf(otav1.Reason_REASON_PERMISSION_DENIED, "permission denied: unknown peer")
	}
	pc, ok := p.AuthInfo.(PeerCred)
	if !ok {
		a.log.Warn("refused: connection has no peer credentials", "method", method, "auth", fmt.Sprintf("%T", p.AuthInfo))
		return status.Errorf(otav1.Reason_REASON_PERMISSION_DENIED, "permission denied: no peer credentials")
	}
	if pc.Err != nil {
		a.refusals.refused("request refused", pc, method)
		return status.Errorf(otav1.Reason_REASON_PERMISSION_DENIED, "permission denied: peer credentials unreadable")
	}
	if a.allows(pc.UID) {
		return nil
	}
	a.refusals.refused("request refused", pc, method)
	return status.Errorf(otav1.Reason_REASON_PERMISSION_DENIED, "permission denied: uid %d is not an allowed peer", pc.UID).
		WithMeta("uid", fmt.Sprint(pc.UID))
}

func (a *authorizer) unary(ctx context.Context, req any, info *grpc.UnaryServerInfo, handler grpc.UnaryHandler) (any, error) {
	if err := a.check(ctx, info.FullMethod); err != nil {
		return nil, err
	}
	return handler(ctx, req)
}

func (a *authorizer) stream(srv any, ss grpc.ServerStream, info *grpc.StreamServerInfo, handler grpc.StreamHandler) error {
	if err := a.check(ss.Context(), info.FullMethod); err != nil {
		return err
	}
	return handler(srv, ss)
}
