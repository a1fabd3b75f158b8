package emulator

import (
	"bytes"
	"context"
	"crypto"
	"encoding/base64"
	"encoding/binary"
	"encoding/hex"
	"encoding/json"
	"errors"
	"fmt"
	"hash/fnv"
	"io"
	mrand "math/rand/v2"
	"regexp"
	"sort"
	"strings"
	"sync"
	"time"
	"unicode"
	"unicode/utf8"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/sign"
)

// Jobs error codes (docs/PROTOCOL.md section 1).
const (
	CodeInvalidTopic           = "InvalidTopic"
	CodeInvalidJSON            = "InvalidJson"
	CodeInvalidRequest         = "InvalidRequest"
	CodeInvalidStateTransition = "InvalidStateTransition"
	CodeResourceNotFound       = "ResourceNotFound"
	CodeVersionMismatch        = "VersionMismatch"
	CodeInternalError          = "InternalError"
	CodeRequestThrottled       = "RequestThrottled"
	CodeTerminalStateReached   = "TerminalStateReached"
)

const maxJobDocument = 32 * 1024

var (
	jobIDRe     = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)
	thingNameRe = regexp.MustCompile(`^[a-zA-Z0-9:_-]{1,128}$`)
	detailKeyRe = regexp.MustCompile(`^[a-zA-Z0-9:_-]{1,128}$`)
)

func validThingName(s string) bool { return thingNameRe.MatchString(s) }

type job struct {
	id        string
	seq       int
	protocols []string
	stream    string
	files     []*jobFile
	urlExpiry time.Duration
	custom    json.RawMessage                       // a non-OTA job's document, sent as is
	rewrite   func(json.RawMessage) json.RawMessage // RewriteDocument hook
}

type jobFile struct {
	spec backend.FileSpec
	size int64
	sig  []byte
	key  string // afr_ota signature key, e.g. sig-sha256-ecdsa
	f    readerAtCloser
}

type readerAtCloser interface {
	ReadAt(p []byte, off int64) (int, error)
	Close() error
}

type execution struct {
	job           *job
	thing         string
	status        string
	details       map[string]string
	queuedAt      time.Time
	startedAt     time.Time
	lastUpdatedAt time.Time
	version       int64
	number        int64
	stepDeadline  time.Time
	stepTimer     interface{ Stop() bool }
	stepGen       int // identifies the current step timer; a replaced timer does nothing
	updates       []backend.Update
}

func terminal(status string) bool {
	switch status {
	case backend.StatusSucceeded, backend.StatusFailed, backend.StatusRejected,
		backend.StatusTimedOut, backend.StatusRemoved, backend.StatusCanceled:
		return true
	}
	return false
}

func pending(status string) bool {
	return status == backend.StatusQueued || status == backend.StatusInProgress
}

// CreateJob implements backend.Backend: it signs (or takes the signature of) each file, builds
// the afr_ota document and queues an execution for every thing.
func (e *Emulator) CreateJob(ctx context.Context, spec backend.JobSpec) error {
	if !jobIDRe.MatchString(spec.JobID) {
		return fmt.Errorf("create job: job id %q must be 1..64 of [a-zA-Z0-9_-]", spec.JobID)
	}
	things := spec.Things
	if len(things) == 0 {
		things = []string{e.thing}
	}
	for _, t := range things {
		if !validThingName(t) {
			return fmt.Errorf("create job %s: thing name %q is not valid", spec.JobID, t)
		}
	}
	protocols := spec.Protocols
	if len(protocols) == 0 {
		protocols = []string{backend.ProtocolMQTT}
	}
	for _, p := range protocols {
		if p != backend.ProtocolMQTT && p != backend.ProtocolHTTP {
			return fmt.Errorf("create job %s: unknown protocol %q", spec.JobID, p)
		}
	}
	if len(spec.Files) == 0 {
		return fmt.Errorf("create job %s: no files", spec.JobID)
	}
	expiry := spec.URLExpiry
	if expiry == 0 {
		expiry = 1800 * time.Second
	}
	if expiry < 60*time.Second || expiry > 3600*time.Second {
		return fmt.Errorf("create job %s: URL expiry %v outside AWS's 60..3600 s", spec.JobID, expiry)
	}
	j := &job{id: spec.JobID, protocols: protocols, urlExpiry: expiry}
	if contains(protocols, backend.ProtocolMQTT) {
		j.stream = "AFR_OTA-" + e.streamUUID(spec.JobID)
	}
	ids := map[int]bool{}
	for _, fs := range spec.Files {
		if fs.FileID < 0 || fs.FileID > 255 {
			j.closeFiles()
			return fmt.Errorf("create job %s: file id %d outside 0..255", spec.JobID, fs.FileID)
		}
		if ids[fs.FileID] {
			j.closeFiles()
			return fmt.Errorf("create job %s: duplicate file id %d", spec.JobID, fs.FileID)
		}
		ids[fs.FileID] = true
		jf, err := prepareFile(ctx, fs)
		if err != nil {
			j.closeFiles()
			return fmt.Errorf("create job %s: %w", spec.JobID, err)
		}
		j.files = append(j.files, jf)
	}
	e.mu.Lock()
	doc := e.document(j, time.Now())
	e.mu.Unlock()
	if len(doc) > maxJobDocument {
		j.closeFiles()
		return fmt.Errorf("create job %s: document is %d bytes, AWS allows %d", spec.JobID, len(doc), maxJobDocument)
	}
	if err := e.queueJob(j, things); err != nil {
		j.closeFiles()
		return err
	}
	e.log.Info("job created", "job", j.id, "things", things, "protocols", protocols, "stream", j.stream)
	return nil
}

