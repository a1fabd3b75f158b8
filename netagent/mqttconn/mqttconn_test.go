package mqttconn_test

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/netagent/mqttconn"
	"github.com/gwota/gwota/netagent/mqttconn/mqtttest"
)

func TestMain(m *testing.M) { mqtttest.VerifyTestMain(m) }

func TestMatch(t *testing.T) {
	tests := []struct {
		filter, topic string
		want          bool
	}{
		{"a/b", "a/b", true},
		{"a/b", "a/c", false},
		{"a/+", "a/b", true},
		{"a/+", "a/b/c", false},
		{"a/#", "a", true},
		{"a/#", "a/b/c", true},
		{"#", "a/b", true},
		{"#", "$aws/things/x", false},
		{"+/b", "$aws/b", false},
		{"$aws/things/+/jobs/+/get/accepted", "$aws/things/gw/jobs/j1/get/accepted", true},
		{"$aws/things/+/jobs/+/get/accepted", "$aws/things/gw/jobs/j1/update/accepted", false},
		{"a/+/c", "a//c", true},
		{"a/b", "a/b/", false},
		{"a/b/", "a/b/", true},
		{"+", "", true},
		{"a/b/c", "a/b", false},
	}
	for _, tt := range tests {
		if got := mqttconn.Match(tt.filter, tt.topic); got != tt.want {
			t.Errorf("Match(%q, %q) = %v, want %v", tt.filter, tt.topic, got, tt.want)
		}
	}
}

func TestValidFilter(t *testing.T) {
	for f, want := range map[string]bool{
		"a/b": true, "a/#": true, "#": true, "+/+": true, "": false, "a/#/b": false, "a/b#": false, "a+/b": false,
	} {
		if got := mqttconn.ValidFilter(f); got != want {
			t.Errorf("ValidFilter(%q) = %v, want %v", f, got, want)
		}
	}
}

type msg struct{ topic, payload string }

// collector hands messages to the test without blocking the receive loop for long.
type collector struct{ ch chan msg }

func newCollector() *collector { return &collector{ch: make(chan msg, 100)} }

func (c *collector) handle(topic string, payload []byte) { c.ch <- msg{topic, string(payload)} }

func (c *collector) next(t *testing.T) msg {
	t.Helper()
	select {
	case m := <-c.ch:
		return m
	case <-time.After(10 * time.Second):
		t.Fatal("no message")
		return msg{}
	}
}

func (c *collector) none(t *testing.T, d time.Duration) {
	t.Helper()
	select {
	case m := <-c.ch:
		t.Fatalf("unexpected message %+v", m)
	case <-time.After(d):
	}
}

