package emulator

import (
	"bytes"
	"crypto/sha256"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/test/backend"
)

func streamSetup(t *testing.T, opts Options, size int) (*Emulator, *device, string, []byte) {
	t.Helper()
	e := startEmulator(t, opts)
	path, _ := writeTestFile(t, size)
	data, err := os.ReadFile(path)
	if err != nil {
		t.Fatal(err)
	}
	createJob(t, e, "job-s", path, backend.ProtocolMQTT)
	d := connectDevice(t, e.BrokerURL(), "gw-01")
	return e, d, thingPrefix + "streams/" + e.StreamName("job-s") + "/", data
}

func cborReq(t testing.TB, r GetStreamRequest) []byte {
	t.Helper()
	b, err := Marshal(FormatCBOR, r)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestGetStreamErrors(t *testing.T) {
	e, d, prefix, _ := streamSetup(t, Options{}, 10000) // 40 blocks of 256
	i := func(v int64) *int64 { return &v }
	get := prefix + "get/cbor"
	tests := []struct {
		name  string
		topic string
		body  []byte
		code  string
	}{
		{"block size 255", get, cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(255), Offset: i(0), NumBlocks: i(1)}), StreamBlockSizeOutOfBounds},
		{"block size 131073", get, cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(131073), Offset: i(0), NumBlocks: i(1)}), StreamBlockSizeOutOfBounds},
		{"no block size", get, cborReq(t, GetStreamRequest{FileID: i(0), Offset: i(0), NumBlocks: i(1)}), StreamBlockSizeOutOfBounds},
		{"offset past the file", get, cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(256), Offset: i(40), NumBlocks: i(1)}), StreamOffsetOutOfBounds},
		{"offset over 98304", get, cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(256), Offset: i(98305), NumBlocks: i(1)}), StreamOffsetOutOfBounds},
		{"negative offset", get, cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(256), Offset: i(-1), NumBlocks: i(1)}), StreamOffsetOutOfBounds},
		{"count over limit", get, cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(256), Offset: i(0), NumBlocks: i(98305)}), StreamBlockCountLimitExceeded},
		{"bitmap 12288 bytes", get, cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(256), Offset: i(0), NumBlocks: i(1), Bitmap: make([]byte, 12288)}), StreamBlockBitmapLimit},
		{"unknown file id", get, cborReq(t, GetStreamRequest{FileID: i(3), BlockSize: i(256), Offset: i(0), NumBlocks: i(1)}), StreamResourceNotFound},
		{"unknown stream", thingPrefix + "streams/AFR_OTA-nope/get/cbor", cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(256), Offset: i(0), NumBlocks: i(1)}), StreamResourceNotFound},
		{"version mismatch", get, cborReq(t, GetStreamRequest{StreamVersion: i(2), FileID: i(0), BlockSize: i(256), Offset: i(0), NumBlocks: i(1)}), StreamVersionMismatch},
		{"no file id", get, cborReq(t, GetStreamRequest{BlockSize: i(256), Offset: i(0), NumBlocks: i(1)}), StreamInvalidRequest},
		{"negative count", get, cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(256), Offset: i(0), NumBlocks: i(-1)}), StreamInvalidRequest},
		{"token over 64 bytes", get, cborReq(t, GetStreamRequest{ClientToken: ptr(strings.Repeat("c", 65)), FileID: i(0), BlockSize: i(256), NumBlocks: i(1)}), StreamInvalidRequest},
		{"malformed CBOR", get, []byte{0xA1, 0x61}, StreamInvalidCBOR},
		{"wrong CBOR type", get, unhex(t, "A1 61 66 63 61 62 63"), StreamInvalidRequest},
		{"malformed JSON", prefix + "get/json", []byte(`{"f":0,`), StreamInvalidJSON},
		{"bad JSON bitmap", prefix + "get/json", []byte(`{"f":0,"l":256,"o":0,"n":1,"b":"0xZZ"}`), StreamInvalidRequest},
		{"unknown format", prefix + "get/xml", []byte(`{}`), StreamInvalidTopic},
		{"unknown operation", prefix + "fetch/cbor", cborReq(t, GetStreamRequest{}), StreamInvalidTopic},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d.t = t
			parts := strings.Split(tt.topic, "/")
			format := parts[6]
			if format == "xml" {
				format = FormatJSON
			}
			rej := strings.Join(parts[:5], "/") + "/rejected/" + format
			d.publish(tt.topic, tt.body)
			m := d.next(rej)
			fmtName := FormatCBOR
			if strings.HasSuffix(rej, "/json") {
				fmtName = FormatJSON
			}
			se, err := DecodeStreamError(fmtName, m.Payload)
			if err != nil {
				t.Fatal(err)
			}
			if se.Code != tt.code {
				t.Errorf("code = %s (%s), want %s", se.Code, se.Message, tt.code)
			}
		})
	}
	d.t = t
	if n := e.BlocksServed("job-s"); n != 0 {
		t.Errorf("%d blocks served for rejected requests", n)
	}
	if len(d.drain(prefix+"data/cbor")) != 0 {
		t.Error("blocks published for rejected requests")
	}
}

