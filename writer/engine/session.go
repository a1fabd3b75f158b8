package engine

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"sync"
	"time"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/internal/crashpoint"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/journal"
	"github.com/gwota/gwota/writer/manifest"
	"github.com/gwota/gwota/writer/target"
)

// session is one image being written. meta's identifying fields never change after creation;
// everything else is guarded by mu.
type session struct {
	id      string
	meta    journal.Session
	tgt     *target.Target
	total   uint64 // blocks
	lastLen uint64 // length of the last block

	mu        sync.Mutex
	state     otav1.SessionState
	verifying chan struct{} // non-nil while Finish reads the image back (mu released)
	dropped   bool
	medium    target.Medium
	// received: written to the medium (maybe not durable); durable: fdatasync returned and
	// the journal says so. received is a superset of durable.
	received, durable   bitmap.Bitmap
	nReceived, nDurable uint64
	pendingBytes        int64
	lastSync            time.Time
	updated             time.Time // last progress (journaled)
	reloaded            bool      // verified by an earlier process: verify again before activation
	sha                 string

	// CHUNKS sessions: the verified manifest (read from mfFile), the chunk decoder and a
	// block of scratch, the local fill running (writes refused), the delta figures.
	mf      *manifest.Manifest
	mfFile  *os.File
	dec     *manifest.ChunkDecoder
	scratch []byte
	dict    []byte // a delta chunk's dictionary, read from the running slot
	filling bool
	stats   deltaStats
}

// closeManifest releases a CHUNKS session's manifest. The caller holds s.mu.
func (s *session) closeManifestLocked() {
	if s.dec != nil {
		s.dec.Close()
		s.dec = nil
	}
	if s.mfFile != nil {
		s.mfFile.Close()
		s.mfFile = nil
	}
}

func newSession(js *journal.Session, t *target.Target) *session {
	bs := uint64(js.BlockSize)
	total := (js.FileSize + bs - 1) / bs
	updated := js.Updated
	if updated.IsZero() {
		updated = js.Created
	}
	return &session{
		id: js.ID, meta: *js, tgt: t, total: total,
		lastLen:  js.FileSize - (total-1)*bs,
		lastSync: time.Now(),
		updated:  updated,
	}
}

// info snapshots the session for State and Begin.
func (s *session) info() *otav1.SessionInfo {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.dropped {
		return nil
	}
	return s.infoLocked()
}

func (s *session) infoLocked() *otav1.SessionInfo {
	missing := s.durable.Complement(int(s.total))
	st := s.state
	if s.verifying != nil {
		st = otav1.SessionState_SESSION_STATE_RECEIVING
	}
	return &otav1.SessionInfo{
		SessionId: s.id, JobId: s.meta.JobID, FileIndex: s.meta.FileIndex, Target: s.meta.Target,
		Slot: s.meta.Slot, FileSize: s.meta.FileSize, BlockSize: s.meta.BlockSize, TotalBlocks: s.total,
		DurableBlocks: s.nDurable, Missing: missing, State: st, Version: s.meta.Version,
		CreatedUnix: unixOrZero(s.meta.Created), UpdatedUnix: unixOrZero(s.updated), ReceivedBlocks: s.nReceived,
		Kind: s.kind(), Delta: s.deltaInfoLocked(),
	}
}

func unixOrZero(t time.Time) int64 {
	if t.IsZero() {
		return 0
	}
	return t.Unix()
}

// saveLocked persists the metadata and the durable bitmap.
func (s *session) journalRecord() *journal.Session {
	js := s.meta
	js.State = int32(s.state)
	js.Durable = s.durable
	js.SHA256 = s.sha
	js.Updated = s.updated
	js.ReusedBlocks, js.ZeroBlocks, js.DownloadBytes, js.WritesSaved = s.stats.reused, s.stats.zero, s.stats.download, s.stats.saved
	return &js
}

