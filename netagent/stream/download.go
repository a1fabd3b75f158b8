// Package stream downloads a file over AWS IoT MQTT-based file delivery (streams): windowed
// bitmap requests, several in flight, re-requests after a quiet period, every block validated
// and handed to a Sink (the writer link) as it arrives.
//
// Requests: each asks for up to BlocksPerRequest missing blocks (never more than 128 KB of
// data) with an offset and a bitmap; windows reach any block a stream can address (offset up
// to 98304, bitmap under 12,288 bytes), so there is no 31-block or 4 MiB ceiling.
//
// Loss: the round trip of requests is measured (SRTT, RTTVAR and RTO as TCP computes them,
// rtt.go) and a block is asked for again as soon as the evidence says it is lost: blocks the
// server sent after it arrived, and a short reordering window passed (scheduler.go); a block
// queued behind AWS's 512 KiB/s quota is late, not lost. When nothing arrives at all in the
// tail, what is outstanding is asked for again after the RTO, doubling per try;
// once that reaches the quiet period, the quiet rounds take over: every outstanding request
// is sent again (this covers a lost first request too), the period doubles per fruitless
// round and after MaxFruitlessRounds the download fails with momentum_abort. Duplicates and
// reordering are harmless: blocks are placed by index and counted once.
//
// QoS: requests go at QoS 0 (idempotent, guarded by the loss detection; QoS 1 would add a
// PUBACK wait per request and count against AWS's 100 unacknowledged messages). The data
// subscription is QoS 1, so AWS delivers blocks at QoS 1: blocks published while the link
// is briefly down wait in the persistent session, and the broker is paced by acks.
//
// Durability: blocks go to a blocksink.Sink (the writer link), whose contract the download
// follows: when the network goes quiet the sink is asked to sync, and a writer restart comes
// back as a *blocksink.ResumedError with the writer's bitmap of missing blocks, from which the
// download continues. Progress survives either process restarting (begin the session again
// and pass its bitmap as missing).
package stream

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"slices"
	"sort"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/netagent/blocksink"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// Transport is the MQTT connection as the downloader uses it (netagent/mqttconn satisfies it).
type Transport interface {
	Publish(ctx context.Context, topic string, qos byte, payload []byte) error
	Subscribe(ctx context.Context, filter string, qos byte, handler func(topic string, payload []byte)) (unsubscribe func(context.Context) error, err error)
}

// Defaults, chosen by measurement (scripts/bench-stream.sh -sweep: block size x requests in
// flight through mosquitto on loopback, 128 KB per request). 64 KiB blocks, 2 per request
// (the 128 KB cap) and 8 requests in flight were fastest; 16 blocks in flight stay well under
// AWS's 100 unacknowledged QoS 1 messages, and a 64 KiB block plus ~24 bytes of CBOR and the
// topic stays under the 128 KB MQTT message limit. In-flight data waits in the broker and
// the socket, not in this process: memory does not grow with these settings.
const (
	DefaultBlockSize          = 64 * 1024
	DefaultBlocksPerRequest   = 2
	DefaultRequestsInFlight   = 8
	DefaultQuietPeriod        = 2 * time.Second
	DefaultMaxQuietPeriod     = 30 * time.Second
	DefaultMaxFruitlessRounds = 12
	// DefaultQuotaBytesPerSecond is AWS IoT Core's per-connection quota: "data received or
	// sent over a client connection is processed at a maximum rate" of 512 KiB/s.
	DefaultQuotaBytesPerSecond = 512 * 1024
)

