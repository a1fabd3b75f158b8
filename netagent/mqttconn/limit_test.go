package mqttconn_test

import (
	"bytes"
	"context"
	"errors"
	"io"
	"net"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/eclipse/paho.golang/packets"
	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/netagent/mqttconn"
)

// rawBroker is a hand-played MQTT 5 "broker" on a TCP socket: it answers CONNECT and
// SUBSCRIBE as a broker would, then sends whatever bytes a test wants, as a hostile broker
// could.
type rawBroker struct {
	t       *testing.T
	ln      net.Listener
	conns   chan net.Conn
	connect chan *packets.Connect
}

func startRawBroker(t *testing.T) *rawBroker {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	b := &rawBroker{t: t, ln: ln, conns: make(chan net.Conn, 16), connect: make(chan *packets.Connect, 16)}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			b.conns <- c
		}
	}()
	return b
}

func (b *rawBroker) URL() string { return "mqtt://" + b.ln.Addr().String() }

// vbi encodes an MQTT variable byte integer.
func vbi(n int) []byte {
	var out []byte
	for {
		d := byte(n % 128)
		n /= 128
		if n > 0 {
			d |= 0x80
		}
		out = append(out, d)
		if n == 0 {
			return out
		}
	}
}

// publishPacket is a QoS 0 PUBLISH of exactly size bytes on topic.
func publishPacket(topic string, size int) []byte {
	// remaining = 2+len(topic) + 1 (no properties) + payload
	for payload := 0; ; payload++ {
		rem := 2 + len(topic) + 1 + payload
		if 1+len(vbi(rem))+rem < size {
			continue
		}
		p := append([]byte{packets.PUBLISH << 4}, vbi(rem)...)
		p = append(p, byte(len(topic)>>8), byte(len(topic)))
		p = append(p, topic...)
		p = append(p, 0)
		return append(p, bytes.Repeat([]byte{'x'}, payload)...)
	}
}

// accept takes the client's connection and plays the broker until the session is up: CONNACK,
// then a SUBACK for every SUBSCRIBE until the client has subscribed subs filters. Later
// packets from the client go to the returned channel; it is closed when the client closes.
func (b *rawBroker) accept(ctx context.Context, subs int) (net.Conn, <-chan *packets.ControlPacket) {
	b.t.Helper()
	var c net.Conn
	select {
	case c = <-b.conns:
	case <-ctx.Done():
		b.t.Fatal("the client did not connect")
	}
	in := make(chan *packets.ControlPacket, 16)
	want := subs
	go func() {
		defer close(in)
		for {
			p, err := packets.ReadPacket(c)
			if err != nil {
				return
			}
			switch x := p.Content.(type) {
			case *packets.Connect:
				b.connect <- x
				_, _ = c.Write([]byte{packets.CONNACK << 4, 3, 0, 0, 0})
			case *packets.Subscribe:
				ack := []byte{byte(x.PacketID >> 8), byte(x.PacketID), 0}
				for range x.Subscriptions {
					ack = append(ack, 0)
				}
				_, _ = c.Write(append(append([]byte{packets.SUBACK << 4}, vbi(len(ack))...), ack...))
				want -= len(x.Subscriptions)
				if want == 0 {
					in <- p
				}
			default:
				in <- p
			}
		}
	}()
	if subs > 0 {
		select {
		case <-in:
		case <-ctx.Done():
			b.t.Fatal("the client did not subscribe")
		}
	}
	return c, in
}

func dialRaw(t *testing.T, b *rawBroker, mod func(*mqttconn.Config)) *mqttconn.Conn {
	t.Helper()
	cfg := mqttconn.Config{BrokerURL: b.URL(), ClientID: "gw-raw", BackoffMin: time.Hour, BackoffMax: 2 * time.Hour,
		Logger: hclog.New(&hclog.LoggerOptions{Name: "raw", Level: hclog.Debug, Output: testWriter{t}})}
	if mod != nil {
		mod(&cfg)
	}
	c, err := mqttconn.Dial(context.Background(), cfg)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	return c
}

