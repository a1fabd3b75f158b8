// Package mqttconn is ota-net's one MQTT 5 connection: an autopaho connection manager with
// mutual TLS (SNI always set, optional ALPN for port 443), a session that survives restarts
// (clean start off, session expiry, file-backed packet store in the state directory),
// exponential reconnect backoff with jitter, and a small routing layer: handlers are attached
// to topic filters, remembered, and the subscriptions renewed on every (re)connection.
//
// Handler contract: handlers run on paho's receive goroutine, one message at a time, in
// arrival order. They must return quickly (copy what they need, hand it to a channel or
// goroutine of their own); a handler that blocks stalls every other subscription and the
// acknowledgements of QoS 1 messages. The payload slice belongs to the handler (paho allocates
// one per packet). Messages can arrive twice (QoS 1 redelivery, overlapping subscriptions, AWS
// delivering responses without a subscription): handlers must tolerate duplicates.
package mqttconn

import (
	"context"
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"net"
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"time"

	"github.com/eclipse/paho.golang/autopaho"
	"github.com/eclipse/paho.golang/paho"
	"github.com/eclipse/paho.golang/paho/session"
	"github.com/eclipse/paho.golang/paho/session/state"
	"github.com/eclipse/paho.golang/paho/store/file"
	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/netagent/webproxy"
)

// ALPNProtocol lets AWS IoT accept MQTT with client certificates on port 443.
const ALPNProtocol = "x-amzn-mqtt-ca"

// AWS IoT accepts keep-alive values from 30 to 1200 seconds.
const (
	MinKeepAlive = 30 * time.Second
	MaxKeepAlive = 1200 * time.Second
)

// DefaultMaxPayload is AWS IoT's message size quota (128 KB); brokers that announce a smaller
// maximum packet size are honoured too.
const DefaultMaxPayload = 128 * 1024

// Errors returned by Publish and Subscribe (wrapped; test with errors.Is).
var (
	// ErrTooLarge: the packet would exceed the broker's maximum packet size or MaxPayload.
	// Retrying cannot help.
	ErrTooLarge = errors.New("mqtt packet too large")
	// ErrInvalid: a bad topic, filter or QoS. Retrying cannot help.
	ErrInvalid = errors.New("invalid mqtt request")
	// ErrDeliveryUnknown: the connection dropped after a QoS 1 publish was sent; it may or may
	// not have reached the broker (it stays in the session and is resent on reconnect).
	ErrDeliveryUnknown = errors.New("mqtt delivery unknown: connection lost")
	// ErrRefused: the broker refused a subscription (SUBACK/UNSUBACK reason code >= 0x80) or a
	// publish (PUBACK reason code >= 0x80).
	ErrRefused = errors.New("refused by broker")
	// ErrClosed: the connection was closed by Close.
	ErrClosed = errors.New("mqtt connection closed")
)

