// Package httpdl downloads a file from a presigned HTTP(S) URL with ranged GETs: only the
// blocks the writer still misses, coalesced into large ranges, streamed block by block to a
// blocksink.Sink (never the whole file in memory), following its contract: the sink is asked
// to sync before a wait for a retry, and a *blocksink.ResumedError reloads the writer's
// bitmap. An expired URL (403) is replaced through a callback that fetches a fresh job
// document.
package httpdl

import (
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptrace"
	"net/url"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/netagent/blocksink"
	"github.com/gwota/gwota/netagent/webproxy"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// Defaults.
const (
	DefaultConnectTimeout = 15 * time.Second
	DefaultHeaderTimeout  = 30 * time.Second
	// DefaultReadTimeout: a body that delivers nothing for this long is abandoned and the
	// rest fetched again.
	DefaultReadTimeout = 30 * time.Second
	// DefaultMaxRangeBytes caps one GET so that a failure late in a huge range loses little
	// time to reconnecting, while one range still amortises the request cost completely.
	DefaultMaxRangeBytes = 64 << 20
	// DefaultMergeGap caps the merge gap: missing runs closer than the gap are fetched in one
	// range (the blocks in between are read and dropped). The gap itself is what the link
	// carries during one GET's wait for its first byte (measured rate × time to first byte),
	// since that is what a separate GET costs; at most this, at least one block.
	DefaultMergeGap = 256 << 10
	// DefaultStartGap is the gap before the Downloader has measured its link (no body of
	// minRateSample bytes yet): small, so that a sparse plan wastes little before it knows.
	DefaultStartGap = 64 << 10
	// minRateSample: shorter bodies arrive in one burst and say nothing of the link's rate.
	minRateSample       = 32 << 10
	DefaultMaxAttempts  = 8
	DefaultRetryBackoff = 500 * time.Millisecond
	maxRetryBackoff     = 30 * time.Second
	// DefaultMaxRefreshes: new URLs in a row that still get 403 before giving up.
	DefaultMaxRefreshes = 3
	// readAhead is how much of a body is read ahead of the sink (memory: at most this much
	// besides what the sink holds).
	readAhead = 1 << 20
)

// Config tunes a Downloader. Zero values take the defaults.
type Config struct {
	// Client, if set, is used as is (its timeouts included); else one is built from the
	// timeouts below.
	Client                        *http.Client
	ConnectTimeout, HeaderTimeout time.Duration
	ReadTimeout                   time.Duration
	MaxRangeBytes                 int64
	// MergeGap caps the adaptive merge gap (default DefaultMergeGap); negative: never merge
	// runs of missing blocks.
	MergeGap int64
	// MaxAttempts failed GETs in a row without a new block fail the download
	// (download_failed); the wait between them doubles from RetryBackoff up to 30 s.
	MaxAttempts  int
	RetryBackoff time.Duration
	MaxRefreshes int
	// Proxy, when set, carries every connection through its CONNECT tunnel (TLS to the
	// server runs inside); nil: direct. The environment's proxy variables are never read
	// here: webproxy.Resolve has applied them already.
	Proxy  *webproxy.Proxy
	Logger hclog.Logger
}

// File names what to download.
type File struct {
	URL       string
	Size      int64
	BlockSize int // the writer session's block size
	// OnProgress, if set, hears the download's progress.
	OnProgress blocksink.ProgressFunc
}

// RefreshFunc returns a fresh URL for the file (the jobs client re-reads the job document,
// which re-signs it).
type RefreshFunc func(ctx context.Context) (string, error)

// Stats describe one Download.
type Stats struct {
	Blocks    int
	Received  int   // new blocks handed to the sink
	Requests  int   // GETs sent
	Bytes     int64 // body bytes read
	Retries   int
	Refreshes int
	Resumes   int
	// MergeGap is the gap of the last plan (bytes).
	MergeGap int64
}

// Downloader fetches files over HTTP.
type Downloader struct {
	cfg  Config
	hc   *http.Client
	log  hclog.Logger
	link linkEstimate // kept across downloads: the link outlives one file
	// blocks holds block buffers handed back by the sink (Recycle) for the next reads; a sink
	// that hands none back leaves every block a new allocation.
	blocks sync.Pool // *[]byte
}

// block returns a buffer of n bytes for a block: a recycled one when one fits.
func (d *Downloader) block(n int) []byte {
	if p, ok := d.blocks.Get().(*[]byte); ok && cap(*p) >= n && cap(*p) <= 2*n {
		return (*p)[:n]
	}
	return make([]byte, n)
}

// Recycle takes back a block buffer this Downloader handed to a sink, once the sink refers to
// it no longer (writerlink.Sink.SetOnSent): reading a 64 MiB image otherwise allocated 64 MiB
// of short-lived buffers, and their garbage collection was about a quarter of ota-net's CPU on
// an unshaped HTTP download.
func (d *Downloader) Recycle(b []byte) {
	b = b[:cap(b)]
	d.blocks.Put(&b)
}

// linkEstimate is what the Downloader has measured of its own GETs.
type linkEstimate struct {
	mu   sync.Mutex
	ttfb time.Duration // moving average from request written to first response byte; 0: none
	// Decayed sums of bodies of at least minRateSample bytes: rate = bytes / secs.
	bytes, secs float64
}

func (e *linkEstimate) observe(ttfb time.Duration, bodyBytes int64, body time.Duration) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if ttfb > 0 {
		if e.ttfb == 0 {
			e.ttfb = ttfb
		} else {
			e.ttfb = (3*e.ttfb + ttfb) / 4
		}
	}
	if bodyBytes >= minRateSample && body > 0 {
		e.bytes = e.bytes/2 + float64(bodyBytes)
		e.secs = e.secs/2 + body.Seconds()
	}
}

