package emulator

import (
	"fmt"
	"io"
	"net/http"
	"testing"

	"github.com/gwota/gwota/test/backend"
)

// BenchmarkGetStream measures block delivery through the embedded broker to a raw paho client
// that asks for 128 KB per request (the AWS maximum), with one or four requests in flight.
func BenchmarkGetStream(b *testing.B) {
	for _, c := range []struct{ bs, inflight int64 }{{4096, 1}, {131072, 1}, {4096, 4}, {131072, 4}} {
		bs, inflight := c.bs, c.inflight
		b.Run(fmt.Sprintf("block=%d/inflight=%d", bs, inflight), func(b *testing.B) {
			e, err := Start(b.Context(), Options{})
			if err != nil {
				b.Fatal(err)
			}
			defer e.Close()
			path, _ := writeTestFile(b, 4<<20)
			if err := e.CreateJob(b.Context(), backend.JobSpec{JobID: "bench", Files: []backend.FileSpec{{LocalPath: path}}}); err != nil {
				b.Fatal(err)
			}
			d := connectDevice(b, e.BrokerURL(), "gw-01")
			prefix := thingPrefix + "streams/" + e.StreamName("bench") + "/"
			per := 131072 / bs
			nblocks := (int64(4<<20) + bs - 1) / bs
			b.SetBytes(131072 * inflight)
			b.ResetTimer()
			for i := 0; i < b.N; i++ {
				for r := int64(0); r < inflight; r++ {
					o := ((int64(i)*inflight + r) * per) % nblocks
					n := per
					d.publish(prefix+"get/cbor", cborReq(b, GetStreamRequest{FileID: new(int64), BlockSize: &bs, Offset: &o, NumBlocks: &n}))
				}
				for k := int64(0); k < per*inflight; k++ {
					d.next(prefix + "data/cbor")
				}
			}
		})
	}
}

func BenchmarkHTTPDownload(b *testing.B) {
	e, err := Start(b.Context(), Options{})
	if err != nil {
		b.Fatal(err)
	}
	defer e.Close()
	path, _ := writeTestFile(b, 16<<20)
	if err := e.CreateJob(b.Context(), backend.JobSpec{JobID: "bench", Protocols: []string{backend.ProtocolHTTP}, Files: []backend.FileSpec{{LocalPath: path}}}); err != nil {
		b.Fatal(err)
	}
	doc, _ := e.JobDocument("bench")
	url := docURL(b, doc)
	b.SetBytes(16 << 20)
	b.ResetTimer()
	for i := 0; i < b.N; i++ {
		resp, err := http.Get(url)
		if err != nil {
			b.Fatal(err)
		}
		io.Copy(io.Discard, resp.Body)
		resp.Body.Close()
	}
}
