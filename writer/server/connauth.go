package server

import (
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// refusalLogEvery bounds the refusal log: the first refusal is logged at once, later ones at
// most once per interval, each line counting the refusals it stands for. A local process
// looping on connect must not be able to fill the journal.
const refusalLogEvery = time.Minute

// peerListener closes, at accept, every connection whose peer uid is not allowed, before
// grpc sees it. grpc answers malformed bodies, unknown methods and oversize messages itself,
// before any interceptor runs (Internal, Unimplemented, ResourceExhausted); a refused peer
// must get none of that, nor reach the HTTP/2 stack at all. The per-request check in the
// interceptors stays as a second line.
//
// Accept does no I/O on the connection: SO_PEERCRED is recorded by the kernel at connect and
// read with one getsockopt, so a peer that sends nothing or never reads cannot stall the
// accept loop. Closing a refused Unix socket does not block either.
type peerListener struct {
	net.Listener
	auth *authorizer
}

func (l *peerListener) Accept() (net.Conn, error) {
	for {
		c, err := l.Listener.Accept()
		if err != nil {
			return nil, err
		}
		pc := readPeerCred(c)
		if pc.Err == nil && l.auth.allows(pc.UID) {
			return c, nil
		}
		c.Close()
		l.auth.refusals.refused("connection refused", pc, "")
	}
}

// refusalLog is the rate-limited log of refused peers.
type refusalLog struct {
	log     hclog.Logger
	allowed []uint32
	every   time.Duration
	now     func() time.Time

	mu sync.Mutex
	// last is when the last line was written; unlogged counts refusals since then.
	last     time.Time
	unlogged uint64
}

func newRefusalLog(log hclog.Logger, allowed []uint32) *refusalLog {
	return &refusalLog{log: log, allowed: allowed, every: refusalLogEvery, now: time.Now}
}

// refused records one refusal and logs it unless a line was written less than every ago.
// where says what was refused (a connection, or a request on one); method is the RPC, if any.
func (r *refusalLog) refused(where string, pc PeerCred, method string) {
	r.mu.Lock()
	now := r.now()
	if !r.last.IsZero() && now.Sub(r.last) < r.every {
		r.unlogged++
		r.mu.Unlock()
		return
	}
	since := r.unlogged
	r.last, r.unlogged = now, 0
	r.mu.Unlock()

	args := []any{}
	if method != "" {
		args = append(args, "method", method)
	}
	msg := where + ": uid not allowed"
	if pc.Err != nil {
		msg = where + ": peer credentials unreadable"
		args = append(args, "error", pc.Err)
	} else {
		args = append(args, "uid", pc.UID, "gid", pc.GID, "pid", pc.PID)
	}
	args = append(args, "allowed_uids", r.allowed, "not_logged_since_last", since, "next_log_in", r.every)
	r.log.Warn(msg, args...)
}
