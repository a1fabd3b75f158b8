package main

import (
	"context"
	"io"
	"net"
	"sync"
	"time"
)

// delayProxy forwards TCP connections to target, holding every chunk back by delay in each
// direction (a link with 2*delay round trip; kernel netem is not available here).
type delayProxy struct {
	ln     net.Listener
	target string
	delay  time.Duration
	wg     sync.WaitGroup
}

func startDelayProxy(target string, delay time.Duration) (*delayProxy, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return nil, err
	}
	p := &delayProxy{ln: ln, target: target, delay: delay}
	p.wg.Add(1)
	go func() {
		defer p.wg.Done()
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			p.wg.Add(1)
			go func() {
				defer p.wg.Done()
				p.serve(c)
			}()
		}
	}()
	return p, nil
}

func (p *delayProxy) addr() string { return p.ln.Addr().String() }

func (p *delayProxy) close() {
	p.ln.Close()
	p.wg.Wait()
}

func (p *delayProxy) serve(c net.Conn) {
	defer c.Close()
	u, err := net.Dial("tcp", p.target)
	if err != nil {
		return
	}
	defer u.Close()
	ctx, cancel := context.WithCancel(context.Background())
	defer cancel()
	var wg sync.WaitGroup
	wg.Add(2)
	go func() { defer wg.Done(); p.pipe(ctx, cancel, u, c) }()
	go func() { defer wg.Done(); p.pipe(ctx, cancel, c, u) }()
	<-ctx.Done()
	c.Close()
	u.Close()
	wg.Wait()
}

type chunk struct {
	due  time.Time
	data []byte
}

func (p *delayProxy) pipe(ctx context.Context, cancel context.CancelFunc, dst io.Writer, src io.Reader) {
	q := make(chan chunk, 4096)
	go func() {
		defer close(q)
		for {
			buf := make([]byte, 64<<10)
			n, err := src.Read(buf)
			if n > 0 {
				select {
				case q <- chunk{time.Now().Add(p.delay), buf[:n]}:
				case <-ctx.Done():
					return
				}
			}
			if err != nil {
				cancel()
				return
			}
		}
	}()
	for ch := range q {
		if d := time.Until(ch.due); d > 0 {
			time.Sleep(d) // the link's propagation delay, by design
		}
		if _, err := dst.Write(ch.data); err != nil {
			cancel()
			return
		}
	}
}
