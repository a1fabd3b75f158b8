// Package mqtttest runs an embedded mochi MQTT broker for tests of ota-net's MQTT users. The
// broker can be stopped and restarted on the same address (a broker restart loses its
// sessions, which is how tests prove that subscriptions are renewed).
package mqtttest

import (
	"crypto/tls"
	"io"
	"log/slog"
	"net"
	"sync"
	"testing"
	"time"

	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
	"go.uber.org/goleak"
)

// Options for a broker.
type Options struct {
	// MaxPacketSize is announced in CONNACK (0: none).
	MaxPacketSize uint32
	// TLS, if set, makes the listener TLS.
	TLS *tls.Config
}

// Broker is an embedded mochi broker on a loopback port.
type Broker struct {
	t    testing.TB
	opts Options

	mu     sync.Mutex
	addr   string
	server *mqtt.Server
	ln     net.Listener
	inline []inlineSub
}

type inlineSub struct {
	filter string
	id     int
	h      func(topic string, payload []byte, origin string)
}

func (is inlineSub) fn() mqtt.InlineSubFn {
	return func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
		is.h(pk.TopicName, append([]byte(nil), pk.Payload...), pk.Origin)
	}
}

// Start starts a broker on 127.0.0.1:0; it is closed at test cleanup.
func Start(t testing.TB, opts Options) *Broker {
	t.Helper()
	b := &Broker{t: t, opts: opts, addr: "127.0.0.1:0"}
	b.Restart()
	t.Cleanup(b.Stop)
	return b
}

// URL is mqtt://addr (or mqtts:// with TLS).
func (b *Broker) URL() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	if b.opts.TLS != nil {
		return "mqtts://" + b.addr
	}
	return "mqtt://" + b.addr
}

// Addr is host:port.
func (b *Broker) Addr() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.addr
}

// Server is the running mochi server (nil while stopped).
func (b *Broker) Server() *mqtt.Server {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.server
}

// Stop closes the broker (all sessions are lost).
func (b *Broker) Stop() {
	b.mu.Lock()
	s, ln := b.server, b.ln
	b.server, b.ln = nil, nil
	b.mu.Unlock()
	if ln != nil {
		// mochi closes its clients before its listener: a client reconnecting at once would be
		// accepted by the dying listener and never answered. Close the listener first.
		_ = ln.Close()
	}
	if s != nil {
		_ = s.Close()
	}
}

// Restart stops the broker if running and starts a fresh one on the same address.
func (b *Broker) Restart() {
	b.t.Helper()
	b.Stop()
	b.mu.Lock()
	defer b.mu.Unlock()
	var ln net.Listener
	var err error
	for i := 0; i < 100; i++ {
		if ln, err = net.Listen("tcp", b.addr); err == nil {
			break
		}
		time.Sleep(20 * time.Millisecond) // port briefly busy right after a stop
	}
	if err != nil {
		b.t.Fatalf("broker listen: %v", err)
	}
	b.addr = ln.Addr().String()
	if b.opts.TLS != nil {
		ln = tls.NewListener(ln, b.opts.TLS)
	}
	s := mqtt.New(&mqtt.Options{
		InlineClient: true,
		Logger:       slog.New(slog.NewTextHandler(io.Discard, nil)),
	})
	if b.opts.MaxPacketSize > 0 {
		s.Options.Capabilities.MaximumPacketSize = b.opts.MaxPacketSize
	}
	if b.opts.MaxPacketSize > 0 {
		// mochi enforces its maximum but does not announce it in CONNACK; AWS does.
		if err := s.AddHook(&announceMax{max: b.opts.MaxPacketSize}, nil); err != nil {
			b.t.Fatal(err)
		}
	}
	if err := s.AddHook(new(allowAll), nil); err != nil {
		b.t.Fatal(err)
	}
	if err := s.AddListener(listeners.NewNet("t", ln)); err != nil {
		b.t.Fatal(err)
	}
	for _, is := range b.inline {
		if err := s.Subscribe(is.filter, is.id, is.fn()); err != nil {
			b.t.Fatal(err)
		}
	}
	if err := s.Serve(); err != nil {
		b.t.Fatal(err)
	}
	b.server, b.ln = s, ln
}

