package emulator

import (
	"net"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/packets"
)

// AWS IoT Core's per-connection quotas (AWS IoT Core endpoints and quotas, message broker),
// enforced by the embedded broker unless Options.NoQuotas is set. docs/PROTOCOL.md says what
// each does and which test proves it.
const (
	// QuotaBytesPerSecond: "Data received or sent over a client connection is processed at a
	// maximum throughput rate. Data that exceeds the maximum throughput is delayed in
	// processing": 512 KiB (AWS writes KB and KiB for the same row) each way, per connection.
	QuotaBytesPerSecond = 512 * 1024
	// QuotaPublishesPerSecond: inbound publish requests per second per connection; the excess
	// is discarded, the connection kept.
	QuotaPublishesPerSecond = 100
	// QuotaPayloadBytes: the payload of one publish; a larger one is refused and the
	// connection closed.
	QuotaPayloadBytes = 128 * 1024
	// QuotaSubscriptions: subscriptions per connection; a SUBSCRIBE that would go past it
	// closes the connection.
	QuotaSubscriptions = 50
	// QuotaFiltersPerSubscribe: topic filters in one SUBSCRIBE; more close the connection.
	QuotaFiltersPerSubscribe = 8
)

// The byte buckets hold 64 KiB: a connection that was idle may send 1/8 s worth at once, so
// any transfer of a few hundred KiB or more runs at the quota, not above it. Writes go out
// in pieces of at most 16 KiB so a large message is paced too, not sent in one burst.
const (
	quotaBurstBytes = 64 * 1024
	quotaWriteChunk = 16 * 1024
)

// bucket is a token bucket. Callers take what they used and wait out any debt, so a reader or
// writer is slowed to the rate, never refused.
type bucket struct {
	mu     sync.Mutex
	rate   float64 // tokens per second
	depth  float64
	tokens float64
	last   time.Time
}

func newBucket(rate, depth float64) *bucket {
	return &bucket{rate: rate, depth: depth, tokens: depth, last: time.Now()}
}

func (b *bucket) refillLocked(now time.Time) {
	b.tokens += now.Sub(b.last).Seconds() * b.rate
	if b.tokens > b.depth {
		b.tokens = b.depth
	}
	b.last = now
}

// take removes n tokens and returns how long the caller must wait for the debt to be repaid.
func (b *bucket) take(n int) time.Duration {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refillLocked(time.Now())
	b.tokens -= float64(n)
	if b.tokens >= 0 {
		return 0
	}
	return time.Duration(-b.tokens / b.rate * float64(time.Second))
}

// allow takes one token if there is one.
func (b *bucket) allow() bool {
	b.mu.Lock()
	defer b.mu.Unlock()
	b.refillLocked(time.Now())
	if b.tokens < 1 {
		return false
	}
	b.tokens--
	return true
}

// quotaListener hands out connections that carry their quotas.
type quotaListener struct{ net.Listener }

func (l quotaListener) Accept() (net.Conn, error) {
	c, err := l.Listener.Accept()
	if err != nil {
		return nil, err
	}
	return newQuotaConn(c), nil
}

// quotaConn throttles one client connection to QuotaBytesPerSecond each way by delaying
// reads and writes (a throttled client sees TCP back-pressure, no loss), and holds the
// connection's publish-rate bucket. Each direction waits on its own goroutine (mochi's
// reader for this client, its writer or the emulator's sender for this client), so a
// throttled client delays no one else.
type quotaConn struct {
	net.Conn
	in, out   *bucket
	publishes *bucket
	closed    chan struct{}
	closeOnce sync.Once
}

func newQuotaConn(c net.Conn) *quotaConn {
	return &quotaConn{
		Conn:      c,
		in:        newBucket(QuotaBytesPerSecond, quotaBurstBytes),
		out:       newBucket(QuotaBytesPerSecond, quotaBurstBytes),
		publishes: newBucket(QuotaPublishesPerSecond, QuotaPublishesPerSecond),
		closed:    make(chan struct{}),
	}
}

