package engine

// Signed update manifests and delta updates (docs/MANIFEST.md). A MANIFEST session receives a
// manifest file into the state directory like any image, and its Finish verifies the
// signature with the trust store, the target, the compatible string and the version policy
// on the signed version. A CHUNKS session then writes the manifest's image into the target's
// writable slot: Begin fills every chunk it can from local data (the running slot, all-zero
// blocks), and only the rest arrives, chunk by chunk, each block checked against its hash
// before it is written. Finish reads the whole slot back and compares the manifest's image
// SHA-256.

import (
	"bytes"
	"context"
	"crypto"
	"crypto/sha256"
	"errors"
	"fmt"
	"hash"
	"io"
	"os"
	"syscall"
	"time"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/internal/crashpoint"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/journal"
	"github.com/gwota/gwota/writer/manifest"
	"github.com/gwota/gwota/writer/target"
	"github.com/gwota/gwota/writer/verify"
)

const (
	kindImage    = otav1.SessionKind_SESSION_KIND_IMAGE
	kindManifest = otav1.SessionKind_SESSION_KIND_MANIFEST
	kindChunks   = otav1.SessionKind_SESSION_KIND_CHUNKS
)

// MaxManifestSize bounds a manifest file the writer stores (2 Mi blocks: 8 GiB in 4 KiB
// blocks); a larger one is refused with REASON_FILE_TOO_LARGE at Begin.
const MaxManifestSize = 64 << 20

// maxManifestSessions bounds the MANIFEST sessions of one job (the state directory holds
// their files); a new job's MANIFEST session ends those of other jobs.
const maxManifestSessions = 4

// kindOf is the session kind of a request or journal value (UNSPECIFIED is an image).
func kindOf(k int32) otav1.SessionKind {
	if otav1.SessionKind(k) == otav1.SessionKind_SESSION_KIND_UNSPECIFIED {
		return kindImage
	}
	return otav1.SessionKind(k)
}

func (s *session) kind() otav1.SessionKind { return kindOf(s.meta.Kind) }

// deltaStats are a CHUNKS session's figures (journaled).
type deltaStats struct {
	reused, zero, download, saved uint64
}

// deltaInfo reports s's figures. The caller holds s.mu.
func (s *session) deltaInfoLocked() *otav1.DeltaInfo {
	if s.kind() != kindChunks {
		return nil
	}
	return &otav1.DeltaInfo{
		ImageBlocks:  (s.meta.ImageSize + uint64(s.meta.BlockSize) - 1) / uint64(s.meta.BlockSize),
		ReusedBlocks: s.stats.reused, ZeroBlocks: s.stats.zero, DownloadBytes: s.stats.download,
		WritesSaved: s.stats.saved, ImageSize: s.meta.ImageSize, ImageBlockSize: s.meta.BlockSize,
	}
}

// anyTrustCheck accepts a signature's form when the global store or any target's accepts
// it: a MANIFEST session names its target only inside the manifest, verified at Finish.
func (e *Engine) anyTrustCheck(alg otav1.SigAlgorithm, sig []byte, certName string) error {
	err := e.trust.Check(alg, sig, certName)
	if err == nil {
		return nil
	}
	for _, st := range e.trustBy {
		if st.Check(alg, sig, certName) == nil {
			return nil
		}
	}
	return err
}

// checkBeginManifest validates a MANIFEST Begin without touching any state.
func (e *Engine) checkBeginManifest(req *otav1.BeginSessionRequest) error {
	if err := e.checkBeginCommon(req); err != nil {
		return err
	}
	if req.GetFileSize() > MaxManifestSize {
		return status.Errorf(otav1.Reason_REASON_FILE_TOO_LARGE, "manifest of %d bytes (limit %d)", req.GetFileSize(), MaxManifestSize).
			WithMeta("max_size", fmt.Sprint(MaxManifestSize))
	}
	if req.GetBlockSize() < config.MinBlockSize || req.GetBlockSize() > e.cfg.MaxBlockSize {
		return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "block size %d outside %d..%d", req.GetBlockSize(), config.MinBlockSize, e.cfg.MaxBlockSize).
			WithMeta("max_block_size", fmt.Sprint(e.cfg.MaxBlockSize))
	}
	return e.anyTrustCheck(req.GetSigAlgorithm(), req.GetSignature(), req.GetCertName())
}