// queueJob registers a job and queues an execution on each thing.
func (e *Emulator) queueJob(j *job, things []string) error {
	e.mu.Lock()
	if _, ok := e.jobs[j.id]; ok {
		e.mu.Unlock()
		return fmt.Errorf("create job %s: a job with this id already exists", j.id)
	}
	e.jobOrder++
	j.seq = e.jobOrder
	e.jobs[j.id] = j
	if j.stream != "" {
		e.streams[j.stream] = j
	}
	now := time.Now()
	for _, t := range things {
		e.things[t] = append(e.things[t], &execution{
			job: j, thing: t, status: backend.StatusQueued, queuedAt: now, lastUpdatedAt: now,
			version: 1, number: 1,
		})
		e.pushNotificationsLocked(t)
	}
	e.notifyLocked()
	e.mu.Unlock()
	return nil
}

func prepareFile(ctx context.Context, fs backend.FileSpec) (*jobFile, error) {
	f, err := openJobFile(fs.LocalPath)
	if err != nil {
		return nil, err
	}
	jf := &jobFile{spec: fs, f: f}
	// Hash the open file (not the path again), so the signature covers what is served.
	digest, size, err := sign.Digest(ctx, io.NewSectionReader(f, 0, 1<<62))
	if err == nil {
		err = ctx.Err()
	}
	if err != nil {
		f.Close()
		if ctx.Err() != nil {
			return nil, ctx.Err()
		}
		return nil, fmt.Errorf("read %s: %w", fs.LocalPath, err)
	}
	jf.size = size
	alg := fs.SigAlgorithm
	switch {
	case fs.Signature != nil:
		if alg == "" {
			alg = backend.SigSHA256ECDSA
		}
		jf.sig = fs.Signature
	case fs.SigningKeyPEM != nil:
		var k crypto.Signer
		if k, alg, err = sign.Key(fs.SigningKeyPEM, alg); err == nil {
			jf.sig, err = sign.SignDigest(k, alg, digest)
		}
		if err != nil {
			f.Close()
			return nil, err
		}
	}
	if jf.sig != nil {
		if !sign.Supported(alg) {
			f.Close()
			return nil, fmt.Errorf("unknown signature algorithm %q", alg)
		}
		jf.key = sign.DocKey(alg)
	}
	return jf, nil
}

// streamUUID derives the stream id from the seed and job id, so a replayed run (same seed)
// names streams, and seeds their faults, identically.
func (e *Emulator) streamUUID(jobID string) string {
	h := fnv.New64a()
	h.Write([]byte(jobID))
	r := mrand.New(mrand.NewPCG(e.opts.Seed, h.Sum64()))
	var b [16]byte
	binary.LittleEndian.PutUint64(b[:8], r.Uint64())
	binary.LittleEndian.PutUint64(b[8:], r.Uint64())
	x := hex.EncodeToString(b[:])
	return x[0:8] + "-" + x[8:12] + "-" + x[12:16] + "-" + x[16:20] + "-" + x[20:]
}

func contains(list []string, s string) bool {
	for _, x := range list {
		if x == s {
			return true
		}
	}
	return false
}

// document builds the afr_ota job document. HTTP URLs are signed afresh every time, which is
// how DescribeJobExecution re-signs them.
func (e *Emulator) document(j *job, now time.Time) json.RawMessage {
	if j.custom != nil {
		return j.custom
	}
	doc := e.otaDocument(j, now)
	if j.rewrite != nil {
		return j.rewrite(doc)
	}
	return doc
}

func (e *Emulator) otaDocument(j *job, now time.Time) json.RawMessage {
	type file struct {
		FilePath   string `json:"filepath,omitempty"`
		FileSize   int64  `json:"filesize"`
		FileID     int    `json:"fileid"`
		CertFile   string `json:"certfile,omitempty"`
		FileType   int    `json:"fileType"`
		URL        string `json:"update_data_url,omitempty"`
		AuthScheme string `json:"auth_scheme,omitempty"`
	}
	var files []json.RawMessage
	for _, f := range j.files {
		fl := file{FilePath: f.spec.DevicePath, FileSize: f.size, FileID: f.spec.FileID, CertFile: f.spec.CertName, FileType: f.spec.FileType}
		if contains(j.protocols, backend.ProtocolHTTP) {
			fl.URL = e.presign(j, f.spec.FileID, now)
			fl.AuthScheme = "aws.s3.presigned"
		}
		b, _ := json.Marshal(fl)
		if f.sig != nil {
			// Insert the signature key after certfile-ish fields; order does not matter to JSON.
			sig, _ := json.Marshal(base64.StdEncoding.EncodeToString(f.sig))
			b = append(append(append(append(b[:len(b)-1:len(b)-1], `,"`...), f.key+`":`...), sig...), '}')
		}
		files = append(files, b)
	}
	doc := struct {
		AfrOTA struct {
			Protocols  []string          `json:"protocols"`
			StreamName string            `json:"streamname,omitempty"`
			Files      []json.RawMessage `json:"files"`
		} `json:"afr_ota"`
	}{}
	doc.AfrOTA.Protocols = j.protocols
	doc.AfrOTA.StreamName = j.stream
	doc.AfrOTA.Files = files
	b, _ := json.Marshal(doc)
	return b
}

