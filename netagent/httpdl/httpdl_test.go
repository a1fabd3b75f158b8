package httpdl_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"encoding/json"
	"errors"
	"fmt"
	"net/http"
	"net/http/httptest"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/netagent/blocksink"
	"github.com/gwota/gwota/netagent/blocksink/blocksinktest"
	"github.com/gwota/gwota/netagent/httpdl"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
)

func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m,
		goleak.IgnoreTopFunction("github.com/mochi-mqtt/server/v2.(*Client).WriteLoop"),
		goleak.IgnoreTopFunction("github.com/mochi-mqtt/server/v2.(*Server).eventLoop"),
		goleak.IgnoreTopFunction("github.com/mochi-mqtt/server/v2/listeners.(*Net).Serve"),
		goleak.IgnoreTopFunction("github.com/mochi-mqtt/server/v2.(*Server).attachClient"),
		goleak.IgnoreAnyFunction("github.com/mochi-mqtt/server/v2.(*Server).EstablishConnection"),
	)
}

func newSink(t *testing.T) *blocksinktest.Sink { return blocksinktest.New(t) }

// image concatenates the sink's blocks 0..n-1; it fails the test when one is missing.
func image(t *testing.T, s *blocksinktest.Sink, n int) []byte {
	t.Helper()
	var out []byte
	for i := 0; i < n; i++ {
		b, ok := s.Blocks[i]
		if !ok {
			t.Fatalf("block %d missing", i)
		}
		out = append(out, b...)
	}
	return out
}

func randImage(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// server serves img with http.ServeContent and records the Range headers; hook can answer
// instead (return true when it did).
type server struct {
	img    []byte
	mu     sync.Mutex
	ranges []string
	hook   func(w http.ResponseWriter, r *http.Request, n int) bool
	*httptest.Server
}

func newServer(t *testing.T, img []byte) *server {
	s := &server{img: img}
	s.Server = httptest.NewServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		s.mu.Lock()
		s.ranges = append(s.ranges, r.Header.Get("Range"))
		n := len(s.ranges)
		hook := s.hook
		s.mu.Unlock()
		if hook != nil && hook(w, r, n) {
			return
		}
		http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(s.img))
	}))
	t.Cleanup(s.Close)
	return s
}

func (s *server) gotRanges() []string {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]string(nil), s.ranges...)
}

func dl(t *testing.T, cfg httpdl.Config) *httpdl.Downloader {
	if cfg.RetryBackoff == 0 {
		cfg.RetryBackoff = 5 * time.Millisecond
	}
	d, err := httpdl.New(cfg)
	if err != nil {
		t.Fatal(err)
	}
	return d
}

func missingOf(total int, missing ...int) bitmap.Bitmap {
	b := bitmap.New(total)
	for _, i := range missing {
		b.Set(i)
	}
	return b
}

func TestPlan(t *testing.T) {
	const bs = 1024
	tests := []struct {
		name     string
		missing  []int
		total    int
		size     int64
		gap, max int64
		want     []httpdl.Range
	}{
		{name: "all, one range", total: 10, size: 10*bs - 3, missing: []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, gap: 0, max: 1 << 30,
			want: []httpdl.Range{{0, 10*bs - 3}}},
		{name: "runs, no merging", total: 64, size: 64 * bs, missing: []int{3, 4, 5, 10, 50, 51, 63}, gap: -1, max: 1 << 30,
			want: []httpdl.Range{{3 * bs, 6 * bs}, {10 * bs, 11 * bs}, {50 * bs, 52 * bs}, {63 * bs, 64 * bs}}},
		{name: "small gaps merged", total: 64, size: 64 * bs, missing: []int{3, 4, 5, 10, 50, 51, 63}, gap: 4 * bs, max: 1 << 30,
			want: []httpdl.Range{{3 * bs, 11 * bs}, {50 * bs, 52 * bs}, {63 * bs, 64 * bs}}},
		{name: "split at max", total: 10, size: 10 * bs, missing: []int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9}, gap: 0, max: 4 * bs,
			want: []httpdl.Range{{0, 4 * bs}, {4 * bs, 8 * bs}, {8 * bs, 10 * bs}}},
		{name: "nothing", total: 10, size: 10 * bs, gap: bs, max: 1 << 30},
		{name: "gap of one block", total: 16, size: 16 * bs, missing: []int{1, 3, 6, 9, 11}, gap: bs, max: 1 << 30,
			want: []httpdl.Range{{1 * bs, 4 * bs}, {6 * bs, 7 * bs}, {9 * bs, 12 * bs}}},
		{name: "gap of two blocks", total: 16, size: 16 * bs, missing: []int{1, 3, 6, 9, 11}, gap: 2 * bs, max: 1 << 30,
			want: []httpdl.Range{{1 * bs, 12 * bs}}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			m := map[int]bool{}
			for _, i := range tc.missing {
				m[i] = true
			}
			gap := max(tc.gap, 0)
			got := httpdl.Plan(func(i int) bool { return m[i] }, tc.size, bs, gap, tc.max)
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Fatal(diff)
			}
		})
	}
}