// current returns the measured rate (bytes/s) and time to first byte; ok false before both
// are known.
func (e *linkEstimate) current() (rate float64, ttfb time.Duration, ok bool) {
	e.mu.Lock()
	defer e.mu.Unlock()
	if e.ttfb == 0 || e.secs == 0 {
		return 0, 0, false
	}
	return e.bytes / e.secs, e.ttfb, true
}

// GapFor is the merge gap for a link of rate bytes/s whose GETs wait ttfb for their first
// byte: the bytes the link would carry during that wait (fetching fewer and dropping them
// costs less than another GET), within one block and maxGap.
func GapFor(rate float64, ttfb time.Duration, blockSize int, maxGap int64) int64 {
	if maxGap <= 0 {
		return 0
	}
	g := int64(rate * ttfb.Seconds())
	return max(min(g, maxGap), min(int64(blockSize), maxGap))
}

// MergeGap returns the gap the next plan for blocks of blockSize uses: GapFor what the
// Downloader has measured, DefaultStartGap (within the same bounds) before it has.
func (d *Downloader) MergeGap(blockSize int) int64 {
	if d.cfg.MergeGap <= 0 {
		return 0
	}
	rate, ttfb, ok := d.link.current()
	if !ok {
		return max(min(DefaultStartGap, d.cfg.MergeGap), min(int64(blockSize), d.cfg.MergeGap))
	}
	return GapFor(rate, ttfb, blockSize, d.cfg.MergeGap)
}

