package server_test

import (
	"fmt"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/server"
	"github.com/gwota/gwota/writer/writertest"
)

// BenchmarkBlockPath compares the two block paths of the contract over a real Unix socket:
// the WriteBlocks stream and the WriteBatch unary call, one block per message and batched to
// 128 KiB per message. The fake writer discards blocks, so this is the transport's figure only
// (the engine's own benchmarks add the medium). One op = one block.
//
//	go test -run '^$' -bench BlockPath -benchtime 2s ./writer/server/
func BenchmarkBlockPath(b *testing.B) {
	const maxBlock = 128 << 10
	for _, bs := range []int{4 << 10, 64 << 10} {
		for _, per := range []int{1, maxBlock / bs} {
			for _, mode := range []string{"stream", "unary"} {
				b.Run(fmt.Sprintf("%s/block=%dKiB/per_msg=%d", mode, bs>>10, per), func(b *testing.B) {
					core := writertest.NewFake(maxBlock)
					core.Discard = true
					benchBlockPath(b, core, mode, bs, per)
				})
			}
		}
	}
}

var fakeSig = append([]byte{0x30, 0x44, 0x02, 0x20}, append(make([]byte, 32), append([]byte{0x02, 0x20}, make([]byte, 32)...)...)...)

func benchBlockPath(b *testing.B, core api.Writer, mode string, bs, per int) {
	r := start(b, core, server.Options{}, server.ListenConfig{})
	c := dial(b, r.Sock)
	ctx := b.Context()
	const fileSize = 256 << 20
	begin, err := c.Begin(ctx, &otav1.BeginSessionRequest{JobId: "bench", FilePath: writertest.Target, FileSize: fileSize, BlockSize: uint32(bs),
		// Only checked at Finish, which the benchmark never reaches; a DER-shaped value.
		SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: fakeSig, CertName: certName})
	if err != nil {
		b.Fatal(err)
	}
	id := begin.GetSession().GetSessionId()
	total := fileSize / bs
	data := randBytes(b, bs)
	msg := func(i int) []*otav1.Block {
		blocks := make([]*otav1.Block, per)
		for k := range blocks {
			blocks[k] = &otav1.Block{Offset: uint64(((i + k) % total) * bs), Data: data}
		}
		return blocks
	}
	// Ask for durability every 8 MiB, like the engine's default sync policy.
	syncEvery := max(1, (8<<20)/(bs*per))
	b.SetBytes(int64(bs))
	b.ResetTimer()
	switch mode {
	case "stream":
		st, err := c.OpenBlockStream(ctx, id)
		if err != nil {
			b.Fatal(err)
		}
		go func() {
			for range st.Acks() {
			}
		}()
		n := 0
		for i := 0; i < b.N; i += per {
			n++
			if _, err := st.Send(msg(i), n%syncEvery == 0); err != nil {
				b.Fatal(err)
			}
		}
		// The last message syncs, so the timing includes the writer having taken everything.
		if _, err := st.Send(nil, true); err != nil {
			b.Fatal(err)
		}
		st.CloseSend()
		if err := st.Wait(); err != nil {
			b.Fatal(err)
		}
	case "unary":
		n := 0
		for i := 0; i < b.N; i += per {
			n++
			if _, err := c.WriteBatch(ctx, id, uint64(n), msg(i), n%syncEvery == 0); err != nil {
				b.Fatal(err)
			}
		}
	}
}
