package engine

import (
	"crypto/rand"
	"fmt"
	"os"
	"path/filepath"
	"testing"

	"golang.org/x/sys/unix"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/config"
)

const (
	benchImage = 64 << 20
	batchBytes = 128 << 10 // one Write call carries this much, like one gRPC message
)

// benchWrite measures Write throughput through the engine: validation, idempotency bitmap,
// pwrite, and the configured durability policy (fdatasync + journal).
func benchWrite(b *testing.B, bs int, syncBytes int64) {
	r := newRig(b, func(c *config.Config) {
		c.Targets[0].MaxSize = 0
		if syncBytes > 0 {
			c.SyncBytes = syncBytes
		}
	})
	data := make([]byte, benchImage)
	rand.Read(data)
	sig := newImage(b, 1000).sig // Begin checks the shape only; the image is never finished
	img := image{data: data, sig: sig}
	per := batchBytes / bs
	total := benchImage / bs
	var id string
	next := total
	start := func(n int) {
		if id != "" {
			r.e.Abort(ctx, id, 0)
		}
		s, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.BlockSize = uint32(bs); q.JobId = fmt.Sprintf("bench-%d", n) })
		if err != nil {
			b.Fatal(err)
		}
		id, next = s.Session.SessionId, 0
	}
	batches := make([][]*otav1.Block, 0, total/per)
	for k := 0; k < total; k += per {
		batches = append(batches, blocks(data, bs, k, k+per))
	}
	b.SetBytes(batchBytes)
	b.ReportAllocs()
	b.ResetTimer()
	n := 0
	for b.Loop() {
		if next >= len(batches) {
			b.StopTimer()
			n++
			start(n)
			b.StartTimer()
		}
		if _, err := r.e.Write(ctx, id, batches[next], false); err != nil {
			b.Fatal(err)
		}
		next++
	}
}

// baseline: the same bytes with plain pwrite and an fdatasync every syncBytes, no engine.
func benchBaseline(b *testing.B, bs int, syncBytes int64) {
	p := filepath.Join(b.TempDir(), "raw.img")
	f, err := os.OpenFile(p, os.O_RDWR|os.O_CREATE, 0o600)
	if err != nil {
		b.Fatal(err)
	}
	defer f.Close()
	f.Truncate(benchImage)
	data := make([]byte, benchImage)
	rand.Read(data)
	b.SetBytes(batchBytes)
	var off, pending int64
	for b.Loop() {
		for i := 0; i < batchBytes/bs; i++ {
			if _, err := f.WriteAt(data[off:off+int64(bs)], off); err != nil {
				b.Fatal(err)
			}
			off = (off + int64(bs)) % benchImage
			pending += int64(bs)
		}
		if pending >= syncBytes {
			unix.Fdatasync(int(f.Fd()))
			pending = 0
		}
	}
}

func BenchmarkWrite(b *testing.B) {
	for _, bs := range []int{4 << 10, 64 << 10} {
		b.Run(fmt.Sprintf("engine/%dKiB", bs>>10), func(b *testing.B) { benchWrite(b, bs, 0) })
		b.Run(fmt.Sprintf("baseline/%dKiB", bs>>10), func(b *testing.B) { benchBaseline(b, bs, config.DefaultSyncBytes) })
	}
}

// BenchmarkSyncPolicy sweeps sync_bytes to choose the default: the cost of durability
// against how much a crash can lose.
func BenchmarkSyncPolicy(b *testing.B) {
	for _, sb := range []int64{256 << 10, 1 << 20, 4 << 20, 8 << 20, 32 << 20} {
		b.Run(fmt.Sprintf("sync_bytes=%dKiB", sb>>10), func(b *testing.B) { benchWrite(b, 64<<10, sb) })
	}
}

// BenchmarkFinish: read-back verification of a 64 MiB image through the engine.
func BenchmarkFinish(b *testing.B) {
	r := newRig(b, func(c *config.Config) { c.Targets[0].MaxSize = 0 })
	data := make([]byte, benchImage)
	rand.Read(data)
	p := filepath.Join(b.TempDir(), "img")
	os.WriteFile(p, data, 0o600)
	img := image{path: p, data: data, sig: signFile(b, p)}
	b.SetBytes(benchImage)
	n := 0
	for b.Loop() {
		b.StopTimer()
		n++
		s, err := r.begin(img, 0, func(q *otav1.BeginSessionRequest) { q.BlockSize = 65536; q.JobId = fmt.Sprintf("fin-%d", n) })
		if err != nil {
			b.Fatal(err)
		}
		for k := 0; k < benchImage/65536; k += 2 {
			if _, err := r.e.Write(ctx, s.Session.SessionId, blocks(data, 65536, k, k+2), false); err != nil {
				b.Fatal(err)
			}
		}
		b.StartTimer()
		if _, err := r.e.Finish(ctx, s.Session.SessionId); err != nil {
			b.Fatal(err)
		}
		b.StopTimer()
		r.e.Abort(ctx, s.Session.SessionId, 0)
		b.StartTimer()
	}
}
