package stream_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"slices"
	"sort"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/netagent/blocksink"
	"github.com/gwota/gwota/netagent/blocksink/blocksinktest"
	"github.com/gwota/gwota/netagent/mqttconn"
	"github.com/gwota/gwota/netagent/mqttconn/mqtttest"
	"github.com/gwota/gwota/netagent/stream"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
)

func TestMain(m *testing.M) { mqtttest.VerifyTestMain(m) }

func logger(t *testing.T) hclog.Logger {
	if os.Getenv("STREAM_DEBUG") == "" {
		return hclog.NewNullLogger()
	}
	level := hclog.LevelFromString(os.Getenv("STREAM_DEBUG")) // STREAM_DEBUG=trace: loss decisions too
	if level == hclog.NoLevel {
		level = hclog.Debug
	}
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: level})
}

// env is an emulator (embedded mochi) and a device-side mqttconn connection.
type env struct {
	t     *testing.T
	emu   *emulator.Emulator
	conn  *mqttconn.Conn
	dir   string
	image []byte
	job   string
}

func newEnv(t *testing.T, size int) *env {
	t.Helper()
	return newEnvWith(t, size, emulator.Options{Seed: 7})
}

// newEnvWith starts the emulator with opts (newEnv: AWS's quotas on).
func newEnvWith(t *testing.T, size int, opts emulator.Options) *env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	emu, err := emulator.Start(ctx, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { emu.Close() })
	conn, err := mqttconn.Dial(ctx, mqttconn.Config{BrokerURL: emu.BrokerURL(), ClientID: emu.ThingName(),
		BackoffMin: 50 * time.Millisecond, BackoffMax: 200 * time.Millisecond, Logger: logger(t).Named("mqtt")})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		conn.Close(ctx)
	})
	if err := conn.AwaitConnection(ctx); err != nil {
		t.Fatal(err)
	}
	e := &env{t: t, emu: emu, conn: conn, dir: t.TempDir()}
	e.image = make([]byte, size)
	rand.Read(e.image)
	path := filepath.Join(e.dir, "image.bin")
	if err := os.WriteFile(path, e.image, 0o600); err != nil {
		t.Fatal(err)
	}
	e.job = "job-" + strings.ReplaceAll(t.Name(), "/", "_")
	err = emu.CreateJob(ctx, backend.JobSpec{JobID: e.job, Protocols: []string{backend.ProtocolMQTT},
		Files: []backend.FileSpec{{LocalPath: path, DevicePath: "/fw", FileID: 3}}})
	if err != nil {
		t.Fatal(err)
	}
	return e
}

func (e *env) file(bs int) stream.File {
	return stream.File{StreamName: e.emu.StreamName(e.job), FileID: 3, Size: int64(len(e.image)), BlockSize: bs}
}

// memSink is the in-memory sink of the test kit, with the block size of its download.
type memSink struct {
	*blocksinktest.Sink
	t  *testing.T
	bs int
}

func newMemSink(t *testing.T, bs int) *memSink {
	return &memSink{Sink: blocksinktest.New(t), t: t, bs: bs}
}

// check compares the blocks the sink holds, from block from on, with the image.
func (s *memSink) check(image []byte, from int) {
	s.t.Helper()
	s.Check(image, s.bs, from)
}

func cfg(t *testing.T, e *env) stream.Config {
	return stream.Config{Thing: e.emu.ThingName(), QuietPeriod: 150 * time.Millisecond, MaxQuietPeriod: 300 * time.Millisecond, Logger: logger(t)}
}

func download(t *testing.T, tr stream.Transport, c stream.Config, f stream.File, missing bitmap.Bitmap, sink blocksink.Sink) (stream.Stats, error) {
	t.Helper()
	d, err := stream.New(tr, c)
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	return d.Download(ctx, f, missing, sink)
}