func TestGetStreamBlocks(t *testing.T) {
	e, d, prefix, data := streamSetup(t, Options{}, 40*4096+100) // 41 blocks of 4 KiB, last 100 bytes
	i := func(v int64) *int64 { return &v }

	// Bitmap: blocks 2, 3, 40 (the short last one) relative to offset 2; bits past the file
	// end are ignored.
	d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{ClientToken: ptr("bm"), FileID: i(0), BlockSize: i(4096), Offset: i(2), NumBlocks: i(32), Bitmap: BitmapFor(2, []int{2, 3, 40, 41, 42}, 6)}))
	got := map[int64]DataBlock{}
	for len(got) < 3 {
		b, err := DecodeDataBlock(FormatCBOR, d.next(prefix+"data/cbor").Payload)
		if err != nil {
			t.Fatal(err)
		}
		got[b.BlockID] = b
	}
	for id, b := range got {
		end := min(int((id+1)*4096), len(data))
		if b.ClientToken != "bm" || b.FileID != 0 || b.Length != int64(end-int(id)*4096) || !bytes.Equal(b.Payload, data[id*4096:end]) {
			t.Errorf("block %d wrong: token %q len %d", id, b.ClientToken, b.Length)
		}
	}
	if got[40].Length != 100 {
		t.Errorf("last block length %d, want 100", got[10].Length)
	}

	// At most 128 KB per request: n=1000 blocks of 256 bytes gets 512.
	d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(256), Offset: i(0), NumBlocks: i(1000)}))
	waitBlocks(t, d, prefix+"data/cbor", 512)
	reqs := e.StreamRequests("job-s")
	if last := reqs[len(reqs)-1]; len(last.Sent) != 512 || last.Sent[511] != 511 {
		t.Errorf("128 KB cap: sent %d blocks", len(last.Sent))
	}

	// JSON: base64 payload, hex bitmap.
	d.publish(prefix+"get/json", []byte(`{"c":"j","f":0,"l":4096,"o":4,"n":2,"b":"0x03"}`))
	for k := 0; k < 2; k++ {
		b, err := DecodeDataBlock(FormatJSON, d.next(prefix+"data/json").Payload)
		if err != nil {
			t.Fatal(err)
		}
		if !bytes.Equal(b.Payload, data[b.BlockID*4096:(b.BlockID+1)*4096]) || (b.BlockID != 4 && b.BlockID != 5) {
			t.Errorf("JSON block %d wrong", b.BlockID)
		}
	}

	// DescribeStream in both formats.
	d.publish(prefix+"describe/json", []byte(`{"c":"ds"}`))
	ds, err := DecodeDescribeStreamResponse(FormatJSON, d.next(prefix+"description/json").Payload)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff(DescribeStreamResponse{ClientToken: "ds", Version: 1, Description: "OTA job job-s", Files: []StreamFile{{0, int64(len(data))}}}, ds); diff != "" {
		t.Errorf("describe (-want +got):\n%s", diff)
	}
	d.publish(prefix+"describe/cbor", nil)
	if ds, err = DecodeDescribeStreamResponse(FormatCBOR, d.next(prefix+"description/cbor").Payload); err != nil || ds.Files[0].Size != int64(len(data)) {
		t.Errorf("describe cbor = %+v, %v", ds, err)
	}
}

// A request without n or b, or with n = 0, gets 131072 / l blocks from o (the 128 KB cap),
// fewer at the end of the file.
func TestGetStreamDefaultCount(t *testing.T) {
	e, d, prefix, _ := streamSetup(t, Options{}, 200*1024) // 50 blocks of 4 KiB
	i := func(v int64) *int64 { return &v }
	for k, tt := range []struct {
		name string
		req  GetStreamRequest
		want []int
	}{
		{"no n, no b", GetStreamRequest{FileID: i(0), BlockSize: i(4096), Offset: i(3)}, seq(3, 32)},
		{"n = 0", GetStreamRequest{FileID: i(0), BlockSize: i(4096), Offset: i(3), NumBlocks: i(0)}, seq(3, 32)},
		{"no n, near the end", GetStreamRequest{FileID: i(0), BlockSize: i(4096), Offset: i(40)}, seq(40, 10)},
		{"no n, 64 KiB blocks", GetStreamRequest{FileID: i(0), BlockSize: i(65536), Offset: i(0)}, seq(0, 2)},
	} {
		t.Run(tt.name, func(t *testing.T) {
			d.t = t
			d.publish(prefix+"get/cbor", cborReq(t, tt.req))
			rec := waitRequests(t, e, e.StreamName("job-s"), k+1)[k]
			if rec.Rejected != "" {
				t.Fatalf("rejected with %s", rec.Rejected)
			}
			if diff := cmp.Diff(tt.want, rec.Sent); diff != "" {
				t.Errorf("blocks sent (-want +got):\n%s", diff)
			}
			waitBlocks(t, d, prefix+"data/cbor", len(tt.want))
		})
	}
}