// beginManifest begins (or resumes) job's MANIFEST session for file_index: its bytes go to
// the state directory.
func (e *Engine) beginManifest(ctx context.Context, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error) {
	if err := e.checkBeginManifest(req); err != nil {
		return nil, err
	}
	e.ctl.Lock()
	defer e.ctl.Unlock()
	key := journal.ManifestKey(req.GetJobId(), req.GetFileIndex())
	e.mu.RLock()
	s := e.byKey[key]
	var others []*session
	mine := 0
	for _, o := range e.byKey {
		if o.meta.JobID != req.GetJobId() {
			others = append(others, o)
		} else {
			mine++
		}
	}
	e.mu.RUnlock()
	if s != nil {
		m := s.meta
		if m.FileSize != req.GetFileSize() || !bytes.Equal(m.Signature, req.GetSignature()) ||
			m.Algorithm != int32(req.GetSigAlgorithm()) || m.CertName != req.GetCertName() {
			return nil, status.Errorf(otav1.Reason_REASON_SESSION_BUSY, "job %s file %d has a manifest session with another size or signature: abort it first", m.JobID, m.FileIndex).
				WithMeta("session_id", s.id)
		}
		if err := s.lockIdle(ctx); err != nil {
			return nil, err
		}
		if s.pendingBytes > 0 && s.writableLocked() == nil {
			if err := e.syncLocked(s); err != nil {
				s.mu.Unlock()
				return nil, err
			}
		}
		s.mu.Unlock()
		info := s.info()
		if info == nil {
			return nil, status.Errorf(otav1.Reason_REASON_SESSION_LOST, "manifest session %s closed meanwhile", s.id)
		}
		return &otav1.BeginSessionResponse{Session: info, Resumed: true}, nil
	}
	if mine >= maxManifestSessions {
		return nil, status.Errorf(otav1.Reason_REASON_SESSION_BUSY, "job %s has %d manifest sessions already", req.GetJobId(), mine)
	}
	// One job runs at a time: another job's manifests are of no use any more (a CHUNKS
	// session keeps its own link to its manifest).
	for _, o := range others {
		if err := o.lockIdle(ctx); err != nil {
			return nil, err
		}
		e.drop(o, "manifest of another job")
		o.mu.Unlock()
	}
	js := &journal.Session{
		ID: newID(), JobID: req.GetJobId(), FileIndex: req.GetFileIndex(), Kind: int32(kindManifest),
		FileSize: req.GetFileSize(), BlockSize: req.GetBlockSize(), Signature: bytes.Clone(req.GetSignature()),
		Algorithm: int32(req.GetSigAlgorithm()), CertName: req.GetCertName(),
		State: int32(otav1.SessionState_SESSION_STATE_RECEIVING), Created: time.Now().UTC(),
	}
	s = newSession(js, nil)
	m, err := target.OpenStateFile(e.journal.DataPath(key), int64(js.FileSize), true)
	if err != nil {
		return nil, err
	}
	s.startReceiving(m)
	if err := e.journal.SaveSession(s.journalRecord()); err != nil {
		m.Close()
		e.journal.RemoveSession(key)
		return nil, saveErr(err, otav1.Reason_REASON_FILE_WRITE_FAILED)
	}
	e.mu.Lock()
	e.sessions[s.id] = s
	e.byKey[key] = s
	e.mu.Unlock()
	e.log.Info("manifest session begun", "session", s.id, "job", js.JobID, "file_index", js.FileIndex, "file_size", js.FileSize)
	return &otav1.BeginSessionResponse{Session: s.info()}, nil
}

// openManifest opens the manifest file at path and verifies it with the stored signature
// fields of js against the trust store of the target it names (a target with its own
// trusted_keys accepts only those). The target is read from the file before the signature
// is checked only to pick the store; it is checked again once verified. The caller closes
// the file.
func (e *Engine) openManifest(ctx context.Context, path string, size int64, js *journal.Session) (*manifest.Manifest, *os.File, error) {
	f, err := os.OpenFile(path, os.O_RDONLY|syscall.O_NOFOLLOW|syscall.O_CLOEXEC, 0)
	if err != nil {
		return nil, nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "open manifest: %w", err)
	}
	fail := func(err error) (*manifest.Manifest, *os.File, error) {
		f.Close()
		return nil, nil, err
	}
	fi, err := f.Stat()
	if err != nil {
		return fail(status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "manifest file: %w", err))
	}
	if size < 0 {
		size = fi.Size()
	}
	if fi.Size() != size {
		return fail(status.Errorf(otav1.Reason_REASON_SESSION_LOST, "manifest file of %d bytes, %d expected", fi.Size(), size))
	}
	store := e.trust
	if pre, err := manifest.Open(f, size); err == nil {
		store = e.trustFor(pre.Target())
	}
	if js.Target != "" {
		store = e.trustFor(js.Target)
	}
	m, err := manifest.Verify(ctx, store, f, size, otav1.SigAlgorithm(js.Algorithm), js.Signature, js.CertName)
	if err != nil {
		return fail(err)
	}
	if js.Target != "" && m.Target() != js.Target {
		return fail(status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "manifest names target %q, the session %q", m.Target(), js.Target))
	}
	return m, f, nil
}