func TestDownload(t *testing.T) {
	tests := []struct {
		name   string
		size   int
		bs     int
		per    int
		fmt    string
		flight int
	}{
		{name: "defaults", size: 1<<20 + 123, bs: 0},
		{name: "C agent shape", size: 64 << 10, bs: 4096, per: 1, flight: 1},
		{name: "small blocks past the 31-block window", size: 300<<10 + 5, bs: 256, per: 512},
		{name: "json", size: 200<<10 + 1, bs: 16 << 10, fmt: stream.FormatJSON},
		{name: "one short block", size: 100, bs: 256},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, tc.size)
			c := cfg(t, e)
			c.BlockSize, c.BlocksPerRequest, c.Format, c.RequestsInFlight = tc.bs, tc.per, tc.fmt, tc.flight
			bs := tc.bs
			if bs == 0 {
				bs = stream.DefaultBlockSize
			}
			sink := newMemSink(t, bs)
			st, err := download(t, e.conn, c, e.file(bs), nil, sink)
			if err != nil {
				t.Fatal(err)
			}
			sink.check(e.image, 0)
			if st.Received != st.Blocks || sink.Flushes != 1 {
				t.Fatalf("stats %+v, flushes %d", st, sink.Flushes)
			}
			for _, r := range e.emu.StreamRequests(e.job) {
				if r.Rejected != "" {
					t.Fatalf("request rejected: %+v", r)
				}
				if int(r.Count)*int(r.BlockSize) > stream.MaxRequestBytes || len(r.Wanted)*int(r.BlockSize) > stream.MaxRequestBytes {
					t.Fatalf("request over 128 KB: %+v", r)
				}
			}
		})
	}
}

// 20% of blocks dropped, 10% duplicated, every response reordered: every block arrives.
func TestDownloadLossyStream(t *testing.T) {
	e := newEnv(t, 2<<20+77)
	e.emu.SetFaults(e.job, emulator.Faults{Drop: 0.2, Duplicate: 0.1, Reorder: true})
	c := cfg(t, e)
	c.BlockSize = 4096
	c.BlocksPerRequest = 32
	sink := newMemSink(t, 4096)
	st, err := download(t, e.conn, c, e.file(4096), nil, sink)
	if err != nil {
		t.Fatal(err)
	}
	sink.check(e.image, 0)
	dropped, dups := 0, 0
	for _, r := range e.emu.StreamRequests(e.job) {
		dropped += len(r.Dropped)
		dups += len(r.Sent) - len(uniq(r.Sent))
	}
	t.Logf("stats %+v; emulator dropped %d, duplicated %d", st, dropped, dups)
	if dropped == 0 || dups == 0 || st.Duplicates == 0 || st.Rerequests == 0 {
		t.Fatalf("faults not exercised: stats %+v, dropped %d, dups %d", st, dropped, dups)
	}
	if sink.Writes != st.Blocks {
		t.Fatalf("sink got %d writes for %d blocks: duplicates forwarded", sink.Writes, st.Blocks)
	}
}

func uniq(b []int) []int {
	m := map[int]bool{}
	var out []int
	for _, x := range b {
		if !m[x] {
			m[x] = true
			out = append(out, x)
		}
	}
	return out
}

// hookTransport passes through to the real connection, with hooks to lose requests and
// tamper with incoming messages.
type hookTransport struct {
	stream.Transport
	dropPublish func(n int) bool // n counts publishes from 1
	onData      func(deliver func([]byte), payload []byte)
	published   atomic.Int32
}

func (h *hookTransport) Publish(ctx context.Context, topic string, qos byte, payload []byte) error {
	n := int(h.published.Add(1))
	if h.dropPublish != nil && h.dropPublish(n) {
		return nil // lost on the way, as QoS 0 may be
	}
	return h.Transport.Publish(ctx, topic, qos, payload)
}

func (h *hookTransport) Subscribe(ctx context.Context, filter string, qos byte, f func(string, []byte)) (func(context.Context) error, error) {
	if h.onData != nil && strings.Contains(filter, "/data/") {
		inner := f
		f = func(topic string, p []byte) { h.onData(func(b []byte) { inner(topic, b) }, p) }
	}
	return h.Transport.Subscribe(ctx, filter, qos, f)
}

// rustot hangs forever when its first request is lost; here the quiet period re-sends it.
func TestFirstRequestLost(t *testing.T) {
	e := newEnv(t, 100<<10)
	tr := &hookTransport{Transport: e.conn, dropPublish: func(n int) bool { return n == 1 }}
	c := cfg(t, e)
	c.RequestsInFlight = 1
	sink := newMemSink(t, stream.DefaultBlockSize)
	st, err := download(t, tr, c, e.file(stream.DefaultBlockSize), nil, sink)
	if err != nil {
		t.Fatal(err)
	}
	sink.check(e.image, 0)
	reqs := e.emu.StreamRequests(e.job)
	if st.Rounds != 1 || len(reqs) == 0 || reqs[0].Offset != 0 || int(tr.published.Load()) != len(reqs)+1 {
		t.Fatalf("stats %+v, %d publishes, emulator saw %d requests (first %+v)", st, tr.published.Load(), len(reqs), reqs[0])
	}
}