// Begin implements api.Writer: it resumes the target's session when the request is the
// same file of the same job, and otherwise begins a new one on the writable slot.
func (e *Engine) Begin(ctx context.Context, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error) {
	switch kindOf(int32(req.GetKind())) {
	case kindImage:
	case kindManifest:
		return e.beginManifest(ctx, req)
	case kindChunks:
		return e.beginChunks(ctx, req)
	default:
		return nil, status.Errorf(otav1.Reason_REASON_UNSUPPORTED, "session kind %s not supported", req.GetKind())
	}
	t, err := e.checkBegin(req)
	if err != nil {
		return nil, err
	}
	e.ctl.Lock()
	defer e.ctl.Unlock()

	if resp, err := e.resume(ctx, t, req); resp != nil || err != nil {
		return resp, err
	}
	booted, slot, err := e.writableSlot(ctx, t)
	if err != nil {
		return nil, err
	}
	if err := e.checkVersion(t, booted, req.GetVersion(), false); err != nil {
		return nil, err
	}
	if err := e.checkRoom(t, slot, req.GetFileSize()); err != nil {
		return nil, err
	}
	return e.beginNew(t, req, booted, slot)
}

// startReceiving makes a new session's medium m and its empty bitmaps current: the state
// every kind of session begins in.
func (s *session) startReceiving(m target.Medium) {
	s.medium = m
	s.state = otav1.SessionState_SESSION_STATE_RECEIVING
	s.received = bitmap.New(int(s.total))
	s.durable = bitmap.New(int(s.total))
}

// busy refuses a Begin for t, whose session s writes another file.
func busy(t *target.Target, s *session) error {
	m := s.meta
	return status.Errorf(otav1.Reason_REASON_SESSION_BUSY, "target %s is busy with job %s file %d: abort that session first", t.Name(), m.JobID, m.FileIndex).
		WithMeta("job_id", m.JobID).WithMeta("session_id", s.id).WithMeta("file_index", fmt.Sprint(m.FileIndex)).WithMeta("target", t.Name())
}

// lockForResume locks s once no call uses it, refuses it if its slot is fenced, and makes
// what the last client wrote but did not see synced durable, unless the slot may no longer be
// written. On success s.mu is held.
func (e *Engine) lockForResume(ctx context.Context, s *session) error {
	if err := s.lockIdle(ctx); err != nil {
		return err
	}
	if err := e.refuseFencedLocked(ctx, s, true); err != nil {
		s.mu.Unlock()
		return err
	}
	if s.pendingBytes > 0 && s.writableLocked() == nil {
		if err := e.syncLocked(s); err != nil {
			s.mu.Unlock()
			return err
		}
	}
	return nil
}

// resume answers a Begin for the file t's session is writing: what the last client wrote
// but did not see synced becomes durable now, so the resumed client does not fetch it
// again, unless its slot may no longer be written. Another job's session makes the target
// busy. (nil, nil): no session to resume, begin a new one. The caller holds e.ctl.
func (e *Engine) resume(ctx context.Context, t *target.Target, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error) {
	e.mu.RLock()
	s := e.byTarget[t.Name()]
	e.mu.RUnlock()
	if s == nil {
		return nil, nil
	}
	m := s.meta
	if !(s.kind() == kindImage && m.JobID == req.GetJobId() && m.FileIndex == req.GetFileIndex() && m.FileSize == req.GetFileSize() &&
		bytes.Equal(m.Signature, req.GetSignature()) && m.Algorithm == int32(req.GetSigAlgorithm()) &&
		m.CertName == req.GetCertName() && m.Version == req.GetVersion()) {
		return nil, busy(t, s)
	}
	if err := e.lockForResume(ctx, s); err != nil {
		return nil, err
	}
	s.mu.Unlock()
	info := s.info()
	if info == nil {
		return nil, nil // dropped meanwhile
	}
	e.log.Info("session resumed", "session", s.id, "job", m.JobID, "durable", info.DurableBlocks, "total", info.TotalBlocks)
	return &otav1.BeginSessionResponse{Session: info, Resumed: true}, nil
}