// checkManifestPolicy applies the writer's policy to a verified manifest: its target exists,
// its compatible string is the target's, its signer is allowed for the target, its largest
// chunk fits a write, its image fits the target, and (booted being the running slot) the
// version policy accepts its signed version. It returns the target.
func (e *Engine) checkManifestPolicy(ctx context.Context, m *manifest.Manifest, certName string) (*target.Target, error) {
	t := e.byName[m.Target()]
	if t == nil {
		return nil, status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "the manifest is for target %q, which this writer does not have", m.Target()).
			WithMeta("target", m.Target())
	}
	want := t.Config().Compatible
	if want == "" {
		return nil, status.Errorf(otav1.Reason_REASON_UNSUPPORTED, "target %s has no compatible configured: it takes no manifest", t.Name()).
			WithMeta("compatible", m.Compatible())
	}
	if m.Compatible() != want {
		return nil, status.Errorf(otav1.Reason_REASON_UNSUPPORTED, "the manifest is for compatible %q, target %s is %q", m.Compatible(), t.Name(), want).
			WithMeta("compatible", m.Compatible())
	}
	if err := e.checkSigner(t, certName); err != nil {
		return nil, err
	}
	if max := t.Config().MaxSize; max > 0 && m.ImageSize() > max {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_TOO_LARGE, "image of %d bytes exceeds max_size %d of target %s", m.ImageSize(), max, t.Name()).
			WithMeta("max_size", fmt.Sprint(max))
	}
	var largest uint32
	for _, sz := range m.ChunkSizes() {
		largest = max(largest, sz)
	}
	if largest > e.cfg.MaxBlockSize {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_TOO_LARGE, "a chunk of %d bytes exceeds max_block_size %d: build the manifest with smaller chunks or raise max_block_size", largest, e.cfg.MaxBlockSize).
			WithMeta("max_block_size", fmt.Sprint(e.cfg.MaxBlockSize))
	}
	booted, _, err := e.writableSlot(ctx, t)
	if err != nil {
		return nil, err
	}
	if err := e.checkVersion(t, booted, m.Version(), true); err != nil {
		return nil, err
	}
	return t, nil
}

// finishManifest verifies a MANIFEST session whose blocks are all durable: signature over
// what the state directory holds (read back past the page cache), then the policy. Any
// refusal but a read failure closes the session. The caller holds s.mu.
func (e *Engine) finishManifest(ctx context.Context, s *session) (*otav1.FinishSessionResponse, error) {
	rb, err := s.medium.ReadBack()
	if err != nil {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "read back manifest: %w", err)
	}
	defer rb.Close()
	size := int64(s.meta.FileSize)
	// The signature first, with the store of the target the file names (checked again once
	// verified); then the policy.
	store := e.trust
	if pre, err := manifest.Open(rb, size); err == nil {
		store = e.trustFor(pre.Target())
	}
	m, err := manifest.Verify(ctx, store, rb, size, otav1.SigAlgorithm(s.meta.Algorithm), s.meta.Signature, s.meta.CertName)
	var t *target.Target
	if err == nil {
		t, err = e.checkManifestPolicy(ctx, m, s.meta.CertName)
	}
	if err != nil {
		if status.IsClass(err, status.ClassRetryable) {
			e.log.Error("manifest read back failed", "session", s.id, "error", err)
			return nil, err
		}
		e.log.Error("manifest refused", "session", s.id, "job", s.meta.JobID, "error", err)
		e.drop(s, "manifest refused: "+status.Name(status.ReasonOf(err)))
		return nil, err
	}
	sum, _, err := verify.Digest(ctx, rb, size, crypto.SHA256)
	if err != nil {
		return nil, err
	}
	s.sha = fmt.Sprintf("%x", sum)
	s.meta.Target = t.Name()
	s.meta.Version = m.Version()
	s.state = otav1.SessionState_SESSION_STATE_VERIFIED
	s.updated = time.Now().UTC()
	if err := e.journal.SaveSession(s.journalRecord()); err != nil {
		s.state = otav1.SessionState_SESSION_STATE_RECEIVING
		s.meta.Target, s.meta.Version = "", ""
		return nil, saveErr(err, otav1.Reason_REASON_FILE_CLOSE_FAILED)
	}
	e.log.Info("manifest verified", "session", s.id, "job", s.meta.JobID, "target", t.Name(), "version", m.Version(),
		"blocks", m.Blocks(), "zero_blocks", m.ZeroBlocks(), "chunks", m.Chunks())
	return &otav1.FinishSessionResponse{Session: s.infoLocked(), Sha256: s.sha}, nil
}