// Config tunes a Downloader. Zero values take the defaults.
type Config struct {
	// Thing is the thing name in the stream topics (required).
	Thing string
	// Format is FormatCBOR (default) or FormatJSON.
	Format string
	// BlockSize is the block size asked of the writer for new sessions; a resumed session's
	// block size wins (File.BlockSize).
	BlockSize int
	// BlocksPerRequest is the most blocks one request asks for; it is capped so that
	// blocks*size never exceeds 128 KB.
	BlocksPerRequest int
	// RequestsInFlight is how many requests may be outstanding at once.
	RequestsInFlight int
	// QuietPeriod: when no new block arrives for this long, everything outstanding is
	// re-requested (a round). The period doubles with every fruitless round up to
	// MaxQuietPeriod. QuietPeriod is also the RTO before the first round trip was measured,
	// MaxQuietPeriod the RTO's ceiling.
	QuietPeriod    time.Duration
	MaxQuietPeriod time.Duration
	// MaxFruitlessRounds rounds in a row without a new block fail the download with
	// momentum_abort (2003).
	MaxFruitlessRounds int
	// RequestQoS is the QoS of GetStream requests (default 0: a request is idempotent and a
	// lost one is re-sent like a lost block, so a PUBACK round trip buys nothing).
	RequestQoS byte
	// DataQoS is the QoS of the data/rejected subscriptions; AWS delivers blocks at the QoS
	// of the subscription. Default 1: blocks published while the connection is down wait in
	// the persistent session, and QoS 1 flow control paces the broker. Set to 0 explicitly
	// with DataQoS0.
	DataQoS  byte
	DataQoS0 bool
	// ClientToken is sent as "c" (random when empty); rejections with another token are
	// someone else's.
	ClientToken string
	// QuotaBytesPerSecond is the most the connection delivers (default AWS's quota,
	// DefaultQuotaBytesPerSecond): blocks asked for cannot all have arrived before their
	// bytes drained at that rate, so the tail timeout waits at least that long
	// (scheduler.go). NoQuota drops the bound (a loopback broker without AWS's quotas).
	QuotaBytesPerSecond int
	NoQuota             bool
	Logger              hclog.Logger
}

// File names what to download.
type File struct {
	StreamName string
	FileID     int
	Size       int64
	// BlockSize is the session's block size (the writer's answer to BeginSession).
	BlockSize int
	// RequestBytes, when > 0, sizes requests in bytes instead of Config.BlocksPerRequest: a
	// request asks for up to RequestBytes/BlockSize blocks (at most 128 KB). A chunk file
	// fetched in small blocks (netagent/chunksink) keeps the window of the usual block size.
	RequestBytes int
	// OnProgress, if set, hears the download's progress (rate-limit reports there).
	OnProgress blocksink.ProgressFunc
}

// Stats describe one Download.
type Stats struct {
	Blocks     int // blocks in the file
	Received   int // new blocks received in this call
	Duplicates int
	Malformed  int // dropped: undecodable or not matching the file
	Requests   int
	Rerequests int // requests re-issued for blocks that did not come
	Rounds     int // quiet rounds (nothing arrived)
	Rejections int // transient rejections (InternalError)
	Resumes    int // the sink's writer came back and the bitmap was reloaded
	Timeouts   int // re-requests after an RTO without any block (before the quiet rounds)
	// SRTT and RTO at the end (zero when no round trip was measured).
	SRTT, RTO time.Duration
}

// Downloader downloads files over MQTT streams.
type Downloader struct {
	t   Transport
	cfg Config
	log hclog.Logger

	// unsubscribing is closed once the unsubscribes of the downloads that have returned are
	// done (nil: none yet). A download returns without waiting for its UNSUBACKs (two round
	// trips on a long link, before the ready update could go out); the next one waits for
	// them before it subscribes, so an old UNSUBSCRIBE never lands after a new SUBSCRIBE of
	// the same stream (the files of one job share it).
	mu            sync.Mutex
	unsubscribing chan struct{}
}