func TestMomentumAbort(t *testing.T) {
	e := newEnv(t, 64<<10)
	e.emu.SetFaults(e.job, emulator.Faults{Drop: 1})
	c := cfg(t, e)
	c.QuietPeriod, c.MaxQuietPeriod, c.MaxFruitlessRounds, c.RequestsInFlight = 50*time.Millisecond, 100*time.Millisecond, 3, 1
	st, err := download(t, e.conn, c, e.file(stream.DefaultBlockSize), nil, newMemSink(t, stream.DefaultBlockSize))
	if r := status.ReasonOf(err); r != otav1.Reason_REASON_MOMENTUM_ABORT {
		t.Fatalf("err %v (reason %v), want momentum_abort", err, r)
	}
	if status.Code(status.ReasonOf(err)) != "2003" {
		t.Fatal("momentum_abort is not 2003")
	}
	// The first request plus one per fruitless round, then give up.
	if n := len(e.emu.StreamRequests(e.job)); n != 4 || st.Rounds != 4 {
		t.Fatalf("%d requests, stats %+v; want 4 requests (1 + 3 rounds)", n, st)
	}
}

// Resume from a partial bitmap: only the missing blocks are requested, each once.
func TestResumeRequestsOnlyMissing(t *testing.T) {
	const bs = 1024
	e := newEnv(t, 200*bs+10)
	total := stream.NumBlocks(int64(len(e.image)), bs)
	missing := bitmap.New(total)
	var want []int
	for i := 0; i < total; i++ {
		if i%7 == 3 || (i >= 150 && i < 170) || i == total-1 {
			missing.Set(i)
			want = append(want, i)
		}
	}
	c := cfg(t, e)
	c.BlockSize = bs
	sink := newMemSink(t, bs)
	st, err := download(t, e.conn, c, e.file(bs), missing, sink)
	if err != nil {
		t.Fatal(err)
	}
	var asked []int
	for _, r := range e.emu.StreamRequests(e.job) {
		asked = append(asked, r.Wanted...)
	}
	sort.Ints(asked)
	t.Logf("stats %+v", st)
	if diff := cmp.Diff(want, asked); diff != "" {
		t.Fatalf("requested blocks differ from the missing ones (-want +got):\n%s", diff)
	}
	if st.Received != len(want) || len(sink.Blocks) != len(want) {
		t.Fatalf("stats %+v, sink has %d blocks", st, len(sink.Blocks))
	}
	for _, i := range want {
		if !bytes.Equal(sink.Blocks[i], e.image[i*bs:min(len(e.image), (i+1)*bs)]) {
			t.Fatalf("block %d wrong", i)
		}
	}
}

// Files beyond the offset limit: blocks past 98304 are asked for with o = 98304 and a bitmap.
func TestFarOffsets(t *testing.T) {
	const bs = 256
	total := stream.MaxOffset + 300
	e := newEnv(t, total*bs-17)
	missing := bitmap.New(total)
	for i := stream.MaxOffset - 5; i < total; i++ {
		missing.Set(i)
	}
	c := cfg(t, e)
	c.BlockSize, c.BlocksPerRequest = bs, 512
	sink := newMemSink(t, bs)
	if _, err := download(t, e.conn, c, e.file(bs), missing, sink); err != nil {
		t.Fatal(err)
	}
	sink.check(e.image, stream.MaxOffset-5)
	for _, r := range e.emu.StreamRequests(e.job) {
		if r.Offset > stream.MaxOffset || r.Rejected != "" {
			t.Fatalf("bad request %+v", r)
		}
	}
}