// Config configures a connection.
type Config struct {
	// BrokerURL is mqtts://host:8883 (AWS IoT), mqtts://host:443 with ALPN, or mqtt://host:port
	// for local tests.
	BrokerURL string
	// ClientID is the thing name on AWS IoT.
	ClientID string
	// CAFile, CertFile, KeyFile are PEM files for mutual TLS. CAFile may be empty to use the
	// system roots; CertFile/KeyFile are required for mqtts:// unless TLSConfig is given.
	CAFile, CertFile, KeyFile string
	// ALPN adds the x-amzn-mqtt-ca protocol (needed on port 443; set automatically there).
	ALPN bool
	// TLSConfig, if set, is used as the base TLS configuration (ServerName is still set).
	TLSConfig *tls.Config
	// KeepAlive, clamped to AWS's 30..1200 s (default 60 s).
	KeepAlive time.Duration
	// SessionExpiry keeps the broker-side session (subscriptions, queued QoS 1 messages) across
	// disconnects and restarts (default 1 h; AWS caps it by its own quota).
	SessionExpiry time.Duration
	// StateDir, if set, holds the file-backed session store (StateDir/mqtt-session) so
	// unacknowledged QoS 1 packets survive a restart. Empty: in memory.
	StateDir string
	// BackoffMin/BackoffMax bound the exponential reconnect backoff with jitter
	// (defaults 1 s and 2 min).
	BackoffMin, BackoffMax time.Duration
	// ConnectTimeout bounds one connection attempt (default 20 s).
	ConnectTimeout time.Duration
	// MaxPayload caps an outgoing packet (default DefaultMaxPayload); the broker's announced
	// maximum packet size applies as well.
	MaxPayload int
	// MaxIncomingPacket is the Maximum Packet Size announced in CONNECT and enforced on what
	// the broker sends (default DefaultMaxIncomingPacket): a larger packet drops the
	// connection before its body is read.
	MaxIncomingPacket int
	// Proxy, when set, carries every connection attempt through an HTTP CONNECT tunnel (TLS
	// to the broker runs inside it, SNI and ALPN unchanged). Nil: direct.
	Proxy *webproxy.Proxy
	// MaxPublishRate caps publishes per second over any one-second window (default
	// DefaultMaxPublishRate, AWS's quota); negative: no cap (a broker without the quota).
	// Publish waits for its turn.
	MaxPublishRate int
	// Logger (hclog.NewNullLogger() when nil).
	Logger hclog.Logger
	// Subscriptions are attached before the first connection, so messages the broker kept in
	// the persistent session while the device was away are routed too (a Subscribe call
	// after Dial may come after they arrived).
	Subscriptions []Subscription
}

// Subscription is a filter with its handler (see Config.Subscriptions).
type Subscription struct {
	Filter  string
	QoS     byte
	Handler func(topic string, payload []byte)
}

type handler struct {
	id uint64
	h  func(topic string, payload []byte)
}

type filterState struct {
	qos      byte
	handlers []handler
}

// Conn is one managed MQTT connection. It is safe for concurrent use.
type Conn struct {
	cfg     Config
	log     hclog.Logger
	cm      *autopaho.ConnectionManager
	session *state.State
	ctx     context.Context
	cancel  context.CancelFunc
	wg      sync.WaitGroup

	mu       sync.RWMutex
	filters  map[string]*filterState
	nextID   uint64
	onUp     map[uint64]func(ctx context.Context)
	maxPkt   uint32 // broker's maximum packet size (0: none announced)
	upCancel context.CancelFunc
	upCh     chan struct{} // closed once a connection is up and its CONNACK recorded
	upCount  int
	closed   bool
	pubRate  *publishBucket // nil: no cap
}

// Dial starts the connection manager and returns at once; the connection is made (and remade)
// in the background. Use AwaitConnection to wait for it.
func Dial(ctx context.Context, cfg Config) (*Conn, error) {
	if cfg.ClientID == "" {
		return nil, fmt.Errorf("%w: empty client id", ErrInvalid)
	}
	cfg.setDefaults()
	u, tlsCfg, err := brokerURL(cfg)
	if err != nil {
		return nil, err
	}
	filters, nextID, err := initialFilters(cfg.Subscriptions)
	if err != nil {
		return nil, err
	}
	sess, err := openSession(cfg.StateDir)
	if err != nil {
		return nil, err
	}
	cctx, cancel := context.WithCancel(context.WithoutCancel(ctx))
	c := &Conn{
		cfg:     cfg,
		log:     cfg.Logger,
		session: sess,
		ctx:     cctx,
		cancel:  cancel,
		filters: filters,
		nextID:  nextID,
		onUp:    map[uint64]func(context.Context){},
		upCh:    make(chan struct{}),
	}
	if cfg.MaxPublishRate > 0 {
		c.pubRate = newPublishBucket(cfg.MaxPublishRate)
	}
	cm, err := autopaho.NewConnection(cctx, c.managerConfig(u, tlsCfg))
	if err != nil {
		cancel()
		_ = sess.Close()
		return nil, fmt.Errorf("mqtt connection manager: %w", err)
	}
	c.cm = cm
	return c, nil
}