// New returns a downloader using t.
func New(t Transport, cfg Config) (*Downloader, error) {
	if t == nil {
		return nil, errors.New("stream: nil transport")
	}
	if cfg.Thing == "" {
		return nil, errors.New("stream: thing name required")
	}
	if cfg.Format == "" {
		cfg.Format = FormatCBOR
	}
	if cfg.Format != FormatCBOR && cfg.Format != FormatJSON {
		return nil, fmt.Errorf("stream: unknown format %q", cfg.Format)
	}
	if cfg.BlockSize == 0 {
		cfg.BlockSize = DefaultBlockSize
	}
	if cfg.BlockSize < MinBlockSize || cfg.BlockSize > MaxBlockSize {
		return nil, fmt.Errorf("stream: block size %d outside %d..%d", cfg.BlockSize, MinBlockSize, MaxBlockSize)
	}
	if cfg.BlocksPerRequest <= 0 {
		cfg.BlocksPerRequest = DefaultBlocksPerRequest
	}
	if cfg.RequestsInFlight <= 0 {
		cfg.RequestsInFlight = DefaultRequestsInFlight
	}
	if cfg.QuietPeriod <= 0 {
		cfg.QuietPeriod = DefaultQuietPeriod
	}
	if cfg.MaxQuietPeriod < cfg.QuietPeriod {
		cfg.MaxQuietPeriod = max(DefaultMaxQuietPeriod, cfg.QuietPeriod)
	}
	if cfg.MaxFruitlessRounds <= 0 {
		cfg.MaxFruitlessRounds = DefaultMaxFruitlessRounds
	}
	if cfg.RequestQoS > 1 || cfg.DataQoS > 1 {
		return nil, errors.New("stream: QoS must be 0 or 1")
	}
	if cfg.DataQoS == 0 && !cfg.DataQoS0 {
		cfg.DataQoS = 1
	}
	if cfg.QuotaBytesPerSecond < 0 {
		return nil, errors.New("stream: negative quota")
	}
	if cfg.NoQuota {
		cfg.QuotaBytesPerSecond = 0
	} else if cfg.QuotaBytesPerSecond == 0 {
		cfg.QuotaBytesPerSecond = DefaultQuotaBytesPerSecond
	}
	if len(cfg.ClientToken) > maxTokenLen {
		return nil, fmt.Errorf("stream: client token longer than %d bytes", maxTokenLen)
	}
	if cfg.Logger == nil {
		cfg.Logger = hclog.NewNullLogger()
	}
	return &Downloader{t: t, cfg: cfg, log: cfg.Logger}, nil
}

func perRequest(c Config, f File) int {
	if f.RequestBytes > 0 {
		return f.RequestBytes / f.BlockSize
	}
	return c.BlocksPerRequest
}

// Config returns the effective configuration (defaults filled in).
func (d *Downloader) Config() Config { return d.cfg }

// WindowBytes is the block data of all requests in flight: what one request window holds.
func (c Config) WindowBytes() int64 {
	return int64(c.BlockSize) * int64(c.BlocksPerRequest) * int64(c.RequestsInFlight)
}

// Topic returns a stream topic: op is get, data or rejected.
func (d *Downloader) Topic(stream, op string) string {
	return "$aws/things/" + d.cfg.Thing + "/streams/" + stream + "/" + op + "/" + d.cfg.Format
}

type event struct {
	blk Block
	rej *Rejection
	err error
}

type request struct {
	blocks    []int // increasing; blocks given up on leave the list
	remaining int
	sentAt    time.Time
	// Evidence of loss (scheduler.go): a request sent later was answered in full (later:
	// this one's missing blocks went out before its end) and another block of a later
	// request came after that (overtaken), or a block of this one above the blocks still
	// missing (highest: the server sends a request's blocks in order). evidenceAt is when
	// the first evidence for the blocks still pending came.
	later      bool
	overtaken  bool
	highest    int
	evidenceAt time.Time
}

type run struct {
	d      *Downloader
	f      File
	sink   blocksink.Sink
	total  int
	perReq int
	token  string
	events chan event
	done   chan struct{}

	have     bitmap.Bitmap // handed to the sink (and not lost since)
	pending  bitmap.Bitmap // asked for in an outstanding request
	asking   int           // blocks set in pending (never held: want excludes held blocks)
	held     int
	inflight []*request
	cursor   int

	lastProgress time.Time     // last new block, or start of the current round
	lastActivity time.Time     // last new block or RTO timeout
	hold         time.Time     // a late timer's decision waits until then (scheduler.go)
	reorder      int           // reordering window in quarters of SRTT (scheduler.go)
	lastBlock    time.Time     // the last new block
	gap          time.Duration // smoothed time between new blocks (scheduler.go)
	fruitless    int
	badSince     int // malformed blocks since the last new one
	msgOverhead  int // bytes of a block's publish besides its data (scheduler.go drain)
	stats        Stats

	rtt   rttEstimator
	asked bitmap.Bitmap // asked for at least once
	again bitmap.Bitmap // asked for more than once: no RTT sample (Karn)
}

