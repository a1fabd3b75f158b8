// Package emulator is a local, faithful stand-in for the device-facing side of AWS IoT Jobs,
// MQTT-based file delivery (streams) and presigned S3 downloads. It runs on an embedded mochi
// broker (default) or as a client of an external broker, and implements backend.Backend so
// end-to-end tests run unchanged against it or against real AWS.
package emulator

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"math/rand/v2"
	"net"
	"net/http"
	"os"
	"sync"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/test/backend"
)

// Options configure an emulator. Zero values give an embedded broker and an HTTP server on
// free loopback ports, thing "gw-01" and seed 1.
type Options struct {
	// Listen is the embedded broker address ("127.0.0.1:0" when empty). Ignored with
	// ExternalBrokerURL.
	Listen string
	// ExternalBrokerURL (mqtt://host:port) makes the emulator a client of that broker.
	ExternalBrokerURL string
	// HTTPListen is the address of the presigned-URL file server ("127.0.0.1:0" when empty).
	HTTPListen string
	// Thing is the default thing (and the MQTT client id devices use).
	Thing string
	// Seed makes fault injection reproducible.
	Seed uint64
	// Logger receives the emulator's logs (hclog.NewNullLogger() when nil).
	Logger hclog.Logger
	// OnUpdate is called, in order, on a goroutine of its own, for every recorded status change
	// (accepted device updates, start-next, timeouts, cancels). It may call the emulator; while
	// it blocks, later calls wait (nothing else does). Calls stop at Close.
	OnUpdate func(UpdateEvent)
	// StepTimeoutUnit is the length of one "minute" of stepTimeoutInMinutes (time.Minute when
	// zero); tests shorten it to see TIMED_OUT without waiting.
	StepTimeoutUnit time.Duration
	// NoQuotas lifts AWS IoT Core's per-connection quotas, which the embedded broker enforces
	// by default (quota.go): 512 KiB/s each way, 100 inbound publishes per second, 128 KiB
	// payloads, 50 subscriptions, 8 filters per SUBSCRIBE. Lift them for loopback benchmarks
	// of the agent itself; an external broker enforces none of them.
	NoQuotas bool
	// MaxStatusDetails caps the number of statusDetails pairs (0: no cap). AWS documents a
	// 10-pair cap for a control-plane call; whether the MQTT API enforces it is unconfirmed.
	MaxStatusDetails int
}

// UpdateEvent is one recorded status change, as OnUpdate sees it.
type UpdateEvent struct {
	Thing  string
	JobID  string
	Source string // "device" (UpdateJobExecution, StartNext) or "service" (cancel, timeout)
	backend.Update
	VersionNumber int64
}

// Emulator is a running emulator. It implements backend.Backend.
type Emulator struct {
	opts  Options
	log   hclog.Logger
	thing string
	tr    transport
	emb   *embedded // nil with an external broker

	httpLn   net.Listener
	httpSrv  *http.Server
	httpBase string
	// httpBytes counts file bytes served over presigned URLs, per job.
	httpBytes  map[string]int64
	httpRanges map[string][]string
	urlKey     []byte

	qMu     sync.Mutex
	queue   []message     // requests waiting for the worker, unbounded (see enqueue)
	qSignal chan struct{} // capacity 1: "the queue is not empty"

	sMu     sync.Mutex
	senders map[string]*sender // per requesting client, while it has responses to send
	stop    chan struct{}
	wg      sync.WaitGroup
	closing sync.Once

	mu       sync.Mutex
	jobs     map[string]*job
	jobOrder int
	things   map[string][]*execution // per thing, in creation order
	streams  map[string]*job
	lastNext map[string]string // per thing: jobId of the last notify-next ("" = none)
	lastPend map[string]string // per thing: fingerprint of the last notify
	faults   map[string]*faultState
	records  map[string][]StreamRequest // per stream name
	changed  chan struct{}              // closed and replaced on every change
	events   []UpdateEvent              // pending OnUpdate calls
	evSignal chan struct{}              // capacity 1: "events are waiting"
	pushQ    []jobReply                 // notifications waiting to be published, in order
	pushing  bool
	removed  []*job // deleted jobs whose files stay open until Close
	// holdNext, while set, keeps the answers to $next/get (see HoldNext).
	holdNext *heldAnswers
}

var _ backend.Backend = (*Emulator)(nil)

