package api

import (
	"slices"
	"sync"

	"google.golang.org/grpc/mem"
)

// NewBufferPool is the message buffer pool of both sides of the socket, tiered by
// BufferTiers. Unlike grpc's tiered pool it does not clear a buffer it hands out again:
// grpc clears a reused buffer's whole capacity on every Get, which for block messages cost
// the writer a tenth of its CPU (a 132 KiB memclr per 128 KiB message), and every user
// here overwrites what it reads (grpc fills a receive buffer with io.ReadFull or CopyTo up
// to the length it asked for; the block codec marshals into it from the start).
func NewBufferPool() mem.BufferPool {
	p := &tieredPool{sizes: BufferTiers()}
	p.pools = make([]sync.Pool, len(p.sizes))
	return p
}

type tieredPool struct {
	sizes []int // ascending
	pools []sync.Pool
}

func (p *tieredPool) Get(n int) *[]byte {
	i, _ := slices.BinarySearch(p.sizes, n)
	if i == len(p.sizes) {
		b := make([]byte, n)
		return &b
	}
	if b, ok := p.pools[i].Get().(*[]byte); ok {
		*b = (*b)[:n]
		return b
	}
	b := make([]byte, n, p.sizes[i])
	return &b
}

func (p *tieredPool) Put(b *[]byte) {
	c := cap(*b)
	i, ok := slices.BinarySearch(p.sizes, c)
	if !ok {
		return // not one of ours (larger than the largest tier): left to the GC
	}
	*b = (*b)[:0]
	p.pools[i].Put(b)
}