func dial(t *testing.T, b *mqtttest.Broker, id string, mod func(*mqttconn.Config)) *mqttconn.Conn {
	t.Helper()
	cfg := mqttconn.Config{BrokerURL: b.URL(), ClientID: id, BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond, StateDir: t.TempDir(),
		Logger: hclog.New(&hclog.LoggerOptions{Name: id, Level: hclog.Debug, Output: testWriter{t}})}
	if mod != nil {
		mod(&cfg)
	}
	c, err := mqttconn.Dial(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if err := c.Close(context.Background()); err != nil {
			t.Errorf("close: %v", err)
		}
	})
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	if err := c.AwaitConnection(ctx); err != nil {
		t.Fatal(err)
	}
	return c
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 15*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func TestPublishSubscribeRouting(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	c := dial(t, b, "gw-01", nil)
	ctx := ctxT(t)

	jobs, streams, both := newCollector(), newCollector(), newCollector()
	if _, err := c.Subscribe(ctx, "$aws/things/gw-01/jobs/+/get/accepted", 1, jobs.handle); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Subscribe(ctx, "$aws/things/gw-01/streams/s1/data/cbor", 0, streams.handle); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Subscribe(ctx, "$aws/things/gw-01/#", 1, both.handle); err != nil {
		t.Fatal(err)
	}

	if err := b.Publish("$aws/things/gw-01/jobs/j1/get/accepted", []byte("J"), 1); err != nil {
		t.Fatal(err)
	}
	if got := jobs.next(t); got != (msg{"$aws/things/gw-01/jobs/j1/get/accepted", "J"}) {
		t.Fatalf("jobs got %+v", got)
	}
	if got := both.next(t); got.payload != "J" {
		t.Fatalf("wildcard got %+v", got)
	}
	if err := b.Publish("$aws/things/gw-01/streams/s1/data/cbor", []byte("S"), 0); err != nil {
		t.Fatal(err)
	}
	if got := streams.next(t); got.payload != "S" {
		t.Fatalf("streams got %+v", got)
	}
	if got := both.next(t); got.payload != "S" {
		t.Fatalf("wildcard got %+v", got)
	}
	jobs.none(t, 50*time.Millisecond)

	// Device -> broker.
	got := make(chan msg, 1)
	if err := b.Subscribe("$aws/things/gw-01/jobs/$next/get", 7, func(topic string, p []byte, origin string) {
		got <- msg{topic, string(p) + "/" + origin}
	}); err != nil {
		t.Fatal(err)
	}
	if err := c.Publish(ctx, "$aws/things/gw-01/jobs/$next/get", 1, []byte("{}")); err != nil {
		t.Fatal(err)
	}
	select {
	case m := <-got:
		if m.payload != "{}/gw-01" {
			t.Fatalf("broker got %+v", m)
		}
	case <-time.After(10 * time.Second):
		t.Fatal("broker got nothing")
	}
}

func TestUnsubscribe(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	c := dial(t, b, "gw-unsub", nil)
	ctx := ctxT(t)
	h1, h2 := newCollector(), newCollector()
	un1, err := c.Subscribe(ctx, "t/a", 1, h1.handle)
	if err != nil {
		t.Fatal(err)
	}
	un2, err := c.Subscribe(ctx, "t/a", 1, h2.handle)
	if err != nil {
		t.Fatal(err)
	}
	if err := un1(ctx); err != nil {
		t.Fatal(err)
	}
	// The other handler on the same filter keeps the broker subscription.
	if !b.Subscribed("gw-unsub", "t/a") {
		t.Fatal("broker subscription dropped while a handler remains")
	}
	if err := b.Publish("t/a", []byte("1"), 1); err != nil {
		t.Fatal(err)
	}
	h2.next(t)
	h1.none(t, 50*time.Millisecond)
	if err := un2(ctx); err != nil {
		t.Fatal(err)
	}
	if b.Subscribed("gw-unsub", "t/a") {
		t.Fatal("broker subscription kept after the last handler left")
	}
}

func TestResubscribeAfterBrokerRestart(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	c := dial(t, b, "gw-re", nil)
	ctx := ctxT(t)

	type up struct {
		n          int
		subscribed bool
	}
	ups := make(chan up, 10)
	remove := c.OnConnect(func(ctx context.Context) {
		ups <- up{c.Connections(), b.Subscribed("gw-re", "cmd/+")}
	})
	defer remove()

	h := newCollector()
	if _, err := c.Subscribe(ctx, "cmd/+", 1, h.handle); err != nil {
		t.Fatal(err)
	}
	// A restarted broker has lost the session and the subscription: only renewal brings it
	// back, and the hooks of the new connection run after it.
	b.Restart()
	waitUp := func(min int) {
		t.Helper()
		for {
			select {
			case u := <-ups:
				if u.n >= min {
					if !u.subscribed {
						t.Fatal("OnConnect hook ran before the subscription was renewed")
					}
					return
				}
			case <-time.After(10 * time.Second):
				t.Fatal("OnConnect hook not called after reconnect")
			}
		}
	}
	waitUp(2)
	if err := b.Publish("cmd/x", []byte("after"), 1); err != nil {
		t.Fatal(err)
	}
	if got := h.next(t); got.payload != "after" {
		t.Fatalf("got %+v", got)
	}
	if c.Connections() < 2 {
		t.Fatalf("connections = %d", c.Connections())
	}

	// A kick keeps the broker session; the connection comes back and still routes.
	if !b.Kick("gw-re") {
		t.Fatal("kick failed")
	}
	waitUp(3)
	if err := c.Publish(ctx, "cmd/y", 1, []byte("self")); err != nil {
		t.Fatal(err)
	}
	// "after" may come again: QoS 1 redelivery from the resumed session is allowed.
	for {
		got := h.next(t)
		if got.payload == "self" {
			break
		}
		if got.payload != "after" {
			t.Fatalf("got %+v", got)
		}
	}
}