// writableSlot is the slot a new session of t writes, and the running slot ("" for a file
// target). Writing the inactive slot during a trial or after a rollback that has not
// rebooted yet would overwrite the only known-good image; while an activation waits for its
// reboot it would overwrite the image about to be tried.
func (e *Engine) writableSlot(ctx context.Context, t *target.Target) (booted, slot string, err error) {
	if !t.IsAB() {
		return "", target.FileSlot, nil
	}
	st, err := e.bootState(ctx)
	if err != nil {
		return "", "", err
	}
	switch {
	case st.Trial:
		return "", "", status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "slot %s is on trial: commit or reject it before a new update", st.Booted)
	case st.Pending != "":
		return "", "", status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "slot %s is activated and waits for a reboot", st.Pending)
	case st.Booted != st.Committed:
		return "", "", status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "running slot %s is not the committed slot %s: reboot first", st.Booted, st.Committed)
	}
	if slot, err = t.Inactive(st.Booted); err != nil {
		return "", "", err
	}
	return st.Booted, slot, nil
}

// beginNew begins a new session of req on t's slot: the slot's recorded version is forgotten,
// the medium opened fresh and the session journaled before it is known. The caller holds
// e.ctl.
func (e *Engine) beginNew(t *target.Target, req *otav1.BeginSessionRequest, booted, slot string) (*otav1.BeginSessionResponse, error) {
	js := &journal.Session{
		ID: newID(), JobID: req.GetJobId(), FileIndex: req.GetFileIndex(), Target: t.Name(), Slot: slot,
		FileSize: req.GetFileSize(), BlockSize: req.GetBlockSize(), Signature: bytes.Clone(req.GetSignature()),
		Algorithm: int32(req.GetSigAlgorithm()), CertName: req.GetCertName(), Version: req.GetVersion(),
		State: int32(otav1.SessionState_SESSION_STATE_RECEIVING), Created: time.Now().UTC(),
	}
	s := newSession(js, t)
	if bitmap.Len(int(s.total)) > maxBitmapBytes {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_TOO_LARGE, "%d blocks of %d bytes: too many, use larger blocks", s.total, js.BlockSize)
	}
	// The slot's old content is about to be destroyed: forget its version first.
	if t.IsAB() {
		if err := e.setVersion(t.Name(), slot, ""); err != nil {
			return nil, err
		}
	}
	m, err := e.openMedium(t, booted, slot, int64(js.FileSize), true)
	if err != nil {
		return nil, err
	}
	s.startReceiving(m)
	if err := e.journal.SaveSession(s.journalRecord()); err != nil {
		m.Close()
		t.Discard()
		return nil, saveErr(err, otav1.Reason_REASON_FILE_WRITE_FAILED)
	}
	e.mu.Lock()
	e.sessions[s.id] = s
	e.byTarget[t.Name()] = s
	e.mu.Unlock()
	e.log.Info("session begun", "session", s.id, "job", js.JobID, "file_index", js.FileIndex, "target", t.Name(),
		"slot", slot, "file_size", js.FileSize, "block_size", js.BlockSize, "blocks", s.total)
	return &otav1.BeginSessionResponse{Session: s.info()}, nil
}

// checkBeginCommon validates the fields every session kind needs.
func (e *Engine) checkBeginCommon(req *otav1.BeginSessionRequest) error {
	invalid := func(format string, args ...any) *status.Error {
		return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, format, args...)
	}
	switch {
	case !jobIDRE.MatchString(req.GetJobId()):
		return invalid("job id %q is not 1..64 of [a-zA-Z0-9_-]", trunc(req.GetJobId(), 80))
	case req.GetFileSize() == 0:
		return invalid("file size 0")
	case req.GetFileSize() > 1<<62:
		return status.Errorf(otav1.Reason_REASON_FILE_TOO_LARGE, "file size %d", req.GetFileSize())
	case len(req.GetCertName()) > 256:
		return invalid("cert name of %d bytes", len(req.GetCertName()))
	case len(req.GetFilePath()) > 4096:
		return invalid("file path of %d bytes", len(req.GetFilePath()))
	}
	return nil
}