// Start runs an emulator until Close.
func Start(ctx context.Context, opts Options) (*Emulator, error) {
	if opts.Thing == "" {
		opts.Thing = "gw-01"
	}
	if !validThingName(opts.Thing) {
		return nil, fmt.Errorf("thing name %q is not valid for AWS IoT", opts.Thing)
	}
	if opts.Listen == "" {
		opts.Listen = "127.0.0.1:0"
	}
	if opts.HTTPListen == "" {
		opts.HTTPListen = "127.0.0.1:0"
	}
	if opts.Seed == 0 {
		opts.Seed = 1
	}
	if opts.StepTimeoutUnit == 0 {
		opts.StepTimeoutUnit = time.Minute
	}
	if opts.Logger == nil {
		opts.Logger = hclog.NewNullLogger()
	}
	e := &Emulator{
		opts:       opts,
		log:        opts.Logger,
		thing:      opts.Thing,
		qSignal:    make(chan struct{}, 1),
		senders:    map[string]*sender{},
		evSignal:   make(chan struct{}, 1),
		stop:       make(chan struct{}),
		jobs:       map[string]*job{},
		things:     map[string][]*execution{},
		streams:    map[string]*job{},
		lastNext:   map[string]string{},
		lastPend:   map[string]string{},
		faults:     map[string]*faultState{},
		records:    map[string][]StreamRequest{},
		httpBytes:  map[string]int64{},
		httpRanges: map[string][]string{},
		changed:    make(chan struct{}),
		urlKey:     []byte(fmt.Sprintf("emulator-url-key-%d-%d", opts.Seed, time.Now().UnixNano())),
	}

	ln, err := net.Listen("tcp", opts.HTTPListen)
	if err != nil {
		return nil, fmt.Errorf("HTTP listen %s: %w", opts.HTTPListen, err)
	}
	e.httpLn = ln
	e.httpBase = "http://" + ln.Addr().String()
	e.httpSrv = &http.Server{Handler: http.HandlerFunc(e.serveHTTP), ReadHeaderTimeout: 10 * time.Second}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		if err := e.httpSrv.Serve(ln); err != nil && !errors.Is(err, http.ErrServerClosed) {
			e.log.Error("HTTP server", "error", err)
		}
	}()

	if opts.ExternalBrokerURL != "" {
		x, err := newExternal(ctx, opts.ExternalBrokerURL, fmt.Sprintf("gwota-emulator-%d", time.Now().UnixNano()), e.log.Named("broker"), e.enqueue)
		if err != nil {
			e.shutdownHTTP()
			return nil, err
		}
		e.tr = x
	} else {
		emb, err := newEmbedded(opts.Listen, !opts.NoQuotas, e.log.Named("broker"), e.enqueue)
		if err != nil {
			e.shutdownHTTP()
			return nil, err
		}
		e.tr, e.emb = emb, emb
	}

	e.wg.Add(2)
	go e.worker()
	go e.deliverEvents()
	e.log.Info("emulator started", "broker", e.tr.url(), "http", e.httpBase, "thing", e.thing)
	return e, nil
}

// enqueue hands a request to the worker; requests are handled one at a time, in arrival
// order, which keeps job versions and seeded faults deterministic. It never blocks: on an
// external broker it runs in the MQTT client's receive path, and blocking there would stop
// the PUBACKs the worker's own publishes wait for.
func (e *Emulator) enqueue(m message) {
	e.qMu.Lock()
	e.queue = append(e.queue, m)
	e.qMu.Unlock()
	select {
	case e.qSignal <- struct{}{}:
	default:
	}
}

func (e *Emulator) worker() {
	defer e.wg.Done()
	for {
		select {
		case <-e.qSignal:
		case <-e.stop:
			return
		}
		for {
			e.qMu.Lock()
			if len(e.queue) == 0 {
				e.qMu.Unlock()
				break
			}
			m := e.queue[0]
			e.queue[0] = message{}
			e.queue = e.queue[1:]
			e.qMu.Unlock()
			select {
			case <-e.stop:
				return
			default:
			}
			e.handle(m)
		}
	}
}

// later runs f after d unless the emulator closes first (delayed responses).
func (e *Emulator) later(d time.Duration, f func()) {
	if d <= 0 {
		f()
		return
	}
	e.wg.Add(1)
	go func() {
		defer e.wg.Done()
		t := time.NewTimer(d)
		defer t.Stop()
		select {
		case <-t.C:
			f()
		case <-e.stop:
		}
	}()
}

// sender sends one client's responses in order, on a goroutine of its own.
type sender struct {
	queue   []func()
	running bool
}

