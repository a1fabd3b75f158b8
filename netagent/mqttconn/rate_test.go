package mqttconn_test

import (
	"sync"
	"testing"
	"time"

	"github.com/gwota/gwota/netagent/mqttconn"
	"github.com/gwota/gwota/netagent/mqttconn/mqtttest"
)

// AWS IoT Core takes at most 100 publishes per second per connection. Counted at the broker,
// as they arrive: a burst of publishes from several goroutines (stream requests and job
// updates share the connection) never puts more than 100 into any one-second window. The
// same burst with the cap lifted does, so the count can see a breach.
func TestPublishRateAtBroker(t *testing.T) {
	const n = 260
	for _, tc := range []struct {
		name    string
		rate    int
		wantMax int // the busiest one-second window at most (capped) or at least (lifted)
	}{
		{name: "default cap", rate: 0, wantMax: mqttconn.DefaultMaxPublishRate},
		{name: "lifted", rate: -1, wantMax: n},
	} {
		t.Run(tc.name, func(t *testing.T) {
			b := mqtttest.Start(t, mqtttest.Options{})
			var mu sync.Mutex
			var at []time.Time
			all := make(chan struct{})
			if err := b.Subscribe("rate/#", 1, func(_ string, _ []byte, origin string) {
				if origin != "rate-client" {
					return
				}
				mu.Lock()
				defer mu.Unlock()
				at = append(at, time.Now())
				if len(at) == n {
					close(all)
				}
			}); err != nil {
				t.Fatal(err)
			}
			c := dial(t, b, "rate-client", func(cfg *mqttconn.Config) { cfg.MaxPublishRate = tc.rate })
			ctx := ctxT(t)
			var wg sync.WaitGroup
			for g := 0; g < 8; g++ {
				wg.Add(1)
				go func() {
					defer wg.Done()
					for i := g; i < n; i += 8 {
						if err := c.Publish(ctx, "rate/x", byte(i%2), []byte("x")); err != nil {
							t.Error(err)
							return
						}
					}
				}()
			}
			wg.Wait()
			select {
			case <-all:
			case <-ctx.Done():
				t.Fatalf("only %d of %d publishes reached the broker", len(at), n)
			}
			mu.Lock()
			busiest := busiestSecond(at)
			mu.Unlock()
			t.Logf("busiest one-second window at the broker: %d publishes", busiest)
			if tc.rate == 0 && busiest > tc.wantMax {
				t.Fatalf("%d publishes in one second at the broker, cap %d", busiest, tc.wantMax)
			}
			if tc.rate < 0 && busiest <= mqttconn.DefaultMaxPublishRate {
				t.Fatalf("uncapped burst: only %d in the busiest second; the count cannot see a breach", busiest)
			}
		})
	}
}

// busiestSecond is the most arrivals in any window of one second (at is in arrival order).
func busiestSecond(at []time.Time) int {
	best, lo := 0, 0
	for hi := range at {
		for at[hi].Sub(at[lo]) >= time.Second {
			lo++
		}
		best = max(best, hi-lo+1)
	}
	return best
}