// CreateCustomJob queues a job whose document is given verbatim (a custom job, or a
// deliberately broken afr_ota one). It must be a JSON object of at most 32 KB, as AWS requires.
func (e *Emulator) CreateCustomJob(ctx context.Context, jobID string, document json.RawMessage, things ...string) error {
	if !jobIDRe.MatchString(jobID) {
		return fmt.Errorf("create job: job id %q must be 1..64 of [a-zA-Z0-9_-]", jobID)
	}
	var obj map[string]json.RawMessage
	if err := json.Unmarshal(document, &obj); err != nil {
		return fmt.Errorf("create job %s: document is not a JSON object: %w", jobID, err)
	}
	if len(document) > maxJobDocument {
		return fmt.Errorf("create job %s: document is %d bytes, AWS allows %d", jobID, len(document), maxJobDocument)
	}
	if len(things) == 0 {
		things = []string{e.thing}
	}
	for _, t := range things {
		if !validThingName(t) {
			return fmt.Errorf("create job %s: thing name %q is not valid", jobID, t)
		}
	}
	return e.queueJob(&job{id: jobID, custom: append(json.RawMessage(nil), document...)}, things)
}

// RewriteDocument makes every document sent for jobID pass through fn first, e.g. to quote
// numbers, drop the signature or corrupt a field, while the stream and URL keep working.
// A nil fn removes the hook.
func (e *Emulator) RewriteDocument(jobID string, fn func(json.RawMessage) json.RawMessage) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	j, ok := e.jobs[jobID]
	if !ok {
		return fmt.Errorf("job %s: %w", jobID, ErrNotFound)
	}
	j.rewrite = fn
	return nil
}

// JobDocument returns the document a device would receive now (URLs freshly signed).
func (e *Emulator) JobDocument(jobID string) (json.RawMessage, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	j, ok := e.jobs[jobID]
	if !ok {
		return nil, fmt.Errorf("job %s: %w", jobID, ErrNotFound)
	}
	return e.document(j, time.Now()), nil
}

// Errors of the Go API, for errors.Is.
var (
	// ErrNotFound: no such job or execution (AWS ResourceNotFound).
	ErrNotFound = errors.New("not found")
	// ErrInvalidState: the change is not allowed now, e.g. canceling an in-progress
	// execution without force (AWS InvalidStateTransition).
	ErrInvalidState = errors.New("invalid state transition")
)

// CancelJob implements backend.Backend: queued executions become CANCELED; in-progress ones
// only with force (AWS refuses otherwise).
func (e *Emulator) CancelJob(ctx context.Context, jobID string, force bool) error {
	return e.endJob(jobID, force, backend.StatusCanceled, false)
}

// DeleteJob implements backend.Backend: the executions disappear (ResourceNotFound from then
// on); in-progress ones only with force.
func (e *Emulator) DeleteJob(ctx context.Context, jobID string, force bool) error {
	return e.endJob(jobID, force, backend.StatusRemoved, true)
}

func (e *Emulator) endJob(jobID string, force bool, status string, remove bool) error {
	e.mu.Lock()
	j, ok := e.jobs[jobID]
	if !ok {
		e.mu.Unlock()
		return fmt.Errorf("job %s: %w", jobID, ErrNotFound)
	}
	if !force {
		for _, execs := range e.things {
			for _, x := range execs {
				if x.job == j && x.status == backend.StatusInProgress {
					e.mu.Unlock()
					return fmt.Errorf("job %s: execution on %s is IN_PROGRESS and force is not set: %w", jobID, x.thing, ErrInvalidState)
				}
			}
		}
	}
	now := time.Now()
	for thing, execs := range e.things {
		kept := execs[:0]
		for _, x := range execs {
			if x.job == j && !terminal(x.status) {
				e.setStatusLocked(x, status, nil, now, "service")
			}
			if !(remove && x.job == j) {
				kept = append(kept, x)
			}
		}
		e.things[thing] = kept
		e.pushNotificationsLocked(thing)
	}
	if remove {
		delete(e.jobs, jobID)
		// Keep the stream and its file open: a device mid-download gets blocks until it sees
		// the removal, as with a real stream that outlives the job. Closed on Close.
		e.removed = append(e.removed, j)
	}
	e.notifyLocked()
	e.mu.Unlock()
	e.flushEvents()
	return nil
}

// setStatusLocked changes an execution and records the change.
func (e *Emulator) setStatusLocked(x *execution, status string, details map[string]string, now time.Time, source string) {
	if status == backend.StatusInProgress && x.startedAt.IsZero() {
		x.startedAt = now
	}
	x.status = status
	if details != nil {
		x.details = details
	}
	x.lastUpdatedAt = now
	x.version++
	if terminal(status) && x.stepTimer != nil {
		x.stepTimer.Stop()
		x.stepTimer = nil
		x.stepDeadline = time.Time{}
	}
	u := backend.Update{At: now, Status: status, StatusDetails: copyMap(x.details)}
	x.updates = append(x.updates, u)
	e.events = append(e.events, UpdateEvent{Thing: x.thing, JobID: x.job.id, Source: source, Update: u, VersionNumber: x.version})
	e.log.Info("job execution", "thing", x.thing, "job", x.job.id, "status", status, "details", x.details, "version", x.version, "by", source)
}