func TestDownloadWhole(t *testing.T) {
	img := randImage(3<<20 + 11)
	s := newServer(t, img)
	const bs = 32 << 10
	sink := newSink(t)
	st, err := dl(t, httpdl.Config{}).Download(context.Background(), httpdl.File{URL: s.URL + "/f?sig=1", Size: int64(len(img)), BlockSize: bs}, nil, sink, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(image(t, sink, st.Blocks), img) {
		t.Fatal("image differs")
	}
	// One GET for the whole file, not one per block.
	if r := s.gotRanges(); len(r) != 1 || st.Requests != 1 {
		t.Fatalf("GETs %q, stats %+v", r, st)
	}
}

// Resume from a partial bitmap: only the missing runs are fetched, coalesced.
func TestResumeFetchesOnlyMissing(t *testing.T) {
	const bs = 4096
	img := randImage(100 * bs)
	s := newServer(t, img)
	missing := missingOf(100, 3, 4, 5, 6, 40, 41, 99)
	sink := newSink(t)
	st, err := dl(t, httpdl.Config{MergeGap: -1}).Download(context.Background(), httpdl.File{URL: s.URL, Size: int64(len(img)), BlockSize: bs}, missing, sink, nil)
	if err != nil {
		t.Fatal(err)
	}
	want := []string{
		fmt.Sprintf("bytes=%d-%d", 3*bs, 7*bs-1),
		fmt.Sprintf("bytes=%d-%d", 40*bs, 42*bs-1),
		fmt.Sprintf("bytes=%d-%d", 99*bs, 100*bs-1),
	}
	if diff := cmp.Diff(want, s.gotRanges()); diff != "" {
		t.Fatal(diff)
	}
	if st.Received != 7 || sink.Writes != 7 {
		t.Fatalf("stats %+v, writes %d", st, sink.Writes)
	}
	for _, i := range []int{3, 4, 5, 6, 40, 41, 99} {
		if !bytes.Equal(sink.Blocks[i], img[i*bs:(i+1)*bs]) {
			t.Fatalf("block %d differs", i)
		}
	}
}

// The connection dies mid-body, and from then on the URL is expired (403): the download
// asks for a fresh URL and continues where the data ended.
func TestExpiredURLRefreshed(t *testing.T) {
	const bs = 8192
	img := randImage(64 * bs)
	s := newServer(t, img)
	s.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		switch {
		case r.URL.Query().Get("sig") == "fresh":
			return false
		case n == 1:
			// Half of the file, then the connection drops.
			w.Header().Set("Content-Length", fmt.Sprint(len(img)))
			w.WriteHeader(http.StatusOK)
			w.Write(img[:20*bs+100])
			w.(http.Flusher).Flush()
			conn, _, _ := w.(http.Hijacker).Hijack()
			conn.Close()
			return true
		default:
			http.Error(w, "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>", http.StatusForbidden)
			return true
		}
	}
	refreshes := 0
	refresh := func(context.Context) (string, error) {
		refreshes++
		return s.URL + "/f?sig=fresh", nil
	}
	sink := newSink(t)
	st, err := dl(t, httpdl.Config{}).Download(context.Background(), httpdl.File{URL: s.URL + "/f?sig=old", Size: int64(len(img)), BlockSize: bs}, nil, sink, refresh)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(image(t, sink, 64), img) || refreshes != 1 || sink.Writes != 64 {
		t.Fatalf("refreshes %d, writes %d, stats %+v", refreshes, sink.Writes, st)
	}
	r := s.gotRanges()
	if want := fmt.Sprintf("bytes=%d-%d", 20*bs, len(img)-1); r[len(r)-1] != want {
		t.Fatalf("last GET %q, want %q (all: %q)", r[len(r)-1], want, r)
	}
}