// Publish sends from the broker's inline client (as a cloud service would).
func (b *Broker) Publish(topic string, payload []byte, qos byte) error {
	return b.Server().Publish(topic, payload, false, qos)
}

// Subscribe attaches an inline handler (the broker side of a test) to filter. It stays
// attached across restarts (re-attached before the new broker serves).
func (b *Broker) Subscribe(filter string, id int, h func(topic string, payload []byte, origin string)) error {
	b.mu.Lock()
	is := inlineSub{filter, id, h}
	b.inline = append(b.inline, is)
	s := b.server
	b.mu.Unlock()
	if s == nil {
		return nil
	}
	return s.Subscribe(filter, id, is.fn())
}

// Kick drops the connection of clientID (its session stays on the broker).
func (b *Broker) Kick(clientID string) bool {
	s := b.Server()
	if s == nil {
		return false
	}
	cl, ok := s.Clients.Get(clientID)
	if !ok {
		return false
	}
	_ = s.DisconnectClient(cl, packets.ErrServerShuttingDown)
	cl.Stop(packets.ErrServerShuttingDown)
	return true
}

// Subscribed reports whether clientID holds a subscription to filter.
func (b *Broker) Subscribed(clientID, filter string) bool {
	s := b.Server()
	if s == nil {
		return false
	}
	cl, ok := s.Clients.Get(clientID)
	if !ok {
		return false
	}
	_, ok = cl.State.Subscriptions.Get(filter)
	return ok
}

// IgnoreMochi lists goroutine top functions of mochi internals that outlive Close (its Close
// does not wait); pass them to goleak.IgnoreTopFunction.
var IgnoreMochi = []string{
	"github.com/mochi-mqtt/server/v2.(*Server).eventLoop",
	"github.com/mochi-mqtt/server/v2.(*Client).WriteLoop",
	"github.com/mochi-mqtt/server/v2/listeners.(*Net).Serve",
}

// VerifyTestMain runs a package's tests and fails them when a goroutine outlives them, except
// mochi's own (LeakOptions): the goroutine-leak check of every package that runs a broker.
func VerifyTestMain(m *testing.M) { goleak.VerifyTestMain(m, LeakOptions()...) }

// LeakOptions are goleak's options for a package that runs a mochi broker: mochi's Close does
// not wait for its own goroutines.
func LeakOptions() []goleak.Option {
	opts := []goleak.Option{
		goleak.IgnoreTopFunction("github.com/mochi-mqtt/server/v2.(*Server).attachClient"),
		goleak.IgnoreAnyFunction("github.com/mochi-mqtt/server/v2.(*Server).EstablishConnection"),
	}
	for _, f := range IgnoreMochi {
		opts = append(opts, goleak.IgnoreTopFunction(f))
	}
	return opts
}

// allowAll lets every client connect and use every topic (mochi's auth hook pulls in a YAML
// dependency this module does not carry).
type allowAll struct{ mqtt.HookBase }

func (allowAll) ID() string { return "allow-all" }

func (allowAll) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}

func (allowAll) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }

func (allowAll) OnACLCheck(*mqtt.Client, string, bool) bool { return true }

type announceMax struct {
	mqtt.HookBase
	max uint32
}

func (*announceMax) ID() string { return "announce-max-packet" }

func (*announceMax) Provides(b byte) bool { return b == mqtt.OnPacketEncode }

func (h *announceMax) OnPacketEncode(_ *mqtt.Client, pk packets.Packet) packets.Packet {
	if pk.FixedHeader.Type == packets.Connack {
		pk.Properties.MaximumPacketSize = h.max
	}
	return pk
}