func copyMap(m map[string]string) map[string]string {
	if m == nil {
		return nil
	}
	out := make(map[string]string, len(m))
	for k, v := range m {
		out[k] = v
	}
	return out
}

func (e *Emulator) findLocked(thing, jobID string) *execution {
	for _, x := range e.things[thing] {
		if x.job.id == jobID {
			return x
		}
	}
	return nil
}

// nextLocked is the execution $next names: the oldest IN_PROGRESS one, else the oldest QUEUED.
func (e *Emulator) nextLocked(thing string) *execution {
	var queued *execution
	for _, x := range e.things[thing] {
		if x.status == backend.StatusInProgress {
			return x
		}
		if x.status == backend.StatusQueued && queued == nil {
			queued = x
		}
	}
	return queued
}

// Describe implements backend.Backend for the default thing.
func (e *Emulator) Describe(ctx context.Context, jobID string) (backend.Execution, error) {
	return e.DescribeThing(e.thing, jobID)
}

// DescribeThing returns the execution of jobID on thing.
func (e *Emulator) DescribeThing(thing, jobID string) (backend.Execution, error) {
	e.mu.Lock()
	defer e.mu.Unlock()
	x := e.findLocked(thing, jobID)
	if x == nil {
		return backend.Execution{}, fmt.Errorf("execution of %s on %s: %w", jobID, thing, ErrNotFound)
	}
	return x.snapshot(), nil
}

func (x *execution) snapshot() backend.Execution {
	return backend.Execution{JobID: x.job.id, ThingName: x.thing, Status: x.status, StatusDetails: copyMap(x.details), VersionNumber: x.version, ExecutionNumber: x.number}
}

// WaitStatus implements backend.Backend for the default thing.
func (e *Emulator) WaitStatus(ctx context.Context, jobID string, statuses ...string) (backend.Execution, error) {
	return e.WaitThingStatus(ctx, e.thing, jobID, statuses...)
}

// WaitThingStatus blocks until jobID's execution on thing has one of the statuses.
func (e *Emulator) WaitThingStatus(ctx context.Context, thing, jobID string, statuses ...string) (backend.Execution, error) {
	for {
		e.mu.Lock()
		x := e.findLocked(thing, jobID)
		ch := e.changed
		var snap backend.Execution
		if x != nil {
			snap = x.snapshot()
		}
		e.mu.Unlock()
		if x != nil && contains(statuses, snap.Status) {
			return snap, nil
		}
		select {
		case <-ch:
		case <-ctx.Done():
			return snap, fmt.Errorf("waiting for %s on %s to reach %v (now %q): %w", jobID, thing, statuses, snap.Status, ctx.Err())
		}
	}
}

// Updates implements backend.Backend: every recorded change of jobID on the default thing.
func (e *Emulator) Updates(jobID string) []backend.Update {
	return e.ThingUpdates(e.thing, jobID)
}

// ThingUpdates returns the recorded changes of jobID on thing, oldest first.
func (e *Emulator) ThingUpdates(thing, jobID string) []backend.Update {
	e.mu.Lock()
	defer e.mu.Unlock()
	x := e.findLocked(thing, jobID)
	if x == nil {
		return nil
	}
	out := make([]backend.Update, len(x.updates))
	for i, u := range x.updates {
		u.StatusDetails = copyMap(u.StatusDetails)
		out[i] = u
	}
	return out
}

// ---- MQTT side ----

// handle routes one request by topic.
func (e *Emulator) handle(m message) {
	parts := strings.Split(m.topic, "/")
	if len(parts) < 4 || parts[0] != "$aws" || parts[1] != "things" {
		return
	}
	thing := parts[2]
	switch parts[3] {
	case "jobs":
		e.handleJobs(m, thing, parts[4:])
	case "streams":
		e.handleStreams(m, thing, parts[4:])
	}
	e.flushEvents()
}

// JSON shapes of the Jobs MQTT API.
type jobExecutionJSON struct {
	JobID                   string            `json:"jobId"`
	ThingName               string            `json:"thingName"`
	JobDocument             json.RawMessage   `json:"jobDocument,omitempty"`
	Status                  string            `json:"status"`
	StatusDetails           map[string]string `json:"statusDetails,omitempty"`
	QueuedAt                int64             `json:"queuedAt"`
	StartedAt               int64             `json:"startedAt,omitempty"`
	LastUpdatedAt           int64             `json:"lastUpdatedAt"`
	ApproxSecondsBeforeTout int64             `json:"approximateSecondsBeforeTimedOut,omitempty"`
	VersionNumber           int64             `json:"versionNumber"`
	ExecutionNumber         int64             `json:"executionNumber"`
}

type jobSummaryJSON struct {
	JobID           string `json:"jobId"`
	QueuedAt        int64  `json:"queuedAt"`
	StartedAt       int64  `json:"startedAt,omitempty"`
	LastUpdatedAt   int64  `json:"lastUpdatedAt"`
	VersionNumber   int64  `json:"versionNumber"`
	ExecutionNumber int64  `json:"executionNumber"`
}

type executionStateJSON struct {
	Status        string            `json:"status"`
	StatusDetails map[string]string `json:"statusDetails,omitempty"`
	VersionNumber int64             `json:"versionNumber"`
}

type jobsErrorJSON struct {
	Code           string              `json:"code"`
	Message        string              `json:"message"`
	ClientToken    string              `json:"clientToken,omitempty"`
	Timestamp      int64               `json:"timestamp"`
	ExecutionState *executionStateJSON `json:"executionState,omitempty"`
}

