package emulator

import (
	"context"
	"fmt"
	"net"
	"net/url"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
)

// rawClient is a bare paho client that remembers how the server ended the connection.
type rawClient struct {
	t    *testing.T
	c    *paho.Client
	ctx  context.Context // ends at cleanup
	wg   sync.WaitGroup
	mu   sync.Mutex
	disc *paho.Disconnect
	gone chan struct{}
	once sync.Once
}

func dialRaw(t *testing.T, brokerURL, clientID string, onMsg func(*paho.Publish)) *rawClient {
	t.Helper()
	u, err := url.Parse(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancelAll := context.WithCancel(context.Background())
	r := &rawClient{t: t, ctx: ctx, gone: make(chan struct{})}
	r.c = paho.NewClient(paho.ClientConfig{
		Conn: conn,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			if onMsg != nil {
				onMsg(pr.Packet)
			}
			return true, nil
		}},
		OnServerDisconnect: func(d *paho.Disconnect) {
			r.mu.Lock()
			r.disc = d
			r.mu.Unlock()
			r.once.Do(func() { close(r.gone) })
		},
		OnClientError: func(error) { r.once.Do(func() { close(r.gone) }) },
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if ca, err := r.c.Connect(ctx, &paho.Connect{ClientID: clientID, CleanStart: true, KeepAlive: 30}); err != nil || ca.ReasonCode != 0 {
		t.Fatalf("connect %s: %v %v", clientID, err, ca)
	}
	t.Cleanup(func() {
		cancelAll()
		r.wg.Wait()
		_ = r.c.Disconnect(&paho.Disconnect{})
		select {
		case <-r.c.Done():
		case <-time.After(5 * time.Second):
		}
	})
	return r
}

// closedWith waits for the server to end the connection and returns the DISCONNECT reason
// code (-1 if the connection ended without one).
func (r *rawClient) closedWith(t *testing.T) int {
	t.Helper()
	select {
	case <-r.gone:
	case <-time.After(5 * time.Second):
		t.Fatal("connection still open 5 s after a request over the quota")
	}
	r.mu.Lock()
	defer r.mu.Unlock()
	if r.disc == nil {
		return -1
	}
	return int(r.disc.ReasonCode)
}

// fire sends a request the server will answer by closing the connection; paho would wait for
// the acknowledgement until its context ends, so it is sent on the side.
func (r *rawClient) fire(f func(ctx context.Context)) {
	r.wg.Add(1)
	go func() {
		defer r.wg.Done()
		f(r.ctx)
	}()
}

func (r *rawClient) open() bool {
	select {
	case <-r.gone:
		return false
	default:
		return true
	}
}

func (r *rawClient) subscribe(filters ...string) error {
	ctx, cancel := context.WithTimeout(r.ctx, 5*time.Second)
	defer cancel()
	var subs []paho.SubscribeOptions
	for _, f := range filters {
		subs = append(subs, paho.SubscribeOptions{Topic: f, QoS: 1})
	}
	_, err := r.c.Subscribe(ctx, &paho.Subscribe{Subscriptions: subs})
	return err
}

func filters(from, n int) []string {
	var out []string
	for i := from; i < from+n; i++ {
		out = append(out, fmt.Sprintf("q/%d", i))
	}
	return out
}

// Throughput each way is held to 512 KiB/s per connection with quotas on (by delaying: every
// byte arrives), and is far higher with them off. Rates are compared within the test; the
// bounds are loose on the slow side (a loaded machine) and tight on the fast side, which no
// machine can exceed with the quota in force.
func TestQuotaThroughput(t *testing.T) {
	const size = 2 << 20 // 2 MiB each way: the 64 KiB burst is 3 % of it
	measure := func(t *testing.T, opts Options) (egress, ingress float64) {
		e, d, prefix, data := streamSetup(t, opts, size)
		// Egress: the device asks for the whole file in 128 KB requests without subscribing
		// (AWS sends the blocks to the requester), 64 KiB blocks.
		start := time.Now()
		for o := int64(0); o < int64(size/65536); o += 2 {
			bs, n, off := int64(65536), int64(2), o
			d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: &[]int64{0}[0], BlockSize: &bs, Offset: &off, NumBlocks: &n}))
		}
		got := 0
		for seen := map[int64]bool{}; len(seen) < size/65536; {
			m := d.wait(60*time.Second, prefix+"data/cbor")
			if m == nil {
				t.Fatalf("%d of %d blocks after 60 s", len(seen), size/65536)
			}
			b, err := DecodeDataBlock(FormatCBOR, m.Payload)
			if err != nil || string(b.Payload) != string(data[b.BlockID*65536:(b.BlockID+1)*65536]) {
				t.Fatalf("block %d wrong: %v", b.BlockID, err)
			}
			seen[b.BlockID] = true
			got += len(b.Payload)
		}
		egress = float64(got) / time.Since(start).Seconds()

		// Ingress: 20 QoS 1 publishes of 100 KiB, each waiting for its PUBACK, which the
		// broker sends once it has read the whole message.
		payload := make([]byte, 100<<10)
		start = time.Now()
		for i := 0; i < 20; i++ {
			d.publish("load/in", payload)
		}
		ingress = float64(20*len(payload)) / time.Since(start).Seconds()
		_ = e
		return egress, ingress
	}
	onOut, onIn := measure(t, Options{})
	offOut, offIn := measure(t, Options{NoQuotas: true})
	t.Logf("quotas on: egress %.0f KiB/s, ingress %.0f KiB/s; off: egress %.0f KiB/s, ingress %.0f KiB/s",
		onOut/1024, onIn/1024, offOut/1024, offIn/1024)
	for _, c := range []struct {
		name    string
		on, off float64
	}{{"egress", onOut, offOut}, {"ingress", onIn, offIn}} {
		if c.on > 1.1*QuotaBytesPerSecond || c.on < 0.5*QuotaBytesPerSecond {
			t.Errorf("%s with quotas: %.0f KiB/s, want about 512 (0.5x..1.1x)", c.name, c.on/1024)
		}
		// Unthrottled loopback runs at tens of MiB/s; the race detector makes copying the
		// blocks about ten times slower, so only a smaller margin is certain there.
		margin := 4.0
		if raceEnabled {
			margin = 1.5
		}
		if c.off < margin*c.on {
			t.Errorf("%s without quotas: %.0f KiB/s, want at least %.1fx the %.0f KiB/s with them", c.name, c.off/1024, margin, c.on/1024)
		}
	}
}