// setDefaults fills in the documented defaults and clamps the keep-alive to AWS's range.
func (cfg *Config) setDefaults() {
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	if cfg.KeepAlive == 0 {
		cfg.KeepAlive = 60 * time.Second
	}
	cfg.KeepAlive = min(max(cfg.KeepAlive, MinKeepAlive), MaxKeepAlive)
	if cfg.SessionExpiry == 0 {
		cfg.SessionExpiry = time.Hour
	}
	if cfg.BackoffMin <= 0 {
		cfg.BackoffMin = time.Second
	}
	if cfg.BackoffMax <= cfg.BackoffMin {
		cfg.BackoffMax = max(2*time.Minute, 2*cfg.BackoffMin)
	}
	if cfg.ConnectTimeout == 0 {
		cfg.ConnectTimeout = 20 * time.Second
	}
	if cfg.MaxPayload <= 0 {
		cfg.MaxPayload = DefaultMaxPayload
	}
	if cfg.MaxIncomingPacket <= 0 {
		cfg.MaxIncomingPacket = DefaultMaxIncomingPacket
	}
	if cfg.MaxPublishRate == 0 {
		cfg.MaxPublishRate = DefaultMaxPublishRate
	}
}

// brokerURL parses the broker URL and builds its TLS configuration (nil for mqtt://).
func brokerURL(cfg Config) (*url.URL, *tls.Config, error) {
	u, err := url.Parse(cfg.BrokerURL)
	if err != nil {
		return nil, nil, fmt.Errorf("broker url: %w", err)
	}
	if u.Hostname() == "" {
		return nil, nil, fmt.Errorf("%w: broker url %q has no host", ErrInvalid, cfg.BrokerURL)
	}
	switch strings.ToLower(u.Scheme) {
	case "mqtt", "tcp":
		return u, nil, nil
	case "mqtts", "ssl", "tls":
		tlsCfg, err := buildTLS(cfg, u)
		return u, tlsCfg, err
	default:
		return nil, nil, fmt.Errorf("%w: broker url scheme %q (want mqtts or mqtt)", ErrInvalid, u.Scheme)
	}
}

// openSession returns the MQTT session state: in memory, or file-backed under stateDir so
// unacknowledged QoS 1 packets survive a restart.
func openSession(stateDir string) (*state.State, error) {
	if stateDir == "" {
		return state.NewInMemory(), nil
	}
	dir := filepath.Join(stateDir, "mqtt-session")
	cs, err := file.New(filepath.Join(dir, "client"), "c-", ".pkt")
	if err != nil {
		return nil, fmt.Errorf("mqtt session store: %w", err)
	}
	ss, err := file.New(filepath.Join(dir, "server"), "s-", ".pkt")
	if err != nil {
		return nil, fmt.Errorf("mqtt session store: %w", err)
	}
	return state.New(cs, ss), nil
}

// initialFilters registers Config.Subscriptions; it returns the filter table and the last
// handler id used.
func initialFilters(subs []Subscription) (map[string]*filterState, uint64, error) {
	filters := map[string]*filterState{}
	var nextID uint64
	for _, sub := range subs {
		if !ValidFilter(sub.Filter) || sub.QoS > 1 || sub.Handler == nil {
			return nil, 0, fmt.Errorf("%w: subscription %q", ErrInvalid, sub.Filter)
		}
		fs := filters[sub.Filter]
		if fs == nil {
			fs = &filterState{}
			filters[sub.Filter] = fs
		}
		nextID++
		fs.qos = max(fs.qos, sub.QoS)
		fs.handlers = append(fs.handlers, handler{id: nextID, h: sub.Handler})
	}
	return filters, nextID, nil
}

