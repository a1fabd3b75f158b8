package emulator

import (
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"runtime"
	"sync"
	"testing"
	"time"

	"github.com/gwota/gwota/test/backend"
)

// peakHeap samples HeapInuse while f runs and returns the growth over the starting value.
func peakHeap(t *testing.T, f func()) uint64 {
	t.Helper()
	runtime.GC()
	var ms runtime.MemStats
	runtime.ReadMemStats(&ms)
	base := ms.HeapInuse
	var mu sync.Mutex
	peak := base
	stop := make(chan struct{})
	done := make(chan struct{})
	go func() {
		defer close(done)
		tick := time.NewTicker(2 * time.Millisecond)
		defer tick.Stop()
		for {
			var m runtime.MemStats
			runtime.ReadMemStats(&m)
			mu.Lock()
			if m.HeapInuse > peak {
				peak = m.HeapInuse
			}
			mu.Unlock()
			select {
			case <-stop:
				return
			case <-tick.C:
			}
		}
	}()
	f()
	close(stop)
	<-done
	return peak - base
}

// A 256 MiB image is served over HTTP and over streams without being loaded into memory.
func TestServingLargeFileKeepsHeapFlat(t *testing.T) {
	if testing.Short() {
		t.Skip("moves 512 MiB")
	}
	const size = 256 << 20
	path := filepath.Join(t.TempDir(), "big.img")
	f, err := os.Create(path)
	if err != nil {
		t.Fatal(err)
	}
	// Sparse, so the test does not write 256 MiB to disk; a few real bytes at the ends.
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
	f.WriteAt([]byte("head"), 0)
	f.WriteAt([]byte("tail"), size-4)
	f.Close()

	e := startEmulator(t, Options{})
	var growthCreate uint64
	growthCreate = peakHeap(t, func() {
		err = e.CreateJob(context.Background(), backend.JobSpec{JobID: "big", Protocols: []string{backend.ProtocolMQTT, backend.ProtocolHTTP},
			Files: []backend.FileSpec{{LocalPath: path, Signature: []byte("s")}}})
	})
	if err != nil {
		t.Fatal(err)
	}
	doc, _ := e.JobDocument("big")
	url := docURL(t, doc)

	var n int64
	growthHTTP := peakHeap(t, func() {
		resp, err := http.Get(url)
		if err != nil {
			t.Error(err)
			return
		}
		defer resp.Body.Close()
		n, _ = io.Copy(io.Discard, resp.Body)
	})
	if n != size {
		t.Fatalf("HTTP delivered %d bytes", n)
	}

	d := connectDevice(t, e.BrokerURL(), "gw-01")
	prefix := thingPrefix + "streams/" + e.StreamName("big") + "/"
	const bs = 128 * 1024
	var got int64
	growthMQTT := peakHeap(t, func() {
		const burst = 8
		stride := int64(burst)
		if raceEnabled {
			stride = 4 * burst // a quarter of the file, spread over all of it
		}
		for o := int64(0); o < size/bs; o += stride {
			// Eight requests in flight, each asking for 8 blocks of 128 KiB: the 128 KB cap
			// sends only the first of each.
			for k := int64(0); k < burst; k++ {
				l, cnt, off := int64(bs), int64(8), o+k
				d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: new(int64), BlockSize: &l, Offset: &off, NumBlocks: &cnt}))
			}
			for k := 0; k < burst; k++ {
				blk, err := DecodeDataBlock(FormatCBOR, d.next(prefix+"data/cbor").Payload)
				if err != nil {
					t.Fatal(err)
				}
				if blk.BlockID < o || blk.BlockID >= o+burst {
					t.Fatalf("block %d outside %d..%d", blk.BlockID, o, o+burst-1)
				}
				got += int64(len(blk.Payload))
			}
		}
	})
	if want := int64(size); raceEnabled && got != want/4 || !raceEnabled && got != want {
		t.Fatalf("streams delivered %d bytes", got)
	}
	t.Logf("heap growth: create+sign %d KiB, HTTP 256 MiB %d KiB, streams %d MiB %d KiB",
		growthCreate>>10, growthHTTP>>10, got>>20, growthMQTT>>10)
	const limit = 32 << 20
	// Control: the meter does see a whole-file read, so a pass above means something.
	var whole []byte
	growthControl := peakHeap(t, func() { whole, _ = os.ReadFile(path) })
	if len(whole) != size || growthControl < size {
		t.Fatalf("control: reading the file whole grew the heap by only %d MiB", growthControl>>20)
	}
	t.Logf("control: os.ReadFile of the same file grew the heap by %d MiB", growthControl>>20)
	for name, g := range map[string]uint64{"create": growthCreate, "http": growthHTTP, "streams": growthMQTT} {
		if g > limit {
			t.Errorf("%s: heap grew by %d MiB serving a 256 MiB file", name, g>>20)
		}
	}
}