// Over 100 publishes per second the excess is discarded and the connection kept: of a burst of
// 1000 QoS 0 and 200 concurrent QoS 1 messages, at most 100 plus what the elapsed time refills
// get through, and each QoS 1 publish over the rate is answered with PUBACK "quota exceeded"
// (0x97). Without quotas all get through.
func TestQuotaPublishRate(t *testing.T) {
	type result struct {
		delivered, acceptedQoS1, rejectedQoS1 int
		elapsed                               time.Duration
	}
	run := func(t *testing.T, opts Options) result {
		e := startEmulator(t, opts)
		var mu sync.Mutex
		var r result
		marker := make(chan struct{})
		rx := dialRaw(t, e.BrokerURL(), "rx", func(p *paho.Publish) {
			mu.Lock()
			defer mu.Unlock()
			switch p.Topic {
			case "rate/end":
				close(marker)
			case "rate/m":
				r.delivered++
			}
		})
		if err := rx.subscribe("rate/#"); err != nil {
			t.Fatal(err)
		}
		tx := dialRaw(t, e.BrokerURL(), "tx", nil)
		ctx := context.Background()
		start := time.Now()
		for i := 0; i < 1000; i++ {
			if _, err := tx.c.Publish(ctx, &paho.Publish{Topic: "rate/m", QoS: 0, Payload: []byte("x")}); err != nil {
				t.Fatal(err)
			}
		}
		var wg sync.WaitGroup
		for i := 0; i < 200; i++ {
			wg.Add(1)
			go func() {
				defer wg.Done()
				pr, err := tx.c.Publish(ctx, &paho.Publish{Topic: "rate/q1", QoS: 1, Payload: []byte("x")})
				mu.Lock()
				defer mu.Unlock()
				switch {
				case err == nil:
					r.acceptedQoS1++
				case pr != nil && pr.ReasonCode == 0x97:
					r.rejectedQoS1++
				default:
					t.Errorf("QoS 1 publish: %v (%+v), want success or PUBACK 0x97", err, pr)
				}
			}()
		}
		wg.Wait()
		// Every PUBACK is back: the broker has handled the whole burst within this time.
		r.elapsed = time.Since(start)
		// The marker is retried until the bucket has a token again; the broker keeps a
		// connection's order, so when it arrives every accepted message before it has too.
		for {
			_, err := tx.c.Publish(ctx, &paho.Publish{Topic: "rate/end", QoS: 1, Payload: []byte("x")})
			if err == nil {
				break
			}
			if !tx.open() {
				t.Fatal("connection closed by the publish rate quota")
			}
			time.Sleep(5 * time.Millisecond) // pacing retries, not synchronising
		}
		select {
		case <-marker:
		case <-time.After(10 * time.Second):
			t.Fatal("end marker not delivered")
		}
		mu.Lock()
		defer mu.Unlock()
		return r
	}
	r := run(t, Options{})
	t.Logf("quotas on: %d of 1000 QoS 0 delivered, %d of 200 QoS 1 accepted in %v", r.delivered, r.acceptedQoS1, r.elapsed)
	limit := QuotaPublishesPerSecond + int(r.elapsed.Seconds()*QuotaPublishesPerSecond) + 1
	if through := r.delivered + r.acceptedQoS1; through > limit || r.delivered < QuotaPublishesPerSecond {
		t.Errorf("with quotas %d of 1200 got through (%d QoS 0 delivered), want 100..%d", through, r.delivered, limit)
	}
	if limit < 1000 && r.rejectedQoS1 == 0 {
		t.Error("no QoS 1 publish was answered with quota exceeded")
	}
	r = run(t, Options{NoQuotas: true})
	if r.delivered != 1000 || r.acceptedQoS1 != 200 {
		t.Errorf("without quotas %d of 1000 QoS 0 delivered, %d of 200 QoS 1 accepted", r.delivered, r.acceptedQoS1)
	}
}