// New returns a Downloader.
func New(cfg Config) (*Downloader, error) {
	if cfg.ConnectTimeout <= 0 {
		cfg.ConnectTimeout = DefaultConnectTimeout
	}
	if cfg.HeaderTimeout <= 0 {
		cfg.HeaderTimeout = DefaultHeaderTimeout
	}
	if cfg.ReadTimeout <= 0 {
		cfg.ReadTimeout = DefaultReadTimeout
	}
	if cfg.MaxRangeBytes <= 0 {
		cfg.MaxRangeBytes = DefaultMaxRangeBytes
	}
	if cfg.MergeGap < 0 {
		cfg.MergeGap = 0
	} else if cfg.MergeGap == 0 {
		cfg.MergeGap = DefaultMergeGap
	}
	if cfg.MaxAttempts <= 0 {
		cfg.MaxAttempts = DefaultMaxAttempts
	}
	if cfg.RetryBackoff <= 0 {
		cfg.RetryBackoff = DefaultRetryBackoff
	}
	if cfg.MaxRefreshes <= 0 {
		cfg.MaxRefreshes = DefaultMaxRefreshes
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	hc := cfg.Client
	if hc == nil {
		tr := http.DefaultTransport.(*http.Transport).Clone()
		tr.DialContext = (&net.Dialer{Timeout: cfg.ConnectTimeout, KeepAlive: 30 * time.Second}).DialContext
		tr.Proxy = nil
		if px := cfg.Proxy; px != nil {
			tr.DialContext = func(ctx context.Context, network, addr string) (net.Conn, error) {
				ctx, cancel := context.WithTimeout(ctx, cfg.ConnectTimeout)
				defer cancel()
				return px.DialContext(ctx, network, addr)
			}
		}
		tr.TLSHandshakeTimeout = cfg.ConnectTimeout
		tr.ResponseHeaderTimeout = cfg.HeaderTimeout
		// Transparent gzip would break byte ranges.
		tr.DisableCompression = true
		hc = &http.Client{Transport: tr}
	}
	return &Downloader{cfg: cfg, hc: hc, log: cfg.Logger}, nil
}

// Config returns the effective configuration.
func (d *Downloader) Config() Config { return d.cfg }

// Range is a byte range [Start, End) starting on a block boundary; End is a block boundary
// or the file size.
type Range struct{ Start, End int64 }

// Plan returns the byte ranges a download of the missing blocks will GET: runs of missing
// blocks, merged across gaps of at most mergeGap bytes, split at maxRange bytes.
func Plan(missing func(i int) bool, size int64, blockSize int, mergeGap, maxRange int64) []Range {
	return planFrom(missing, 0, size, blockSize, mergeGap, maxRange)
}

// planFrom is Plan from block from on.
func planFrom(missing func(i int) bool, from int, size int64, blockSize int, mergeGap, maxRange int64) []Range {
	bs := int64(blockSize)
	total := int((size + bs - 1) / bs)
	var out []Range
	for i := from; i < total; {
		if !missing(i) {
			i++
			continue
		}
		j := i + 1
		for gap := 0; j < total; j++ {
			if missing(j) {
				gap = 0
				continue
			}
			gap++
			if int64(gap)*bs > mergeGap {
				j -= gap - 1
				break
			}
		}
		// Trim trailing non-missing blocks kept while looking for a merge.
		for j > i+1 && !missing(j-1) {
			j--
		}
		start, end := int64(i)*bs, min(int64(j)*bs, size)
		step := max(bs, maxRange/bs*bs)
		for s := start; s < end; s += step {
			out = append(out, Range{s, min(s+step, end)})
		}
		i = j
	}
	return out
}

type run struct {
	d       *Downloader
	f       File
	sink    blocksink.Sink
	refresh RefreshFunc
	url     string
	total   int
	have    bitmap.Bitmap // handed to the sink (and not lost since)
	held    int
	stats   Stats
}

func (r *run) missing(i int) bool { return !r.have.Has(i) }

// reload makes the writer's missing bitmap the truth (blocks past a short one count as
// missing).
func (r *run) reload(missing bitmap.Bitmap) {
	r.have = missing.Complement(r.total)
	r.held = r.have.Count()
	r.progress()
}

func (r *run) progress() {
	if r.f.OnProgress != nil {
		r.f.OnProgress(blocksink.Progress{Received: r.held, Durable: r.sink.Durable(), Total: r.total})
	}
}

// Download fetches the blocks that missing marks (nil: all) and hands them to sink, then
// waits until they are durable (sink.Flush). refresh may be nil (a 403 then fails).
func (d *Downloader) Download(ctx context.Context, f File, missing bitmap.Bitmap, sink blocksink.Sink, refresh RefreshFunc) (Stats, error) {
	if f.URL == "" || f.Size <= 0 || f.BlockSize <= 0 {
		return Stats{}, status.Errorf(otav1.Reason_REASON_JOB_DOCUMENT_INVALID, "http download: url %q, size %d, block size %d", redact(f.URL), f.Size, f.BlockSize)
	}
	r := &run{d: d, f: f, sink: sink, refresh: refresh, url: f.URL, total: int((f.Size + int64(f.BlockSize) - 1) / int64(f.BlockSize))}
	r.stats.Blocks = r.total
	r.reload(missing)
	err := r.loop(ctx)
	return r.stats, err
}

func (r *run) loop(ctx context.Context) error {
	attempts, refreshes := 0, 0
	backoff := r.d.cfg.RetryBackoff
	for {
		gap := r.d.MergeGap(r.f.BlockSize)
		r.stats.MergeGap = gap
		plan := Plan(r.missing, r.f.Size, r.f.BlockSize, gap, r.d.cfg.MaxRangeBytes)
		if len(plan) == 0 {
			err := r.sink.Flush(ctx)
			if err == nil {
				r.progress()
				return nil
			}
			if err := r.sinkErr(err); err != nil {
				return err
			}
			continue
		}
		var err error
		progressed := false
		for k := 0; k < len(plan); k++ {
			sp := plan[k]
			before := r.held
			err = r.fetch(ctx, sp)
			if r.held > before {
				progressed = true
			}
			if err != nil {
				break
			}
			// Each GET refines the measured gap: when it has moved by more than a quarter,
			// the rest of the file is planned again with it.
			if g := r.d.MergeGap(r.f.BlockSize); k+1 < len(plan) && (g < gap*3/4 || g > gap*5/4) {
				gap = g
				r.stats.MergeGap = gap
				rest := planFrom(r.missing, int(sp.End/int64(r.f.BlockSize)), r.f.Size, r.f.BlockSize, gap, r.d.cfg.MaxRangeBytes)
				plan = append(plan[:k+1], rest...)
			}
		}
		if err == nil {
			continue
		}
		if progressed {
			attempts, refreshes, backoff = 0, 0, r.d.cfg.RetryBackoff
		}
		if ctx.Err() != nil {
			return fmt.Errorf("http download: %w", ctx.Err())
		}
		var se *sinkError
		var ee *expiredError
		var pe *permanentError
		switch {
		case errors.As(err, &se):
			if err := r.sinkErr(se.err); err != nil {
				return err
			}
		case errors.As(err, &ee):
			refreshes++
			if r.refresh == nil || refreshes > r.d.cfg.MaxRefreshes {
				return status.Errorf(otav1.Reason_REASON_DOWNLOAD_FAILED, "http download: URL refused after %d refreshes: %v", refreshes-1, err).
					WithMeta("http_status", strconv.Itoa(ee.code))
			}
			u, rerr := r.refresh(ctx)
			if rerr != nil {
				if ctx.Err() != nil {
					return fmt.Errorf("http download: %w", ctx.Err())
				}
				return status.Errorf(otav1.Reason_REASON_DOWNLOAD_FAILED, "http download: refreshing the expired URL: %w", rerr)
			}
			r.stats.Refreshes++
			r.d.log.Info("presigned URL refused; using a fresh one", "status", ee.code)
			r.url = u
		case errors.As(err, &pe):
			return status.Errorf(otav1.Reason_REASON_DOWNLOAD_FAILED, "http download: %v", err).WithMeta("http_status", strconv.Itoa(pe.code))
		default:
			attempts++
			r.stats.Retries++
			var pxe *webproxy.Error
			if errors.As(err, &pxe) {
				r.d.log.Error("http download failed at the web proxy", "proxy", pxe.Proxy, "proxy_status", pxe.Status, "error", err)
				if pxe.Permanent() || attempts >= r.d.cfg.MaxAttempts {
					return status.Errorf(otav1.Reason_REASON_PROXY_FAILED, "http download: %v", err).WithMeta("proxy_status", strconv.Itoa(pxe.Status))
				}
			} else if attempts >= r.d.cfg.MaxAttempts {
				return status.Errorf(otav1.Reason_REASON_DOWNLOAD_FAILED, "http download: %d attempts without progress, last: %v", attempts, err)
			}
			r.d.log.Warn("http download interrupted; retrying", "error", err, "attempt", attempts, "backoff", backoff)
			// What arrived before the failure survives a writer crash during the wait.
			if err := r.sink.Sync(ctx); err != nil {
				if err := r.sinkErr(err); err != nil {
					return err
				}
			}
			t := time.NewTimer(backoff)
			select {
			case <-t.C:
			case <-ctx.Done():
				t.Stop()
				return fmt.Errorf("http download: %w", ctx.Err())
			}
			backoff = min(backoff*2, maxRetryBackoff)
		}
	}
}

// sinkErr handles a sink error by the blocksink.Sink contract: a resumed writer session
// reloads the bitmap, anything else ends the download.
func (r *run) sinkErr(err error) error {
	var res *blocksink.ResumedError
	if !errors.As(err, &res) {
		return err
	}
	r.stats.Resumes++
	r.d.log.Info("writer session resumed; continuing from its bitmap", "error", err)
	r.reload(res.Missing)
	return nil
}

type sinkError struct{ err error }

func (e *sinkError) Error() string { return e.err.Error() }

type expiredError struct{ code int }

func (e *expiredError) Error() string { return fmt.Sprintf("HTTP %d", e.code) }

type permanentError struct {
	code int
	msg  string
}

func (e *permanentError) Error() string { return e.msg }

// fetch GETs one range and streams its blocks to the sink.
func (r *run) fetch(ctx context.Context, sp Range) error {
	ctx, cancel := context.WithCancel(ctx)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, r.url, nil)
	if err != nil {
		return &permanentError{msg: fmt.Sprintf("bad URL: %v", err)}
	}
	whole := sp.Start == 0 && sp.End == r.f.Size
	if !whole {
		req.Header.Set("Range", fmt.Sprintf("bytes=%d-%d", sp.Start, sp.End-1))
	}
	// Time to first byte counts from the request written, so a new connection's handshakes
	// do not count: a merged gap saves a GET on a kept connection.
	// The transport calls these on its own goroutines: nanoseconds since t0, 0 for not yet.
	t0 := time.Now()
	var wrote, first atomic.Int64
	req = req.WithContext(httptrace.WithClientTrace(ctx, &httptrace.ClientTrace{
		WroteRequest:         func(httptrace.WroteRequestInfo) { wrote.Store(int64(time.Since(t0)) + 1) },
		GotFirstResponseByte: func() { first.Store(int64(time.Since(t0)) + 1) },
	}))
	r.stats.Requests++
	resp, err := r.d.hc.Do(req)
	if err != nil {
		return fmt.Errorf("GET: %w", redactErr(err))
	}
	defer resp.Body.Close()
	skip := int64(0)
	end := sp.End
	switch {
	case resp.StatusCode == http.StatusPartialContent:
		start, last, size, err := parseContentRange(resp.Header.Get("Content-Range"))
		if err != nil || start != sp.Start || last < start || last >= sp.End || (size >= 0 && size != r.f.Size) {
			return &permanentError{code: resp.StatusCode, msg: fmt.Sprintf("Content-Range %q does not match bytes %d-%d of %d",
				resp.Header.Get("Content-Range"), sp.Start, sp.End-1, r.f.Size)}
		}
		end = last + 1 // a shorter answer is fine: the rest is fetched next round
	case resp.StatusCode == http.StatusOK:
		// The server ignored the range: the body is the whole file.
		if resp.ContentLength >= 0 && resp.ContentLength != r.f.Size {
			return &permanentError{code: resp.StatusCode, msg: fmt.Sprintf("body of %d bytes, file is %d", resp.ContentLength, r.f.Size)}
		}
		skip = sp.Start
	case resp.StatusCode == http.StatusForbidden || resp.StatusCode == http.StatusUnauthorized:
		return &expiredError{code: resp.StatusCode}
	case resp.StatusCode == http.StatusRequestTimeout || resp.StatusCode == http.StatusTooManyRequests || resp.StatusCode >= 500:
		return fmt.Errorf("HTTP %d", resp.StatusCode)
	default:
		return &permanentError{code: resp.StatusCode, msg: fmt.Sprintf("HTTP %d for bytes %d-%d", resp.StatusCode, sp.Start, sp.End-1)}
	}

	body := newIdleReader(resp.Body, r.d.cfg.ReadTimeout, cancel)
	defer body.stop()
	if skip > 0 {
		n, err := io.CopyN(io.Discard, body, skip)
		r.stats.Bytes += n
		if err != nil {
			return fmt.Errorf("skipping to byte %d: %w", skip, err)
		}
	}
	// The body is read on a goroutine of its own, up to readAhead bytes ahead of the sink:
	// while the writer syncs (and the sink waits for it) the network keeps delivering, as
	// it does for curl; a link paced by the sender cannot make up a pause later.
	bs := int64(r.f.BlockSize)
	type chunk struct {
		i    int
		data []byte
		err  error
	}
	ch := make(chan chunk, max(1, int(readAhead/bs)))
	var bodyBytes int64
	var bodyEnd time.Duration // since t0, set once the whole range has been read
	go func() {
		defer close(ch)
		for off := sp.Start; off < end; {
			i := int(off / bs)
			n := min(bs, r.f.Size-off)
			if off+n > end {
				return // a short 206: the block's tail comes next round
			}
			data := r.d.block(int(n))
			got, err := io.ReadFull(body, data)
			bodyBytes += int64(got)
			if err != nil {
				if body.timedOut() {
					err = fmt.Errorf("no data for %v at byte %d", r.d.cfg.ReadTimeout, off+int64(got))
				} else {
					err = fmt.Errorf("reading block %d: %w", i, err)
				}
				select {
				case ch <- chunk{err: err}:
				case <-ctx.Done():
				}
				return
			}
			off += n
			if off >= end {
				bodyEnd = time.Since(t0)
			}
			select {
			case ch <- chunk{i: i, data: data}:
			case <-ctx.Done():
				return
			}
		}
	}()
	defer func() {
		cancel()
		for range ch { // the reader has stopped once ch is closed
		}
		r.stats.Bytes += bodyBytes
	}()
	for c := range ch {
		if c.err != nil {
			return c.err
		}
		if !r.missing(c.i) {
			r.d.Recycle(c.data) // merged across a gap, or a duplicate after a resume
			continue
		}
		if err := r.sink.WriteBlock(ctx, c.i, c.data); err != nil {
			return &sinkError{err}
		}
		r.have.Set(c.i)
		r.held++
		r.stats.Received++
		r.progress()
	}
	// ch is closed: the reader has stopped and its writes are visible.
	if w, f := time.Duration(wrote.Load()-1), time.Duration(first.Load()-1); bodyEnd > 0 && w >= 0 && f > w {
		r.d.link.observe(f-w, bodyBytes+skip, bodyEnd-f)
	}
	return nil
}