// checkBegin validates an image's BeginSession request without touching any state.
func (e *Engine) checkBegin(req *otav1.BeginSessionRequest) (*target.Target, error) {
	invalid := func(format string, args ...any) *status.Error {
		return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, format, args...)
	}
	if err := e.checkBeginCommon(req); err != nil {
		return nil, err
	}
	switch {
	case req.GetBlockSize() < config.MinBlockSize || req.GetBlockSize() > e.cfg.MaxBlockSize:
		return nil, invalid("block size %d outside %d..%d", req.GetBlockSize(), config.MinBlockSize, e.cfg.MaxBlockSize).
			WithMeta("max_block_size", fmt.Sprint(e.cfg.MaxBlockSize))
	case req.GetVersion() != "" && !versionRE.MatchString(req.GetVersion()):
		return nil, invalid("version %q is not 1..64 of [A-Za-z0-9._+~-]", trunc(req.GetVersion(), 80))
	}
	t, err := e.selectTarget(req.FileType, req.GetFilePath())
	if err != nil {
		return nil, err
	}
	if max := t.Config().MaxSize; max > 0 && req.GetFileSize() > max {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_TOO_LARGE, "image of %d bytes exceeds max_size %d of target %s", req.GetFileSize(), max, t.Name()).
			WithMeta("max_size", fmt.Sprint(max))
	}
	if err := e.checkSigner(t, req.GetCertName()); err != nil {
		return nil, err
	}
	if err := e.trustFor(t.Name()).Check(req.GetSigAlgorithm(), req.GetSignature(), req.GetCertName()); err != nil {
		return nil, err
	}
	return t, nil
}

// Write implements api.Writer. Blocks are validated as a batch before any is written; a
// block already written in this session is skipped (idempotent).
func (e *Engine) Write(ctx context.Context, sessionID string, blocks []*otav1.Block, sync bool) (api.WriteResult, error) {
	s, err := e.lookup(sessionID)
	if err != nil {
		return api.WriteResult{}, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.writableLocked(); err != nil {
		return s.resultLocked(false), err
	}
	// The boot state is read again when blocks are to become durable or the last read is
	// older than sync_interval: a slot switched behind the engine's back is caught before
	// the blocks of a sync are written, and within sync_interval otherwise.
	refreshed := sync || e.fenceStale()
	if err := e.refuseFencedLocked(ctx, s, refreshed); err != nil {
		return s.resultLocked(false), err
	}
	if s.kind() == kindChunks {
		if err := e.writeChunksLocked(s, blocks); err != nil {
			return s.resultLocked(false), err
		}
	} else if err := e.writeBlocksLocked(s, blocks); err != nil {
		return s.resultLocked(false), err
	}
	if s.pendingBytes > 0 && (sync || s.pendingBytes >= e.cfg.SyncBytes || time.Since(s.lastSync) >= e.cfg.SyncInterval) {
		// Blocks become durable only in a slot that is still writable.
		if err := e.refuseFencedLocked(ctx, s, !refreshed); err != nil {
			return s.resultLocked(false), err
		}
		if err := e.syncLocked(s); err != nil {
			return s.resultLocked(false), err
		}
		return s.resultLocked(true), nil
	}
	return s.resultLocked(sync || s.pendingBytes == 0), nil
}

// writeBlocksLocked writes an image's blocks: the batch is validated whole before any block
// is written. The caller holds s.mu.
func (e *Engine) writeBlocksLocked(s *session, blocks []*otav1.Block) error {
	bs := uint64(s.meta.BlockSize)
	for _, b := range blocks {
		off := b.GetOffset()
		if off >= s.meta.FileSize || off%bs != 0 {
			return status.Errorf(otav1.Reason_REASON_BLOCK_OUT_OF_RANGE,
				"offset %d is not a block of this image (%d bytes in blocks of %d)", off, s.meta.FileSize, bs).
				WithMeta("offset", fmt.Sprint(off))
		}
		want := bs
		if off/bs == s.total-1 {
			want = s.lastLen
		}
		if uint64(len(b.GetData())) != want {
			return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST,
				"block at offset %d has %d bytes, want %d", off, len(b.GetData()), want).WithMeta("offset", fmt.Sprint(off))
		}
	}
	for _, b := range blocks {
		k := int(b.GetOffset() / bs)
		if s.received.Has(k) {
			continue
		}
		if _, err := s.medium.WriteAt(b.GetData(), int64(b.GetOffset())); err != nil {
			e.log.Error("block write failed", "session", s.id, "offset", b.GetOffset(), "error", err)
			return target.IOError(err, "write block at offset %d", b.GetOffset())
		}
		s.received.Set(k)
		s.nReceived++
		s.pendingBytes += int64(len(b.GetData()))
		crashpoint.Hit(crashpoint.WriterBlock)
	}
	return nil
}

