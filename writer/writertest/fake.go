// Package writertest is the writer's test kit: Fake, the one in-memory api.Writer; Serve,
// which serves any api.Writer (the Fake or the real engine) through the real gRPC adapter on
// a real Unix socket; and Dial, a client that waited for the writer and handshook.
//
// The Fake is for what sits around the writer (the adapter's transport, authorization and
// error boundary; the client; ota-net's writer link). The writer's own behaviour is tested
// with the real engine.
package writertest

import (
	"context"
	"errors"
	"sync"

	"github.com/gwota/gwota/internal/bitmap"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
)

// Target is the only file path the Fake's Begin accepts (a job's filepath).
const Target = "/fw"

var _ api.Writer = (*Fake)(nil)

// Fake is an in-memory writer with the properties its callers rely on: sessions resumed by
// job with the bitmap of blocks not yet durable, idempotent block writes checked against the
// session, durability only at syncs (asked for, or every SyncEvery writes), and Crash, which
// forgets what was not durable, as a writer killed and restarted does. It has no boot
// control: Commit is refused outside a trial boot, which it never is in.
type Fake struct {
	maxBlock uint32

	// SyncEvery makes every SyncEvery-th Write durable although not asked (the writer's own
	// sync policy); 0: only when asked. Set it before serving.
	SyncEvery int
	// Discard keeps no block data (transport benchmarks).
	Discard bool
	// Ext is what Extensions answers.
	Ext status.Fields

	mu       sync.Mutex
	sessions map[string]*fakeSession
	fail     map[string]error
	panics   map[string]bool
	writes   int
}

type fakeSession struct {
	req     *otav1.BeginSessionRequest
	bs      uint32
	blocks  map[uint64][]byte
	durable map[uint64]bool
	since   int // writes since the last sync
	state   otav1.SessionState
}

// NewFake returns a writer taking blocks of up to maxBlock bytes.
func NewFake(maxBlock uint32) *Fake {
	return &Fake{maxBlock: maxBlock, Ext: status.Pairs("fw", "1"), sessions: map[string]*fakeSession{}, fail: map[string]error{}, panics: map[string]bool{}}
}

// MaxBlockSize is the largest block Begin accepts (Serve sizes the server's limit by it).
func (f *Fake) MaxBlockSize() uint32 { return f.maxBlock }

// Fail makes method ("Write", "Activate", ...) return err from now on; nil clears it. The
// error is returned as it is: an untyped one tests the adapter's REASON_OTHER.
func (f *Fake) Fail(method string, err error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fail[method] = err
}

// Panic makes method panic from now on (tests the adapter's recovery).
func (f *Fake) Panic(method string) {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.panics[method] = true
}

// injected is the failure set for method; f.mu is held.
func (f *Fake) injected(method string) error {
	if f.panics[method] {
		panic("writertest: " + method)
	}
	return f.fail[method]
}

// Crash forgets everything not durable, like a writer killed and restarted.
func (f *Fake) Crash() {
	f.mu.Lock()
	defer f.mu.Unlock()
	for _, s := range f.sessions {
		for i := range s.blocks {
			if !s.durable[i] {
				delete(s.blocks, i)
			}
		}
		s.since = 0
	}
}

// Image is what session id holds, block by block.
func (f *Fake) Image(id string) []byte {
	f.mu.Lock()
	defer f.mu.Unlock()
	s := f.sessions[id]
	if s == nil {
		return nil
	}
	var out []byte
	for i := range s.total() {
		out = append(out, s.blocks[i]...)
	}
	return out
}

// Durable is the number of durable blocks of session id.
func (f *Fake) Durable(id string) int {
	f.mu.Lock()
	defer f.mu.Unlock()
	if s := f.sessions[id]; s != nil {
		return len(s.durable)
	}
	return 0
}

func (s *fakeSession) total() uint64 {
	return (s.req.GetFileSize() + uint64(s.bs) - 1) / uint64(s.bs)
}

func (s *fakeSession) info(id string) *otav1.SessionInfo {
	n := s.total()
	missing := bitmap.New(int(n))
	for i := range n {
		if !s.durable[i] {
			missing.Set(int(i))
		}
	}
	return &otav1.SessionInfo{SessionId: id, JobId: s.req.GetJobId(), Target: "fake", FileSize: s.req.GetFileSize(), BlockSize: s.bs,
		TotalBlocks: n, DurableBlocks: uint64(len(s.durable)), ReceivedBlocks: uint64(len(s.blocks)), Missing: missing, State: s.state}
}

func (f *Fake) Handshake(_ context.Context, req *otav1.HandshakeRequest) (*otav1.HandshakeResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("Handshake"); err != nil {
		return nil, err
	}
	if req.GetProtocolVersion() != otav1.ProtocolVersion_PROTOCOL_VERSION_1 {
		return nil, status.Errorf(otav1.Reason_REASON_PROTOCOL_VERSION, "protocol %s", req.GetProtocolVersion())
	}
	return &otav1.HandshakeResponse{ProtocolVersion: otav1.ProtocolVersion_PROTOCOL_VERSION_1, MaxBlockSize: f.maxBlock}, nil
}