func TestFailures(t *testing.T) {
	const bs = 4096
	img := randImage(16 * bs)
	tests := []struct {
		name    string
		hook    func(w http.ResponseWriter, r *http.Request, n int) bool
		refresh httpdl.RefreshFunc
		reason  otav1.Reason // UNSPECIFIED: success
		gets    int
	}{
		{name: "not found", hook: func(w http.ResponseWriter, _ *http.Request, _ int) bool { http.NotFound(w, nil); return true },
			reason: otav1.Reason_REASON_DOWNLOAD_FAILED, gets: 1},
		{name: "server errors until attempts run out", hook: func(w http.ResponseWriter, _ *http.Request, _ int) bool {
			w.WriteHeader(http.StatusServiceUnavailable)
			return true
		}, reason: otav1.Reason_REASON_DOWNLOAD_FAILED, gets: 3},
		{name: "one server error", hook: func(w http.ResponseWriter, _ *http.Request, n int) bool {
			if n == 1 {
				w.WriteHeader(http.StatusInternalServerError)
				return true
			}
			return false
		}, gets: 2},
		{name: "403 without refresh", hook: func(w http.ResponseWriter, _ *http.Request, _ int) bool {
			w.WriteHeader(http.StatusForbidden)
			return true
		}, reason: otav1.Reason_REASON_DOWNLOAD_FAILED, gets: 1},
		{name: "403 forever", hook: func(w http.ResponseWriter, _ *http.Request, _ int) bool {
			w.WriteHeader(http.StatusForbidden)
			return true
		}, refresh: func(context.Context) (string, error) { return "", nil }, reason: otav1.Reason_REASON_DOWNLOAD_FAILED},
		{name: "wrong Content-Range", hook: func(w http.ResponseWriter, _ *http.Request, _ int) bool {
			w.Header().Set("Content-Range", "bytes 5-9/100")
			w.WriteHeader(http.StatusPartialContent)
			return true
		}, reason: otav1.Reason_REASON_DOWNLOAD_FAILED, gets: 1},
		{name: "server ignores Range", hook: func(w http.ResponseWriter, r *http.Request, _ int) bool {
			w.Write(img)
			return true
		}},
		{name: "stalled body", hook: func(w http.ResponseWriter, r *http.Request, n int) bool {
			if n == 1 {
				w.Header().Set("Content-Length", fmt.Sprint(len(img)))
				w.Write(img[:3*bs])
				w.(http.Flusher).Flush()
				<-r.Context().Done() // stall until the client gives up
				return true
			}
			return false
		}, gets: 2},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer(t, img)
			s.hook = tc.hook
			refresh := tc.refresh
			if refresh != nil {
				refresh = func(ctx context.Context) (string, error) { return s.URL + "/again", nil }
			}
			sink := newSink(t)
			_, err := dl(t, httpdl.Config{MaxAttempts: 3, ReadTimeout: 200 * time.Millisecond}).Download(context.Background(),
				httpdl.File{URL: s.URL + "/f", Size: int64(len(img)), BlockSize: bs}, nil, sink, refresh)
			if got := status.ReasonOf(err); got != tc.reason {
				t.Fatalf("err %v (%v), want %v", err, got, tc.reason)
			}
			if err == nil && !bytes.Equal(image(t, sink, 16), img) {
				t.Fatal("image differs")
			}
			if tc.gets > 0 && len(s.gotRanges()) != tc.gets {
				t.Fatalf("%d GETs, want %d: %q", len(s.gotRanges()), tc.gets, s.gotRanges())
			}
		})
	}
}