// sendTo runs f (which sends responses to clientID) after d, on that client's sender: the
// responses to one client keep their order, and a client whose connection is throttled
// (quotas) delays its own responses only, never the worker or other clients.
func (e *Emulator) sendTo(clientID string, d time.Duration, f func()) {
	if d > 0 {
		e.later(d, func() { e.sendTo(clientID, 0, f) })
		return
	}
	e.sMu.Lock()
	defer e.sMu.Unlock()
	s := e.senders[clientID]
	if s == nil {
		s = &sender{}
		e.senders[clientID] = s
	}
	s.queue = append(s.queue, f)
	if !s.running {
		s.running = true
		e.wg.Add(1)
		go e.runSender(clientID, s)
	}
}

func (e *Emulator) runSender(clientID string, s *sender) {
	defer e.wg.Done()
	for {
		e.sMu.Lock()
		if len(s.queue) == 0 {
			s.running = false
			delete(e.senders, clientID)
			e.sMu.Unlock()
			return
		}
		f := s.queue[0]
		s.queue[0] = nil
		s.queue = s.queue[1:]
		e.sMu.Unlock()
		select {
		case <-e.stop:
			return
		default:
		}
		f()
	}
}

// Close stops the broker (or disconnects from it), the HTTP server and every timer.
func (e *Emulator) Close() error {
	var err error
	e.closing.Do(func() {
		close(e.stop)
		err = e.tr.close()
		e.shutdownHTTP()
		e.wg.Wait()
		e.mu.Lock()
		for _, execs := range e.things {
			for _, x := range execs {
				if x.stepTimer != nil {
					x.stepTimer.Stop()
				}
			}
		}
		for _, j := range e.jobs {
			j.closeFiles()
		}
		for _, j := range e.removed {
			j.closeFiles()
		}
		e.mu.Unlock()
	})
	return err
}

func (e *Emulator) shutdownHTTP() {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	_ = e.httpSrv.Shutdown(ctx)
}

// Name implements backend.Backend.
func (e *Emulator) Name() string { return "emulator" }

// ThingName implements backend.Backend.
func (e *Emulator) ThingName() string { return e.thing }

// BrokerURL implements backend.Backend (mqtt://127.0.0.1:port).
func (e *Emulator) BrokerURL() string { return e.tr.url() }

// HTTPURL is the base URL of the presigned-URL file server.
func (e *Emulator) HTTPURL() string {
	e.mu.Lock()
	defer e.mu.Unlock()
	return e.httpBase
}

// StopBroker stops the embedded broker: every client is disconnected and connections are
// refused until StartBroker. Jobs and streams keep their state.
func (e *Emulator) StopBroker() error {
	if e.emb == nil {
		return errors.New("StopBroker: only the embedded broker can be stopped")
	}
	e.emb.stop()
	return nil
}

// StartBroker starts the embedded broker again on the same address.
func (e *Emulator) StartBroker() error {
	if e.emb == nil {
		return errors.New("StartBroker: only the embedded broker can be started")
	}
	return e.emb.start()
}

// RestartBroker stops the embedded broker and starts it again on the same address.
func (e *Emulator) RestartBroker() error {
	if err := e.StopBroker(); err != nil {
		return err
	}
	return e.StartBroker()
}

// DisconnectClient drops one client's connection (embedded broker only).
func (e *Emulator) DisconnectClient(clientID string) bool { return e.tr.disconnect(clientID) }

// notifyLocked wakes waiters; call with e.mu held.
func (e *Emulator) notifyLocked() {
	close(e.changed)
	e.changed = make(chan struct{})
}

// flushEvents wakes the goroutine that delivers OnUpdate calls. Callbacks run there, in
// order, never on the emulator's own goroutines: a slow callback delays nothing else, and a
// callback may call back into the emulator.
func (e *Emulator) flushEvents() {
	select {
	case e.evSignal <- struct{}{}:
	default:
	}
}

func (e *Emulator) deliverEvents() {
	defer e.wg.Done()
	for {
		select {
		case <-e.evSignal:
		case <-e.stop:
			return
		}
		e.mu.Lock()
		evs := e.events
		e.events = nil
		e.mu.Unlock()
		for _, ev := range evs {
			if e.opts.OnUpdate != nil {
				e.opts.OnUpdate(ev)
			}
		}
	}
}