// managerConfig is autopaho's configuration for this connection. Every connection attempt,
// the first and each reconnection, goes through AttemptConnection: the web proxy (if any),
// then TLS, then the packet size guard.
func (c *Conn) managerConfig(u *url.URL, tlsCfg *tls.Config) autopaho.ClientConfig {
	cfg := c.cfg
	return autopaho.ClientConfig{
		ServerUrls:                    []*url.URL{u},
		TlsCfg:                        tlsCfg,
		KeepAlive:                     uint16(cfg.KeepAlive / time.Second),
		CleanStartOnInitialConnection: false,
		SessionExpiryInterval:         uint32(cfg.SessionExpiry / time.Second),
		ReconnectBackoff:              autopaho.NewExponentialBackoff(cfg.BackoffMin, cfg.BackoffMax, min(2*cfg.BackoffMin, cfg.BackoffMax), 2),
		ConnectTimeout:                cfg.ConnectTimeout,
		OnConnectionUp:                c.connectionUp,
		OnConnectionDown:              c.connectionDown,
		OnConnectError:                func(err error) { c.connectError(u, err) },
		// paho announces no Maximum Packet Size and sizes its read buffer from whatever
		// length a packet declares: announce ours and enforce it on the connection.
		ConnectPacketBuilder: func(cp *paho.Connect, _ *url.URL) (*paho.Connect, error) {
			if cp.Properties == nil {
				cp.Properties = &paho.ConnectProperties{}
			}
			mp := uint32(cfg.MaxIncomingPacket)
			cp.Properties.MaximumPacketSize = &mp
			return cp, nil
		},
		AttemptConnection: func(ctx context.Context, _ autopaho.ClientConfig, u *url.URL) (net.Conn, error) {
			return dialLimited(ctx, u, tlsCfg, cfg.Proxy, cfg.ConnectTimeout, cfg.MaxIncomingPacket, func(n int) {
				c.log.Error("broker sent a packet over the maximum packet size; disconnecting", "declared_bytes", n, "max", cfg.MaxIncomingPacket)
			})
		},
		ClientConfig: paho.ClientConfig{
			ClientID:          cfg.ClientID,
			Session:           c.session,
			OnPublishReceived: []func(paho.PublishReceived) (bool, error){c.route},
			OnClientError: func(err error) {
				c.log.Debug("mqtt client error", "error", err)
			},
			OnServerDisconnect: func(d *paho.Disconnect) {
				c.log.Warn("mqtt broker disconnected us", "reason_code", d.ReasonCode)
			},
		},
	}
}

// connectError logs a failed connection attempt; a failure of the web proxy says so, with
// the proxy's answer (never its credentials).
func (c *Conn) connectError(u *url.URL, err error) {
	var pe *webproxy.Error
	if errors.As(err, &pe) {
		c.log.Error("mqtt connect failed at the web proxy", "broker", u.Redacted(), "proxy", pe.Proxy, "proxy_status", pe.Status, "error", err)
		return
	}
	c.log.Warn("mqtt connect failed", "broker", u.Redacted(), "error", err)
}

func buildTLS(cfg Config, u *url.URL) (*tls.Config, error) {
	var tc *tls.Config
	if cfg.TLSConfig != nil {
		tc = cfg.TLSConfig.Clone()
	} else {
		tc = &tls.Config{MinVersion: tls.VersionTLS12}
	}
	// AWS IoT requires SNI, and autopaho's proxy path needs ServerName explicitly.
	tc.ServerName = u.Hostname()
	if cfg.CAFile != "" {
		pem, err := os.ReadFile(cfg.CAFile)
		if err != nil {
			return nil, fmt.Errorf("ca file: %w", err)
		}
		pool := x509.NewCertPool()
		if !pool.AppendCertsFromPEM(pem) {
			return nil, fmt.Errorf("%w: ca file %s has no PEM certificate", ErrInvalid, cfg.CAFile)
		}
		tc.RootCAs = pool
	}
	if cfg.CertFile != "" || cfg.KeyFile != "" {
		cert, err := tls.LoadX509KeyPair(cfg.CertFile, cfg.KeyFile)
		if err != nil {
			return nil, fmt.Errorf("client certificate: %w", err)
		}
		tc.Certificates = []tls.Certificate{cert}
	}
	if len(tc.Certificates) == 0 && tc.GetClientCertificate == nil {
		return nil, fmt.Errorf("%w: mqtts needs cert_file and key_file (mutual TLS)", ErrInvalid)
	}
	if cfg.ALPN || u.Port() == "443" {
		tc.NextProtos = []string{ALPNProtocol}
	}
	return tc, nil
}