func waitBlocks(t *testing.T, d *device, topic string, n int) {
	t.Helper()
	for k := 0; k < n; k++ {
		d.next(topic)
	}
}

// fetchAll is a device that re-requests missing blocks with bitmaps after a quiet period.
// With e set, it learns from the emulator's record how many blocks each request produced, so
// the request sequence (and so the seeded faults) does not depend on timing.
func fetchAll(t *testing.T, e *Emulator, stream string, d *device, prefix string, size, blockSize int) ([]byte, int) {
	t.Helper()
	nblocks := (size + blockSize - 1) / blockSize
	have := make([]bool, nblocks)
	out := make([]byte, size)
	missing := nblocks
	rounds := 0
	for missing > 0 {
		rounds++
		if rounds > 200 {
			t.Fatalf("still %d blocks missing after 200 rounds", missing)
		}
		// Ask for the first window of up to 32 missing blocks (128 KB / 4 KiB).
		var want []int
		for b := 0; b < nblocks && len(want) < 32; b++ {
			if !have[b] {
				want = append(want, b)
			}
		}
		o := int64(want[0])
		bs, n := int64(blockSize), int64(len(want))
		d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: &[]int64{0}[0], BlockSize: &bs, Offset: &o, NumBlocks: &n, Bitmap: BitmapFor(int(o), want, 0)}))
		expect := -1
		if e != nil {
			expect = len(waitRequests(t, e, stream, rounds)[rounds-1].Sent)
		}
		for got := 0; got != expect; got++ {
			timeout := 150 * time.Millisecond
			if expect >= 0 {
				timeout = 5 * time.Second
			}
			m := d.wait(timeout, prefix+"data/cbor")
			if m == nil {
				if expect >= 0 {
					t.Fatalf("request %d: got %d of %d blocks", rounds, got, expect)
				}
				break // quiet period: re-request what is missing
			}
			blk, err := DecodeDataBlock(FormatCBOR, m.Payload)
			if err != nil {
				t.Fatal(err)
			}
			if have[blk.BlockID] {
				continue // duplicate
			}
			have[blk.BlockID] = true
			copy(out[blk.BlockID*int64(blockSize):], blk.Payload)
			missing--
		}
	}
	return out, rounds
}

func TestStreamFaultsStillDeliverEverything(t *testing.T) {
	run := func(seed uint64) ([]StreamRequest, []byte) {
		e, d, prefix, data := streamSetup(t, Options{Seed: seed}, 200*4096+17)
		e.SetFaults(e.StreamName("job-s"), Faults{Drop: 0.2, Duplicate: 0.1, Reorder: true})
		got, rounds := fetchAll(t, e, "job-s", d, prefix, len(data), 4096)
		if sha256.Sum256(got) != sha256.Sum256(data) {
			t.Fatal("reassembled file differs")
		}
		reqs := e.StreamRequests("job-s")
		dropped, dups, reordered := 0, 0, 0
		for _, r := range reqs {
			for k := 1; k < len(r.Sent); k++ {
				if r.Sent[k] < r.Sent[k-1] {
					reordered++
					break
				}
			}
			dropped += len(r.Dropped)
			seen := map[int]bool{}
			for _, b := range r.Sent {
				if seen[b] {
					dups++
				}
				seen[b] = true
			}
		}
		t.Logf("seed %d: %d requests in %d rounds, %d blocks dropped, %d duplicated", seed, len(reqs), rounds, dropped, dups)
		if dropped == 0 || dups == 0 || reordered == 0 {
			t.Errorf("faults not injected: %d dropped, %d duplicated, %d responses reordered", dropped, dups, reordered)
		}
		e.Close()
		return reqs, got
	}
	a, _ := run(42)
	b, _ := run(42)
	strip := cmp.FilterPath(func(p cmp.Path) bool {
		s := p.Last().String()
		return s == ".At" || s == ".Stream"
	}, cmp.Ignore())
	if diff := cmp.Diff(a, b, strip); diff != "" {
		t.Errorf("same seed, different faults (-first +second):\n%s", diff)
	}
	c, _ := run(43)
	if cmp.Equal(a, c, strip) {
		t.Error("different seeds gave identical faults")
	}
}

