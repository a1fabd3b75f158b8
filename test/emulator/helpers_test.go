package emulator

import (
	"context"
	"crypto/sha256"
	"encoding/json"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/hashicorp/go-hclog"
	"go.uber.org/goleak"

	"github.com/gwota/gwota/test/backend"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		// mochi's Close does not wait for its per-client goroutines; these are its internals.
		goleak.IgnoreTopFunction("github.com/mochi-mqtt/server/v2.(*Client).WriteLoop"),
		goleak.IgnoreTopFunction("github.com/mochi-mqtt/server/v2.(*Server).eventLoop"),
		goleak.IgnoreTopFunction("github.com/mochi-mqtt/server/v2/listeners.(*Net).Serve"),
		goleak.IgnoreTopFunction("github.com/mochi-mqtt/server/v2.(*Server).attachClient"),
		goleak.IgnoreAnyFunction("github.com/mochi-mqtt/server/v2.(*Server).EstablishConnection"),
	)
}

// testLogger keeps test output readable; set EMULATOR_DEBUG=1 to see everything.
func testLogger(t *testing.T) hclog.Logger {
	if os.Getenv("EMULATOR_DEBUG") == "" {
		return hclog.NewNullLogger()
	}
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug})
}

func startEmulator(t *testing.T, opts Options) *Emulator {
	t.Helper()
	if opts.Logger == nil {
		opts.Logger = testLogger(t)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	e, err := Start(ctx, opts)
	if err != nil {
		t.Fatalf("Start: %v", err)
	}
	t.Cleanup(func() { e.Close() })
	return e
}

// device is an MQTT client written directly against the topics with paho.golang: no project code.
type device struct {
	t  testing.TB
	c  *paho.Client
	id string

	mu   sync.Mutex
	cond *sync.Cond
	msgs []*paho.Publish
	down bool
}

func connectDevice(t testing.TB, brokerURL, clientID string, subscribe ...string) *device {
	t.Helper()
	d, _ := connectSession(t, brokerURL, clientID, 0, subscribe...)
	return d
}

// connectSession connects with a persistent session when expiry > 0 (CleanStart false) and
// reports whether the broker had kept one.
func connectSession(t testing.TB, brokerURL, clientID string, expiry uint32, subscribe ...string) (*device, bool) {
	t.Helper()
	u, err := url.Parse(brokerURL)
	if err != nil {
		t.Fatal(err)
	}
	conn, err := net.Dial("tcp", u.Host)
	if err != nil {
		t.Fatalf("dial broker: %v", err)
	}
	d := &device{t: t, id: clientID}
	d.cond = sync.NewCond(&d.mu)
	d.c = paho.NewClient(paho.ClientConfig{
		Conn: conn,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){func(pr paho.PublishReceived) (bool, error) {
			d.mu.Lock()
			d.msgs = append(d.msgs, pr.Packet)
			d.cond.Broadcast()
			d.mu.Unlock()
			return true, nil
		}},
		OnClientError:      func(error) { d.setDown() },
		OnServerDisconnect: func(*paho.Disconnect) { d.setDown() },
	})
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	cp := &paho.Connect{ClientID: clientID, CleanStart: expiry == 0, KeepAlive: 30}
	if expiry > 0 {
		cp.Properties = &paho.ConnectProperties{SessionExpiryInterval: &expiry}
	}
	ca, err := d.c.Connect(ctx, cp)
	if err != nil || ca.ReasonCode != 0 {
		t.Fatalf("connect: %v %v", err, ca)
	}
	if len(subscribe) > 0 {
		var subs []paho.SubscribeOptions
		for _, s := range subscribe {
			subs = append(subs, paho.SubscribeOptions{Topic: s, QoS: 1})
		}
		if _, err := d.c.Subscribe(ctx, &paho.Subscribe{Subscriptions: subs}); err != nil {
			t.Fatalf("subscribe: %v", err)
		}
	}
	t.Cleanup(d.close)
	return d, ca.SessionPresent
}