func (s *session) writableLocked() error {
	switch {
	case s.dropped:
		return status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "session %s is closed", s.id)
	case s.verifying != nil:
		return status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "session %s is being verified", s.id)
	case s.filling:
		return status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "session %s is being filled from local data", s.id)
	case s.state != otav1.SessionState_SESSION_STATE_RECEIVING:
		return status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "session %s is %s, not receiving", s.id, s.state)
	}
	return nil
}

func (s *session) resultLocked(synced bool) api.WriteResult {
	return api.WriteResult{Synced: synced, Durable: s.nDurable, Received: s.nReceived, Total: s.total}
}

// syncLocked makes every written block durable: fdatasync of the medium first, then the
// journal names them. A block is never recorded before the medium holds it.
func (e *Engine) syncLocked(s *session) error {
	if err := s.medium.Sync(); err != nil {
		// What was written since the last sync is unknown now: write it again.
		copy(s.received, s.durable)
		s.nReceived, s.pendingBytes = s.nDurable, 0
		e.log.Error("sync failed", "session", s.id, "error", err)
		return target.IOError(err, "sync")
	}
	copy(s.durable, s.received)
	s.updated = time.Now().UTC()
	if err := e.journal.SaveSession(s.journalRecord()); err != nil {
		e.log.Error("journal save failed", "session", s.id, "error", err)
		return saveErr(err, otav1.Reason_REASON_FILE_WRITE_FAILED)
	}
	s.nDurable = s.nReceived
	s.pendingBytes = 0
	s.lastSync = time.Now()
	return nil
}