func TestStreamRejectAndDisconnectFaults(t *testing.T) {
	e, d, prefix, _ := streamSetup(t, Options{}, 64*1024)
	i := func(v int64) *int64 { return &v }
	e.SetFaults("job-s", Faults{RejectCode: StreamETagMismatch})
	d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(1024), NumBlocks: i(4)}))
	if se, _ := DecodeStreamError(FormatCBOR, d.next(prefix+"rejected/cbor").Payload); se.Code != StreamETagMismatch {
		t.Fatalf("injected code = %+v", se)
	}

	e.SetFaults("job-s", Faults{DisconnectAfterBlocks: 10})
	d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(1024), NumBlocks: i(8)}))
	waitBlocks(t, d, prefix+"data/cbor", 8)
	d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(1024), Offset: i(8), NumBlocks: i(8)}))
	waitBlocks(t, d, prefix+"data/cbor", 2)
	select {
	case <-d.c.Done():
	case <-time.After(5 * time.Second):
		t.Fatal("client not disconnected after 10 blocks")
	}
	if n := e.BlocksServed("job-s"); n != 10 {
		t.Errorf("blocks served = %d, want 10", n)
	}
}

// StallAfterBlocks: the first N blocks go out, then none (the requests are still recorded)
// until the faults are cleared.
func TestStreamStallFault(t *testing.T) {
	e, d, prefix, _ := streamSetup(t, Options{}, 64*1024)
	i := func(v int64) *int64 { return &v }
	e.SetFaults("job-s", Faults{StallAfterBlocks: 5})
	d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(1024), NumBlocks: i(8)}))
	waitBlocks(t, d, prefix+"data/cbor", 5)
	d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(1024), Offset: i(5), NumBlocks: i(3)}))
	reqs := waitRequests(t, e, "job-s", 2)
	got := [][2][]int{{reqs[0].Sent, reqs[0].Dropped}, {reqs[1].Sent, reqs[1].Dropped}}
	if diff := cmp.Diff([][2][]int{{{0, 1, 2, 3, 4}, {5, 6, 7}}, {nil, {5, 6, 7}}}, got); diff != "" {
		t.Fatalf("sent and withheld per request (-want +got):\n%s", diff)
	}
	e.ClearFaults("job-s")
	d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(1024), Offset: i(5), NumBlocks: i(3)}))
	waitBlocks(t, d, prefix+"data/cbor", 3)
	if n := e.BlocksServed("job-s"); n != 8 {
		t.Errorf("blocks served = %d, want 8", n)
	}
}

// waitRequests waits until the emulator has recorded n GetStream requests.
func waitRequests(t *testing.T, e *Emulator, stream string, n int) []StreamRequest {
	t.Helper()
	timeout := time.NewTimer(5 * time.Second)
	defer timeout.Stop()
	for {
		e.mu.Lock()
		ch := e.changed
		e.mu.Unlock()
		if r := e.StreamRequests(stream); len(r) >= n {
			return r
		}
		select {
		case <-ch:
		case <-timeout.C:
			t.Fatalf("emulator recorded fewer than %d requests", n)
		}
	}
}

// TestStreamCorruptFault: the first CorruptBlocks sends of the block holding CorruptOffset
// carry that byte inverted, and only that byte; later sends are intact.
func TestStreamCorruptFault(t *testing.T) {
	e, d, prefix, data := streamSetup(t, Options{}, 8*4096)
	e.SetFaults(e.StreamName("job-s"), Faults{CorruptBlocks: 2, CorruptFileID: 0, CorruptOffset: 3*4096 + 17})
	i := func(v int64) *int64 { return &v }
	for round := range 3 {
		d.publish(prefix+"get/cbor", cborReq(t, GetStreamRequest{FileID: i(0), BlockSize: i(4096), Offset: i(2), NumBlocks: i(2)}))
		for range 2 {
			b, err := DecodeDataBlock(FormatCBOR, d.next(prefix+"data/cbor").Payload)
			if err != nil {
				t.Fatal(err)
			}
			want := bytes.Clone(data[b.BlockID*4096 : (b.BlockID+1)*4096])
			if b.BlockID == 3 && round < 2 {
				want[17] ^= 0xff
			}
			if !bytes.Equal(b.Payload, want) {
				t.Errorf("round %d block %d: payload not as the fault says", round, b.BlockID)
			}
		}
	}
	var corrupted []int
	for _, r := range e.StreamRequests("job-s") {
		corrupted = append(corrupted, r.Corrupted...)
	}
	if diff := cmp.Diff([]int{3, 3}, corrupted); diff != "" {
		t.Errorf("Corrupted (-want +got):\n%s", diff)
	}
}