// connectionUp must not block autopaho: renewal runs in its own goroutine.
func (c *Conn) connectionUp(cm *autopaho.ConnectionManager, ca *paho.Connack) {
	c.mu.Lock()
	if c.upCancel != nil {
		c.upCancel()
	}
	c.maxPkt = 0
	if ca.Properties != nil && ca.Properties.MaximumPacketSize != nil {
		c.maxPkt = *ca.Properties.MaximumPacketSize
	}
	ctx, cancel := context.WithCancel(c.ctx)
	c.upCancel = cancel
	c.upCount++
	closed := c.closed
	if !closed {
		c.wg.Add(1)
	}
	c.mu.Unlock()
	c.log.Info("mqtt connected", "session_present", ca.SessionPresent, "max_packet", c.maxPkt)
	if closed {
		return
	}
	go func() {
		defer c.wg.Done()
		c.renew(ctx, cm)
	}()
}

func (c *Conn) connectionDown() bool {
	c.mu.Lock()
	if c.upCancel != nil {
		c.upCancel()
		c.upCancel = nil
	}
	select {
	case <-c.upCh:
		c.upCh = make(chan struct{})
	default:
	}
	c.mu.Unlock()
	c.log.Warn("mqtt connection lost; reconnecting")
	return true
}

// renew re-subscribes every remembered filter, then runs the OnConnect hooks. It retries
// while this connection stays up.
func (c *Conn) renew(ctx context.Context, cm *autopaho.ConnectionManager) {
	for attempt := 0; ; attempt++ {
		c.mu.RLock()
		subs := make([]paho.SubscribeOptions, 0, len(c.filters))
		for f, fs := range c.filters {
			subs = append(subs, paho.SubscribeOptions{Topic: f, QoS: fs.qos})
		}
		c.mu.RUnlock()
		err := c.subscribeAll(ctx, cm, subs)
		if err == nil {
			break
		}
		if ctx.Err() != nil {
			return
		}
		c.log.Warn("mqtt re-subscribe failed; retrying", "error", err)
		select {
		case <-ctx.Done():
			return
		case <-time.After(min(time.Duration(attempt+1)*time.Second, 30*time.Second)):
		}
	}
	c.mu.Lock()
	if ctx.Err() == nil {
		select {
		case <-c.upCh:
		default:
			close(c.upCh) // publishers may go: every subscription is in place
		}
	}
	c.mu.Unlock()
	c.mu.RLock()
	hooks := make([]func(context.Context), 0, len(c.onUp))
	for _, f := range c.onUp {
		hooks = append(hooks, f)
	}
	c.mu.RUnlock()
	for _, f := range hooks {
		f(ctx)
	}
}

func (c *Conn) subscribeAll(ctx context.Context, cm *autopaho.ConnectionManager, subs []paho.SubscribeOptions) error {
	// Brokers limit the number of filters per SUBSCRIBE (AWS: 8).
	for len(subs) > 0 {
		n := min(len(subs), 8)
		sctx, cancel := context.WithTimeout(ctx, 30*time.Second)
		sa, err := cm.Subscribe(sctx, &paho.Subscribe{Subscriptions: subs[:n]})
		cancel()
		if err != nil {
			return err
		}
		if err := subackErr(sa, subs[:n]); err != nil {
			return err
		}
		subs = subs[n:]
	}
	return nil
}