func TestPublishWaitsForConnection(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	c := dial(t, b, "gw-wait", nil)
	h := newCollector()
	ctx := ctxT(t)
	if _, err := c.Subscribe(ctx, "q/1", 1, h.handle); err != nil {
		t.Fatal(err)
	}
	b.Stop()
	// While the broker is away, a bounded publish gives up with ctx's error.
	short, cancel := context.WithTimeout(ctx, 100*time.Millisecond)
	defer cancel()
	err := c.Publish(short, "q/1", 1, []byte("x"))
	if err == nil {
		// The manager may not have noticed the loss yet: delivery is then unknown, not success.
		t.Log("publish raced the disconnect")
	} else if !errors.Is(err, context.DeadlineExceeded) && !errors.Is(err, mqttconn.ErrDeliveryUnknown) {
		t.Fatalf("publish with broker down: %v", err)
	}
	done := make(chan error, 1)
	go func() { done <- c.Publish(ctx, "q/1", 1, []byte("later")) }()
	b.Restart()
	if err := <-done; err != nil {
		t.Fatal(err)
	}
	for {
		if m := h.next(t); m.payload == "later" {
			break
		}
	}
}

func TestPayloadLimits(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{MaxPacketSize: 4096})
	c := dial(t, b, "gw-big", func(cfg *mqttconn.Config) { cfg.MaxPayload = 100 * 1024 })
	ctx := ctxT(t)
	topic := "big/t"
	limit := c.MaxPayload(topic, 1)
	if limit <= 0 || limit >= 4096 {
		t.Fatalf("limit %d not derived from the broker's 4096", limit)
	}
	h := newCollector()
	if _, err := c.Subscribe(ctx, topic, 1, h.handle); err != nil {
		t.Fatal(err)
	}
	// Exactly at the limit goes through (the broker would drop us if we were wrong).
	if err := c.Publish(ctx, topic, 1, bytes.Repeat([]byte("a"), limit)); err != nil {
		t.Fatal(err)
	}
	if got := h.next(t); len(got.payload) != limit {
		t.Fatalf("got %d bytes", len(got.payload))
	}
	err := c.Publish(ctx, topic, 1, bytes.Repeat([]byte("a"), limit+1))
	if !errors.Is(err, mqttconn.ErrTooLarge) {
		t.Fatalf("over the limit: %v", err)
	}

	b2 := mqtttest.Start(t, mqtttest.Options{})
	c2 := dial(t, b2, "gw-big2", func(cfg *mqttconn.Config) { cfg.MaxPayload = 1000 })
	if err := c2.Publish(ctx, topic, 0, make([]byte, 1001)); !errors.Is(err, mqttconn.ErrTooLarge) {
		t.Fatalf("over MaxPayload: %v", err)
	}
}