// A payload of exactly 128 KiB is accepted; one byte more closes the connection with
// DISCONNECT "packet too large" (0x95). Without quotas it is accepted.
func TestQuotaPayloadLimit(t *testing.T) {
	e := startEmulator(t, Options{})
	c := dialRaw(t, e.BrokerURL(), "big", nil)
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if _, err := c.c.Publish(ctx, &paho.Publish{Topic: "big/ok", QoS: 1, Payload: make([]byte, QuotaPayloadBytes)}); err != nil {
		t.Fatalf("128 KiB payload: %v", err)
	}
	c.fire(func(ctx context.Context) {
		_, _ = c.c.Publish(ctx, &paho.Publish{Topic: "big/over", QoS: 1, Payload: make([]byte, QuotaPayloadBytes+1)})
	})
	if code := c.closedWith(t); code != 0x95 {
		t.Errorf("disconnect reason %#x, want 0x95", code)
	}

	off := startEmulator(t, Options{NoQuotas: true})
	c = dialRaw(t, off.BrokerURL(), "big", nil)
	if _, err := c.c.Publish(ctx, &paho.Publish{Topic: "big/over", QoS: 1, Payload: make([]byte, QuotaPayloadBytes+1)}); err != nil || !c.open() {
		t.Errorf("without quotas a 128 KiB + 1 payload: %v", err)
	}
}