func (f *Fake) State(context.Context) (*otav1.DeviceState, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("State"); err != nil {
		return nil, err
	}
	st := &otav1.DeviceState{ImageState: otav1.ImageState_IMAGE_STATE_NORMAL, BootBackend: "fake"}
	for id, s := range f.sessions {
		st.Sessions = append(st.Sessions, s.info(id))
	}
	return st, nil
}

// Begin opens the session of a job, or resumes it when the file size matches.
func (f *Fake) Begin(_ context.Context, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("Begin"); err != nil {
		return nil, err
	}
	if req.GetFilePath() != Target {
		return nil, status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "no target for %q", req.GetFilePath())
	}
	if req.GetBlockSize() == 0 || req.GetBlockSize() > f.maxBlock {
		return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "block size %d", req.GetBlockSize())
	}
	id := "s-" + req.GetJobId()
	if s, ok := f.sessions[id]; ok && s.req.GetFileSize() == req.GetFileSize() {
		return &otav1.BeginSessionResponse{Session: s.info(id), Resumed: true}, nil
	}
	s := &fakeSession{req: req, bs: req.GetBlockSize(), blocks: map[uint64][]byte{}, durable: map[uint64]bool{}, state: otav1.SessionState_SESSION_STATE_RECEIVING}
	f.sessions[id] = s
	return &otav1.BeginSessionResponse{Session: s.info(id)}, nil
}

// Write checks the whole batch (offset on a block boundary, inside the image, exactly one
// block of data, the last one shorter) before it keeps any of it.
func (f *Fake) Write(_ context.Context, id string, blocks []*otav1.Block, sync bool) (api.WriteResult, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("Write"); err != nil {
		return api.WriteResult{}, err
	}
	s, ok := f.sessions[id]
	if !ok {
		return api.WriteResult{}, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "no session %q", id)
	}
	size := s.req.GetFileSize()
	for _, b := range blocks {
		want := min(uint64(s.bs), size-min(size, b.GetOffset()))
		if b.GetOffset()%uint64(s.bs) != 0 || b.GetOffset() >= size || uint64(len(b.GetData())) != want {
			return api.WriteResult{}, status.Errorf(otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, "block at %d (%d bytes)", b.GetOffset(), len(b.GetData()))
		}
	}
	for _, b := range blocks {
		var data []byte
		if !f.Discard {
			data = append([]byte(nil), b.GetData()...)
		}
		s.blocks[b.GetOffset()/uint64(s.bs)] = data
		f.writes++
	}
	s.since++
	res := api.WriteResult{Received: uint64(len(s.blocks)), Total: s.total()}
	if sync || (f.SyncEvery > 0 && s.since >= f.SyncEvery) {
		s.sync()
		res.Synced = true
	}
	res.Durable = uint64(len(s.durable))
	return res, nil
}

func (s *fakeSession) sync() {
	for i := range s.blocks {
		s.durable[i] = true
	}
	s.since = 0
}

// Finish makes what was written durable (as the writer's flush does) and needs every block.
func (f *Fake) Finish(_ context.Context, id string) (*otav1.FinishSessionResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("Finish"); err != nil {
		return nil, err
	}
	s, ok := f.sessions[id]
	if !ok {
		return nil, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "no session %q", id)
	}
	s.sync()
	if uint64(len(s.durable)) != s.total() {
		return nil, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "%d of %d blocks", len(s.durable), s.total())
	}
	s.state = otav1.SessionState_SESSION_STATE_VERIFIED
	return &otav1.FinishSessionResponse{Session: s.info(id)}, nil
}

// Abort drops a session; one that does not exist is already dropped.
func (f *Fake) Abort(_ context.Context, id string, _ otav1.Reason) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("Abort"); err != nil {
		return err
	}
	delete(f.sessions, id)
	return nil
}

// Activate takes a verified session, which is then done.
func (f *Fake) Activate(_ context.Context, id string) (*otav1.ActivateResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("Activate"); err != nil {
		return nil, err
	}
	s, ok := f.sessions[id]
	if !ok || s.state != otav1.SessionState_SESSION_STATE_VERIFIED {
		return nil, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "no verified session %q", id)
	}
	delete(f.sessions, id)
	return &otav1.ActivateResponse{Target: "fake"}, nil
}

func (f *Fake) Reboot(context.Context) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.injected("Reboot")
}

func (f *Fake) SelfTest(context.Context, string) (*otav1.SelfTestResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("SelfTest"); err != nil {
		return nil, err
	}
	return &otav1.SelfTestResponse{Passed: true}, nil
}

func (f *Fake) Commit(context.Context, string) (*otav1.CommitResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("Commit"); err != nil {
		return nil, err
	}
	return nil, status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "not in a trial boot")
}

func (f *Fake) Reject(context.Context, string, otav1.Reason) (*otav1.RejectResponse, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("Reject"); err != nil {
		return nil, err
	}
	return &otav1.RejectResponse{}, nil
}

func (f *Fake) Extensions(context.Context) (status.Fields, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.injected("Extensions"); err != nil {
		return nil, err
	}
	return f.Ext, nil
}

// ErrUntyped is a plain error, not a *status.Error: what a bug in the writer would return.
var ErrUntyped = errors.New("writertest: plain error, not typed")
