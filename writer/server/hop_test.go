package server_test

import (
	"context"
	"fmt"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/server"
	"github.com/gwota/gwota/writer/writertest"
)

// BenchmarkHop prices the gRPC hop: the same block stream through the same api.Writer
// method set, once to the engine linked in-process and once to writer/client over the Unix
// socket with that engine behind writer/server. Blocks land in a file-backed slot with the
// engine's sync policy in both. One op = one Write call of per blocks of bs bytes: ota-net's
// default request (2 blocks of 64 KiB) and the AWS C agent's (8 blocks of 4 KiB). A third
// mode, socket-stream, sends the same calls as WriteBlocks messages on one stream with the
// acks read meanwhile, the path ota-net's sink takes (netagent/writerlink).
// scripts/bench-link.sh reports socket/in-process from this.
//
//	go test -run '^$' -bench Hop -benchtime 64x ./writer/server/
func BenchmarkHop(b *testing.B) {
	const maxBlock = 128 << 10
	for _, shape := range []struct{ bs, per int }{{64 << 10, 2}, {4 << 10, 8}} {
		for _, mode := range []string{"inprocess", "socket", "socket-stream"} {
			b.Run(fmt.Sprintf("block=%dKiB/per_call=%d/%s", shape.bs>>10, shape.per, mode), func(b *testing.B) {
				e := newBenchEngine(b, maxBlock)
				var w api.Writer = e
				if mode != "inprocess" {
					r := start(b, e, server.Options{}, server.ListenConfig{})
					c := dial(b, r.Sock)
					w = c
					if mode == "socket-stream" {
						w = &streamWriter{Client: c}
					}
				}
				benchHop(b, w, shape.bs, shape.per)
			})
		}
	}
}

func benchHop(b *testing.B, w api.Writer, bs, per int) {
	ctx := b.Context()
	const fileSize = 64 << 20
	total := fileSize / bs
	data := randBytes(b, bs)
	var id string
	next, n := total, 0
	begin := func() {
		if id != "" {
			w.Abort(ctx, id, 0)
		}
		n++
		resp, err := w.Begin(ctx, &otav1.BeginSessionRequest{JobId: fmt.Sprintf("hop-%d", n), FilePath: writertest.Target, FileSize: fileSize, BlockSize: uint32(bs),
			// Only checked at Finish, which the benchmark never reaches; a DER-shaped value.
			SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: fakeSig, CertName: certName})
		if err != nil {
			b.Fatal(err)
		}
		id, next = resp.GetSession().GetSessionId(), 0
	}
	blocks := make([]*otav1.Block, per)
	b.SetBytes(int64(bs * per))
	b.ReportAllocs()
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		if next+per > total {
			b.StopTimer()
			begin()
			b.StartTimer()
		}
		for k := range blocks {
			blocks[k] = &otav1.Block{Offset: uint64((next + k) * bs), Data: data}
		}
		if _, err := w.Write(ctx, id, blocks, false); err != nil {
			b.Fatal(err)
		}
		next += per
	}
	if s, ok := w.(*streamWriter); ok {
		s.finish(b) // the last message syncs: the timing includes the writer having taken all
	}
	b.StopTimer()
}

// streamWriter is writer/client with Write on one WriteBlocks stream per session: it returns
// once the message is sent (acks are read meanwhile), as ota-net's sink does.
type streamWriter struct {
	*client.Client
	st   *client.BlockStream
	acks chan struct{}
	n    int
}

func (s *streamWriter) Write(ctx context.Context, sessionID string, blocks []*otav1.Block, sync bool) (api.WriteResult, error) {
	if s.st == nil {
		st, err := s.OpenBlockStream(ctx, sessionID)
		if err != nil {
			return api.WriteResult{}, err
		}
		s.st, s.acks = st, make(chan struct{})
		go func() {
			for range st.Acks() {
			}
			close(s.acks)
		}()
	}
	s.n++
	// Durability every 8 MiB of 128 KiB messages, like the engine's default sync policy.
	_, err := s.st.Send(blocks, s.n%64 == 0)
	return api.WriteResult{}, err
}

func (s *streamWriter) Abort(ctx context.Context, sessionID string, reason otav1.Reason) error {
	s.finish(nil)
	return s.Client.Abort(ctx, sessionID, reason)
}

func (s *streamWriter) finish(b *testing.B) {
	if s.st == nil {
		return
	}
	_, err := s.st.Send(nil, true)
	s.st.CloseSend()
	if werr := s.st.Wait(); err == nil {
		err = werr
	}
	<-s.acks
	s.st = nil
	if err != nil && b != nil {
		b.Fatal(err)
	}
}