func subackErr(sa *paho.Suback, subs []paho.SubscribeOptions) error {
	if sa == nil {
		return nil
	}
	for i, rc := range sa.Reasons {
		if rc >= 0x80 && i < len(subs) {
			return fmt.Errorf("subscribe %q: %w (reason code 0x%02x)", subs[i].Topic, ErrRefused, rc)
		}
	}
	return nil
}

// OnConnect registers f to run after every (re)connection, once the subscriptions are renewed
// (jobs use it to ask $next/get). ctx ends when that connection drops. f runs on the
// renewal goroutine: it may publish, but should not block for long. Returns a remover.
func (c *Conn) OnConnect(f func(ctx context.Context)) (remove func()) {
	c.mu.Lock()
	c.nextID++
	id := c.nextID
	c.onUp[id] = f
	c.mu.Unlock()
	return func() {
		c.mu.Lock()
		delete(c.onUp, id)
		c.mu.Unlock()
	}
}

// AwaitConnection waits until the connection is up and every remembered subscription has
// been renewed on it (or ctx ends).
func (c *Conn) AwaitConnection(ctx context.Context) error {
	// autopaho reports "up" before OnConnectionUp ran; wait for both so the broker's limits
	// are known.
	if err := c.cm.AwaitConnection(ctx); err != nil {
		if c.ctx.Err() != nil {
			return ErrClosed
		}
		return err
	}
	c.mu.RLock()
	ch := c.upCh
	c.mu.RUnlock()
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	case <-c.ctx.Done():
		return ErrClosed
	}
}

// waitDown waits (briefly) until the manager noticed a lost connection, so a retry does not
// spin on a stale "up".
func (c *Conn) waitDown(ctx context.Context) {
	c.mu.RLock()
	ch := c.upCh
	c.mu.RUnlock()
	select {
	case <-ch:
	default:
		return
	}
	t := time.NewTimer(20 * time.Millisecond)
	defer t.Stop()
	select {
	case <-t.C:
	case <-ctx.Done():
	}
}

// Connections returns how many times the connection came up (for tests and metrics).
func (c *Conn) Connections() int {
	c.mu.RLock()
	defer c.mu.RUnlock()
	return c.upCount
}

// MaxPayload is the largest payload Publish accepts for topic at qos right now.
func (c *Conn) MaxPayload(topic string, qos byte) int {
	limit := c.cfg.MaxPayload
	c.mu.RLock()
	mp := c.maxPkt
	c.mu.RUnlock()
	if mp > 0 {
		// Fixed header (up to 5 bytes), topic, packet id, empty properties (1 byte).
		over := 5 + 2 + len(topic) + 1
		if qos > 0 {
			over += 2
		}
		limit = min(limit, int(mp)-over)
	}
	return limit
}