// Against the emulator's presigned-URL server: the URL expires, 403 (S3's AccessDenied), and a
// fresh job document gives a new one.
func TestEmulatorExpiredURL(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	emu, err := emulator.Start(ctx, emulator.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer emu.Close()
	img := randImage(1<<20 + 3)
	path := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := emu.CreateJob(ctx, backend.JobSpec{JobID: "h1", Protocols: []string{backend.ProtocolHTTP},
		Files: []backend.FileSpec{{LocalPath: path, DevicePath: "/fw"}}}); err != nil {
		t.Fatal(err)
	}
	docURL := func() string {
		raw, err := emu.JobDocument("h1")
		if err != nil {
			t.Fatal(err)
		}
		var doc struct {
			AFR struct {
				Files []struct {
					URL string `json:"update_data_url"`
				} `json:"files"`
			} `json:"afr_ota"`
		}
		if err := json.Unmarshal(raw, &doc); err != nil || len(doc.AFR.Files) != 1 || doc.AFR.Files[0].URL == "" {
			t.Fatalf("document %s: %v", raw, err)
		}
		return doc.AFR.Files[0].URL
	}
	emu.SetFaults("h1", emulator.Faults{ExpireURLAfter: time.Second})
	old := docURL()
	emu.ClearFaults("h1")
	// Wait for the short-lived URL to be refused (S3 answers 403 once it expired).
	for {
		resp, err := http.Head(old)
		if err != nil {
			t.Fatal(err)
		}
		resp.Body.Close()
		if resp.StatusCode == http.StatusForbidden {
			break
		}
		time.Sleep(50 * time.Millisecond)
	}
	refreshes := 0
	sink := newSink(t)
	const bs = 64 << 10
	st, err := dl(t, httpdl.Config{}).Download(ctx, httpdl.File{URL: old, Size: int64(len(img)), BlockSize: bs}, nil, sink,
		func(context.Context) (string, error) { refreshes++; return docURL(), nil })
	if err != nil {
		t.Fatal(err)
	}
	if refreshes != 1 || !bytes.Equal(image(t, sink, st.Blocks), img) {
		t.Fatalf("refreshes %d, stats %+v", refreshes, st)
	}
}

// resumingSink fails once, at write n, as the writer link does after a writer restart that
// lost every block from lostFrom on.
func resumingSink(t *testing.T, n, lostFrom, total int) *blocksinktest.Sink {
	s := newSink(t)
	s.FailAt = n
	s.Fail = func(blocks map[int][]byte) error {
		missing := bitmap.New(total)
		for b := 0; b < total; b++ {
			if b >= lostFrom {
				delete(blocks, b)
			}
			if _, ok := blocks[b]; !ok {
				missing.Set(b)
			}
		}
		return fmt.Errorf("sink: %w", &blocksink.ResumedError{Cause: errors.New("writer restarted"), Missing: missing})
	}
	return s
}

// The writer restarts mid-download: the next GET starts at the writer's first missing block.
func TestSinkResumed(t *testing.T) {
	const bs = 4096
	img := randImage(32 * bs)
	s := newServer(t, img)
	sink := resumingSink(t, 20, 8, 32)
	st, err := dl(t, httpdl.Config{}).Download(context.Background(), httpdl.File{URL: s.URL, Size: int64(len(img)), BlockSize: bs}, nil, sink, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Resumes != 1 || !bytes.Equal(image(t, sink, 32), img) {
		t.Fatalf("stats %+v", st)
	}
	want := []string{"", fmt.Sprintf("bytes=%d-%d", 8*bs, len(img)-1)}
	if diff := cmp.Diff(want, s.gotRanges()); diff != "" {
		t.Fatal(diff)
	}
}

// A failed GET is a pause of the network: before waiting to retry, the download asks the sink
// to sync, so the blocks that came survive a writer crash during the wait. Progress goes to
// the file's callback, with the sink's durable count.
func TestSyncBeforeRetryAndProgress(t *testing.T) {
	const bs = 4096
	img := randImage(16 * bs)
	s := newServer(t, img)
	s.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
		if n > 1 {
			return false
		}
		// Three blocks, then the connection drops.
		w.Header().Set("Content-Length", fmt.Sprint(len(img)))
		w.WriteHeader(http.StatusOK)
		w.Write(img[:3*bs])
		w.(http.Flusher).Flush()
		conn, _, _ := w.(http.Hijacker).Hijack()
		conn.Close()
		return true
	}
	sink := newSink(t)
	var got []blocksink.Progress
	f := httpdl.File{URL: s.URL, Size: int64(len(img)), BlockSize: bs, OnProgress: func(p blocksink.Progress) { got = append(got, p) }}
	st, err := dl(t, httpdl.Config{}).Download(context.Background(), f, nil, sink, nil)
	if err != nil {
		t.Fatal(err)
	}
	if st.Retries != 1 || !bytes.Equal(image(t, sink, 16), img) {
		t.Fatalf("stats %+v", st)
	}
	if diff := cmp.Diff([]int{3}, sink.Syncs); diff != "" {
		t.Fatalf("blocks held at each Sync (-want +got):\n%s", diff)
	}
	want := []blocksink.Progress{{Received: 0, Durable: 0, Total: 16}}
	for i := 1; i <= 16; i++ {
		d := 0
		if i > 3 {
			d = 3 // synced before the retry
		}
		want = append(want, blocksink.Progress{Received: i, Durable: d, Total: 16})
	}
	want = append(want, blocksink.Progress{Received: 16, Durable: 16, Total: 16}) // flushed
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("progress (-want +got):\n%s", diff)
	}
}