func TestRejected(t *testing.T) {
	tests := []struct {
		code   string
		reason otav1.Reason
	}{
		{stream.CodeResourceNotFound, otav1.Reason_REASON_DOWNLOAD_FAILED},
		{stream.CodeUnauthorized, otav1.Reason_REASON_DOWNLOAD_FAILED},
		{stream.CodeBlockSizeOutOfBounds, otav1.Reason_REASON_FAILED_INGEST},
		{stream.CodeInvalidCBOR, otav1.Reason_REASON_FAILED_INGEST},
		// Transient: re-requested until the rounds run out.
		{stream.CodeInternalError, otav1.Reason_REASON_MOMENTUM_ABORT},
	}
	for _, tc := range tests {
		t.Run(tc.code, func(t *testing.T) {
			e := newEnv(t, 10<<10)
			e.emu.SetFaults(e.job, emulator.Faults{RejectCode: tc.code})
			c := cfg(t, e)
			c.QuietPeriod, c.MaxQuietPeriod, c.MaxFruitlessRounds = 50*time.Millisecond, 50*time.Millisecond, 2
			_, err := download(t, e.conn, c, e.file(stream.DefaultBlockSize), nil, newMemSink(t, stream.DefaultBlockSize))
			se := status.FromError(err)
			if se == nil || se.Reason != tc.reason {
				t.Fatalf("err %v, want reason %v", err, tc.reason)
			}
			if tc.code != stream.CodeInternalError && (se.Meta["stream_error"] != tc.code || !strings.Contains(se.Msg, tc.code)) {
				t.Fatalf("AWS code missing from %+v", se)
			}
		})
	}
}

// Malformed copies of every block are dropped, never forwarded; the real ones get through.
func TestMalformedBlocksDropped(t *testing.T) {
	testMalformedBlocksDropped(t, false)
}

// The same when blocks come more than once (a re-request of what was on its way, as a loaded
// machine makes; here the emulator sends half the blocks twice).
func TestMalformedBlocksDroppedWithRerequests(t *testing.T) {
	testMalformedBlocksDropped(t, true)
}

func testMalformedBlocksDropped(t *testing.T, twice bool) {
	const bs = 2048
	e := newEnv(t, 40*bs+3)
	if twice {
		e.emu.SetFaults(e.job, emulator.Faults{Duplicate: 0.5})
	}
	var forged atomic.Int32
	tr := &hookTransport{Transport: e.conn, onData: func(deliver func([]byte), p []byte) {
		blk, err := stream.DecodeBlock(stream.FormatCBOR, p)
		if err != nil {
			t.Errorf("emulator sent an undecodable block: %v", err)
			return
		}
		bad := []stream.Block{
			{FileID: blk.FileID + 1, Index: blk.Index, Length: blk.Length, Payload: blk.Payload},
			{FileID: blk.FileID, Index: blk.Index, Length: blk.Length, Payload: blk.Payload[:len(blk.Payload)-1]},
			{FileID: blk.FileID, Index: 1 << 20, Length: blk.Length, Payload: blk.Payload},
		}
		for _, b := range bad {
			enc, _ := encodeBlock(b)
			deliver(enc)
			forged.Add(1)
		}
		deliver([]byte{0xBF, 0x61, 0x66}) // truncated
		deliver(p)
	}}
	c := cfg(t, e)
	c.BlockSize = bs
	sink := newMemSink(t, bs)
	st, err := download(t, tr, c, e.file(bs), nil, sink)
	if err != nil {
		t.Fatal(err)
	}
	sink.check(e.image, 0)
	// Each delivery of a block is 3 forged and 1 truncated message, then the block. Handlers
	// run one at a time and the download takes messages in order, so it saw exactly the
	// deliveries whose block it counted, new or duplicate. Copies that come after the last
	// new block are not its business: the count of all forgeries (forged) is no measure.
	if seen := st.Received + st.Duplicates; st.Malformed != 4*seen || sink.Writes != st.Blocks || int(forged.Load()) < 3*seen {
		t.Fatalf("stats %+v, forged %d, sink writes %d", st, forged.Load(), sink.Writes)
	}
	if twice && st.Duplicates == 0 {
		t.Fatalf("no block came twice (stats %+v): the case is not exercised", st)
	}
}

// Only malformed blocks arrive: the download fails with failed_ingest, not a hang.
func TestOnlyMalformedFailsIngest(t *testing.T) {
	e := newEnv(t, 8<<10)
	tr := &hookTransport{Transport: e.conn, onData: func(deliver func([]byte), p []byte) { deliver(p[:len(p)-1]) }}
	c := cfg(t, e)
	c.QuietPeriod, c.MaxQuietPeriod, c.MaxFruitlessRounds = 50*time.Millisecond, 50*time.Millisecond, 2
	sink := newMemSink(t, stream.DefaultBlockSize)
	_, err := download(t, tr, c, e.file(stream.DefaultBlockSize), nil, sink)
	if r := status.ReasonOf(err); r != otav1.Reason_REASON_FAILED_INGEST {
		t.Fatalf("err %v, want failed_ingest", err)
	}
	if sink.Writes != 0 {
		t.Fatalf("%d malformed blocks forwarded", sink.Writes)
	}
}