// Publish sends payload to topic. It waits for the connection (bounded by ctx); with QoS 1 it
// returns once the broker acknowledged. Errors: ErrTooLarge / ErrInvalid (never retry),
// ErrDeliveryUnknown, ErrRefused, ErrClosed, or ctx's error.
func (c *Conn) Publish(ctx context.Context, topic string, qos byte, payload []byte) error {
	if topic == "" || strings.ContainsAny(topic, "+#\x00") || len(topic) > 65535 {
		return fmt.Errorf("%w: topic %q", ErrInvalid, topic)
	}
	if qos > 1 {
		return fmt.Errorf("%w: qos %d (0 or 1)", ErrInvalid, qos)
	}
	if c.pubRate != nil {
		if err := c.pubRate.wait(ctx); err != nil {
			return fmt.Errorf("publish %s: %w", topic, err)
		}
	}
	var resp *paho.PublishResponse
	var err error
	for {
		if err := c.AwaitConnection(ctx); err != nil {
			return err
		}
		if limit := c.MaxPayload(topic, qos); len(payload) > limit {
			return fmt.Errorf("%w: %d bytes to %s, limit %d", ErrTooLarge, len(payload), topic, limit)
		}
		resp, err = c.cm.Publish(ctx, &paho.Publish{Topic: topic, QoS: qos, Payload: payload})
		// Down before anything was sent: safe to wait for the next connection and send then.
		if !errors.Is(err, autopaho.ConnectionDownError) && !errors.Is(err, session.ErrNoConnection) || c.ctx.Err() != nil {
			break
		}
		c.waitDown(ctx)
	}
	switch {
	case err == nil:
		return nil
	case c.ctx.Err() != nil:
		return ErrClosed
	case errors.Is(err, paho.ErrInvalidArguments):
		return fmt.Errorf("%w: %w", ErrInvalid, err)
	case errors.Is(err, paho.ErrConnectionLost), errors.Is(err, paho.ErrNetworkErrorAfterStored):
		return fmt.Errorf("publish %s: %w: %w", topic, ErrDeliveryUnknown, err)
	case resp != nil && resp.ReasonCode >= 0x80:
		return fmt.Errorf("publish %s: %w: %w", topic, ErrRefused, err)
	case ctx.Err() != nil:
		return fmt.Errorf("publish %s: %w", topic, ctx.Err())
	default:
		return fmt.Errorf("publish %s: %w: %w", topic, ErrDeliveryUnknown, err)
	}
}

// Subscribe attaches h to filter (MQTT wildcards allowed) and subscribes at the broker. The
// subscription is remembered and renewed on every reconnection until unsubscribe is called.
// Subscribe waits for the connection and the broker's SUBACK (bounded by ctx); on error
// nothing stays registered. Several handlers may share a filter. See the package comment for
// the handler contract.
func (c *Conn) Subscribe(ctx context.Context, filter string, qos byte, h func(topic string, payload []byte)) (unsubscribe func(context.Context) error, err error) {
	if !ValidFilter(filter) {
		return nil, fmt.Errorf("%w: filter %q", ErrInvalid, filter)
	}
	if qos > 1 {
		return nil, fmt.Errorf("%w: qos %d (0 or 1)", ErrInvalid, qos)
	}
	if h == nil {
		return nil, fmt.Errorf("%w: nil handler", ErrInvalid)
	}
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil, ErrClosed
	}
	c.nextID++
	id := c.nextID
	fs := c.filters[filter]
	if fs == nil {
		fs = &filterState{qos: qos}
		c.filters[filter] = fs
	}
	fs.qos = max(fs.qos, qos)
	subQoS := fs.qos
	fs.handlers = append(fs.handlers, handler{id: id, h: h})
	c.mu.Unlock()

	remove := func() (last bool) {
		c.mu.Lock()
		defer c.mu.Unlock()
		fs := c.filters[filter]
		if fs == nil {
			return false
		}
		for i, hd := range fs.handlers {
			if hd.id == id {
				fs.handlers = append(fs.handlers[:i:i], fs.handlers[i+1:]...)
				break
			}
		}
		if len(fs.handlers) == 0 {
			delete(c.filters, filter)
			return true
		}
		return false
	}

	if err := c.subscribeNow(ctx, filter, subQoS); err != nil {
		remove()
		return nil, err
	}
	var once sync.Once
	return func(ctx context.Context) error {
		var err error
		once.Do(func() {
			if !remove() {
				return
			}
			uctx, cancel := context.WithTimeout(ctx, 30*time.Second)
			defer cancel()
			ua, uerr := c.cm.Unsubscribe(uctx, &paho.Unsubscribe{Topics: []string{filter}})
			switch {
			case uerr != nil && (errors.Is(uerr, autopaho.ConnectionDownError) || c.ctx.Err() != nil):
				// Not renewed on the next connection; the broker session forgets it at expiry.
			case uerr != nil:
				err = fmt.Errorf("unsubscribe %q: %w", filter, uerr)
			case ua != nil && len(ua.Reasons) > 0 && ua.Reasons[0] >= 0x80 && ua.Reasons[0] != 0x11:
				err = fmt.Errorf("unsubscribe %q: %w (reason code 0x%02x)", filter, ErrRefused, ua.Reasons[0])
			}
		})
		return err
	}, nil
}