func (d *device) setDown() {
	d.mu.Lock()
	d.down = true
	d.cond.Broadcast()
	d.mu.Unlock()
}

func (d *device) close() {
	_ = d.c.Disconnect(&paho.Disconnect{})
	select {
	case <-d.c.Done():
	case <-time.After(5 * time.Second):
	}
}

func (d *device) publish(topic string, payload []byte) {
	d.t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := d.c.Publish(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: payload}); err != nil {
		d.t.Fatalf("publish %s: %v", topic, err)
	}
}

func (d *device) publishJSON(topic string, v any) {
	d.t.Helper()
	b, err := json.Marshal(v)
	if err != nil {
		d.t.Fatal(err)
	}
	d.publish(topic, b)
}

// next removes and returns the first message whose topic is one of topics, waiting up to 5 s.
func (d *device) next(topics ...string) *paho.Publish {
	d.t.Helper()
	m := d.wait(5*time.Second, topics...)
	if m == nil {
		d.t.Fatalf("no message on %v within 5s", topics)
	}
	return m
}

func (d *device) wait(timeout time.Duration, topics ...string) *paho.Publish {
	deadline := time.Now().Add(timeout)
	timer := time.AfterFunc(timeout, func() {
		d.mu.Lock()
		d.cond.Broadcast()
		d.mu.Unlock()
	})
	defer timer.Stop()
	d.mu.Lock()
	defer d.mu.Unlock()
	for {
		for i, m := range d.msgs {
			for _, t := range topics {
				if m.Topic == t {
					d.msgs = append(d.msgs[:i], d.msgs[i+1:]...)
					return m
				}
			}
		}
		if !time.Now().Before(deadline) {
			return nil
		}
		d.cond.Wait()
	}
}

// drain returns and removes every message received so far on topic.
func (d *device) drain(topic string) []*paho.Publish {
	d.mu.Lock()
	defer d.mu.Unlock()
	var out, keep []*paho.Publish
	for _, m := range d.msgs {
		if m.Topic == topic {
			out = append(out, m)
		} else {
			keep = append(keep, m)
		}
	}
	d.msgs = keep
	return out
}

func decodeJSONMap(t testing.TB, b []byte) map[string]any {
	t.Helper()
	var m map[string]any
	if err := json.Unmarshal(b, &m); err != nil {
		t.Fatalf("response %s: %v", b, err)
	}
	return m
}

// writeTestFile writes n deterministic bytes and returns the path and its SHA-256.
func writeTestFile(t testing.TB, n int) (string, [32]byte) {
	t.Helper()
	b := make([]byte, n)
	for i := range b {
		b[i] = byte(i*7 + i>>8)
	}
	p := filepath.Join(t.TempDir(), "image.bin")
	if err := os.WriteFile(p, b, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, sha256.Sum256(b)
}

func createJob(t *testing.T, e *Emulator, id string, path string, protocols ...string) {
	t.Helper()
	err := e.CreateJob(context.Background(), backend.JobSpec{JobID: id, Protocols: protocols, Files: []backend.FileSpec{{
		LocalPath: path, DevicePath: "/opt/fw/gateway.img", CertName: "signer.crt.pem", Signature: []byte("sig"),
	}}})
	if err != nil {
		t.Fatalf("CreateJob: %v", err)
	}
}

const thingPrefix = "$aws/things/gw-01/"

// waitPushed waits until every queued notification has been handed to the broker.
func waitPushed(t testing.TB, e *Emulator) {
	t.Helper()
	timeout := time.After(10 * time.Second)
	for {
		e.mu.Lock()
		done := !e.pushing && len(e.pushQ) == 0
		ch := e.changed
		e.mu.Unlock()
		if done {
			return
		}
		select {
		case <-ch:
		case <-timeout:
			t.Fatal("notifications still queued after 10s")
		}
	}
}
