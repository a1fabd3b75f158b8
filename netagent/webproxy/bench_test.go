package webproxy_test

import (
	"encoding/binary"
	"io"
	"net"
	"testing"

	"github.com/gwota/gwota/netagent/webproxy"
	"github.com/gwota/gwota/test/harness"
)

// BenchmarkTunnel compares a bulk transfer from a loopback server read directly with the
// same transfer through tinyproxy's CONNECT tunnel, and through tinyproxy behind a TLS front
// (an https:// proxy). Figures, not pass/fail:
//
//	go test -run '^$' -bench Tunnel -benchtime 20x ./netagent/webproxy
func BenchmarkTunnel(b *testing.B) {
	if _, err := harness.FindTinyproxy(); err != nil {
		b.Skip(err)
	}
	const size = 32 << 20
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		b.Fatal(err)
	}
	defer ln.Close()
	go func() {
		buf := make([]byte, 64<<10)
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				var n [8]byte
				if _, err := io.ReadFull(c, n[:]); err != nil {
					return
				}
				for left := int(binary.BigEndian.Uint64(n[:])); left > 0; {
					w, err := c.Write(buf[:min(left, len(buf))])
					if err != nil {
						return
					}
					left -= w
				}
			}()
		}
	}()
	ctx := b.Context()
	plain, err := harness.StartWebProxy(ctx, b.TempDir(), harness.WebProxyOptions{})
	if err != nil {
		b.Fatal(err)
	}
	defer plain.Stop()
	tlsPx, err := harness.StartWebProxy(ctx, b.TempDir(), harness.WebProxyOptions{TLS: true})
	if err != nil {
		b.Fatal(err)
	}
	defer tlsPx.Stop()
	for _, bc := range []struct {
		name string
		s    *webproxy.Settings
	}{
		{"direct", nil},
		{"tinyproxy", &webproxy.Settings{URL: plain.URL()}},
		{"tinyproxy-tls", &webproxy.Settings{URL: tlsPx.URL(), CAFile: tlsPx.CAFile}},
	} {
		b.Run(bc.name, func(b *testing.B) {
			var p *webproxy.Proxy
			if bc.s != nil {
				if p, err = webproxy.Resolve(*bc.s, func(string) string { return "" }); err != nil {
					b.Fatal(err)
				}
			}
			b.SetBytes(size)
			buf := make([]byte, 64<<10)
			for b.Loop() {
				c, err := p.DialContext(ctx, "tcp", ln.Addr().String())
				if err != nil {
					b.Fatal(err)
				}
				var n [8]byte
				binary.BigEndian.PutUint64(n[:], size)
				if _, err := c.Write(n[:]); err != nil {
					b.Fatal(err)
				}
				got, err := io.CopyBuffer(io.Discard, io.LimitReader(c, size), buf)
				if err != nil || got != size {
					b.Fatalf("%d bytes: %v", got, err)
				}
				c.Close()
			}
		})
	}
}