// beginChunks begins (or resumes) the CHUNKS session of a job whose MANIFEST session is
// verified: the target, the version and the image come from the manifest, never from the
// request. A new session is filled from local data before Begin answers.
func (e *Engine) beginChunks(ctx context.Context, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error) {
	if err := e.checkBeginCommon(req); err != nil {
		return nil, err
	}
	e.ctl.Lock()
	defer e.ctl.Unlock()
	mkey := journal.ManifestKey(req.GetJobId(), req.GetManifestFileIndex())
	e.mu.RLock()
	ms := e.byKey[mkey]
	e.mu.RUnlock()
	var mmeta journal.Session
	if ms != nil {
		ms.mu.Lock()
		mmeta = ms.meta
		verified := !ms.dropped && ms.state == otav1.SessionState_SESSION_STATE_VERIFIED
		ms.mu.Unlock()
		if !verified {
			ms = nil
		}
	}
	if ms == nil || req.GetManifestFileIndex() == req.GetFileIndex() {
		return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "job %s has no verified manifest session for file %d: finish the manifest first", req.GetJobId(), req.GetManifestFileIndex()).
			WithMeta("manifest_file_index", fmt.Sprint(req.GetManifestFileIndex()))
	}
	t := e.byName[mmeta.Target]
	if t == nil {
		return nil, status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "target %q is not configured", mmeta.Target)
	}
	if routed, err := e.selectTarget(req.FileType, req.GetFilePath()); err != nil || routed != t {
		return nil, status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "the chunk file's file type and path do not select target %s of its manifest", t.Name()).
			WithMeta("target", t.Name())
	}
	if resp, err := e.resumeChunks(ctx, t, req); resp != nil || err != nil {
		return resp, err
	}
	// Verify the manifest again from its file: what this session trusts is what it reads.
	m, f, err := e.openManifest(ctx, e.journal.DataPath(mkey), int64(mmeta.FileSize), &mmeta)
	if err != nil {
		return nil, err
	}
	keep := false
	defer func() {
		if !keep {
			f.Close()
		}
	}()
	if req.GetFileSize() != m.ChunkFileSize() {
		return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "chunk file of %d bytes, the manifest says %d", req.GetFileSize(), m.ChunkFileSize())
	}
	if _, err := e.checkManifestPolicy(ctx, m, mmeta.CertName); err != nil {
		return nil, err
	}
	booted, slot, err := e.writableSlot(ctx, t)
	if err != nil {
		return nil, err
	}
	if err := e.checkRoom(t, slot, m.ImageSize()); err != nil {
		return nil, err
	}
	if err := e.journal.LinkData(mkey, t.Name()); err != nil {
		return nil, saveErr(err, otav1.Reason_REASON_FILE_WRITE_FAILED)
	}
	js := &journal.Session{
		ID: newID(), JobID: req.GetJobId(), FileIndex: req.GetFileIndex(), Target: t.Name(), Slot: slot,
		Kind: int32(kindChunks), ManifestFileIndex: req.GetManifestFileIndex(),
		FileSize: m.ChunkFileSize(), BlockSize: m.BlockSize(), ImageSize: m.ImageSize(), ImageSHA256: m.ImageSHA256(),
		Signature: bytes.Clone(mmeta.Signature), Algorithm: mmeta.Algorithm, CertName: mmeta.CertName, Version: m.Version(),
		State: int32(otav1.SessionState_SESSION_STATE_RECEIVING), Created: time.Now().UTC(),
	}
	s := newSession(js, t)
	s.attachManifest(m, f)
	// The slot's old content is about to be destroyed: forget its version first.
	if t.IsAB() {
		if err := e.setVersion(t.Name(), slot, ""); err != nil {
			e.journal.RemoveSession(t.Name())
			return nil, err
		}
	}
	med, err := e.openMedium(t, booted, slot, int64(js.ImageSize), true)
	if err != nil {
		e.journal.RemoveSession(t.Name())
		return nil, err
	}
	s.startReceiving(med)
	if err := e.journal.SaveSession(s.journalRecord()); err != nil {
		med.Close()
		t.Discard()
		e.journal.RemoveSession(t.Name())
		return nil, saveErr(err, otav1.Reason_REASON_FILE_WRITE_FAILED)
	}
	keep = true
	e.mu.Lock()
	e.sessions[s.id] = s
	e.byTarget[t.Name()] = s
	e.mu.Unlock()
	e.log.Info("chunks session begun", "session", s.id, "job", js.JobID, "file_index", js.FileIndex, "target", t.Name(),
		"slot", slot, "image_size", js.ImageSize, "chunks", s.total, "version", js.Version)
	if err := e.fillLocal(ctx, s, booted); err != nil {
		return nil, err
	}
	return e.chunksResponse(s, false)
}