// 8 filters per SUBSCRIBE and 50 subscriptions per connection; past either the connection is
// closed with DISCONNECT "quota exceeded" (0x97). A filter subscribed again does not count
// twice. Without quotas neither limit applies.
func TestQuotaSubscriptions(t *testing.T) {
	e := startEmulator(t, Options{})
	c := dialRaw(t, e.BrokerURL(), "subs8", nil)
	if err := c.subscribe(filters(0, 8)...); err != nil {
		t.Fatalf("8 filters: %v", err)
	}
	c.fire(func(context.Context) { _ = c.subscribe(filters(8, 9)...) })
	if code := c.closedWith(t); code != 0x97 {
		t.Errorf("9 filters: disconnect reason %#x, want 0x97", code)
	}

	c = dialRaw(t, e.BrokerURL(), "subs50", nil)
	for i := 0; i < 48; i += 8 {
		if err := c.subscribe(filters(i, 8)...); err != nil {
			t.Fatalf("subscriptions %d..%d: %v", i, i+7, err)
		}
	}
	if err := c.subscribe(append(filters(0, 6), filters(48, 2)...)...); err != nil { // 6 again + 2 new = 50
		t.Fatalf("subscriptions 49, 50: %v", err)
	}
	c.fire(func(context.Context) { _ = c.subscribe(filters(50, 1)...) })
	if code := c.closedWith(t); code != 0x97 {
		t.Errorf("51st subscription: disconnect reason %#x, want 0x97", code)
	}

	off := startEmulator(t, Options{NoQuotas: true})
	c = dialRaw(t, off.BrokerURL(), "subs", nil)
	if err := c.subscribe(filters(0, 9)...); err != nil {
		t.Fatalf("without quotas, 9 filters: %v", err)
	}
	for i := 9; i < 57; i += 8 {
		if err := c.subscribe(filters(i, 8)...); err != nil {
			t.Fatalf("without quotas, subscriptions %d..%d: %v", i, i+7, err)
		}
	}
	if !c.open() {
		t.Error("without quotas, 57 subscriptions closed the connection")
	}
}

// Jobs /accepted and /rejected go to the requester only, even to another client subscribed to
// the same topics; notifications still reach every subscriber.
func TestJobResponsesReachOnlyTheRequester(t *testing.T) {
	e := startEmulator(t, Options{})
	path, _ := writeTestFile(t, 1000)
	filter := thingPrefix + "jobs/#"
	a := connectDevice(t, e.BrokerURL(), "gw-01", filter)
	b := connectDevice(t, e.BrokerURL(), "spy", filter)

	a.publish(thingPrefix+"jobs/get", []byte(`{"clientToken":"A"}`))
	if tok := decodeJSONMap(t, a.next(thingPrefix+"jobs/get/accepted").Payload)["clientToken"]; tok != "A" {
		t.Fatalf("requester got token %v", tok)
	}
	a.publish(thingPrefix+"jobs/nope/update", []byte(`{"clientToken":"A2"}`)) // rejected: no status
	a.next(thingPrefix + "jobs/nope/update/rejected")
	// The spy's own request is answered after the requester's: had those leaked, they would
	// be in front of its own answer.
	b.publish(thingPrefix+"jobs/get", []byte(`{"clientToken":"B"}`))
	if tok := decodeJSONMap(t, b.next(thingPrefix+"jobs/get/accepted").Payload)["clientToken"]; tok != "B" {
		t.Errorf("spy got another client's response first: token %v", tok)
	}
	if m := b.drain(thingPrefix + "jobs/nope/update/rejected"); len(m) != 0 {
		t.Errorf("spy got another client's /rejected: %s", m[0].Payload)
	}

	createJob(t, e, "job-n", path, "MQTT")
	a.next(thingPrefix + "jobs/notify-next")
	b.next(thingPrefix + "jobs/notify-next")
}

// A client whose throttled connection has a backlog of blocks delays no one else: another
// client's request is answered while the first is still being served.
func TestQuotaThrottledClientDelaysNoOneElse(t *testing.T) {
	e, d, prefix, _ := streamSetup(t, Options{}, 1<<20) // 2 s of blocks at 512 KiB/s
	other := connectDevice(t, e.BrokerURL(), "gw-02")
	// The first client asks for everything without subscribing: the blocks go to it
	// directly, through its throttled connection.
	for o := int64(0); o < 16; o += 2 {
		bs, n, off := int64(65536), int64(2), o
		d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: &[]int64{0}[0], BlockSize: &bs, Offset: &off, NumBlocks: &n}))
	}
	d.next(prefix + "data/cbor") // the transfer is under way
	other.publish("$aws/things/gw-02/jobs/get", []byte(`{"clientToken":"other"}`))
	other.next("$aws/things/gw-02/jobs/get/accepted")
	// Answered before the throttled transfer ended (the quota makes its 16 blocks take 2 s
	// whatever the load); had it waited behind them, all 16 would have been sent. No tighter
	// bound: on a loaded machine the answer itself may take a second.
	if got := 1 + len(d.drain(prefix+"data/cbor")); got >= 16 {
		t.Errorf("another client's answer came only after %d of 16 throttled blocks", got)
	}
}