func parseContentRange(h string) (start, last, size int64, err error) {
	// "bytes 0-99/1000" or "bytes 0-99/*"
	rest, ok := strings.CutPrefix(h, "bytes ")
	if !ok {
		return 0, 0, 0, errors.New("no bytes unit")
	}
	rng, sz, ok := strings.Cut(rest, "/")
	if !ok {
		return 0, 0, 0, errors.New("no size")
	}
	a, b, ok := strings.Cut(rng, "-")
	if !ok {
		return 0, 0, 0, errors.New("no range")
	}
	if start, err = strconv.ParseInt(a, 10, 64); err != nil {
		return
	}
	if last, err = strconv.ParseInt(b, 10, 64); err != nil {
		return
	}
	size = -1
	if sz != "*" {
		size, err = strconv.ParseInt(sz, 10, 64)
	}
	return
}

// idleReader cancels the request when no byte arrives for the timeout.
type idleReader struct {
	r       io.Reader
	d       time.Duration
	t       *time.Timer
	mu      sync.Mutex
	expired bool
}

func newIdleReader(r io.Reader, d time.Duration, cancel context.CancelFunc) *idleReader {
	ir := &idleReader{r: r, d: d}
	ir.t = time.AfterFunc(d, func() {
		ir.mu.Lock()
		ir.expired = true
		ir.mu.Unlock()
		cancel()
	})
	return ir
}

func (ir *idleReader) Read(p []byte) (int, error) {
	n, err := ir.r.Read(p)
	if n > 0 {
		ir.t.Reset(ir.d)
	}
	return n, err
}

func (ir *idleReader) stop() { ir.t.Stop() }

func (ir *idleReader) timedOut() bool {
	ir.mu.Lock()
	defer ir.mu.Unlock()
	return ir.expired
}

// redact drops the query (the presigned signature) from URLs that reach logs and reasons.
func redact(u string) string {
	if i := strings.IndexByte(u, '?'); i >= 0 {
		return u[:i] + "?…"
	}
	return u
}

func redactErr(err error) error {
	var ue *urlError
	if errors.As(err, &ue) {
		return fmt.Errorf("%s %s: %w", ue.Op, redact(ue.URL), ue.Err)
	}
	return err
}

type urlError = url.Error