func TestGapFor(t *testing.T) {
	const bs = 4096
	tests := []struct {
		name   string
		rate   float64 // bytes/s
		ttfb   time.Duration
		maxGap int64
		want   int64
	}{
		{name: "rate x ttfb", rate: 1 << 20, ttfb: 50 * time.Millisecond, maxGap: httpdl.DefaultMergeGap, want: 52428},
		{name: "5 Mbit/s, 80 ms", rate: 625000, ttfb: 80 * time.Millisecond, maxGap: httpdl.DefaultMergeGap, want: 50000},
		{name: "fast link, long wait: capped", rate: 100 << 20, ttfb: 100 * time.Millisecond, maxGap: httpdl.DefaultMergeGap, want: httpdl.DefaultMergeGap},
		{name: "local: one block", rate: 100 << 20, ttfb: 10 * time.Microsecond, maxGap: httpdl.DefaultMergeGap, want: bs},
		{name: "cap below a block", rate: 1 << 20, ttfb: time.Second, maxGap: 1024, want: 1024},
		{name: "never merge", rate: 1 << 20, ttfb: time.Second, maxGap: 0, want: 0},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			if diff := cmp.Diff(tc.want, httpdl.GapFor(tc.rate, tc.ttfb, bs, tc.maxGap)); diff != "" {
				t.Fatal(diff)
			}
		})
	}
}

// slowWriter paces a response body: 16 KiB, then a pause.
type slowWriter struct {
	http.ResponseWriter
	pause time.Duration
}

func (w slowWriter) Write(p []byte) (int, error) {
	n := 0
	for len(p) > 0 {
		k := min(len(p), 16<<10)
		m, err := w.ResponseWriter.Write(p[:k])
		n += m
		if err != nil {
			return n, err
		}
		w.ResponseWriter.(http.Flusher).Flush()
		time.Sleep(w.pause)
		p = p[k:]
	}
	return n, nil
}

