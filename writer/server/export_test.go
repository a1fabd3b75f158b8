package server

import (
	"net"
	"time"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
)

// ServicesOf lists what s serves, for the authorization tests (a row per method).
func ServicesOf(s *Server) map[string]grpc.ServiceInfo { return s.grpc.GetServiceInfo() }

// RefusalLogForTest exposes the rate-limited refusal log with a controllable clock.
type RefusalLogForTest struct{ r *refusalLog }

func NewRefusalLogForTest(log hclog.Logger, every time.Duration, now func() time.Time) RefusalLogForTest {
	r := newRefusalLog(log, []uint32{7})
	r.every, r.now = every, now
	return RefusalLogForTest{r}
}

// Refuse records a refused connection from uid.
func (t RefusalLogForTest) Refuse(uid uint32) {
	t.r.refused("connection refused", PeerCred{UID: uid, GID: uid, PID: 1}, "")
}

// ServeWithoutConnCheck serves s on ln without the accept-time uid check, to test the
// per-request check behind it.
func ServeWithoutConnCheck(s *Server, ln net.Listener) error { return s.serve(ln) }

// HeldBlockBuffers is how many received buffers s holds for WriteBlocksRequests whose blocks
// alias them (blockCodec): 0 once every call has returned.
func HeldBlockBuffers(s *Server) int {
	n := 0
	s.codec.held.Range(func(any, any) bool { n++; return true })
	return n
}