// resumeChunks answers a CHUNKS Begin for the session t already has: the same job, file and
// manifest resume it (and finish its local fill if a crash interrupted it); anything else is
// busy. (nil, nil): no session. The caller holds e.ctl.
func (e *Engine) resumeChunks(ctx context.Context, t *target.Target, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error) {
	e.mu.RLock()
	s := e.byTarget[t.Name()]
	e.mu.RUnlock()
	if s == nil {
		return nil, nil
	}
	m := s.meta
	if s.kind() != kindChunks || m.JobID != req.GetJobId() || m.FileIndex != req.GetFileIndex() || m.FileSize != req.GetFileSize() ||
		m.ManifestFileIndex != req.GetManifestFileIndex() {
		return nil, busy(t, s)
	}
	if err := e.lockForResume(ctx, s); err != nil {
		return nil, err
	}
	fillDone := s.meta.FillDone
	s.mu.Unlock()
	if !fillDone {
		st, err := e.bootState(ctx)
		if err != nil {
			return nil, err
		}
		e.log.Info("resuming the local fill", "session", s.id)
		if err := e.fillLocal(ctx, s, st.Booted); err != nil {
			return nil, err
		}
	}
	return e.chunksResponse(s, true)
}

func (e *Engine) chunksResponse(s *session, resumed bool) (*otav1.BeginSessionResponse, error) {
	info := s.info()
	if info == nil {
		return nil, status.Errorf(otav1.Reason_REASON_SESSION_LOST, "session %s closed meanwhile", s.id)
	}
	return &otav1.BeginSessionResponse{Session: info, Resumed: resumed, ChunkSizes: s.mf.ChunkSizes()}, nil
}

// attachManifest gives a CHUNKS session its verified manifest: units are the units of the
// chunk file, the ordinary chunks then the delta chunks.
func (s *session) attachManifest(m *manifest.Manifest, f *os.File) {
	s.mf, s.mfFile = m, f
	s.total = uint64(m.Units())
}