// Download fetches the blocks of f that missing marks (nil: all) and hands them to sink. It
// returns once every block is durable (sink.Flush), or fails with a typed error
// (status.ReasonOf): momentum_abort, failed_ingest, download_failed, or the sink's reason.
func (d *Downloader) Download(ctx context.Context, f File, missing bitmap.Bitmap, sink blocksink.Sink) (Stats, error) {
	if f.BlockSize == 0 {
		f.BlockSize = d.cfg.BlockSize
	}
	switch {
	case f.StreamName == "":
		return Stats{}, status.Errorf(otav1.Reason_REASON_JOB_DOCUMENT_INVALID, "stream: no stream name")
	case f.FileID < 0 || f.FileID > 255:
		return Stats{}, status.Errorf(otav1.Reason_REASON_JOB_DOCUMENT_INVALID, "stream: file id %d outside 0..255", f.FileID)
	case f.Size <= 0:
		return Stats{}, status.Errorf(otav1.Reason_REASON_JOB_DOCUMENT_INVALID, "stream: file size %d", f.Size)
	case f.BlockSize < MinBlockSize || f.BlockSize > MaxBlockSize:
		return Stats{}, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "stream: block size %d outside %d..%d", f.BlockSize, MinBlockSize, MaxBlockSize)
	}
	total := NumBlocks(f.Size, f.BlockSize)
	if total > MaxBlocks {
		return Stats{}, status.Errorf(otav1.Reason_REASON_DOWNLOAD_FAILED,
			"stream: %d blocks of %d bytes are beyond what a stream can serve (%d blocks)", total, f.BlockSize, MaxBlocks)
	}
	token := d.cfg.ClientToken
	if token == "" {
		var b [4]byte
		_, _ = rand.Read(b[:])
		token = hex.EncodeToString(b[:])
	}
	r := &run{
		d: d, f: f, sink: sink, total: total, token: token,
		perReq: max(1, min(perRequest(d.cfg, f), MaxRequestBytes/f.BlockSize)),
		events: make(chan event, 16), // bounds decoded blocks waiting for the sink
		done:   make(chan struct{}),
	}
	r.stats.Blocks = total
	r.rtt = rttEstimator{initial: d.cfg.QuietPeriod, min: MinRTO, max: d.cfg.MaxQuietPeriod}
	r.asked, r.again = bitmap.New(total), bitmap.New(total)
	r.msgOverhead = len(d.Topic(f.StreamName, "data")) + 32
	r.reorder = 1

	if err := d.awaitUnsubscribed(ctx); err != nil {
		return Stats{}, status.Errorf(otav1.Reason_REASON_DOWNLOAD_FAILED, "stream: %w", err)
	}
	// Both subscriptions in one round trip: each Subscribe waits for its SUBACK.
	var unsubRej func(context.Context) error
	var errRej error
	subscribed := make(chan struct{})
	go func() {
		defer close(subscribed)
		unsubRej, errRej = d.t.Subscribe(ctx, d.Topic(f.StreamName, "rejected"), d.cfg.DataQoS, r.onRejected)
	}()
	unsubData, err := d.t.Subscribe(ctx, d.Topic(f.StreamName, "data"), d.cfg.DataQoS, r.onData)
	<-subscribed
	if err != nil || errRej != nil {
		close(r.done)
		r.unsubscribe(ctx, unsubData)
		r.unsubscribe(ctx, unsubRej)
		if err != nil {
			return r.stats, status.Errorf(otav1.Reason_REASON_DOWNLOAD_FAILED, "stream: subscribe to data: %w", err)
		}
		return r.stats, status.Errorf(otav1.Reason_REASON_DOWNLOAD_FAILED, "stream: subscribe to rejected: %w", errRej)
	}
	defer func() {
		close(r.done)
		d.unsubscribeLater(ctx, r, unsubData, unsubRej)
	}()
	err = r.loop(ctx, missing)
	if r.rtt.Measured() {
		r.stats.SRTT, r.stats.RTO = r.rtt.srtt, r.rtt.RTO()
	}
	return r.stats, err
}

