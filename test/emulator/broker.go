package emulator

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/eclipse/paho.golang/paho"
	"github.com/hashicorp/go-hclog"
	mqtt "github.com/mochi-mqtt/server/v2"
	"github.com/mochi-mqtt/server/v2/listeners"
	"github.com/mochi-mqtt/server/v2/packets"
)

// message is one request a device published on a $aws topic.
type message struct {
	clientID string // empty on an external broker (it does not tell who published)
	topic    string
	payload  []byte
}

// transport is where the emulator meets MQTT: the embedded broker or an external one.
type transport interface {
	// respond sends a response meant for the requester: on the embedded broker it reaches the
	// requester even when it has not subscribed, as on AWS IoT. A private response (Jobs
	// /accepted and /rejected) reaches the requester only: AWS says those "don't pass through
	// the message broker and they can't be subscribed to by other clients". An external
	// broker can only publish to the topic.
	respond(clientID, topic string, payload []byte, private bool) error
	// publish sends to subscribers only (notify, notify-next).
	publish(topic string, payload []byte) error
	// disconnect drops a client's connection (fault injection); false if not possible.
	disconnect(clientID string) bool
	url() string
	close() error
}

// requestFilters are the topic filters the emulator serves.
var requestFilters = []string{"$aws/things/+/jobs/#", "$aws/things/+/streams/#"}

// embedded runs mochi in-process. Stopping it closes the listener and drops every client, but
// the broker's state (persistent sessions, their subscriptions and queued messages) survives
// until the listener is back on the same address: like a network outage between device and
// AWS IoT, which keeps persistent sessions.
type embedded struct {
	log     hclog.Logger
	handler func(message)
	quotas  bool // AWS's per-connection quotas (quota.go)

	mu       sync.Mutex
	addr     string // fixed after the first start so a restart keeps the port
	server   *mqtt.Server
	listener string // id of the active listener, "" while stopped
	starts   int
}

func newEmbedded(listen string, quotas bool, log hclog.Logger, handler func(message)) (*embedded, error) {
	e := &embedded{log: log, handler: handler, addr: listen, quotas: quotas}
	s := mqtt.New(&mqtt.Options{
		InlineClient: true,
		// Coalesce queued publishes into fewer writes when a subscriber has a backlog.
		ClientNetWriteBufferSize: 64 * 1024,
		Logger:                   slog.New(slog.NewTextHandler(hclogWriter{log}, &slog.HandlerOptions{Level: slog.LevelWarn})),
	})
	if err := s.AddHook(new(allowAll), nil); err != nil {
		return nil, err
	}
	if quotas {
		if err := s.AddHook(&quotaHook{server: s, log: log.Named("quota")}, nil); err != nil {
			return nil, err
		}
	}
	for i, f := range requestFilters {
		err := s.Subscribe(f, i+1, func(_ *mqtt.Client, _ packets.Subscription, pk packets.Packet) {
			// Origin is the publishing client; our own responses come from the inline client.
			if pk.Origin == "" || pk.Origin == mqtt.InlineClientId {
				return
			}
			e.handler(message{clientID: pk.Origin, topic: pk.TopicName, payload: append([]byte(nil), pk.Payload...)})
		})
		if err != nil {
			return nil, err
		}
	}
	if err := s.Serve(); err != nil {
		s.Close()
		return nil, err
	}
	e.server = s
	if err := e.start(); err != nil {
		s.Close()
		return nil, err
	}
	return e, nil
}

func (e *embedded) start() error {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.listener != "" {
		return nil
	}
	ln, err := listenRetry(e.addr)
	if err != nil {
		return fmt.Errorf("embedded broker listen %s: %w", e.addr, err)
	}
	e.addr = ln.Addr().String()
	e.starts++
	id := fmt.Sprintf("emulator-%d", e.starts)
	if e.quotas {
		ln = quotaListener{ln}
	}
	if err := e.server.AddListener(listeners.NewNet(id, ln)); err != nil {
		ln.Close()
		return err
	}
	e.server.Listeners.Serve(id, e.server.EstablishConnection)
	e.listener = id
	return nil
}

// listenRetry binds addr; right after a stop the port can be briefly busy.
func listenRetry(addr string) (net.Listener, error) {
	var err error
	for i := 0; i < 50; i++ {
		var ln net.Listener
		if ln, err = net.Listen("tcp", addr); err == nil {
			return ln, nil
		}
		time.Sleep(20 * time.Millisecond)
	}
	return nil, err
}

func (e *embedded) stop() {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.listener == "" {
		return
	}
	s := e.server
	s.Listeners.Close(e.listener, func(id string) {
		for _, cl := range s.Clients.GetByListener(id) {
			_ = s.DisconnectClient(cl, packets.ErrServerShuttingDown)
		}
	})
	s.Listeners.Delete(e.listener)
	e.listener = ""
}