// The writer restarts mid-download and resumes with a bitmap: blocks it lost are fetched again.
func TestSinkResumed(t *testing.T) {
	const bs = 1024
	e := newEnv(t, 64*bs)
	sink := newMemSink(t, bs)
	sink.FailAt = 40
	missing := bitmap.New(64)
	sink.Fail = func(blocks map[int][]byte) error {
		// The writer kept only the odd blocks; the one being written is lost too.
		for i := 0; i < 64; i++ {
			if i%2 == 0 {
				delete(blocks, i)
			}
			if _, ok := blocks[i]; !ok {
				missing.Set(i)
			}
		}
		return fmt.Errorf("write: %w", &blocksink.ResumedError{Cause: errors.New("writer restarted"), Missing: missing})
	}
	c := cfg(t, e)
	c.BlockSize = bs
	st, err := download(t, e.conn, c, e.file(bs), nil, sink)
	if err != nil {
		t.Fatal(err)
	}
	sink.check(e.image, 0)
	if st.Resumes != 1 {
		t.Fatalf("stats %+v", st)
	}
	// After the resume, exactly the even blocks were asked for again.
	var again []int
	reqs := e.emu.StreamRequests(e.job)
	seen := map[int]int{}
	for _, r := range reqs {
		for _, b := range r.Wanted {
			seen[b]++
		}
	}
	for b, n := range seen {
		if n > 1 {
			again = append(again, b)
		}
	}
	for _, b := range again {
		if !missing.Has(b) {
			t.Fatalf("block %d (durable in the writer) fetched again", b)
		}
	}
	if len(again) == 0 {
		t.Fatal("nothing fetched again after the resume")
	}
}

// A sink failure with a typed reason ends the download with that reason.
func TestSinkErrorKeepsReason(t *testing.T) {
	e := newEnv(t, 64<<10)
	sink := newMemSink(t, stream.DefaultBlockSize)
	sink.FailAt = 1
	sink.Fail = func(map[int][]byte) error { return status.Errorf(otav1.Reason_REASON_STORAGE_FULL, "disk full") }
	_, err := download(t, e.conn, cfg(t, e), e.file(stream.DefaultBlockSize), nil, sink)
	if r := status.ReasonOf(err); r != otav1.Reason_REASON_STORAGE_FULL {
		t.Fatalf("err %v, want storage_full", err)
	}
}

func TestDownloadCanceled(t *testing.T) {
	e := newEnv(t, 64<<10)
	e.emu.SetFaults(e.job, emulator.Faults{Drop: 1})
	d, err := stream.New(e.conn, cfg(t, e))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithCancel(context.Background())
	go func() {
		for len(e.emu.StreamRequests(e.job)) == 0 {
			time.Sleep(5 * time.Millisecond)
		}
		cancel()
	}()
	_, err = d.Download(ctx, e.file(stream.DefaultBlockSize), nil, newMemSink(t, stream.DefaultBlockSize))
	if !errors.Is(err, context.Canceled) || status.ReasonOf(err) != otav1.Reason_REASON_USER_ABORT {
		t.Fatalf("err %v", err)
	}
}

func TestConfigChecks(t *testing.T) {
	tr := &hookTransport{}
	for _, c := range []stream.Config{
		{},
		{Thing: "t", BlockSize: 100},
		{Thing: "t", BlockSize: 256 << 10},
		{Thing: "t", Format: "xml"},
		{Thing: "t", RequestQoS: 2},
		{Thing: "t", QuotaBytesPerSecond: -1},
	} {
		if _, err := stream.New(tr, c); err == nil {
			t.Errorf("config %+v accepted", c)
		}
	}
	d, err := stream.New(tr, stream.Config{Thing: "t", BlockSize: 64 << 10, BlocksPerRequest: 8})
	if err != nil {
		t.Fatal(err)
	}
	if c := d.Config(); c.DataQoS != 1 || c.RequestQoS != 0 || c.RequestsInFlight != stream.DefaultRequestsInFlight ||
		c.QuotaBytesPerSecond != stream.DefaultQuotaBytesPerSecond {
		t.Fatalf("defaults %+v", c)
	}
	if d, err := stream.New(tr, stream.Config{Thing: "t", NoQuota: true}); err != nil {
		t.Fatal(err)
	} else if q := d.Config().QuotaBytesPerSecond; q != 0 {
		t.Fatalf("NoQuota left a quota of %d", q)
	}
	// Beyond what a stream can address at this block size.
	_, err = d.Download(context.Background(), stream.File{StreamName: "s", Size: int64(stream.MaxBlocks+1) * 256, BlockSize: 256}, nil, nil)
	if status.ReasonOf(err) != otav1.Reason_REASON_DOWNLOAD_FAILED {
		t.Fatalf("oversized file: %v", err)
	}
}