// Finish implements api.Writer: flush, check every block is durable, read the image back
// from the medium and verify its signature. A signature failure closes the session (its data
// cannot be told apart from a corrupted medium; the client starts over) and the slot is never
// activated; a read failure leaves it open to retry.
func (e *Engine) Finish(ctx context.Context, sessionID string) (*otav1.FinishSessionResponse, error) {
	s, err := e.lookup(sessionID)
	if err != nil {
		return nil, err
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.dropped && s.state == otav1.SessionState_SESSION_STATE_VERIFIED {
		return &otav1.FinishSessionResponse{Session: s.infoLocked(), Sha256: s.sha}, nil
	}
	if err := s.writableLocked(); err != nil {
		return nil, err
	}
	if err := e.refuseFencedLocked(ctx, s, true); err != nil {
		return nil, err
	}
	if s.pendingBytes > 0 {
		if err := e.syncLocked(s); err != nil {
			return nil, err
		}
	}
	if missing := s.total - s.nDurable; missing > 0 {
		return nil, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "%d of %d blocks missing", missing, s.total).
			WithMeta("missing_blocks", fmt.Sprint(missing))
	}
	if s.kind() == kindManifest {
		return e.finishManifest(ctx, s)
	}
	done := make(chan struct{})
	s.verifying = done
	med := s.medium
	s.mu.Unlock()
	sum, verr := e.verifyMedium(ctx, med, &s.meta)
	s.mu.Lock()
	s.verifying = nil
	close(done)
	if verr != nil {
		if status.IsClass(verr, status.ClassRetryable) {
			// The medium could not be read back: the session stays, Finish may be repeated.
			e.log.Error("read back failed", "session", s.id, "error", verr)
			return nil, verr
		}
		e.log.Error("image refused: signature check failed", "session", s.id, "job", s.meta.JobID, "target", s.meta.Target, "error", verr)
		e.drop(s, "verification failed")
		return nil, verr
	}
	s.sha = fmt.Sprintf("%x", sum)
	s.state = otav1.SessionState_SESSION_STATE_VERIFIED
	s.updated = time.Now().UTC()
	if err := e.journal.SaveSession(s.journalRecord()); err != nil {
		s.state = otav1.SessionState_SESSION_STATE_RECEIVING
		return nil, saveErr(err, otav1.Reason_REASON_FILE_CLOSE_FAILED)
	}
	e.log.Info("image verified", "session", s.id, "job", s.meta.JobID, "target", s.meta.Target, "slot", s.meta.Slot, "sha256", s.sha)
	crashpoint.Hit(crashpoint.WriterVerified)
	return &otav1.FinishSessionResponse{Session: s.infoLocked(), Sha256: s.sha}, nil
}

// verifyMedium checks meta's signature over what m holds: read back from the device, not
// from the page cache the writes left, so a write the medium lost or corrupted fails here.
func (e *Engine) verifyMedium(ctx context.Context, m target.Medium, meta *journal.Session) ([]byte, error) {
	if kindOf(meta.Kind) == kindChunks {
		return e.verifyChunksMedium(ctx, m, meta)
	}
	rb, err := m.ReadBack()
	if err != nil {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "read back %s: %w", m.Path(), err)
	}
	defer rb.Close()
	e.log.Debug("reading the image back", "path", m.Path(), "direct", rb.Direct())
	return e.trustFor(meta.Target).Verify(ctx, halfwayHook(rb, int64(meta.FileSize)), int64(meta.FileSize), otav1.SigAlgorithm(meta.Algorithm), meta.Signature, meta.CertName)
}

// lockIdle locks s.mu once no verification is running (ctx bounds the wait).
func (s *session) lockIdle(ctx context.Context) error {
	for {
		s.mu.Lock()
		ch := s.verifying
		if ch == nil {
			return nil
		}
		s.mu.Unlock()
		select {
		case <-ch:
		case <-ctx.Done():
			return status.Errorf(otav1.Reason_REASON_OTHER, "waiting for verification: %w", ctx.Err())
		}
	}
}

// Abort implements api.Writer.
func (e *Engine) Abort(ctx context.Context, sessionID string, reason otav1.Reason) error {
	e.ctl.Lock()
	defer e.ctl.Unlock()
	s, err := e.lookup(sessionID)
	if err != nil {
		return err
	}
	if err := s.lockIdle(ctx); err != nil {
		return err
	}
	defer s.mu.Unlock()
	if s.dropped {
		return status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "session %s is closed", s.id)
	}
	e.drop(s, "aborted: "+status.Name(reason))
	return nil
}

func (e *Engine) setVersion(targetName, slot, version string) error {
	e.recMu.Lock()
	defer e.recMu.Unlock()
	if e.record.Versions[targetName][slot] == version {
		return nil
	}
	old := e.record.Versions[targetName]
	nv := map[string]string{}
	for k, v := range old {
		nv[k] = v
	}
	nv[slot] = version
	e.record.Versions[targetName] = nv
	if err := e.saveRecordLocked(); err != nil {
		e.record.Versions[targetName] = old
		return err
	}
	return nil
}