func (e *embedded) current() *mqtt.Server { return e.server }

func (e *embedded) respond(clientID, topic string, payload []byte, private bool) error {
	s := e.current()
	subscribed := false
	if clientID != "" && !private {
		_, subscribed = s.Topics.Subscribers(topic).Subscriptions[clientID]
	}
	// Everyone subscribed gets it through the broker (QoS is capped by each subscription).
	if !private || clientID == "" {
		if err := s.Publish(topic, payload, false, 1); err != nil {
			return err
		}
	}
	if subscribed || clientID == "" {
		return nil
	}
	cl, ok := s.Clients.Get(clientID)
	if !ok || cl.Closed() {
		return nil // gone, like on AWS: the response is lost
	}
	// AWS IoT delivers responses to the requester without a subscription; write it directly.
	// This runs on the requester's own sender (Emulator.sendTo): a throttled connection holds
	// up only its own responses.
	return cl.WritePacket(packets.Packet{
		FixedHeader: packets.FixedHeader{Type: packets.Publish},
		TopicName:   topic,
		Payload:     payload,
	})
}

func (e *embedded) publish(topic string, payload []byte) error {
	return e.current().Publish(topic, payload, false, 1)
}

func (e *embedded) disconnect(clientID string) bool {
	s := e.current()
	cl, ok := s.Clients.Get(clientID)
	if !ok || cl.Closed() {
		return false
	}
	_ = s.DisconnectClient(cl, packets.ErrServerShuttingDown)
	cl.Stop(packets.ErrServerShuttingDown)
	return true
}

func (e *embedded) url() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return "mqtt://" + e.addr
}

func (e *embedded) close() error {
	e.stop()
	return e.server.Close()
}

// external is a client of a broker run elsewhere (mosquitto). Ordinary brokers deliver only
// what is subscribed, so devices must subscribe to the response topics. When the connection
// drops (the broker restarts), it reconnects with backoff and subscribes again; requests
// published meanwhile are lost, as with a broker that keeps no state.
type external struct {
	brokerURL string
	host      string
	clientID  string
	handler   func(message)
	log       hclog.Logger
	ctx       context.Context // ends at close, so no publish waits for a PUBACK that cannot come
	cancel    context.CancelFunc
	done      chan struct{} // closed when the reconnect loop has ended

	mu     sync.Mutex
	client *paho.Client
	conn   net.Conn
	up     chan struct{} // closed while client is connected; replaced when it drops
}

// Reconnect backoff: quick at first (a broker restart takes a moment), capped so a broker
// that stays down is not hammered.
const (
	reconnectMin = 50 * time.Millisecond
	reconnectMax = 2 * time.Second
)

func newExternal(ctx context.Context, brokerURL, clientID string, log hclog.Logger, handler func(message)) (*external, error) {
	u, err := url.Parse(brokerURL)
	if err != nil {
		return nil, fmt.Errorf("broker URL %q: %w", brokerURL, err)
	}
	if u.Scheme != "mqtt" && u.Scheme != "tcp" {
		return nil, fmt.Errorf("broker URL %q: only mqtt:// is supported", brokerURL)
	}
	x := &external{brokerURL: brokerURL, host: u.Host, clientID: clientID, handler: handler, log: log,
		done: make(chan struct{}), up: make(chan struct{})}
	// The first connection is made here, so a wrong URL fails the start rather than retrying.
	c, conn, err := x.connect(ctx)
	if err != nil {
		return nil, err
	}
	x.client, x.conn = c, conn
	close(x.up)
	x.ctx, x.cancel = context.WithCancel(context.Background())
	go x.reconnectLoop(c)
	return x, nil
}