func TestInvalidRequests(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	c := dial(t, b, "gw-inv", nil)
	ctx := ctxT(t)
	for _, f := range []string{"", "a/#/b", "a+"} {
		if _, err := c.Subscribe(ctx, f, 1, func(string, []byte) {}); !errors.Is(err, mqttconn.ErrInvalid) {
			t.Errorf("Subscribe(%q): %v", f, err)
		}
	}
	for _, topic := range []string{"", "a/+", "a/#"} {
		if err := c.Publish(ctx, topic, 1, nil); !errors.Is(err, mqttconn.ErrInvalid) {
			t.Errorf("Publish(%q): %v", topic, err)
		}
	}
	if err := c.Publish(ctx, "a", 2, nil); !errors.Is(err, mqttconn.ErrInvalid) {
		t.Errorf("qos 2: %v", err)
	}
	for _, u := range []string{"http://x", "mqtt://", "::"} {
		if _, err := mqttconn.Dial(ctx, mqttconn.Config{BrokerURL: u, ClientID: "x"}); err == nil {
			t.Errorf("Dial(%q) accepted", u)
		}
	}
	if _, err := mqttconn.Dial(ctx, mqttconn.Config{BrokerURL: "mqtts://h:8883", ClientID: "x"}); !errors.Is(err, mqttconn.ErrInvalid) {
		t.Errorf("mqtts without client certificate: %v", err)
	}
}

func TestClosedConn(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	cfg := mqttconn.Config{BrokerURL: b.URL(), ClientID: "gw-close"}
	c, err := mqttconn.Dial(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	ctx := ctxT(t)
	if err := c.AwaitConnection(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := c.Publish(ctx, "a", 1, nil); !errors.Is(err, mqttconn.ErrClosed) {
		t.Fatalf("publish after close: %v", err)
	}
	if _, err := c.Subscribe(ctx, "a", 1, func(string, []byte) {}); !errors.Is(err, mqttconn.ErrClosed) {
		t.Fatalf("subscribe after close: %v", err)
	}
	if err := c.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

// A slow handler of one filter must not lose messages of another (it delays them only).
func TestManyMessagesInOrder(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	c := dial(t, b, "gw-many", nil)
	ctx := ctxT(t)
	h := &collector{ch: make(chan msg, 1000)}
	if _, err := c.Subscribe(ctx, "m/+", 1, h.handle); err != nil {
		t.Fatal(err)
	}
	for i := range 200 {
		if err := c.Publish(ctx, "m/x", 1, fmt.Appendf(nil, "%d", i)); err != nil {
			t.Fatal(err)
		}
	}
	for i := range 200 {
		if got := h.next(t); got.payload != fmt.Sprint(i) {
			t.Fatalf("message %d: %+v", i, got)
		}
	}
}

type testWriter struct{ t *testing.T }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(string(bytes.TrimRight(p, "\n")))
	return len(p), nil
}

// The broker keeps the session across a clean disconnect and a new process (clean start
// off, session expiry): QoS 1 messages sent meanwhile arrive after the restart.
func TestSessionSurvivesRestart(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	state := t.TempDir()
	mod := func(cfg *mqttconn.Config) { cfg.StateDir = state }
	ctx := ctxT(t)
	c1, err := mqttconn.Dial(ctx, mqttconn.Config{BrokerURL: b.URL(), ClientID: "gw-sess", StateDir: state})
	if err != nil {
		t.Fatal(err)
	}
	if _, err := c1.Subscribe(ctx, "sess/+", 1, func(string, []byte) {}); err != nil {
		t.Fatal(err)
	}
	if err := c1.Close(ctx); err != nil {
		t.Fatal(err)
	}
	if err := b.Publish("sess/x", []byte("while away"), 1); err != nil {
		t.Fatal(err)
	}
	h := newCollector()
	cfg := mqttconn.Config{BrokerURL: b.URL(), ClientID: "gw-sess",
		Subscriptions: []mqttconn.Subscription{{Filter: "sess/+", QoS: 1, Handler: h.handle}}}
	mod(&cfg)
	c2, err := mqttconn.Dial(ctx, cfg)
	if err != nil {
		t.Fatal(err)
	}
	defer c2.Close(context.Background())
	if got := h.next(t); got.payload != "while away" {
		t.Fatalf("got %+v", got)
	}
	if _, err := os.Stat(filepath.Join(state, "mqtt-session")); err != nil {
		t.Fatalf("no file-backed session store: %v", err)
	}
}