func unix(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.Unix()
}

func (e *Emulator) executionJSON(x *execution, withDoc bool, now time.Time) *jobExecutionJSON {
	out := &jobExecutionJSON{
		JobID: x.job.id, ThingName: x.thing, Status: x.status, StatusDetails: copyMap(x.details),
		QueuedAt: unix(x.queuedAt), StartedAt: unix(x.startedAt), LastUpdatedAt: unix(x.lastUpdatedAt),
		VersionNumber: x.version, ExecutionNumber: x.number,
	}
	if withDoc {
		out.JobDocument = e.document(x.job, now)
	}
	if !x.stepDeadline.IsZero() {
		if s := int64(x.stepDeadline.Sub(now).Seconds()); s > 0 {
			out.ApproxSecondsBeforeTout = s
		}
	}
	return out
}

func (x *execution) state() *executionStateJSON {
	return &executionStateJSON{Status: x.status, StatusDetails: copyMap(x.details), VersionNumber: x.version}
}

func mustJSON(v any) []byte {
	b, err := json.Marshal(v)
	if err != nil {
		panic(err) // only our own types are marshalled
	}
	return b
}

// jobReply carries a response out of the lock.
type jobReply struct {
	topic   string
	payload []byte
	delay   time.Duration
}

// send delivers a streams response to the requester (and whoever subscribed to its topic).
func (e *Emulator) send(clientID string, r jobReply) { e.sendReply(clientID, r, false) }

// sendJobReply delivers a Jobs /accepted or /rejected response to the requester only: on AWS
// these "don't pass through the message broker and they can't be subscribed to by other
// clients".
func (e *Emulator) sendJobReply(clientID string, r jobReply) { e.sendReply(clientID, r, true) }

func (e *Emulator) sendReply(clientID string, r jobReply, private bool) {
	e.sendTo(clientID, r.delay, func() {
		if err := e.tr.respond(clientID, r.topic, r.payload, private); err != nil {
			e.log.Warn("respond", "topic", r.topic, "error", err)
		}
	})
}

func rejected(topic, code, msg, token string, st *executionStateJSON) jobReply {
	return jobReply{topic: topic + "/rejected", payload: mustJSON(jobsErrorJSON{
		Code: code, Message: msg, ClientToken: token, Timestamp: time.Now().Unix(), ExecutionState: st,
	})}
}

// jobRequest is the union of the Jobs request bodies; pointers tell absent from zero.
type jobRequest struct {
	ClientToken              *string         `json:"clientToken"`
	Status                   *string         `json:"status"`
	StatusDetails            json.RawMessage `json:"statusDetails"`
	ExpectedVersion          *int64          `json:"expectedVersion"`
	ExecutionNumber          *int64          `json:"executionNumber"`
	IncludeJobExecutionState *bool           `json:"includeJobExecutionState"`
	IncludeJobDocument       *bool           `json:"includeJobDocument"`
	StepTimeoutInMinutes     *int64          `json:"stepTimeoutInMinutes"`
}

func (e *Emulator) handleJobs(m message, thing string, rest []string) {
	// Responses and pushes travel on the same filter: not requests.
	if len(rest) == 0 {
		return
	}
	last := rest[len(rest)-1]
	if last == "accepted" || last == "rejected" || (len(rest) == 1 && (last == "notify" || last == "notify-next")) {
		return
	}
	op := ""
	jobID := ""
	switch {
	case len(rest) == 1 && rest[0] == "get":
		op = "get-pending"
	case len(rest) == 1 && rest[0] == "start-next":
		op = "start-next"
	case len(rest) == 2 && rest[1] == "get":
		op, jobID = "describe", rest[0]
	case len(rest) == 2 && rest[1] == "update":
		op, jobID = "update", rest[0]
	}
	if op == "" || !validThingName(thing) || (jobID != "" && jobID != "$next" && !jobIDRe.MatchString(jobID)) || (op == "update" && jobID == "$next") {
		e.sendJobReply(m.clientID, rejected(m.topic, CodeInvalidTopic, "topic does not map to a Jobs API", "", nil))
		return
	}
	var req jobRequest
	token := ""
	body := bytes.TrimSpace(m.payload)
	if len(body) == 0 {
		body = []byte("{}") // an empty request is treated as {}
	}
	if !json.Valid(body) || !utf8.Valid(body) {
		e.sendJobReply(m.clientID, rejected(m.topic, CodeInvalidJSON, "request is not valid UTF-8 JSON", "", nil))
		return
	}
	if err := json.Unmarshal(body, &req); err != nil {
		// Try to keep the token for the reply.
		var t struct {
			ClientToken string `json:"clientToken"`
		}
		_ = json.Unmarshal(body, &t)
		e.sendJobReply(m.clientID, rejected(m.topic, CodeInvalidRequest, "request has a field of the wrong type: "+err.Error(), t.ClientToken, nil))
		return
	}
	if req.ClientToken != nil {
		token = *req.ClientToken
		if len(token) > 64 {
			e.sendJobReply(m.clientID, rejected(m.topic, CodeInvalidRequest, "clientToken longer than 64 characters", "", nil))
			return
		}
	}

	e.mu.Lock()
	var reply jobReply
	switch op {
	case "get-pending":
		reply = e.getPendingLocked(m.topic, thing, token)
	case "describe":
		reply = e.describeLocked(m.topic, thing, jobID, token, req)
		if h := e.holdNext; h != nil && jobID == "$next" {
			h.replies = append(h.replies, heldReply{m.clientID, reply})
			select {
			case h.held <- struct{}{}:
			default:
			}
			e.mu.Unlock()
			return
		}
	case "start-next":
		reply = e.startNextLocked(m.topic, thing, token, req)
	case "update":
		reply = e.updateLocked(m.topic, thing, jobID, token, req)
	}
	e.mu.Unlock()
	e.sendJobReply(m.clientID, reply)
}