// wait sleeps d unless the connection closes first.
func (c *quotaConn) wait(d time.Duration) bool {
	if d <= 0 {
		return true
	}
	t := time.NewTimer(d)
	defer t.Stop()
	select {
	case <-t.C:
		return true
	case <-c.closed:
		return false
	}
}

func (c *quotaConn) Read(p []byte) (int, error) {
	n, err := c.Conn.Read(p)
	if n > 0 && !c.wait(c.in.take(n)) && err == nil {
		err = net.ErrClosed
	}
	return n, err
}

func (c *quotaConn) Write(p []byte) (int, error) {
	written := 0
	for len(p) > 0 {
		n := min(len(p), quotaWriteChunk)
		if !c.wait(c.out.take(n)) {
			return written, net.ErrClosed
		}
		m, err := c.Conn.Write(p[:n])
		written += m
		if err != nil {
			return written, err
		}
		p = p[n:]
	}
	return written, nil
}

func (c *quotaConn) Close() error {
	c.closeOnce.Do(func() { close(c.closed) })
	return c.Conn.Close()
}

// quotaHook enforces the packet quotas. Its callbacks run on the reading goroutine of the
// client concerned.
type quotaHook struct {
	mqtt.HookBase
	server *mqtt.Server
	log    hclog.Logger
}

func (*quotaHook) ID() string { return "aws-quotas" }

func (*quotaHook) Provides(b byte) bool { return b == mqtt.OnPacketRead || b == mqtt.OnPublish }

// OnPacketRead refuses what AWS refuses by closing the connection: an oversized payload and a
// SUBSCRIBE over the filter or subscription quota.
func (h *quotaHook) OnPacketRead(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	if cl.Net.Inline {
		return pk, nil
	}
	switch pk.FixedHeader.Type {
	case packets.Publish:
		if len(pk.Payload) > QuotaPayloadBytes {
			return pk, h.refuse(cl, packets.ErrPacketTooLarge, "payload over 128 KiB", "topic", pk.TopicName, "bytes", len(pk.Payload))
		}
	case packets.Subscribe:
		if len(pk.Filters) > QuotaFiltersPerSubscribe {
			return pk, h.refuse(cl, packets.ErrQuotaExceeded, "more than 8 topic filters in one SUBSCRIBE", "filters", len(pk.Filters))
		}
		total := cl.State.Subscriptions.Len()
		seen := map[string]bool{}
		for _, f := range pk.Filters {
			if _, ok := cl.State.Subscriptions.Get(f.Filter); !ok && !seen[f.Filter] {
				seen[f.Filter] = true
				total++
			}
		}
		if total > QuotaSubscriptions {
			return pk, h.refuse(cl, packets.ErrQuotaExceeded, "more than 50 subscriptions", "subscriptions", total)
		}
	}
	return pk, nil
}

// refuse closes the connection; an MQTT 5 client is told why in a DISCONNECT first.
func (h *quotaHook) refuse(cl *mqtt.Client, code packets.Code, why string, args ...any) error {
	h.log.Warn("quota: disconnecting client: "+why, append([]any{"client", cl.ID}, args...)...)
	if cl.Properties.ProtocolVersion == 5 {
		_ = h.server.DisconnectClient(cl, code)
	}
	cl.Stop(code)
	return code
}

// OnPublish discards a publish over the connection's rate, keeping the connection, as AWS
// documents. An MQTT 5 QoS 1 publish is answered with PUBACK "Quota exceeded" (0x97), so the
// client's in-flight window is not held up; a QoS 0 publish just goes nowhere.
func (h *quotaHook) OnPublish(cl *mqtt.Client, pk packets.Packet) (packets.Packet, error) {
	qc, ok := cl.Net.Conn.(*quotaConn)
	if cl.Net.Inline || !ok || qc.publishes.allow() {
		return pk, nil
	}
	h.log.Debug("quota: publish over 100/s discarded", "client", cl.ID, "topic", pk.TopicName)
	if pk.FixedHeader.Qos > 0 && cl.Properties.ProtocolVersion == 5 {
		return pk, packets.ErrQuotaExceeded
	}
	return pk, packets.ErrRejectPacket
}