func encodeBlock(b stream.Block) ([]byte, error) { return stream.EncodeBlockForTest(b) }

// With a quarter of the stream messages lost on a fast link, a download takes at most twice
// as long as the same download without loss, measured side by side in this test: a lost
// block is asked for again after a round trip or so, not after the quiet period. Several
// pairs are run and the medians compared, so one slow run on a loaded machine does not decide.
func TestLossRecoveryInRoundTrips(t *testing.T) {
	// Large enough that the loss-free run is not just a few round trips on loopback.
	const size = 16 << 20
	// A fast link: AWS's quotas lifted (with them, both runs crawl at 512 KiB/s).
	e := newEnvWith(t, size, emulator.Options{Seed: 7, NoQuotas: true})
	c := cfg(t, e)
	c.QuietPeriod, c.MaxQuietPeriod = 2*time.Second, 30*time.Second // the defaults
	c.NoQuota = true                                                // the downloader knows
	var clean, lossy []time.Duration
	for rep := 0; rep < 3; rep++ {
		for _, drop := range []float64{0, 0.25} {
			job := fmt.Sprintf("%s-%d-%d", e.job, rep, int(drop*100))
			path := filepath.Join(e.dir, "image.bin")
			if err := e.emu.CreateJob(context.Background(), backend.JobSpec{JobID: job, Protocols: []string{backend.ProtocolMQTT},
				Files: []backend.FileSpec{{LocalPath: path, DevicePath: "/fw", FileID: 3}}}); err != nil {
				t.Fatal(err)
			}
			e.emu.SetFaults(job, emulator.Faults{Drop: drop})
			f := e.file(stream.DefaultBlockSize)
			f.StreamName = e.emu.StreamName(job)
			sink := newMemSink(t, stream.DefaultBlockSize)
			start := time.Now()
			st, err := download(t, e.conn, c, f, nil, sink)
			took := time.Since(start)
			if err != nil {
				t.Fatal(err)
			}
			sink.check(e.image, 0)
			dropped := 0
			for _, r := range e.emu.StreamRequests(job) {
				dropped += len(r.Dropped)
			}
			t.Logf("drop %.2f: %v, %d blocks dropped, stats %+v", drop, took, dropped, st)
			if drop == 0 {
				clean = append(clean, took)
			} else {
				if dropped == 0 {
					t.Fatal("no block dropped")
				}
				lossy = append(lossy, took)
			}
		}
	}
	mc, ml := medianDur(clean), medianDur(lossy)
	ratio := float64(ml) / float64(mc)
	t.Logf("median loss-free %v, 25%% loss %v: ratio %.2f", mc, ml, ratio)
	if ratio > 2 {
		t.Fatalf("25%% loss takes %.2fx the loss-free time (median %v vs %v), want at most 2x", ratio, ml, mc)
	}
}

func medianDur(d []time.Duration) time.Duration {
	s := slices.Clone(d)
	slices.Sort(s)
	return s[len(s)/2]
}