// The merge gap follows the link the Downloader has measured: a server slow to answer but
// fast to send gets sparse blocks merged into one GET (a second GET would wait longer than
// the gap takes to arrive); a server that answers at once but sends slowly gets each run by
// itself (the gap would take longer than another GET). Before any measurement the gap is
// DefaultStartGap. A whole file is one GET either way.
func TestAdaptiveMergeGap(t *testing.T) {
	const bs = 4096
	const blocks = 128
	img := randImage(blocks * bs)
	sparse := []int{0, 32, 64, 96} // 124 KiB between missing blocks
	type figures struct{ Requests, Received int }
	tests := []struct {
		name         string
		delay, pause time.Duration // before the headers; after each 16 KiB of body
		warm         bool          // download the whole file first (measures the link)
		gapLo, gapHi int64
		want         figures
		wantBytes    int64
	}{
		{name: "slow first byte, fast body: merged", delay: 150 * time.Millisecond, warm: true,
			gapLo: 128 << 10, gapHi: httpdl.DefaultMergeGap, want: figures{1, 4}, wantBytes: 97 * bs},
		{name: "fast first byte, slow body: apart", pause: 16 * time.Millisecond, warm: true,
			gapLo: bs, gapHi: 64 << 10, want: figures{4, 4}, wantBytes: 4 * bs},
		{name: "not measured: start gap", delay: 150 * time.Millisecond,
			gapLo: httpdl.DefaultStartGap, gapHi: httpdl.DefaultStartGap, want: figures{4, 4}, wantBytes: 4 * bs},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			s := newServer(t, img)
			s.hook = func(w http.ResponseWriter, r *http.Request, n int) bool {
				time.Sleep(tc.delay)
				if tc.pause > 0 {
					w = slowWriter{w, tc.pause}
				}
				http.ServeContent(w, r, "", time.Time{}, bytes.NewReader(img))
				return true
			}
			d := dl(t, httpdl.Config{})
			f := httpdl.File{URL: s.URL, Size: int64(len(img)), BlockSize: bs}
			if tc.warm {
				st, err := d.Download(context.Background(), f, nil, newSink(t), nil)
				if err != nil {
					t.Fatal(err)
				}
				if st.Requests != 1 || st.Bytes != int64(len(img)) {
					t.Fatalf("whole file: %+v", st)
				}
			}
			sink := newSink(t)
			st, err := d.Download(context.Background(), f, missingOf(blocks, sparse...), sink, nil)
			if err != nil {
				t.Fatal(err)
			}
			t.Logf("merge gap %d, stats %+v", st.MergeGap, st)
			if st.MergeGap < tc.gapLo || st.MergeGap > tc.gapHi {
				t.Errorf("merge gap %d, want %d..%d", st.MergeGap, tc.gapLo, tc.gapHi)
			}
			if diff := cmp.Diff(tc.want, figures{st.Requests, st.Received}); diff != "" {
				t.Error(diff)
			}
			if st.Bytes != tc.wantBytes {
				t.Errorf("fetched %d bytes, want %d", st.Bytes, tc.wantBytes)
			}
			for _, i := range sparse {
				if !bytes.Equal(sink.Blocks[i], img[i*bs:(i+1)*bs]) {
					t.Fatalf("block %d differs", i)
				}
			}
		})
	}
}

// recyclingSink copies each block, poisons the buffer it was given and hands it straight
// back to the Downloader, as writerlink.Sink does once a block is sent.
type recyclingSink struct {
	*blocksinktest.Sink
	d       *httpdl.Downloader
	buffers map[*byte]bool // distinct buffers seen
}

func (s *recyclingSink) WriteBlock(ctx context.Context, i int, data []byte) error {
	s.buffers[unsafe.SliceData(data)] = true
	if err := s.Sink.WriteBlock(ctx, i, bytes.Clone(data)); err != nil {
		return err
	}
	for k := range data {
		data[k] = 0xa5
	}
	s.d.Recycle(data)
	return nil
}

// Block buffers a sink hands back (Recycle) are read into again, and never while the sink
// might still hold them: the image arrives whole although every buffer is overwritten the
// moment it is handed back, and far fewer buffers than blocks are used.
func TestRecycledBlockBuffers(t *testing.T) {
	img := randImage(8<<20 + 100)
	s := newServer(t, img)
	const bs = 32 << 10
	d := dl(t, httpdl.Config{})
	sink := &recyclingSink{Sink: newSink(t), d: d, buffers: map[*byte]bool{}}
	st, err := d.Download(context.Background(), httpdl.File{URL: s.URL + "/f?sig=1", Size: int64(len(img)), BlockSize: bs}, nil, sink, nil)
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(image(t, sink.Sink, st.Blocks), img) {
		t.Fatal("image differs")
	}
	// At most readAhead (32 blocks) in flight; sync.Pool may drop some (a quarter of them
	// under the race detector, all of them at a second GC).
	if n := len(sink.buffers); n > st.Blocks*3/4 {
		t.Errorf("%d distinct buffers for %d blocks: recycled buffers are not reused", n, st.Blocks)
	}
}