// The client announces its Maximum Packet Size in CONNECT.
func TestConnectAnnouncesMaximumPacketSize(t *testing.T) {
	ctx := ctxT(t)
	for _, tt := range []struct {
		set, want int
	}{{0, mqttconn.DefaultMaxIncomingPacket}, {4096, 4096}} {
		b := startRawBroker(t)
		dialRaw(t, b, func(c *mqttconn.Config) { c.MaxIncomingPacket = tt.set })
		b.accept(ctx, 0)
		select {
		case cp := <-b.connect:
			if cp.Properties == nil || cp.Properties.MaximumPacketSize == nil || int(*cp.Properties.MaximumPacketSize) != tt.want {
				t.Errorf("MaxIncomingPacket %d: CONNECT properties %+v, want MaximumPacketSize %d", tt.set, cp.Properties, tt.want)
			}
		case <-ctx.Done():
			t.Fatal("no CONNECT")
		}
	}
}

// A packet of exactly the limit is delivered; one byte more drops the connection with
// DISCONNECT 0x95 before the body is read.
func TestIncomingPacketLimitBoundary(t *testing.T) {
	const limit = 4096
	ctx := ctxT(t)
	b := startRawBroker(t)
	got := newCollector()
	dialRaw(t, b, func(c *mqttconn.Config) {
		c.MaxIncomingPacket = limit
		c.Subscriptions = []mqttconn.Subscription{{Filter: "t/x", Handler: got.handle}}
	})
	conn, in := b.accept(ctx, 1)
	if _, err := conn.Write(publishPacket("t/x", limit)); err != nil {
		t.Fatal(err)
	}
	if m := got.next(t); len(m.payload) != limit-1-2-2-3-1 {
		t.Fatalf("payload of %d bytes delivered", len(m.payload))
	}
	over := publishPacket("t/x", limit+1)
	// Header and topic only: the body never comes.
	if _, err := conn.Write(over[:8]); err != nil {
		t.Fatal(err)
	}
	expectRefused(t, ctx, in)
	got.none(t, 100*time.Millisecond)
}

// expectRefused waits for the client's DISCONNECT 0x95 and the end of the connection.
func expectRefused(t *testing.T, ctx context.Context, in <-chan *packets.ControlPacket) {
	t.Helper()
	sawDisconnect := false
	for {
		select {
		case p, ok := <-in:
			if !ok {
				if !sawDisconnect {
					t.Error("connection closed without DISCONNECT 0x95")
				}
				return
			}
			if d, isD := p.Content.(*packets.Disconnect); isD {
				if d.ReasonCode != packets.DisconnectPacketTooLarge {
					t.Errorf("DISCONNECT reason 0x%02x, want 0x95", d.ReasonCode)
				}
				sawDisconnect = true
			}
		case <-ctx.Done():
			t.Fatal("the client kept the connection open after an oversized packet header")
		}
	}
}

// A hostile broker declares a 200 MiB PUBLISH: the client must drop the connection without
// allocating the declared size (paho would size its buffer from the header and wait for the
// body).
func TestOversizedPacketRefusedWithoutAllocation(t *testing.T) {
	const declared = 200 << 20
	ctx := ctxT(t)
	b := startRawBroker(t)
	dialRaw(t, b, nil)
	conn, in := b.accept(ctx, 0)
	var before, after runtime.MemStats
	runtime.ReadMemStats(&before)
	hdr := append([]byte{packets.PUBLISH << 4}, vbi(declared)...)
	hdr = append(hdr, 0, 3, 't', '/', 'x')
	if _, err := conn.Write(hdr); err != nil {
		t.Fatal(err)
	}
	expectRefused(t, ctx, in)
	runtime.ReadMemStats(&after)
	grew := after.TotalAlloc - before.TotalAlloc
	if grew > declared/8 {
		t.Errorf("the process allocated %d bytes after a %d-byte packet header", grew, declared)
	}
	t.Logf("allocated %d bytes between the %d-byte header and the refusal", grew, declared)
	// The body is never asked for: the socket is closed on the client's side.
	_ = conn.SetReadDeadline(time.Now().Add(5 * time.Second))
	if _, err := conn.Read(make([]byte, 1)); !errors.Is(err, io.EOF) && (err == nil || !strings.Contains(err.Error(), "reset")) {
		t.Errorf("read after the refusal: %v, want EOF", err)
	}
}
