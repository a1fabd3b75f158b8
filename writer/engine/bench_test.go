package engine

import (
	"bytes"
	"crypto/rand"
	"fmt"
	rand2 "math/rand/v2"
	"os"
	"path/filepath"
	"runtime"
	"runtime/debug"
	"runtime/metrics"
	"strconv"
	"strings"
	"sync/atomic"
	"testing"
	"time"

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

// BenchmarkDeltaMemory installs a delta update of a GWOTA_DELTA_MB (default 256) MiB image
// through the engine: v2 is v1 with one block in 500 changed, 30 % of both zeros. It reports
// the peak Go heap and the peak RSS (VmHWM, reset after the manifest is built) of the
// manifest session, the local fill, the chunk writes and the read-back, which must stay flat
// in the image size, under ota-writer's soft heap limit of 12 MiB. Run: go test ./writer/engine -run '^$' -bench DeltaMemory -benchtime 1x
func BenchmarkDeltaMemory(b *testing.B) {
	mb := 256
	if v, err := strconv.Atoi(os.Getenv("GWOTA_DELTA_MB")); err == nil && v > 0 {
		mb = v
	}
	size := mb << 20
	blocks := size / dbs
	rng := rand2.NewChaCha8([32]byte{1})
	v1 := make([]byte, size)
	rng.Read(v1)
	for k := 0; k < blocks; k += 10 {
		clear(v1[k*dbs : min(k+3, blocks)*dbs])
	}
	v2 := bytes.Clone(v1)
	for k := 7; k < blocks; k += 500 {
		rng.Read(v2[k*dbs : (k+1)*dbs])
	}
	r, _, _ := deltaRig(b, nil, func(c *config.Config) { c.Targets[0].MaxSize = 0 })
	for i, p := range r.slots {
		data := bytes.Repeat([]byte{0xEE}, size)
		if i == 0 {
			data = v1
		}
		if err := os.WriteFile(p, data, 0o600); err != nil {
			b.Fatal(err)
		}
	}
	d := makeDelta(b, v2, nil)
	// The chunks are read from a file as they are sent, so the test holds no image-sized
	// buffer while it measures.
	chunkFile := filepath.Join(b.TempDir(), "chunks")
	if err := os.WriteFile(chunkFile, d.chunks, 0o600); err != nil {
		b.Fatal(err)
	}
	cf, err := os.Open(chunkFile)
	if err != nil {
		b.Fatal(err)
	}
	defer cf.Close()
	mfLen, chunkLen, creq := len(d.mf), len(d.chunks), d.chunksReq("job-mem")
	v1, v2, d.img, d.chunks = nil, nil, nil, nil
	// The soft heap limit ota-writer's main sets (cmd/ota-writer memoryLimit).
	defer debug.SetMemoryLimit(debug.SetMemoryLimit(12 << 20))
	runtime.GC()
	debug.FreeOSMemory()
	if err := os.WriteFile("/proc/self/clear_refs", []byte("5"), 0); err != nil {
		b.Fatal(err)
	}
	base := procStatusKiB(b, "VmRSS:")
	var peak atomic.Uint64
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		s := []metrics.Sample{{Name: "/memory/classes/heap/objects:bytes"}}
		base := uint64(0)
		for i := 0; ; i++ {
			metrics.Read(s)
			v := s[0].Value.Uint64()
			if i == 0 {
				base = v
			}
			if v > base && v-base > peak.Load() {
				peak.Store(v - base)
			}
			select {
			case <-stop:
				return
			case <-time.After(time.Millisecond):
			}
		}
	}()
	start := time.Now()
	if _, err := installManifest(b, r.e, d, "job-mem"); err != nil {
		b.Fatal(err)
	}
	res, err := r.e.Begin(ctx, creq)
	if err != nil {
		b.Fatal(err)
	}
	fill := time.Since(start)
	missing := missingChunks(res.GetSession())
	for _, k := range missing {
		c := d.m.Chunk(k)
		data := make([]byte, c.Size)
		if _, err := cf.ReadAt(data, int64(c.Offset)); err != nil {
			b.Fatal(err)
		}
		if _, err := r.e.Write(ctx, res.GetSession().GetSessionId(), []*otav1.Block{{Offset: c.Offset, Data: data}}, false); err != nil {
			b.Fatal(err)
		}
	}
	if _, err := r.e.Finish(ctx, res.GetSession().GetSessionId()); err != nil {
		b.Fatal(err)
	}
	close(stop)
	<-done
	hwm := procStatusKiB(b, "VmHWM:")
	dl := res.GetSession().GetDelta()
	b.ReportMetric(float64(peak.Load())/(1<<20), "peak-heap-MiB")
	b.ReportMetric(float64(hwm)/1024, "peak-rss-MiB")
	b.ReportMetric(float64(hwm-base)/1024, "rss-growth-MiB")
	b.Logf("%d MiB image: manifest %d B, chunk file %d B, %d of %d chunks (%d B) downloaded, %d reused + %d zero of %d blocks; manifest+fill %v, total %v; peak heap +%.1f MiB, peak RSS %.1f MiB, %.1f MiB over the test process before the update",
		mb, mfLen, chunkLen, len(missing), res.GetSession().GetTotalBlocks(), dl.GetDownloadBytes(), dl.GetReusedBlocks(), dl.GetZeroBlocks(), dl.GetImageBlocks(),
		fill.Round(time.Millisecond), time.Since(start).Round(time.Millisecond), float64(peak.Load())/(1<<20), float64(hwm)/1024, float64(hwm-base)/1024)
}

// procStatusKiB reads a "kB" field of /proc/self/status.
func procStatusKiB(b *testing.B, field string) int {
	st, err := os.ReadFile("/proc/self/status")
	if err != nil {
		b.Fatal(err)
	}
	for _, line := range strings.Split(string(st), "\n") {
		if f := strings.Fields(line); len(f) >= 2 && f[0] == field {
			n, _ := strconv.Atoi(f[1])
			return n
		}
	}
	b.Fatalf("no %s in /proc/self/status", field)
	return 0
}