// unsubscribeLater unsubscribes fs concurrently in the background (each bounded by
// unsubscribe's own timeout); awaitUnsubscribed waits for it.
func (d *Downloader) unsubscribeLater(ctx context.Context, r *run, fs ...func(context.Context) error) {
	d.mu.Lock()
	prev := d.unsubscribing
	done := make(chan struct{})
	d.unsubscribing = done
	d.mu.Unlock()
	go func() {
		defer close(done)
		var wg sync.WaitGroup
		for _, f := range fs {
			wg.Add(1)
			go func() {
				defer wg.Done()
				r.unsubscribe(ctx, f)
			}()
		}
		wg.Wait()
		if prev != nil {
			<-prev
		}
	}()
}

// awaitUnsubscribed waits until the unsubscribes of earlier downloads are done.
func (d *Downloader) awaitUnsubscribed(ctx context.Context) error {
	d.mu.Lock()
	ch := d.unsubscribing
	d.mu.Unlock()
	if ch == nil {
		return nil
	}
	select {
	case <-ch:
		return nil
	case <-ctx.Done():
		return fmt.Errorf("waiting for the previous download's unsubscribes: %w", ctx.Err())
	}
}

func (r *run) unsubscribe(ctx context.Context, f func(context.Context) error) {
	if f == nil {
		return
	}
	ctx, cancel := context.WithTimeout(context.WithoutCancel(ctx), 5*time.Second)
	defer cancel()
	if err := f(ctx); err != nil {
		r.d.log.Debug("unsubscribe", "error", err)
	}
}

// onData runs on the MQTT client's goroutine: decode there, decide in the loop.
func (r *run) onData(_ string, payload []byte) {
	blk, err := DecodeBlock(r.d.cfg.Format, payload)
	r.send(event{blk: blk, err: err})
}

func (r *run) onRejected(_ string, payload []byte) {
	rej, err := DecodeRejection(r.d.cfg.Format, payload)
	if err != nil {
		r.send(event{err: err})
		return
	}
	r.send(event{rej: &rej})
}

func (r *run) send(ev event) {
	select {
	case r.events <- ev:
	case <-r.done:
	}
}

func (r *run) loop(ctx context.Context, missing bitmap.Bitmap) error {
	if err := r.reload(ctx, missing); err != nil {
		return err
	}
	due := time.Now().Add(r.d.cfg.QuietPeriod)
	timer := time.NewTimer(r.d.cfg.QuietPeriod)
	defer timer.Stop()
	for {
		if r.held == r.total {
			err := r.sink.Flush(ctx)
			if err == nil {
				r.progress()
				return nil
			}
			if err := r.resume(ctx, err); err != nil {
				return err
			}
			continue
		}
		select {
		case <-ctx.Done():
			return fmt.Errorf("stream download: %w", ctx.Err())
		case ev := <-r.events:
			if err := r.handle(ctx, ev); err != nil {
				return err
			}
		case now := <-timer.C:
			if err := r.timeout(ctx, now, due); err != nil {
				return err
			}
		}
		due = r.nextCheck()
		timer.Reset(max(time.Until(due), 0))
	}
}

// reload makes the writer's missing bitmap the truth: what it does not miss is held (blocks
// past a short bitmap count as missing: fetching again is safe).
func (r *run) reload(ctx context.Context, missing bitmap.Bitmap) error {
	r.have = missing.Complement(r.total)
	r.held = r.have.Count()
	r.pending = bitmap.New(r.total)
	r.asking = 0
	r.inflight = r.inflight[:0]
	r.cursor = 0
	r.lastProgress = time.Now()
	r.lastActivity = r.lastProgress
	r.fruitless = 0
	r.d.log.Debug("stream download", "stream", r.f.StreamName, "blocks", r.total, "held", r.held, "block_size", r.f.BlockSize, "per_request", r.perReq)
	r.progress()
	return r.fill(ctx)
}