func (e *Emulator) jobDelayLocked(jobID string) time.Duration {
	if f := e.faultsLocked(jobID); f != nil {
		return f.Delay
	}
	return 0
}

func (e *Emulator) getPendingLocked(topic, thing, token string) jobReply {
	now := time.Now()
	out := struct {
		InProgress  []jobSummaryJSON `json:"inProgressJobs"`
		Queued      []jobSummaryJSON `json:"queuedJobs"`
		Timestamp   int64            `json:"timestamp"`
		ClientToken string           `json:"clientToken,omitempty"`
	}{InProgress: []jobSummaryJSON{}, Queued: []jobSummaryJSON{}, Timestamp: now.Unix(), ClientToken: token}
	for _, x := range e.things[thing] {
		s := jobSummaryJSON{JobID: x.job.id, QueuedAt: unix(x.queuedAt), StartedAt: unix(x.startedAt), LastUpdatedAt: unix(x.lastUpdatedAt), VersionNumber: x.version, ExecutionNumber: x.number}
		switch x.status {
		case backend.StatusInProgress:
			out.InProgress = append(out.InProgress, s)
		case backend.StatusQueued:
			out.Queued = append(out.Queued, s)
		}
	}
	return jobReply{topic: topic + "/accepted", payload: mustJSON(out)}
}

type describeAccepted struct {
	Execution   *jobExecutionJSON `json:"execution,omitempty"`
	Timestamp   int64             `json:"timestamp"`
	ClientToken string            `json:"clientToken,omitempty"`
}

func (e *Emulator) describeLocked(topic, thing, jobID, token string, req jobRequest) jobReply {
	now := time.Now()
	var x *execution
	if jobID == "$next" {
		x = e.nextLocked(thing)
		if x == nil {
			// Nothing pending: accepted, without an execution.
			return jobReply{topic: topic + "/accepted", payload: mustJSON(describeAccepted{Timestamp: now.Unix(), ClientToken: token})}
		}
	} else {
		x = e.findLocked(thing, jobID)
		if x == nil || (req.ExecutionNumber != nil && *req.ExecutionNumber != x.number) {
			return rejected(topic, CodeResourceNotFound, fmt.Sprintf("job execution %s not found for thing %s", jobID, thing), token, nil)
		}
	}
	r := jobReply{delay: e.jobDelayLocked(x.job.id)}
	if terminal(x.status) {
		r2 := rejected(topic, CodeTerminalStateReached, fmt.Sprintf("job execution %s is in terminal state %s", x.job.id, x.status), token, nil)
		r2.delay = r.delay
		return r2
	}
	withDoc := req.IncludeJobDocument == nil || *req.IncludeJobDocument
	r.topic = topic + "/accepted"
	r.payload = mustJSON(describeAccepted{Execution: e.executionJSON(x, withDoc, now), Timestamp: now.Unix(), ClientToken: token})
	return r
}

// validateDetails applies AWS's statusDetails rules: a map of string to string, keys 1..128 of
// [a-zA-Z0-9:_-], values 1..1024 characters without control or invisible characters.
func (e *Emulator) validateDetails(raw json.RawMessage) (map[string]string, error) {
	if raw == nil {
		return nil, nil
	}
	if bytes.Equal(bytes.TrimSpace(raw), []byte("null")) {
		return nil, nil
	}
	var m map[string]json.RawMessage
	if err := json.Unmarshal(raw, &m); err != nil {
		return nil, errors.New("statusDetails must be an object")
	}
	if e.opts.MaxStatusDetails > 0 && len(m) > e.opts.MaxStatusDetails {
		return nil, fmt.Errorf("statusDetails has %d entries, at most %d allowed", len(m), e.opts.MaxStatusDetails)
	}
	out := make(map[string]string, len(m))
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	sort.Strings(keys)
	for _, k := range keys {
		if !detailKeyRe.MatchString(k) {
			return nil, fmt.Errorf("statusDetails key %q must be 1..128 of [a-zA-Z0-9:_-]", k)
		}
		var v string
		if err := json.Unmarshal(m[k], &v); err != nil {
			return nil, fmt.Errorf("statusDetails value of %q must be a string", k)
		}
		if n := utf8.RuneCountInString(v); n < 1 || n > 1024 {
			return nil, fmt.Errorf("statusDetails value of %q must be 1..1024 characters, is %d", k, n)
		}
		for _, r := range v {
			if unicode.Is(unicode.C, r) {
				return nil, fmt.Errorf("statusDetails value of %q contains a control or invisible character %U", k, r)
			}
		}
		out[k] = v
	}
	return out, nil
}

func validStepTimeout(p *int64) bool {
	return p == nil || *p == -1 || (*p >= 1 && *p <= 10080)
}

