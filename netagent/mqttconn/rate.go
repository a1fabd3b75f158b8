package mqttconn

import (
	"context"
	"sync"
	"time"
)

// DefaultMaxPublishRate is AWS IoT Core's limit on inbound publishes per second per
// connection. Every publish of the connection counts (stream requests and job updates
// alike): AWS counts per connection, not per topic.
const DefaultMaxPublishRate = 100

// publishBucket is a token bucket that keeps a connection's publishes under limit in any
// one-second window. A bucket of rate r and depth b lets at most b + r*t publishes through
// in any window t; with r = 0.9*limit and b = limit/20 that is 0.95*limit per second: the
// broker, which counts on arrival, sees at most limit even when the network bunches up a
// twentieth of a second's worth of publishes. A burst of 5 requests goes out at once.
type publishBucket struct {
	rate  float64 // tokens per second
	depth float64

	mu     sync.Mutex
	tokens float64
	last   time.Time
}

func newPublishBucket(limit int) *publishBucket {
	depth := max(1, float64(limit)/20)
	return &publishBucket{rate: 0.9 * float64(limit), depth: depth, tokens: depth, last: time.Now()}
}

// wait takes a token, waiting for one if needed (bounded by ctx). The token is taken when
// the publish may go, not reserved ahead: a waiter that wakes late does not bunch up with
// the next one.
func (b *publishBucket) wait(ctx context.Context) error {
	for {
		b.mu.Lock()
		now := time.Now()
		b.tokens = min(b.depth, b.tokens+now.Sub(b.last).Seconds()*b.rate)
		b.last = now
		if b.tokens >= 1 {
			b.tokens--
			b.mu.Unlock()
			return nil
		}
		d := time.Duration((1 - b.tokens) / b.rate * float64(time.Second))
		b.mu.Unlock()
		t := time.NewTimer(d)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return ctx.Err()
		}
	}
}