// A block lost once is asked for again within round trips, not after the quiet period: in
// the middle of the stream (later blocks are the evidence) and at its very end (no later
// block can come: the tail timeout). The quiet period is 20 s here, so the fixed rule would
// take 20 s; the re-request must come within a quarter of that (room for a loaded machine),
// after at least the RTO floor.
// Times are the emulator's records of the two requests, not sleeps.
func TestLostBlockRerequestedAfterRTO(t *testing.T) {
	const bs = 4096
	const blocks = 64
	for _, tc := range []struct {
		name string
		lose int
		per  int
	}{
		{name: "mid-stream", lose: 20, per: 2},
		{name: "tail-answered-in-part", lose: blocks - 1, per: 2},
		{name: "tail-unanswered", lose: blocks - 1, per: 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, blocks*bs)
			var dropped atomic.Bool
			tr := &hookTransport{Transport: e.conn, onData: func(deliver func([]byte), p []byte) {
				blk, err := stream.DecodeBlock(stream.FormatCBOR, p)
				if err == nil && int(blk.Index) == tc.lose && dropped.CompareAndSwap(false, true) {
					return // lost once
				}
				deliver(p)
			}}
			c := cfg(t, e)
			c.BlockSize, c.BlocksPerRequest, c.RequestsInFlight = bs, tc.per, 4
			c.QuietPeriod, c.MaxQuietPeriod = 20*time.Second, 20*time.Second
			sink := newMemSink(t, bs)
			st, err := download(t, tr, c, e.file(bs), nil, sink)
			if err != nil {
				t.Fatal(err)
			}
			sink.check(e.image, 0)
			var asked []time.Time
			for _, r := range e.emu.StreamRequests(e.job) {
				if slices.Contains(r.Wanted, tc.lose) {
					asked = append(asked, r.At)
				}
			}
			if !dropped.Load() || len(asked) < 2 {
				t.Fatalf("block %d asked for %d times (dropped %v), stats %+v", tc.lose, len(asked), dropped.Load(), st)
			}
			gap := asked[1].Sub(asked[0])
			t.Logf("re-requested after %v; stats %+v", gap, st)
			if gap >= c.QuietPeriod/4 || gap < stream.MinRTO {
				t.Fatalf("block %d re-requested after %v, want between the RTO floor %v and %v (quiet period %v)", tc.lose, gap, stream.MinRTO, c.QuietPeriod/4, c.QuietPeriod)
			}
			if st.Rounds != 0 || (tc.per == 1 && tc.lose == blocks-1 && st.Timeouts == 0) {
				t.Fatalf("a quiet round ran, or the tail was not found by a timeout: %+v", st)
			}
		})
	}
}

// AWS's 512 KiB/s quota (on in the emulator by default) delays blocks, it loses none: a
// window of requests queued behind the throttle must not be asked for again. The blocks of
// the later requests wait behind the earlier ones, so round trips grow with the queue and
// the blocks of one response come spread over its whole transfer time; neither is loss.
func TestThrottleIsNotLoss(t *testing.T) {
	for _, tc := range []struct {
		name        string
		bs, per, in int
		delay       time.Duration
	}{
		{name: "crash campaign shape", bs: 4096, per: 8, in: 2, delay: 5 * time.Millisecond},
		{name: "whole image in flight", bs: 4096, per: 32, in: 8},
		{name: "defaults", bs: stream.DefaultBlockSize},
	} {
		t.Run(tc.name, func(t *testing.T) {
			const size = 1 << 20
			e := newEnv(t, size) // quotas on
			e.emu.SetFaults(e.job, emulator.Faults{Delay: tc.delay})
			c := cfg(t, e)
			c.QuietPeriod, c.MaxQuietPeriod = stream.DefaultQuietPeriod, stream.DefaultMaxQuietPeriod
			c.BlockSize, c.BlocksPerRequest, c.RequestsInFlight = tc.bs, tc.per, tc.in
			sink := newMemSink(t, tc.bs)
			st, err := download(t, e.conn, c, e.file(tc.bs), nil, sink)
			if err != nil {
				t.Fatal(err)
			}
			sink.check(e.image, 0)
			sent := 0
			for _, r := range e.emu.StreamRequests(e.job) {
				sent += len(r.Sent)
			}
			t.Logf("stats %+v; blocks sent %d", st, sent)
			if st.Rerequests != 0 || st.Duplicates != 0 || st.Timeouts != 0 || st.Rounds != 0 || sent != st.Blocks {
				t.Fatalf("throttled, loss-free download re-requested: stats %+v, %d blocks sent for %d", st, sent, st.Blocks)
			}
		})
	}
}

// unsubTransport holds every unsubscribe until release is closed and logs, in order, when a
// subscribe is called and when an unsubscribe is done.
type unsubTransport struct {
	stream.Transport
	release    chan struct{}
	subscribed chan struct{} // gets a value per subscribe, when asked for
	unsubbed   chan struct{} // gets a value per unsubscribe done
	mu         sync.Mutex
	log        []string
}

func (u *unsubTransport) add(s string) { u.mu.Lock(); u.log = append(u.log, s); u.mu.Unlock() }