// resume handles a sink error by the blocksink.Sink contract: a resumed writer session
// reloads the bitmap, anything else ends the download.
func (r *run) resume(ctx context.Context, err error) error {
	var res *blocksink.ResumedError
	if !errors.As(err, &res) {
		return err
	}
	r.stats.Resumes++
	r.d.log.Info("writer session resumed; continuing from its bitmap", "error", err)
	return r.reload(ctx, res.Missing)
}

func (r *run) want(i int) bool { return !r.have.Has(i) && !r.pending.Has(i) }

// fill issues requests until RequestsInFlight are outstanding or nothing is left to ask.
func (r *run) fill(ctx context.Context) error {
	for len(r.inflight) < r.d.cfg.RequestsInFlight {
		w, ok := nextWindow(r.want, r.cursor, r.total, r.perReq)
		if !ok {
			return nil
		}
		r.cursor = w.blocks[len(w.blocks)-1] + 1
		req := Request{
			ClientToken: r.token,
			FileID:      int64(r.f.FileID),
			BlockSize:   int64(r.f.BlockSize),
			Offset:      int64(w.offset),
			NumBlocks:   int64(len(w.blocks)),
			Bitmap:      w.bitmap,
		}
		payload, err := EncodeRequest(r.d.cfg.Format, req)
		if err != nil {
			return status.Errorf(otav1.Reason_REASON_FAILED_INGEST, "stream: encode request: %w", err)
		}
		for _, i := range w.blocks {
			r.setPending(i)
			if r.asked.Has(i) {
				r.again.Set(i)
			}
			r.asked.Set(i)
		}
		q := &request{blocks: w.blocks, remaining: len(w.blocks), highest: -1}
		r.inflight = append(r.inflight, q)
		r.stats.Requests++
		// Bounded, but not by a short quiet period: a publish may wait its turn under the
		// connection's publish rate (netagent/mqttconn).
		pctx, cancel := context.WithTimeout(ctx, max(r.d.cfg.QuietPeriod, time.Second))
		err = r.d.t.Publish(pctx, r.d.Topic(r.f.StreamName, "get"), r.d.cfg.RequestQoS, payload)
		cancel()
		// The clock starts once the request is on its way (a rate-limited publish waits).
		q.sentAt = time.Now()
		if err != nil {
			if ctx.Err() != nil {
				return fmt.Errorf("stream download: %w", ctx.Err())
			}
			// Counted as sent: the quiet period re-requests it like a lost one.
			r.d.log.Debug("publish request", "offset", w.offset, "error", err)
		} else if r.repeat(w.blocks) {
			r.stats.Requests++
			pctx, cancel := context.WithTimeout(ctx, max(r.d.cfg.QuietPeriod, time.Second))
			_ = r.d.t.Publish(pctx, r.d.Topic(r.f.StreamName, "get"), r.d.cfg.RequestQoS, payload)
			cancel()
		}
	}
	return nil
}

func (r *run) handle(ctx context.Context, ev event) error {
	if ev.rej != nil {
		return r.rejected(*ev.rej)
	}
	if ev.err == nil {
		ev.err = ev.blk.Validate(int64(r.f.FileID), r.f.Size, r.f.BlockSize)
	}
	if ev.err != nil {
		// Dropped, never forwarded; the block stays missing and is asked for again.
		r.stats.Malformed++
		r.badSince++
		r.d.log.Debug("dropped malformed stream message", "error", ev.err)
		return nil
	}
	i := int(ev.blk.Index)
	if r.have.Has(i) {
		r.stats.Duplicates++
		if r.again.Has(i) {
			r.spurious() // the re-request was not needed: widen the reordering window
		}
		return nil
	}
	now := time.Now()
	r.have.Set(i)
	r.held++
	r.stats.Received++
	r.lastProgress = now
	r.lastActivity = now
	r.gapArrived(now)
	r.fruitless = 0
	r.badSince = 0
	if r.pending.Has(i) {
		r.clearPending(i)
		for k, q := range r.inflight {
			if j := sort.SearchInts(q.blocks, i); j < len(q.blocks) && q.blocks[j] == i {
				r.arrived(k, i, now)
				q.remaining--
				if q.remaining == 0 {
					r.remove(k)
				}
				break
			}
		}
	}
	if err := r.sink.WriteBlock(ctx, i, ev.blk.Payload); err != nil {
		return r.resume(ctx, err)
	}
	r.progress()
	return r.fill(ctx)
}