func (e *Emulator) startNextLocked(topic, thing, token string, req jobRequest) jobReply {
	now := time.Now()
	details, err := e.validateDetails(req.StatusDetails)
	if err != nil {
		return rejected(topic, CodeInvalidRequest, err.Error(), token, nil)
	}
	if !validStepTimeout(req.StepTimeoutInMinutes) {
		return rejected(topic, CodeInvalidRequest, "stepTimeoutInMinutes must be 1..10080 or -1", token, nil)
	}
	x := e.nextLocked(thing)
	if x == nil {
		return jobReply{topic: topic + "/accepted", payload: mustJSON(describeAccepted{Timestamp: now.Unix(), ClientToken: token})}
	}
	if x.status == backend.StatusQueued {
		e.setStatusLocked(x, backend.StatusInProgress, details, now, "device")
		e.setStepTimerLocked(x, req.StepTimeoutInMinutes, now)
		e.pushNotificationsLocked(thing)
		e.notifyLocked()
	}
	return jobReply{topic: topic + "/accepted", delay: e.jobDelayLocked(x.job.id),
		payload: mustJSON(describeAccepted{Execution: e.executionJSON(x, true, now), Timestamp: now.Unix(), ClientToken: token})}
}

func (e *Emulator) setStepTimerLocked(x *execution, minutes *int64, now time.Time) {
	if minutes == nil {
		return
	}
	if x.stepTimer != nil {
		x.stepTimer.Stop()
		x.stepTimer, x.stepDeadline = nil, time.Time{}
		x.stepGen++
	}
	if *minutes == -1 {
		return
	}
	d := time.Duration(*minutes) * e.opts.StepTimeoutUnit
	x.stepDeadline = now.Add(d)
	x.stepGen++
	gen := x.stepGen
	// Later updates without stepTimeoutInMinutes leave the timer running, as on AWS.
	x.stepTimer = timeAfterFunc(d, func() {
		e.mu.Lock()
		if x.stepGen != gen || terminal(x.status) {
			e.mu.Unlock()
			return
		}
		select {
		case <-e.stop:
			e.mu.Unlock()
			return
		default:
		}
		e.setStatusLocked(x, backend.StatusTimedOut, nil, time.Now(), "service")
		e.pushNotificationsLocked(x.thing)
		e.notifyLocked()
		e.mu.Unlock()
		e.flushEvents()
	})
}

func (e *Emulator) updateLocked(topic, thing, jobID, token string, req jobRequest) jobReply {
	now := time.Now()
	if req.Status == nil {
		return rejected(topic, CodeInvalidRequest, "status is required", token, nil)
	}
	status := *req.Status
	switch status {
	case backend.StatusInProgress, backend.StatusSucceeded, backend.StatusFailed, backend.StatusRejected,
		backend.StatusQueued, backend.StatusTimedOut, backend.StatusRemoved, backend.StatusCanceled:
	default:
		return rejected(topic, CodeInvalidRequest, fmt.Sprintf("unknown status %q", status), token, nil)
	}
	details, err := e.validateDetails(req.StatusDetails)
	if err != nil {
		return rejected(topic, CodeInvalidRequest, err.Error(), token, nil)
	}
	if !validStepTimeout(req.StepTimeoutInMinutes) {
		return rejected(topic, CodeInvalidRequest, "stepTimeoutInMinutes must be 1..10080 or -1", token, nil)
	}
	delay := e.jobDelayLocked(jobID)
	withDelay := func(r jobReply) jobReply { r.delay = delay; return r }
	if f := e.faultsLocked(jobID); f != nil {
		if f.throttleLeft > 0 {
			f.throttleLeft--
			return withDelay(rejected(topic, CodeRequestThrottled, "rate exceeded", token, nil))
		}
		if f.RejectCode != "" {
			return withDelay(rejected(topic, f.RejectCode, "injected fault", token, nil))
		}
		if f.RejectUpdate != nil {
			if code := f.RejectUpdate(status, details); code != "" {
				return withDelay(rejected(topic, code, "injected fault", token, nil))
			}
		}
	}
	x := e.findLocked(thing, jobID)
	if x == nil || (req.ExecutionNumber != nil && *req.ExecutionNumber != x.number) {
		return withDelay(rejected(topic, CodeResourceNotFound, fmt.Sprintf("job execution %s not found for thing %s", jobID, thing), token, nil))
	}
	if req.ExpectedVersion != nil && *req.ExpectedVersion != x.version {
		return withDelay(rejected(topic, CodeVersionMismatch, fmt.Sprintf("expected version %d, current %d", *req.ExpectedVersion, x.version), token, x.state()))
	}
	if !legalTransition(x.status, status) {
		return withDelay(rejected(topic, CodeInvalidStateTransition, fmt.Sprintf("cannot change %s to %s", x.status, status), token, x.state()))
	}
	e.setStatusLocked(x, status, details, now, "device")
	if !terminal(status) {
		e.setStepTimerLocked(x, req.StepTimeoutInMinutes, now)
	}
	e.pushNotificationsLocked(thing)
	e.notifyLocked()
	out := struct {
		ExecutionState *executionStateJSON `json:"executionState,omitempty"`
		JobDocument    json.RawMessage     `json:"jobDocument,omitempty"`
		Timestamp      int64               `json:"timestamp"`
		ClientToken    string              `json:"clientToken,omitempty"`
	}{Timestamp: now.Unix(), ClientToken: token}
	if req.IncludeJobExecutionState != nil && *req.IncludeJobExecutionState {
		out.ExecutionState = x.state()
	}
	if req.IncludeJobDocument != nil && *req.IncludeJobDocument {
		out.JobDocument = e.document(x.job, now)
	}
	return withDelay(jobReply{topic: topic + "/accepted", payload: mustJSON(out)})
}

