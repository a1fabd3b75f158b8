package mqttconn

import (
	"context"
	"crypto/tls"
	"errors"
	"fmt"
	"net"
	"net/url"
	"strings"
	"sync"
	"time"

	"github.com/eclipse/paho.golang/packets"

	"github.com/gwota/gwota/netagent/webproxy"
)

// DefaultMaxIncomingPacket is the Maximum Packet Size ota-net announces in CONNECT and
// enforces on every packet it receives. The largest packet the agent needs is a stream data
// message of a 128 KiB block in JSON: 4/3 x 131072 = 174764 bytes of base64 plus under 1 KiB
// of JSON keys, topic (thing and stream names up to 128 each) and properties. Job documents
// (32 KB at most) with their execution envelope and statusDetails stay far below. 256 KiB
// leaves half again as much for properties a broker adds, and bounds what a hostile broker
// can make the client allocate: paho sizes its buffer from the declared remaining length
// before reading the body, up to 256 MiB.
const DefaultMaxIncomingPacket = 256 << 10

// ErrPacketTooLarge: the broker sent (announced, in a fixed header) a packet over the
// Maximum Packet Size the client declared; the connection is dropped before its body is read.
var ErrPacketTooLarge = errors.New("mqtt: broker sent a packet over the maximum packet size")

// limitConn reads the MQTT framing of what the broker sends and refuses a packet whose fixed
// header declares more than max bytes, before paho reads (and allocates for) its body. It
// never reads ahead of the packet it is in: a fixed header is read one byte at a time (paho
// reads it so too) and a body no further than its end.
type limitConn struct {
	net.Conn
	max    int
	onOver func(declared int)

	// Owned by the (single) reading goroutine.
	state     int // 0: type byte next, 1: in the remaining length, 2: in the body
	headerLen int // bytes of the fixed header so far
	length    int // remaining length (being decoded in state 1)
	shift     uint
	left      int // body bytes left in state 2
	err       error

	wmu sync.Mutex // serialises writes (paho asks for a sync.Locker on its conn)
}

// Lock and Unlock make the conn thread safe for paho's writers.
func (c *limitConn) Lock()   { c.wmu.Lock() }
func (c *limitConn) Unlock() { c.wmu.Unlock() }

func (c *limitConn) Read(p []byte) (int, error) {
	if c.err != nil {
		return 0, c.err
	}
	if len(p) == 0 {
		return 0, nil
	}
	switch c.state {
	case 0, 1:
		p = p[:1]
	case 2:
		p = p[:min(len(p), c.left)]
	}
	n, err := c.Conn.Read(p)
	if n == 0 {
		return n, err
	}
	switch c.state {
	case 0:
		c.state, c.headerLen, c.length, c.shift = 1, 1, 0, 0
	case 1:
		b := p[0]
		c.headerLen++
		c.length |= int(b&0x7f) << c.shift
		c.shift += 7
		// A partial length is a lower bound (later digits only add): refuse as soon as the
		// packet is certain to be too large.
		if total := c.headerLen + c.length; total > c.max {
			return 0, c.refuse(total)
		}
		if b&0x80 != 0 {
			if c.headerLen == 5 { // four length digits at most (MQTT 5 section 1.5.5)
				return 0, c.refuse(-1)
			}
			return n, err
		}
		if c.length == 0 {
			c.state = 0
		} else {
			c.state, c.left = 2, c.length
		}
	case 2:
		c.left -= n
		if c.left == 0 {
			c.state = 0
		}
	}
	return n, err
}

// refuse ends the connection: DISCONNECT with reason 0x95 (Packet too large, MQTT 5 section
// 3.1.2.11.4; 0x81 for a malformed length) if the write side is free, then close. Nothing of
// the body is read. declared < 0: the length itself is malformed.
func (c *limitConn) refuse(declared int) error {
	c.err = fmt.Errorf("%w: at least %d bytes, limit %d", ErrPacketTooLarge, declared, c.max)
	code := byte(packets.DisconnectPacketTooLarge)
	if declared < 0 {
		c.err = fmt.Errorf("%w: malformed remaining length", ErrPacketTooLarge)
		code = packets.DisconnectMalformedPacket
	}
	if c.onOver != nil {
		c.onOver(declared)
	}
	if c.wmu.TryLock() {
		_ = c.Conn.SetWriteDeadline(time.Now().Add(time.Second))
		_, _ = c.Conn.Write([]byte{packets.DISCONNECT << 4, 1, code})
		c.wmu.Unlock()
	}
	_ = c.Conn.Close()
	return c.err
}

// dialLimited opens the network connection for autopaho: TCP, directly or through the web
// proxy's CONNECT tunnel, then TLS by the URL's scheme, wrapped in a limitConn.
func dialLimited(ctx context.Context, u *url.URL, tlsCfg *tls.Config, px *webproxy.Proxy, timeout time.Duration, max int, onOver func(int)) (net.Conn, error) {
	dctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	host := u.Host
	if u.Port() == "" {
		host = net.JoinHostPort(u.Hostname(), defaultPort(u.Scheme))
	}
	conn, err := px.DialContext(dctx, "tcp", host)
	if err != nil {
		return nil, err
	}
	switch strings.ToLower(u.Scheme) {
	case "mqtts", "ssl", "tls":
		tc := tls.Client(conn, tlsCfg)
		if err := tc.HandshakeContext(dctx); err != nil {
			conn.Close()
			return nil, err
		}
		conn = tc
	}
	return &limitConn{Conn: conn, max: max, onOver: onOver}, nil
}

func defaultPort(scheme string) string {
	switch strings.ToLower(scheme) {
	case "mqtts", "ssl", "tls":
		return "8883"
	}
	return "1883"
}