func (r *run) remove(k int) {
	r.inflight = slices.Delete(r.inflight, k, k+1)
}

// expire gives up on request k: its missing blocks are wanted again.
func (r *run) expire(k int) {
	for _, i := range r.inflight[k].blocks {
		if r.pending.Has(i) {
			r.clearPending(i)
			r.cursor = min(r.cursor, i)
		}
	}
	r.stats.Rerequests++
	r.remove(k)
}

func (r *run) quiet() time.Duration {
	q := r.d.cfg.QuietPeriod
	for n := 0; n < r.fruitless && q < r.d.cfg.MaxQuietPeriod; n++ {
		q *= 2
	}
	return min(q, r.d.cfg.MaxQuietPeriod)
}

func (r *run) tick(ctx context.Context, now time.Time) error {
	if now.Sub(r.lastProgress) >= r.quiet() {
		// A round: nothing new arrived. The first request is covered too.
		r.fruitless++
		r.stats.Rounds++
		if r.fruitless > r.d.cfg.MaxFruitlessRounds {
			return r.momentumAbort()
		}
		r.d.log.Debug("quiet period: re-requesting", "round", r.fruitless, "held", r.held, "total", r.total)
		// What arrived before the quiet survives a writer crash during it.
		if err := r.sink.Sync(ctx); err != nil {
			if err := r.resume(ctx, err); err != nil {
				return err
			}
		}
		for len(r.inflight) > 0 {
			r.expire(0)
		}
		r.cursor = 0
		r.lastProgress = now
		r.lastActivity = now
		return r.fill(ctx)
	}
	if r.detectLoss(now) {
		return r.fill(ctx)
	}
	return nil
}

func (r *run) momentumAbort() error {
	if r.badSince > 0 {
		return status.Errorf(otav1.Reason_REASON_FAILED_INGEST,
			"stream %s: %d malformed blocks and no valid one in %d rounds (%d/%d blocks)",
			r.f.StreamName, r.badSince, r.d.cfg.MaxFruitlessRounds, r.held, r.total)
	}
	return status.Errorf(otav1.Reason_REASON_MOMENTUM_ABORT, "stream %s: no block in %d rounds of re-requests (%d/%d blocks)",
		r.f.StreamName, r.d.cfg.MaxFruitlessRounds, r.held, r.total).
		WithMeta("progress", fmt.Sprintf("%d/%d", r.held, r.total))
}

// rejected handles a message on the rejected topic. InternalError is transient (the request
// is re-sent after the quiet period); every other code means the request or stream is wrong
// and re-sending cannot help.
func (r *run) rejected(rej Rejection) error {
	if rej.ClientToken != "" && rej.ClientToken != r.token {
		return nil // another requester's
	}
	if rej.Code == CodeInternalError {
		// Transient, perhaps throttling: wait longer before asking again.
		r.rtt.Backoff()
		r.stats.Rejections++
		r.d.log.Warn("stream request rejected, will retry", "code", rej.Code, "message", rej.Message)
		return nil
	}
	reason := otav1.Reason_REASON_DOWNLOAD_FAILED
	switch rej.Code {
	case CodeInvalidJSON, CodeInvalidCBOR, CodeInvalidRequest, CodeBlockSizeOutOfBounds, CodeOffsetOutOfBounds,
		CodeBlockCountLimitExceeded, CodeBlockBitmapLimit, CodeInvalidTopic:
		// Our request could not be served as asked: the block cannot be fetched or placed.
		reason = otav1.Reason_REASON_FAILED_INGEST
	}
	return status.Errorf(reason, "stream %s rejected the request: %s: %s", r.f.StreamName, rej.Code, rej.Message).
		WithMeta("stream_error", rej.Code)
}

func (r *run) progress() {
	if r.f.OnProgress != nil {
		r.f.OnProgress(blocksink.Progress{Received: r.held, Durable: r.sink.Durable(), Total: r.total})
	}
}