func (c *Conn) subscribeNow(ctx context.Context, filter string, qos byte) error {
	for {
		if err := c.AwaitConnection(ctx); err != nil {
			return err
		}
		sa, err := c.cm.Subscribe(ctx, &paho.Subscribe{Subscriptions: []paho.SubscribeOptions{{Topic: filter, QoS: qos}}})
		if err == nil {
			return subackErr(sa, []paho.SubscribeOptions{{Topic: filter, QoS: qos}})
		}
		if c.ctx.Err() != nil {
			return ErrClosed
		}
		if ctx.Err() != nil {
			return ctx.Err()
		}
		if errors.Is(err, paho.ErrInvalidArguments) {
			return fmt.Errorf("%w: %w", ErrInvalid, err)
		}
		// Connection dropped in between: wait for the next one (renew covers it too).
		c.log.Debug("subscribe interrupted; waiting for the connection", "filter", filter, "error", err)
		select {
		case <-ctx.Done():
			return ctx.Err()
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// route dispatches one incoming PUBLISH to every handler whose filter matches.
func (c *Conn) route(pr paho.PublishReceived) (bool, error) {
	p := pr.Packet
	c.mu.RLock()
	var hs []func(string, []byte)
	for f, fs := range c.filters {
		if Match(f, p.Topic) {
			for _, hd := range fs.handlers {
				hs = append(hs, hd.h)
			}
		}
	}
	c.mu.RUnlock()
	if len(hs) == 0 {
		c.log.Trace("mqtt message without handler", "topic", p.Topic)
		return false, nil
	}
	for _, h := range hs {
		h(p.Topic, p.Payload)
	}
	return true, nil
}

// Close disconnects cleanly (the broker keeps the session until it expires) and waits for
// every goroutine it started. Handlers are not called after Close returns.
func (c *Conn) Close(ctx context.Context) error {
	c.mu.Lock()
	if c.closed {
		c.mu.Unlock()
		return nil
	}
	c.closed = true
	c.mu.Unlock()
	dctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	defer cancel()
	err := c.cm.Disconnect(dctx)
	if errors.Is(err, autopaho.ConnectionDownError) {
		err = nil
	}
	c.cancel()
	select {
	case <-c.cm.Done():
	case <-ctx.Done():
		return ctx.Err()
	}
	c.wg.Wait()
	if serr := c.session.Close(); err == nil {
		err = serr
	}
	return err
}

// ValidFilter reports whether f is a well-formed MQTT topic filter.
func ValidFilter(f string) bool {
	if f == "" || len(f) > 65535 || strings.ContainsRune(f, 0) {
		return false
	}
	levels := strings.Split(f, "/")
	for i, l := range levels {
		switch {
		case l == "#":
			if i != len(levels)-1 {
				return false
			}
		case l == "+":
		case strings.ContainsAny(l, "+#"):
			return false
		}
	}
	return true
}

// Match reports whether topic matches filter under MQTT rules; topics starting with '$' are
// not matched by a filter starting with a wildcard.
func Match(filter, topic string) bool {
	if strings.HasPrefix(topic, "$") && (strings.HasPrefix(filter, "+") || strings.HasPrefix(filter, "#")) {
		return false
	}
	for {
		fl, frest, fmore := strings.Cut(filter, "/")
		tl, trest, tmore := strings.Cut(topic, "/")
		switch fl {
		case "#":
			return true
		case "+":
		default:
			if fl != tl {
				return false
			}
		}
		if !fmore && !tmore {
			return true
		}
		if !tmore {
			// "a/#" matches "a" as well.
			return fmore && frest == "#"
		}
		if !fmore {
			return false
		}
		filter, topic = frest, trest
	}
}