func (u *unsubTransport) Subscribe(ctx context.Context, filter string, qos byte, f func(string, []byte)) (func(context.Context) error, error) {
	u.add("subscribe")
	select {
	case u.subscribed <- struct{}{}:
	default:
	}
	unsub, err := u.Transport.Subscribe(ctx, filter, qos, f)
	if err != nil {
		return nil, err
	}
	return func(ctx context.Context) error {
		select {
		case <-u.release:
		case <-ctx.Done():
		}
		err := unsub(ctx)
		u.add("unsubscribed")
		u.unsubbed <- struct{}{}
		return err
	}, nil
}

// A download returns without waiting for its UNSUBACKs (on the satellite profile two round
// trips, 1.2 s, before the ready update could go out), and the next download of the same
// downloader subscribes only once they are done, so an old UNSUBSCRIBE never lands after a
// new SUBSCRIBE of the same stream.
func TestReturnsBeforeUnsubscribed(t *testing.T) {
	e := newEnvWith(t, 256<<10, emulator.Options{Seed: 7, NoQuotas: true})
	tr := &unsubTransport{Transport: e.conn, release: make(chan struct{}), subscribed: make(chan struct{}, 1), unsubbed: make(chan struct{}, 4)}
	d, err := stream.New(tr, cfg(t, e))
	if err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	sink := newMemSink(t, stream.DefaultBlockSize)
	if _, err := d.Download(ctx, e.file(stream.DefaultBlockSize), nil, sink); err != nil {
		t.Fatal(err)
	}
	tr.add("returned")
	sink.check(e.image, 0)
	<-tr.subscribed // drain the first download's signal
	second := make(chan error, 1)
	go func() {
		_, err := d.Download(ctx, e.file(stream.DefaultBlockSize), nil, newMemSink(t, stream.DefaultBlockSize))
		second <- err
	}()
	// Release the held unsubscribes once the second download subscribes (wrong: it did not
	// wait) or after a while (right: it waits for them and never subscribes first).
	select {
	case <-tr.subscribed:
	case <-time.After(time.Second):
	}
	close(tr.release)
	if err := <-second; err != nil {
		t.Fatal(err)
	}
	// Both downloads' unsubscribes end before the test does (no goroutine outlives it).
	for range 4 {
		<-tr.unsubbed
	}
	tr.mu.Lock()
	got := append([]string(nil), tr.log[:6]...)
	tr.mu.Unlock()
	want := []string{"subscribe", "subscribe", "returned", "unsubscribed", "unsubscribed", "subscribe"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("order (-want +got):\n%s", diff)
	}
}

// A delta update fetches a few small blocks of a chunk file, asked for in windows of 128 KB
// (File.RequestBytes): under AWS's quota the first blocks come at once in the quota's
// burst, so the measured round trip and the gap between blocks are tiny and the RTO sits at
// its floor, while the rest of the response waits behind the quota for a write chunk's
// transfer time (tens of milliseconds). That wait is not loss: no block may be asked for
// again, and the emulator serves each wanted block once.
func TestSparseBlocksUnderQuotaAreNotLost(t *testing.T) {
	const bs, blocks = 4096, 512
	for _, tc := range []struct {
		name         string
		wanted, step int
	}{
		{name: "25 of 512", wanted: 25, step: 20},
		{name: "64 of 512", wanted: 64, step: 8},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := newEnv(t, blocks*bs) // quotas on
			missing := bitmap.New(blocks)
			for i := range tc.wanted {
				missing.Set(3 + i*tc.step)
			}
			c := cfg(t, e)
			c.QuietPeriod, c.MaxQuietPeriod = stream.DefaultQuietPeriod, stream.DefaultMaxQuietPeriod
			c.BlockSize = bs
			f := e.file(bs)
			f.RequestBytes = stream.MaxRequestBytes
			sink := newMemSink(t, bs)
			st, err := download(t, e.conn, c, f, missing, sink)
			if err != nil {
				t.Fatal(err)
			}
			sent := e.emu.BlocksServed(e.job)
			t.Logf("stats %+v; blocks sent %d for %d wanted", st, sent, tc.wanted)
			if st.Received != tc.wanted || st.Rerequests != 0 || st.Timeouts != 0 || st.Rounds != 0 || sent != tc.wanted {
				t.Fatalf("throttled, loss-free sparse download re-requested: stats %+v, %d blocks sent for %d", st, sent, tc.wanted)
			}
		})
	}
}
