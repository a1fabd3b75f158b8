package server

import (
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
)

// refusalLogEvery bounds the refusal log: the first refusal of each uid is logged at once,
// later ones at most once per interval, each line counting the refusals not logged since the
// previous line. A local process looping on connect must not be able to fill the journal,
// and one uid's flood must not hide that another uid was refused.
const refusalLogEvery = time.Minute

// refusalSeenMax caps the uids remembered as already logged. Only root could connect under
// arbitrary uids, and root is allowed; past the cap, new uids are rate-limited like the rest.
const refusalSeenMax = 256

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
		// Logged before the close, so that a refused client finds the reason in the log once
		// it sees the connection end. The log is rate-limited: this is rarely a write.
		l.auth.refusals.refused("connection refused", pc, "")
		c.Close()
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
	seen     map[uint32]bool // uids whose refusal was logged
}

func newRefusalLog(log hclog.Logger, allowed []uint32) *refusalLog {
	return &refusalLog{log: log, allowed: allowed, every: refusalLogEvery, now: time.Now, seen: map[uint32]bool{}}
}

// refused records one refusal and logs it if its uid was never logged before or the last
// line is at least every old. where says what was refused (a connection, or a request on
// one); method is the RPC, if any.
func (r *refusalLog) refused(where string, pc PeerCred, method string) {
	r.mu.Lock()
	now := r.now()
	newUID := pc.Err == nil && !r.seen[pc.UID] && len(r.seen) < refusalSeenMax
	if !newUID && !r.last.IsZero() && now.Sub(r.last) < r.every {
		r.unlogged++
		r.mu.Unlock()
		return
	}
	if pc.Err == nil && len(r.seen) < refusalSeenMax {
		r.seen[pc.UID] = true
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