// legalTransition: a device moves QUEUED or IN_PROGRESS to IN_PROGRESS, SUCCEEDED, FAILED or
// REJECTED. Terminal states are final; service-only states cannot be set by a device.
func legalTransition(from, to string) bool {
	if terminal(from) {
		return false
	}
	switch to {
	case backend.StatusInProgress, backend.StatusSucceeded, backend.StatusFailed, backend.StatusRejected:
		return true
	}
	return false
}

// pushNotificationsLocked publishes notify-next when the identity of the next execution
// changed, and notify when the list of pending executions changed.
func (e *Emulator) pushNotificationsLocked(thing string) {
	now := time.Now()
	prefix := "$aws/things/" + thing + "/jobs/"
	next := e.nextLocked(thing)
	nextID := ""
	if next != nil {
		nextID = next.job.id
	}
	if nextID != e.lastNext[thing] {
		e.lastNext[thing] = nextID
		body := struct {
			Timestamp int64             `json:"timestamp"`
			Execution *jobExecutionJSON `json:"execution,omitempty"`
		}{Timestamp: now.Unix()}
		if next != nil {
			body.Execution = e.executionJSON(next, true, now)
		}
		e.publishAsync(prefix+"notify-next", mustJSON(body))
	}
	jobs := map[string][]jobSummaryJSON{}
	var fp strings.Builder
	for _, x := range e.things[thing] {
		if pending(x.status) {
			jobs[x.status] = append(jobs[x.status], jobSummaryJSON{JobID: x.job.id, QueuedAt: unix(x.queuedAt), StartedAt: unix(x.startedAt), LastUpdatedAt: unix(x.lastUpdatedAt), VersionNumber: x.version, ExecutionNumber: x.number})
			fmt.Fprintf(&fp, "%s=%s;", x.job.id, x.status)
		}
	}
	if fp.String() != e.lastPend[thing] {
		e.lastPend[thing] = fp.String()
		e.publishAsync(prefix+"notify", mustJSON(struct {
			Timestamp int64                       `json:"timestamp"`
			Jobs      map[string][]jobSummaryJSON `json:"jobs"`
		}{now.Unix(), jobs}))
	}
}

// publishAsync publishes outside the caller's lock, keeping order: the broker calls back into
// nothing of ours, so publishing under the lock would also be safe, but the external client
// waits for a PUBACK and must not hold the lock meanwhile.
func (e *Emulator) publishAsync(topic string, payload []byte) {
	e.pushQ = append(e.pushQ, jobReply{topic: topic, payload: payload})
	if !e.pushing {
		e.pushing = true
		e.wg.Add(1)
		go e.drainPushes()
	}
}

func (e *Emulator) drainPushes() {
	defer e.wg.Done()
	for {
		e.mu.Lock()
		if len(e.pushQ) == 0 {
			e.pushing = false
			e.notifyLocked() // tests wait for pushes to reach the broker
			e.mu.Unlock()
			return
		}
		r := e.pushQ[0]
		e.pushQ = e.pushQ[1:]
		e.mu.Unlock()
		if err := e.tr.publish(r.topic, r.payload); err != nil {
			e.log.Warn("publish", "topic", r.topic, "error", err)
		}
	}
}

// timeAfterFunc starts step timers; a test replaces it to order a timer's expiry after a
// device's request.
var timeAfterFunc = func(d time.Duration, f func()) interface{ Stop() bool } { return time.AfterFunc(d, f) }

// AnnounceNext publishes a notify-next naming jobID on thing, whatever $next is now: AWS does
// not promise that notifications arrive in order, so a device can hear of another job while
// its current one is still open.
func (e *Emulator) AnnounceNext(thing, jobID string) error {
	e.mu.Lock()
	defer e.mu.Unlock()
	x := e.findLocked(thing, jobID)
	if x == nil {
		return fmt.Errorf("job %s on %s: %w", jobID, thing, ErrNotFound)
	}
	now := time.Now()
	e.publishAsync("$aws/things/"+thing+"/jobs/notify-next", mustJSON(struct {
		Timestamp int64             `json:"timestamp"`
		Execution *jobExecutionJSON `json:"execution"`
	}{now.Unix(), e.executionJSON(x, true, now)}))
	return nil
}

type heldReply struct {
	clientID string
	reply    jobReply
}

type heldAnswers struct {
	held    chan struct{}
	replies []heldReply
}

// HoldNext holds back the answers to $next/get (DescribeJobExecution of "$next"): each is
// computed when its request arrives, as AWS does, and sent only when release is called, in
// order. AWS does not order its responses and notifications, so an answer saying "nothing
// pending" can reach a device after the notify-next of a job created meanwhile; this makes
// that order happen. held gets a value each time an answer is held.
func (e *Emulator) HoldNext() (held <-chan struct{}, release func()) {
	h := &heldAnswers{held: make(chan struct{}, 16)}
	e.mu.Lock()
	e.holdNext = h
	e.mu.Unlock()
	var once sync.Once
	return h.held, func() {
		once.Do(func() {
			e.mu.Lock()
			if e.holdNext == h {
				e.holdNext = nil
			}
			replies := h.replies
			h.replies = nil
			e.mu.Unlock()
			for _, r := range replies {
				e.send(r.clientID, r.reply)
			}
		})
	}
}