// fillLocal writes into s's slot every block the device already has (all zeros, or the same
// bytes in the running slot at any block-aligned offset), syncs, and marks durable every
// chunk whose blocks are all local. Until it is done (FillDone journaled) a crash or a
// failure leaves the session to be resumed, which fills again; blocks already in place are
// not written again. The caller holds e.ctl, not s.mu; writes are refused meanwhile.
func (e *Engine) fillLocal(ctx context.Context, s *session, booted string) (err error) {
	s.mu.Lock()
	if err := s.writableLocked(); err != nil {
		s.mu.Unlock()
		return err
	}
	s.filling = true
	m, med := s.mf, s.medium
	s.mu.Unlock()
	defer func() {
		s.mu.Lock()
		s.filling = false
		s.mu.Unlock()
	}()
	started := time.Now()
	local, err := s.tgt.OpenRunning(booted)
	if err != nil {
		return err
	}
	var lr io.ReaderAt = bytes.NewReader(nil) // a file target not installed yet: zeros only
	var lsize int64
	if local != nil {
		defer local.Close()
		lr, lsize = local, local.Size()
	}
	bs := int64(m.BlockSize())
	found := bitmap.New(int(m.Blocks()))
	zeros := make([]byte, bs)
	w := blockWriter{med: med, scratch: make([]byte, bs)}
	// The pass that indexes the running slot also hashes its first base_size bytes: is the
	// device on the manifest's delta base?
	var bh *baseHasher
	if m.Deltas() > 0 && uint64(lsize) >= m.BaseSize() {
		bh = &baseHasher{r: lr, size: int64(m.BaseSize()), h: sha256.New()}
		lr = bh
	}
	st, err := m.FindLocal(ctx, lr, lsize, 0, func(mt manifest.Match, data []byte) error {
		if mt.Zero {
			data = zeros[:m.BlockLen(mt.Block)]
		} else {
			found.Set(int(mt.Block))
		}
		wrote, err := w.put(int64(mt.Block)*bs, data)
		if wrote {
			crashpoint.Hit(crashpoint.WriterFill)
		}
		return err
	})
	onBase := false
	if err == nil && bh != nil {
		onBase, err = bh.match(ctx, m.BaseSHA256())
	}
	s.mu.Lock()
	defer s.mu.Unlock()
	s.stats.saved += w.saved
	if err != nil {
		if ctx.Err() != nil {
			return status.Errorf(otav1.Reason_REASON_USER_ABORT, "local fill interrupted: %w", err)
		}
		return typed(err, otav1.Reason_REASON_FILE_WRITE_FAILED, "local fill")
	}
	if s.dropped {
		return status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "session %s closed during the local fill", s.id)
	}
	// Units not needed are marked received (durable below): an ordinary chunk whose blocks
	// are all local, the delta chunks of every other chunk but those the device is asked
	// for, and the ordinary chunks those replace. What stays missing is what to download.
	var download uint64
	done := bitmap.New(int(s.total))
	nd := 0
	for k := range m.Chunks() {
		c := m.Chunk(k)
		all := true
		for b := c.FirstBlock; b < c.FirstBlock+c.Blocks && all; b++ {
			all = m.IsZero(b) || found.Has(int(b))
		}
		d, hasDelta := m.DeltaOf(k)
		need := c
		switch {
		case all:
			done.Set(k)
		case hasDelta && onBase:
			done.Set(k)
			need = m.Delta(d)
		}
		if hasDelta && need.Unit != m.Chunks()+d {
			done.Set(m.Chunks() + d)
		}
		if !all {
			if need.Delta {
				nd++
			}
			if !s.durable.Has(need.Unit) {
				download += need.Size
			}
		}
	}
	if err := med.Sync(); err != nil {
		return target.IOError(err, "sync after the local fill")
	}
	for k := range int(s.total) {
		if done.Has(k) {
			s.received.Set(k)
		}
	}
	copy(s.durable, s.received)
	s.nDurable = uint64(s.durable.Count())
	s.nReceived = s.nDurable
	s.pendingBytes = 0
	s.stats.reused, s.stats.zero, s.stats.download = st.Found, st.Zero, download
	s.meta.FillDone, s.meta.OnBase = true, onBase
	s.updated = time.Now().UTC()
	if err := e.journal.SaveSession(s.journalRecord()); err != nil {
		s.meta.FillDone, s.meta.OnBase = false, false
		return saveErr(err, otav1.Reason_REASON_FILE_WRITE_FAILED)
	}
	e.log.Info("local fill done", "session", s.id, "reused_blocks", st.Found, "zero_blocks", st.Zero,
		"units_done", s.nDurable, "units", s.total, "on_base", onBase, "delta_chunks_needed", nd, "download_bytes", download, "writes_saved", w.saved,
		"local_bytes_read", st.BytesRead, "passes", st.Passes, "took", time.Since(started).Round(time.Millisecond))
	return nil
}

// blockWriter writes a block unless the medium already holds exactly its bytes (flash
// wear): re-installing an image, or filling again after a crash, writes nothing twice.
type blockWriter struct {
	med     target.Medium
	scratch []byte
	saved   uint64
}

func (w *blockWriter) put(off int64, data []byte) (wrote bool, err error) {
	have := w.scratch[:len(data)]
	if n, _ := w.med.ReadAt(have, off); n == len(data) && bytes.Equal(have, data) {
		w.saved++
		return false, nil
	}
	if _, err := w.med.WriteAt(data, off); err != nil {
		return false, target.IOError(err, "write block at offset %d", off)
	}
	return true, nil
}