// connect dials, connects with a clean session and subscribes to the request filters.
func (x *external) connect(ctx context.Context) (*paho.Client, net.Conn, error) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "tcp", x.host)
	if err != nil {
		return nil, nil, fmt.Errorf("connect to broker %s: %w", x.host, err)
	}
	c := paho.NewClient(paho.ClientConfig{
		Conn:     conn,
		ClientID: x.clientID,
		OnPublishReceived: []func(paho.PublishReceived) (bool, error){
			func(pr paho.PublishReceived) (bool, error) {
				x.handler(message{topic: pr.Packet.Topic, payload: pr.Packet.Payload})
				return true, nil
			},
		},
		OnClientError: func(err error) { x.log.Warn("external broker connection", "error", err) },
	})
	ca, err := c.Connect(ctx, &paho.Connect{ClientID: x.clientID, CleanStart: true, KeepAlive: 30})
	if err != nil {
		conn.Close()
		return nil, nil, fmt.Errorf("MQTT connect to %s: %w", x.host, err)
	}
	if ca.ReasonCode != 0 {
		conn.Close()
		return nil, nil, fmt.Errorf("MQTT connect to %s: reason %d", x.host, ca.ReasonCode)
	}
	subs := make([]paho.SubscribeOptions, 0, len(requestFilters))
	for _, f := range requestFilters {
		// NoLocal: our own responses are on the same filters.
		subs = append(subs, paho.SubscribeOptions{Topic: f, QoS: 1, NoLocal: true})
	}
	if _, err := c.Subscribe(ctx, &paho.Subscribe{Subscriptions: subs}); err != nil {
		disconnectClient(c, conn)
		return nil, nil, fmt.Errorf("subscribe on %s: %w", x.host, err)
	}
	return c, conn, nil
}

// reconnectLoop waits for the connection to drop, then connects again until it succeeds or
// the transport is closed.
func (x *external) reconnectLoop(c *paho.Client) {
	defer close(x.done)
	for {
		select {
		case <-c.Done():
		case <-x.ctx.Done():
			return
		}
		x.mu.Lock()
		x.conn.Close()
		x.up = make(chan struct{})
		x.mu.Unlock()
		x.log.Warn("external broker connection lost; reconnecting", "broker", x.host)
		wait := reconnectMin
		for {
			nc, conn, err := x.connect(x.ctx)
			if err == nil {
				x.mu.Lock()
				x.client, x.conn, c = nc, conn, nc
				close(x.up)
				x.mu.Unlock()
				x.log.Info("external broker reconnected", "broker", x.host)
				break
			}
			x.log.Debug("external broker reconnect", "error", err, "retry_in", wait)
			select {
			case <-time.After(wait):
			case <-x.ctx.Done():
				return
			}
			wait = min(2*wait, reconnectMax)
		}
	}
}

// connected returns the client once it is connected, waiting through a reconnect.
func (x *external) connected(ctx context.Context) (*paho.Client, error) {
	x.mu.Lock()
	c, up := x.client, x.up // swapped together: c is connected if up is closed
	x.mu.Unlock()
	select {
	case <-up:
		return c, nil
	default:
	}
	select {
	case <-up:
	case <-ctx.Done():
		return nil, fmt.Errorf("external broker %s: not connected: %w", x.host, ctx.Err())
	}
	x.mu.Lock()
	defer x.mu.Unlock()
	return x.client, nil
}

func (x *external) respond(_, topic string, payload []byte, _ bool) error {
	return x.publish(topic, payload)
}

func (x *external) publish(topic string, payload []byte) error {
	ctx, cancel := context.WithTimeout(x.ctx, 10*time.Second)
	defer cancel()
	c, err := x.connected(ctx)
	if err != nil {
		return err
	}
	// Pipelined like AWS's own fleet of publishers: the PUBACK is not awaited per message (that
	// would cap blocks at one round trip each); the session's receive-maximum window still
	// bounds what is in flight, and writes stay in order.
	_, err = c.PublishWithOptions(ctx, &paho.Publish{Topic: topic, QoS: 1, Payload: payload},
		paho.PublishOptions{Method: paho.PublishMethod_AsyncSend})
	return err
}

func (x *external) disconnect(string) bool { return false }
func (x *external) url() string            { return x.brokerURL }

func (x *external) close() error {
	x.cancel()
	<-x.done
	x.mu.Lock()
	defer x.mu.Unlock()
	return disconnectClient(x.client, x.conn)
}

func disconnectClient(c *paho.Client, conn net.Conn) error {
	_ = c.Disconnect(&paho.Disconnect{ReasonCode: 0})
	select {
	case <-c.Done():
	case <-time.After(5 * time.Second):
	}
	return conn.Close()
}

// hclogWriter lets mochi's slog output go to the emulator's hclog logger.
type hclogWriter struct{ l hclog.Logger }

func (w hclogWriter) Write(p []byte) (int, error) {
	w.l.Named("mochi").Debug(strings.TrimSpace(string(p)))
	return len(p), nil
}

// allowAll admits every client and topic: local use only (mochi's own allow hook pulls in YAML).
type allowAll struct{ mqtt.HookBase }

func (*allowAll) ID() string { return "allow-all" }
func (*allowAll) Provides(b byte) bool {
	return b == mqtt.OnConnectAuthenticate || b == mqtt.OnACLCheck
}
func (*allowAll) OnConnectAuthenticate(*mqtt.Client, packets.Packet) bool { return true }
func (*allowAll) OnACLCheck(*mqtt.Client, string, bool) bool              { return true }