// Faults are injected per job ID or per stream name. The zero value injects nothing.
type Faults struct {
	// Drop and Duplicate are fractions (0..1) of stream blocks not sent / sent twice.
	Drop, Duplicate float64
	// Reorder shuffles the blocks of each response.
	Reorder bool
	// Delay holds every response (jobs and streams) back by this long.
	Delay time.Duration
	// RejectCode rejects every stream request (stream error code) or job update (jobs error
	// code) with this code.
	RejectCode string
	// ThrottleUpdates rejects the next N UpdateJobExecution requests with RequestThrottled.
	ThrottleUpdates int
	// RejectUpdate, when set, is asked about every UpdateJobExecution of the job (after
	// ThrottleUpdates): a non-empty jobs error code rejects that update, "" lets it through.
	// It runs under the emulator's lock and must not call the emulator.
	RejectUpdate func(status string, details map[string]string) string
	// DisconnectAfterBlocks drops the requesting client's connection once after it has been
	// sent this many blocks (embedded broker only: an external broker gives no such control,
	// and the fault then only stops the blocks after the Nth).
	DisconnectAfterBlocks int
	// ExpireURLAfter shortens the lifetime of presigned URLs issued from now on.
	ExpireURLAfter time.Duration
	// StallAfterBlocks sends this many stream blocks, then none (requests are still
	// recorded) until the faults are replaced or cleared: a network that goes quiet.
	StallAfterBlocks int
	// CorruptBlocks alters data in transit: the first CorruptBlocks stream blocks sent of file
	// CorruptFileID that hold byte CorruptOffset of it carry that byte inverted (a chunk of a
	// delta update altered once, say).
	CorruptBlocks int
	CorruptFileID int
	CorruptOffset int64
}

type faultState struct {
	Faults
	rng          *rand.Rand
	throttleLeft int
	blocksSent   int
	disconnected bool
	corrupted    int
}

// SetFaults sets (replaces) the faults for a job ID or stream name. The random source is
// reseeded from Options.Seed and the key, so the same seed and requests give the same faults.
func (e *Emulator) SetFaults(key string, f Faults) {
	h := fnv.New64a()
	h.Write([]byte(key))
	e.mu.Lock()
	defer e.mu.Unlock()
	e.faults[key] = &faultState{Faults: f, rng: rand.New(rand.NewPCG(e.opts.Seed, h.Sum64())), throttleLeft: f.ThrottleUpdates}
}

// ClearFaults removes the faults of a key.
func (e *Emulator) ClearFaults(key string) {
	e.mu.Lock()
	defer e.mu.Unlock()
	delete(e.faults, key)
}

// faultsLocked finds the faults for a stream or its job.
func (e *Emulator) faultsLocked(keys ...string) *faultState {
	for _, k := range keys {
		if f, ok := e.faults[k]; ok {
			return f
		}
	}
	return nil
}

// StreamRequest records one GetStream request and what was done with it.
type StreamRequest struct {
	At        time.Time
	ClientID  string
	Stream    string
	Format    string
	FileID    int64
	BlockSize int64
	Offset    int64
	Count     int64 // "n"; 0 when absent
	Bitmap    []byte
	// Wanted are the blocks the request asked for (within the file and the 128 KB cap).
	Wanted []int
	// Sent are the block ids published, in publish order, duplicates included.
	Sent []int
	// Dropped are wanted blocks withheld by fault injection.
	Dropped []int
	// Corrupted are sent blocks altered by fault injection (Faults.CorruptBlocks).
	Corrupted []int
	// Rejected is the error code when the request was rejected.
	Rejected string
}

// StreamRequests returns the GetStream requests recorded for a stream name or a job ID.
func (e *Emulator) StreamRequests(streamOrJob string) []StreamRequest {
	e.mu.Lock()
	defer e.mu.Unlock()
	name := streamOrJob
	if j, ok := e.jobs[streamOrJob]; ok && j.stream != "" {
		name = j.stream
	}
	return append([]StreamRequest(nil), e.records[name]...)
}

// BlocksServed counts the block messages published for a job's stream (duplicates included).
func (e *Emulator) BlocksServed(jobID string) int {
	n := 0
	for _, r := range e.StreamRequests(jobID) {
		n += len(r.Sent)
	}
	return n
}

// StreamName returns the stream of an MQTT job ("" if none).
func (e *Emulator) StreamName(jobID string) string {
	e.mu.Lock()
	defer e.mu.Unlock()
	if j, ok := e.jobs[jobID]; ok {
		return j.stream
	}
	return ""
}

// closeFiles is called once the emulator stops.
func (j *job) closeFiles() {
	for _, f := range j.files {
		if f.f != nil {
			f.f.Close()
		}
	}
}

// open a job file for serving; kept open so blocks are read with ReadAt, never buffered whole.
func openJobFile(path string) (*os.File, error) { return os.Open(path) }