// writeChunksLocked writes a CHUNKS batch: every block is a whole chunk at its offset in the
// chunk file. Offsets and lengths are checked for the whole batch, then every chunk is
// decoded and its blocks checked against the manifest before any block of the batch is
// written: a bad chunk refuses the batch with REASON_BLOCK_HASH_MISMATCH and nothing
// written. The caller holds s.mu.
func (e *Engine) writeChunksLocked(s *session, blocks []*otav1.Block) error {
	if !s.meta.FillDone {
		// The fill writes the zero blocks of every chunk; a decoded chunk has only the others.
		return status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "session %s has not finished its local fill: begin it again", s.id)
	}
	m := s.mf
	type item struct {
		c    manifest.Chunk
		data []byte
	}
	items := make([]item, 0, len(blocks))
	seen := make(map[int]bool, len(blocks))
	for _, b := range blocks {
		c, ok := m.ChunkAt(b.GetOffset())
		if !ok {
			return status.Errorf(otav1.Reason_REASON_BLOCK_OUT_OF_RANGE, "offset %d is not the start of a chunk of this chunk file (%d bytes)", b.GetOffset(), s.meta.FileSize).
				WithMeta("offset", fmt.Sprint(b.GetOffset()))
		}
		if uint64(len(b.GetData())) != c.Size {
			return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "chunk %d at offset %d has %d bytes, want %d", c.Index, b.GetOffset(), len(b.GetData()), c.Size).
				WithMeta("offset", fmt.Sprint(b.GetOffset())).WithMeta("chunk", fmt.Sprint(c.Index))
		}
		// A unit not needed (an ordinary chunk replaced by its delta chunk, a delta chunk of
		// a device not on the base or of a local chunk) was marked received by the fill: it
		// is ignored like a unit written twice.
		if s.received.Has(c.Unit) || seen[c.Unit] {
			continue
		}
		seen[c.Unit] = true
		items = append(items, item{c, b.GetData()})
	}
	if len(items) == 0 {
		return nil
	}
	var running target.Local
	for _, it := range items {
		if it.c.Delta && running == nil {
			if !s.meta.OnBase {
				// Not reachable: the fill marks every delta chunk received off the base.
				return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "delta chunk %d, but the running slot is not the delta base", it.c.D)
			}
			booted := ""
			if s.tgt.IsAB() {
				booted = boot.Other(s.meta.Slot)
			}
			l, err := s.tgt.OpenRunning(booted)
			if err != nil {
				return err
			}
			if l == nil {
				return status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "delta chunk %d: nothing runs on target %s", it.c.D, s.tgt.Name())
			}
			defer l.Close()
			running = l
		}
	}
	if s.dec == nil {
		d, err := m.NewChunkDecoder()
		if err != nil {
			return status.Errorf(otav1.Reason_REASON_OTHER, "chunk decoder: %w", err)
		}
		s.dec = d
	}
	mismatch := func(err error, c manifest.Chunk) error {
		if !errors.Is(err, manifest.ErrBlockHash) {
			return err
		}
		e.log.Warn("chunk refused: it does not match the manifest", "session", s.id, "chunk", c.Index, "delta", c.Delta, "error", err)
		if c.Delta {
			e.deltaFallbackLocked(s, c)
		}
		return status.Errorf(otav1.Reason_REASON_BLOCK_HASH_MISMATCH, "unit %d (chunk %d): %w", c.Unit, c.Index, err).WithMeta("chunk", fmt.Sprint(c.Index))
	}
	// decode decodes a unit; a delta chunk with its dictionary read from the running slot
	// (bounds checked: the manifest keeps it inside base_size, which the fill found the
	// running slot to hold). A dictionary read in this call serves again within it (a chunk
	// is decoded to check it, then to write it, and neighbours share ranges); the next call
	// reads afresh, so a slot written to in between is seen.
	var dictOff, dictLen uint64
	haveDict := false
	decode := func(c manifest.Chunk, data []byte, fn func(uint64, []byte) error) error {
		if !c.Delta {
			return s.dec.Decode(c.Index, data, fn)
		}
		if c.DictOffset+c.DictLen > uint64(running.Size()) {
			return status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "delta chunk %d: dictionary %d+%d past the running slot's %d bytes", c.D, c.DictOffset, c.DictLen, running.Size())
		}
		if cap(s.dict) < int(c.DictLen) {
			s.dict = make([]byte, c.DictLen, manifest.MaxDictSize)
		}
		dict := s.dict[:c.DictLen]
		if !haveDict || dictOff != c.DictOffset || dictLen != c.DictLen {
			haveDict = false
			if n, err := running.ReadAt(dict, int64(c.DictOffset)); n != len(dict) {
				return status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "delta chunk %d: read its dictionary from the running slot: %w", c.D, err)
			}
			dictOff, dictLen, haveDict = c.DictOffset, c.DictLen, true
		}
		return s.dec.DecodeDelta(c.D, data, dict, fn)
	}
	// Check every chunk but the last; the last is checked by the decode that writes it,
	// before it writes anything, and goes first.
	last := len(items) - 1
	for _, it := range items[:last] {
		if err := decode(it.c, it.data, func(uint64, []byte) error { return nil }); err != nil {
			return mismatch(err, it.c)
		}
	}
	order := append([]item{items[last]}, items[:last]...)
	bs := int64(m.BlockSize())
	if s.scratch == nil {
		s.scratch = make([]byte, bs)
	}
	w := blockWriter{med: s.medium, scratch: s.scratch}
	defer func() { s.stats.saved += w.saved }()
	for _, it := range order {
		err := decode(it.c, it.data, func(b uint64, data []byte) error {
			_, err := w.put(int64(b)*bs, data)
			return err
		})
		if err != nil {
			e.log.Error("chunk write failed", "session", s.id, "chunk", it.c.Index, "delta", it.c.Delta, "error", err)
			return mismatch(err, it.c)
		}
		s.received.Set(it.c.Unit)
		s.nReceived++
		s.pendingBytes += int64(max(it.c.Raw, 1))
		crashpoint.Hit(crashpoint.WriterBlock)
	}
	return nil
}

// deltaFallbackLocked gives up delta chunk c after a refusal: whether it was damaged in
// transit, forged, or its dictionary is no longer what the running slot holds (a slot
// written to after the fill), its ordinary chunk becomes missing instead and c not needed,
// journaled at once, so the next Begin asks for the ordinary chunk. A hostile ota-net gains
// nothing by it but a larger download. A failed sync leaves the bitmap as it was. The caller
// holds s.mu.
func (e *Engine) deltaFallbackLocked(s *session, c manifest.Chunk) {
	if s.received.Has(c.Unit) || !s.received.Has(c.Index) {
		return
	}
	s.received.Clear(c.Index)
	s.received.Set(c.Unit)
	s.stats.download = s.stats.download - min(c.Size, s.stats.download) + s.mf.Chunk(c.Index).Size
	if err := e.syncLocked(s); err != nil {
		e.log.Error("delta chunk fallback not saved", "session", s.id, "chunk", c.Index, "error", err)
		return
	}
	e.log.Warn("delta chunk refused: its ordinary chunk will be fetched instead", "session", s.id, "chunk", c.Index, "delta_chunk", c.D)
}

// verifyChunksMedium reads the whole image back from the medium (past the page cache) and
// compares its SHA-256 with the manifest's.
func (e *Engine) verifyChunksMedium(ctx context.Context, med target.Medium, meta *journal.Session) ([]byte, error) {
	rb, err := med.ReadBack()
	if err != nil {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "read back %s: %w", med.Path(), err)
	}
	defer rb.Close()
	size := int64(meta.ImageSize)
	sum, _, err := verify.Digest(ctx, halfwayHook(rb, size), size, crypto.SHA256)
	if err != nil {
		return nil, err
	}
	if !bytes.Equal(sum, meta.ImageSHA256) {
		return sum, status.Errorf(otav1.Reason_REASON_SIG_CHECK_FAILED, "the slot holds an image whose SHA-256 is not the manifest's").
			WithMeta("sha256", fmt.Sprintf("%x", sum))
	}
	return sum, nil
}

// restoreManifest reopens a CHUNKS session's manifest at start: verified again, and still
// the image the session was begun for.
func (e *Engine) restoreManifest(ctx context.Context, s *session) error {
	js := &s.meta
	m, f, err := e.openManifest(ctx, e.journal.DataPath(js.Key()), -1, js)
	if err != nil {
		return err
	}
	if m.ChunkFileSize() != js.FileSize || m.ImageSize() != js.ImageSize || !bytes.Equal(m.ImageSHA256(), js.ImageSHA256) ||
		m.BlockSize() != js.BlockSize || m.Version() != js.Version {
		f.Close()
		return fmt.Errorf("the manifest file is not the session's")
	}
	s.attachManifest(m, f)
	if err := js.Durable.Check(int(s.total)); err != nil {
		s.closeManifestLocked()
		return err
	}
	if s.reloaded && s.nDurable != s.total {
		s.closeManifestLocked()
		return fmt.Errorf("verified session with %d of %d chunks", s.nDurable, s.total)
	}
	return nil
}

// baseHasher hashes the first size bytes of r as FindLocal reads them in order (its first
// pass reads the local data from offset 0 on); match reads what that pass did not.
type baseHasher struct {
	r    io.ReaderAt
	size int64
	next int64 // bytes hashed
	h    hash.Hash
}

func (b *baseHasher) ReadAt(p []byte, off int64) (int, error) {
	n, err := b.r.ReadAt(p, off)
	if off == b.next && b.next < b.size {
		k := min(int64(n), b.size-b.next)
		b.h.Write(p[:k])
		b.next += k
	}
	return n, err
}

// match reports whether the first size bytes have the digest want.
func (b *baseHasher) match(ctx context.Context, want []byte) (bool, error) {
	buf := make([]byte, 1<<20)
	for b.next < b.size {
		if err := ctx.Err(); err != nil {
			return false, status.Errorf(otav1.Reason_REASON_USER_ABORT, "local fill interrupted: %w", err)
		}
		n, err := b.r.ReadAt(buf[:min(int64(len(buf)), b.size-b.next)], b.next)
		if n == 0 {
			return false, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "read the running slot at %d: %w", b.next, err)
		}
		b.h.Write(buf[:n])
		b.next += int64(n)
	}
	return bytes.Equal(b.h.Sum(nil), want), nil
}
