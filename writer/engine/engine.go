// Package engine is the writer's plain Go core: sessions, block writes, durability, the
// journal, verification, activation and the trial/commit/reject cycle. It implements
// api.Writer, which the gRPC adapter (writer/server) serves and `ota-writer flash` drives
// in-process; it returns *status.Error values only.
//
// Everything a caller sends is treated as hostile: sizes, offsets, targets and the call order
// are checked against the configuration and the session state.
//
// Locking (in this order, never the reverse): ctl serialises the control plane (Begin, Abort,
// Activate, Reboot, Commit, Reject); session.mu guards one session (blocks, sync, finish);
// mu guards the session maps; recMu guards the durable record.
package engine

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"fmt"
	"os/exec"
	"regexp"
	"slices"
	"strings"
	"sync"
	"syscall"

	"github.com/hashicorp/go-hclog"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/journal"
	"github.com/gwota/gwota/writer/manifest"
	"github.com/gwota/gwota/writer/target"
	"github.com/gwota/gwota/writer/verify"
)

// Version is the writer version reported in the handshake (set by the build).
var Version = "dev"

// Boot is the boot control the engine needs (writer/boot backends implement it).
type Boot interface {
	Name() string
	State(ctx context.Context) (boot.State, error)
	Activate(ctx context.Context, slot string) error // next boot tries slot ("a"/"b")
	Commit(ctx context.Context) error                // make the trial slot permanent
	Reject(ctx context.Context) error                // roll back to the committed slot
}

// Extensions provides the configured status extension fields (writer/ext implements it):
// given the engine's own fields, it returns every field in statusDetails budget order.
type Extensions interface {
	Collect(ctx context.Context, own status.Fields) status.Fields
}

// SelfTester runs the configured health checks (writer/selftest implements it).
type SelfTester interface {
	Run(ctx context.Context) (*otav1.SelfTestResponse, error)
}

// Deps are the engine's collaborators. Boot is required; Extensions and SelfTest may be nil
// (no configured fields, no checks). Reboot nil runs the configured reboot_command.
// WrapMedium, when set, wraps every medium the engine opens (tests inject faults with it).
type Deps struct {
	Boot       Boot
	Extensions Extensions
	SelfTest   SelfTester
	Reboot     func(ctx context.Context) error
	WrapMedium func(targetName string, m target.Medium) target.Medium
}

// Extension keys the engine derives from the boot state and the record.
const (
	ExtFirmwareVersion = "firmware_version"
	ExtBootSlot        = "boot_slot"
	ExtBootCount       = "boot_count"
	ExtImageState      = "image_state"
)

// maxBitmapBytes bounds the per-session bitmap (64 Mi blocks), whatever the medium allows.
const maxBitmapBytes = 8 << 20

var (
	jobIDRE   = regexp.MustCompile(`^[a-zA-Z0-9_-]{1,64}$`)
	versionRE = regexp.MustCompile(`^[A-Za-z0-9._+~-]{1,64}$`)
)

var _ api.Writer = (*Engine)(nil)

// Engine implements api.Writer.
type Engine struct {
	cfg     *config.Config
	log     hclog.Logger
	deps    Deps
	trust   *verify.Store
	trustBy map[string]*verify.Store // targets with their own trusted_keys
	journal *journal.Journal
	targets []*target.Target
	byName  map[string]*target.Target
	reboot  func(ctx context.Context) error

	ctl sync.Mutex

	mu       sync.RWMutex
	sessions map[string]*session // by id
	byTarget map[string]*session
	byKey    map[string]*session // MANIFEST sessions, by journal.ManifestKey
	fence    fence

	recMu       sync.Mutex
	record      *journal.Record
	recordErr   error // the record could not be loaded: the version policy fails closed
	rebootArmed bool  // an activation or rejection in this process asks for a reboot
}

// New builds the engine: trust store, journal, targets, and the sessions a previous run left
// (resumed; corrupt or inconsistent ones are dropped with a log line, never trusted).
func New(ctx context.Context, cfg *config.Config, deps Deps, log hclog.Logger) (*Engine, error) {
	if cfg == nil {
		return nil, errors.New("engine: no configuration")
	}
	if deps.Boot == nil {
		return nil, errors.New("engine: no boot backend")
	}
	if log == nil {
		log = hclog.NewNullLogger()
	}
	log = log.Named("engine")
	if err := checkOneAB(cfg); err != nil {
		return nil, err
	}
	if len(cfg.Checks) > 0 && deps.SelfTest == nil {
		return nil, errors.New("engine: checks configured but no self test runner")
	}
	trust, trustBy, err := loadTrust(cfg)
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	if len(cfg.TrustedKeys) == 0 {
		log.Warn("no trusted_keys configured: only targets with their own trusted_keys can be verified and activated")
	}
	j, err := journal.Open(cfg.StateDir)
	if err != nil {
		return nil, fmt.Errorf("engine: %w", err)
	}
	e := &Engine{
		cfg: cfg, log: log, deps: deps, trust: trust, trustBy: trustBy, journal: j,
		byName:   map[string]*target.Target{},
		sessions: map[string]*session{},
		byTarget: map[string]*session{},
		byKey:    map[string]*session{},
		reboot:   deps.Reboot,
	}
	if e.reboot == nil {
		e.reboot = CommandReboot(cfg.RebootCommand)
	}
	for _, tc := range cfg.Targets {
		t := target.New(tc)
		e.targets = append(e.targets, t)
		e.byName[tc.Name] = t
	}
	e.record, err = j.LoadRecord()
	if err != nil {
		// Versions the record held are unknown now: the version policy refuses until an
		// operator records the running version again (SetRunningVersion).
		e.recordErr = err
		log.Error("update record unreadable, starting without it", "error", err)
	}
	if e.record.Versions == nil {
		e.record.Versions = map[string]map[string]string{}
	}
	if err := e.reload(ctx); err != nil {
		e.Close()
		return nil, err
	}
	return e, nil
}

// Close releases the open media. Sessions stay in the journal for the next start.
func (e *Engine) Close() error {
	e.mu.Lock()
	all := e.sessions
	e.sessions, e.byTarget, e.byKey = map[string]*session{}, map[string]*session{}, map[string]*session{}
	e.mu.Unlock()
	var errs []error
	for _, s := range all {
		s.mu.Lock()
		s.closeManifestLocked()
		if s.medium != nil {
			errs = append(errs, s.medium.Close())
			s.medium = nil
		}
		s.dropped = true
		s.mu.Unlock()
	}
	return errors.Join(errs...)
}

// reload resumes the journal's sessions.
func (e *Engine) reload(ctx context.Context) error {
	loaded, dropped, err := e.journal.LoadSessions()
	if err != nil {
		return fmt.Errorf("engine: %w", err)
	}
	for _, d := range dropped {
		e.log.Error("journal: corrupt session file dropped, the image will be downloaded again", "error", d)
	}
	var st boot.State
	haveBoot := false
	for _, js := range loaded {
		if kindOf(js.Kind) == kindManifest {
			e.reloadManifest(js)
			continue
		}
		s, err := e.restore(js)
		if err == nil && kindOf(js.Kind) == kindChunks {
			err = e.restoreManifest(ctx, s)
		}
		if err == nil && e.byName[js.Target].IsAB() {
			if !haveBoot {
				if st, err = e.bootState(ctx); err == nil {
					haveBoot = true
				}
			}
			// The slot must still be the writable inactive one. A session whose slot is
			// pending was activated just before a crash: it is done, not resumable.
			if err == nil && (!boot.ValidSlot(st.Booted) || js.Slot != boot.Other(st.Booted) || st.Trial || st.Pending != "" || st.Booted != st.Committed) {
				err = fmt.Errorf("slot %s is no longer the writable inactive slot (running %s, committed %s, pending %q, trial %v)",
					js.Slot, st.Booted, st.Committed, st.Pending, st.Trial)
			}
		}
		if err == nil {
			var booted string
			if haveBoot {
				booted = st.Booted
			}
			size := js.FileSize
			if kindOf(js.Kind) == kindChunks {
				size = js.ImageSize
			}
			s.medium, err = e.openMedium(e.byName[js.Target], booted, js.Slot, int64(size), false)
		}
		if err != nil {
			if s != nil {
				s.closeManifestLocked()
			}
			e.log.Error("journal: session dropped", "session", js.ID, "job", js.JobID, "target", js.Target, "error", err)
			if rerr := e.journal.RemoveSession(js.Target); rerr != nil {
				e.log.Error("journal: remove", "error", rerr)
			}
			if t := e.byName[js.Target]; t != nil {
				t.Discard()
			}
			continue
		}
		e.sessions[s.id] = s
		e.byTarget[s.meta.Target] = s
		e.log.Info("session resumed from journal", "session", s.id, "job", s.meta.JobID, "target", s.meta.Target,
			"slot", s.meta.Slot, "durable", s.nDurable, "total", s.total, "state", s.state)
	}
	return nil
}

// reloadManifest resumes a MANIFEST session from the journal, or drops it.
func (e *Engine) reloadManifest(js *journal.Session) {
	s, err := e.restoreCommon(js, nil)
	if err == nil && js.FileSize > MaxManifestSize {
		err = fmt.Errorf("manifest of %d bytes", js.FileSize)
	}
	if err == nil && js.State == int32(otav1.SessionState_SESSION_STATE_VERIFIED) && e.byName[js.Target] == nil {
		err = fmt.Errorf("target %q is no longer configured", js.Target)
	}
	if err == nil {
		s.medium, err = target.OpenStateFile(e.journal.DataPath(js.Key()), int64(js.FileSize), false)
	}
	if err != nil {
		e.log.Error("journal: manifest session dropped", "session", js.ID, "job", js.JobID, "error", err)
		if rerr := e.journal.RemoveSession(js.Key()); rerr != nil {
			e.log.Error("journal: remove", "error", rerr)
		}
		return
	}
	e.sessions[s.id] = s
	e.byKey[js.Key()] = s
	e.log.Info("manifest session resumed from journal", "session", s.id, "job", js.JobID, "state", s.state)
}

// restore checks a journal entry against the current configuration.
func (e *Engine) restore(js *journal.Session) (*session, error) {
	t := e.byName[js.Target]
	chunks := kindOf(js.Kind) == kindChunks
	switch {
	case t == nil:
		return nil, fmt.Errorf("target %q is no longer configured", js.Target)
	case kindOf(js.Kind) != kindImage && !chunks:
		return nil, fmt.Errorf("session kind %d on a target", js.Kind)
	case t.IsAB() && !boot.ValidSlot(js.Slot), !t.IsAB() && js.Slot != target.FileSlot:
		return nil, fmt.Errorf("slot %q does not fit target %s", js.Slot, js.Target)
	case chunks && (js.ImageSize == 0 || (t.Config().MaxSize > 0 && js.ImageSize > t.Config().MaxSize)):
		return nil, fmt.Errorf("image size %d not allowed", js.ImageSize)
	case !chunks && (js.BlockSize < config.MinBlockSize || js.BlockSize > e.cfg.MaxBlockSize):
		return nil, fmt.Errorf("block size %d outside %d..%d", js.BlockSize, config.MinBlockSize, e.cfg.MaxBlockSize)
	case js.FileSize == 0 || (!chunks && t.Config().MaxSize > 0 && js.FileSize > t.Config().MaxSize):
		return nil, fmt.Errorf("file size %d not allowed", js.FileSize)
	}
	if err := e.checkSigner(t, js.CertName); err != nil {
		return nil, err
	}
	return e.restoreCommon(js, t)
}

// restoreCommon rebuilds the session of a checked journal entry (t nil: a MANIFEST session).
func (e *Engine) restoreCommon(js *journal.Session, t *target.Target) (*session, error) {
	if !jobIDRE.MatchString(js.JobID) || len(js.ID) != 32 {
		return nil, fmt.Errorf("bad identifiers")
	}
	if t == nil && (js.BlockSize < config.MinBlockSize || js.BlockSize > e.cfg.MaxBlockSize || js.FileSize == 0) {
		return nil, fmt.Errorf("block size %d or file size %d not allowed", js.BlockSize, js.FileSize)
	}
	if kindOf(js.Kind) == kindChunks && js.BlockSize < manifest.MinBlockSize {
		return nil, fmt.Errorf("block size %d not allowed", js.BlockSize)
	}
	st := otav1.SessionState(js.State)
	if st != otav1.SessionState_SESSION_STATE_RECEIVING && st != otav1.SessionState_SESSION_STATE_VERIFIED {
		return nil, fmt.Errorf("state %s cannot be resumed", st)
	}
	s := newSession(js, t)
	if kindOf(js.Kind) == kindChunks {
		// Units are chunks: the manifest, opened later, says how many; the bitmap is checked
		// against it then.
		s.total = uint64(len(js.Durable)) * 8
	}
	s.stats = deltaStats{reused: js.ReusedBlocks, zero: js.ZeroBlocks, download: js.DownloadBytes, saved: js.WritesSaved}
	// A bit past the last block would count as durable and leave the session claiming more
	// blocks than the image has.
	if err := js.Durable.Check(int(s.total)); err != nil {
		return nil, err
	}
	s.durable = js.Durable
	s.received = slices.Clone(js.Durable)
	s.nDurable = uint64(s.durable.Count())
	s.nReceived = s.nDurable
	s.state = st
	s.sha = js.SHA256
	s.reloaded = st == otav1.SessionState_SESSION_STATE_VERIFIED
	if s.reloaded && s.nDurable != s.total && kindOf(js.Kind) != kindChunks {
		return nil, fmt.Errorf("verified session with %d of %d blocks", s.nDurable, s.total)
	}
	return s, nil
}

// openMedium opens t's medium (see target.Open), wrapped by Deps.WrapMedium when set.
func (e *Engine) openMedium(t *target.Target, booted, slot string, size int64, fresh bool) (target.Medium, error) {
	m, err := t.Open(booted, slot, size, fresh)
	if err != nil || e.deps.WrapMedium == nil {
		return m, err
	}
	return e.deps.WrapMedium(t.Name(), m), nil
}

// CommandReboot returns a reboot function running argv (no shell).
func CommandReboot(argv []string) func(ctx context.Context) error {
	return func(ctx context.Context) error {
		if len(argv) == 0 {
			return status.Errorf(otav1.Reason_REASON_REBOOT_FAILED, "no reboot_command configured")
		}
		out, err := exec.CommandContext(ctx, argv[0], argv[1:]...).CombinedOutput()
		if err != nil {
			return status.Errorf(otav1.Reason_REASON_REBOOT_FAILED, "%s: %w: %s", argv[0], err, lastLine(out))
		}
		return nil
	}
}

func lastLine(b []byte) string {
	s := strings.TrimSpace(string(b))
	if i := strings.LastIndexByte(s, '\n'); i >= 0 {
		s = s[i+1:]
	}
	if len(s) > 200 {
		s = s[:200]
	}
	return s
}

func newID() string {
	var b [16]byte
	if _, err := rand.Read(b[:]); err != nil {
		panic(err) // crypto/rand does not fail on Linux
	}
	return hex.EncodeToString(b[:])
}

// Handshake implements api.Writer.
func (e *Engine) Handshake(ctx context.Context, req *otav1.HandshakeRequest) (*otav1.HandshakeResponse, error) {
	if req.GetProtocolVersion() != otav1.ProtocolVersion_PROTOCOL_VERSION_1 {
		return nil, status.Errorf(otav1.Reason_REASON_PROTOCOL_VERSION, "protocol version %s not supported", req.GetProtocolVersion()).
			WithMeta("supported", otav1.ProtocolVersion_PROTOCOL_VERSION_1.String())
	}
	e.log.Debug("handshake", "client", req.GetClient())
	return &otav1.HandshakeResponse{
		ProtocolVersion: otav1.ProtocolVersion_PROTOCOL_VERSION_1,
		MaxBlockSize:    e.cfg.MaxBlockSize,
		SigAlgorithms:   e.trust.Algorithms(),
		WriterVersion:   Version,
	}, nil
}

// MaxBlockSize is the configured largest block (it sizes the server's receive limit).
func (e *Engine) MaxBlockSize() uint32 { return e.cfg.MaxBlockSize }

func (e *Engine) bootState(ctx context.Context) (boot.State, error) {
	st, err := e.deps.Boot.State(ctx)
	if err != nil {
		return st, typed(err, otav1.Reason_REASON_BOOT_CONTROL_FAILED, "boot state")
	}
	e.setFence(st)
	return st, nil
}

// typed keeps a *status.Error as it is and wraps anything else with reason r.
func typed(err error, r otav1.Reason, what string) error {
	var se *status.Error
	if errors.As(err, &se) {
		return err
	}
	return status.Errorf(r, "%s: %w", what, err)
}

// selectTarget routes a request to a configured target by file type and/or file path. When
// both select a target they must agree.
func (e *Engine) selectTarget(fileType *int32, filePath string) (*target.Target, error) {
	var byType, byPath *target.Target
	for _, t := range e.targets {
		c := t.Config()
		if fileType != nil {
			for _, ft := range c.FileTypes {
				if ft == *fileType {
					byType = t
				}
			}
		}
		if filePath != "" {
			for _, fp := range c.FilePaths {
				if fp == filePath {
					byPath = t
				}
			}
		}
	}
	switch {
	case byType != nil && byPath != nil && byType != byPath:
		return nil, status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "file type selects target %s but file path selects %s", byType.Name(), byPath.Name())
	case byType != nil:
		return byType, nil
	case byPath != nil:
		return byPath, nil
	}
	ft := "none"
	if fileType != nil {
		ft = fmt.Sprint(*fileType)
	}
	return nil, status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "no target configured for file type %s, file path %q", ft, filePath).
		WithMeta("file_type", ft).WithMeta("file_path", filePath)
}

// currentVersion is the version recorded for what runs now on t.
func (e *Engine) currentVersion(t *target.Target, booted string) string {
	slot := target.FileSlot
	if t.IsAB() {
		slot = booted
	}
	e.recMu.Lock()
	defer e.recMu.Unlock()
	return e.record.Versions[t.Name()][slot]
}

// checkVersion applies the version policy to an image of version for t. signed: the version
// is a verified manifest's; otherwise it is the job document's, which nobody signed, and
// policies other than "any" refuse it unless accept_unsigned_versions says otherwise.
func (e *Engine) checkVersion(t *target.Target, booted, version string, signed bool) error {
	if e.cfg.VersionPolicy == config.VersionAny {
		return nil
	}
	if !signed && !e.cfg.AcceptUnsignedVersions {
		return status.Errorf(otav1.Reason_REASON_VERSION_CHECK, "version policy %q compares only a signed version: this image has no update manifest (the job document's version %q is unsigned; set accept_unsigned_versions to trust it)", e.cfg.VersionPolicy, version).
			WithMeta("version", version)
	}
	if version == "" {
		return status.Errorf(otav1.Reason_REASON_VERSION_CHECK, "version policy %q needs the image version, the job has none", e.cfg.VersionPolicy)
	}
	cur, err := e.runningVersion(t, booted)
	if err != nil {
		return err
	}
	c := CompareVersions(version, cur)
	refuse := c == 0
	if e.cfg.VersionPolicy == config.VersionNewer && !e.cfg.AllowDowngrade {
		refuse = c <= 0
	}
	if refuse {
		return status.Errorf(otav1.Reason_REASON_VERSION_CHECK, "version %s refused by policy %q: running %s", version, e.cfg.VersionPolicy, cur).
			WithMeta("version", version).WithMeta("running_version", cur)
	}
	return nil
}

// CompareVersions compares dotted versions: numeric parts numerically, others as text, a
// leading "v" ignored. It returns -1, 0 or 1.
func CompareVersions(a, b string) int {
	split := func(s string) []string {
		s = strings.TrimPrefix(strings.TrimPrefix(s, "v"), "V")
		return strings.FieldsFunc(s, func(r rune) bool { return r == '.' || r == '-' || r == '+' || r == '_' || r == '~' })
	}
	pa, pb := split(a), split(b)
	for i := 0; i < len(pa) || i < len(pb); i++ {
		var x, y string
		if i < len(pa) {
			x = pa[i]
		}
		if i < len(pb) {
			y = pb[i]
		}
		if c := comparePart(x, y); c != 0 {
			return c
		}
	}
	return 0
}

func comparePart(x, y string) int {
	isNum := func(s string) bool {
		for _, r := range s {
			if r < '0' || r > '9' {
				return false
			}
		}
		return s != ""
	}
	if isNum(x) && isNum(y) {
		x, y = strings.TrimLeft(x, "0"), strings.TrimLeft(y, "0")
		if len(x) != len(y) {
			if len(x) < len(y) {
				return -1
			}
			return 1
		}
	}
	return strings.Compare(x, y)
}

func (e *Engine) saveRecordLocked() error {
	if err := e.journal.SaveRecord(e.record); err != nil {
		return saveErr(err, otav1.Reason_REASON_FILE_WRITE_FAILED)
	}
	return nil
}

// saveErr types a failed write of the state directory (journal, record): out of space
// (ENOSPC, EDQUOT) is REASON_STORAGE_FULL, which the operator repairs by freeing space;
// anything else is r.
func saveErr(err error, r otav1.Reason) *status.Error {
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		r = otav1.Reason_REASON_STORAGE_FULL
	}
	return status.Errorf(r, "%w", err)
}

// Extensions implements api.Writer: the configured fields, with the slot-derived ones
// (firmware_version, boot_slot, image_state, boot_count) under them, in budget order.
func (e *Engine) Extensions(ctx context.Context) (status.Fields, error) {
	var own status.Fields
	if st, err := e.deps.Boot.State(ctx); err == nil {
		if t := e.firmwareTarget(); t != nil {
			if v := e.currentVersion(t, st.Booted); v != "" {
				own = append(own, status.Field{Key: ExtFirmwareVersion, Value: v})
			}
		}
		own = append(own,
			status.Field{Key: ExtBootSlot, Value: st.Booted},
			status.Field{Key: ExtImageState, Value: strings.ToLower(strings.TrimPrefix(st.ImageState().String(), "IMAGE_STATE_"))},
			status.Field{Key: ExtBootCount, Value: fmt.Sprint(st.BootCount)})
	} else {
		e.log.Warn("extensions: boot state unavailable", "error", err)
	}
	if e.deps.Extensions == nil {
		return own, nil
	}
	return e.deps.Extensions.Collect(ctx, own), nil
}

// firmwareTarget is the target whose version is "the firmware version": the A/B target of
// file type 0, else the first A/B target, else the first target.
func (e *Engine) firmwareTarget() *target.Target {
	var firstAB *target.Target
	for _, t := range e.targets {
		if !t.IsAB() {
			continue
		}
		if firstAB == nil {
			firstAB = t
		}
		for _, ft := range t.Config().FileTypes {
			if ft == 0 {
				return t
			}
		}
	}
	if firstAB == nil && len(e.targets) > 0 {
		return e.targets[0]
	}
	return firstAB
}

// State implements api.Writer.
func (e *Engine) State(ctx context.Context) (*otav1.DeviceState, error) {
	st, err := e.bootState(ctx)
	if err != nil {
		return nil, err
	}
	out := &otav1.DeviceState{ImageState: st.ImageState(), BootBackend: e.deps.Boot.Name()}
	e.recMu.Lock()
	for _, t := range e.targets {
		ts := &otav1.TargetState{Name: t.Name(), Kind: t.Kind(), FileTypes: append([]int32(nil), t.Config().FileTypes...)}
		vers := e.record.Versions[t.Name()]
		if t.IsAB() {
			ts.ActiveSlot, ts.InactiveSlot = st.Booted, boot.Other(st.Booted)
			for _, sl := range []string{boot.SlotA, boot.SlotB} {
				ts.Slots = append(ts.Slots, &otav1.SlotInfo{Name: sl, Version: vers[sl], Active: sl == st.Booted})
			}
		} else {
			ts.ActiveSlot = target.FileSlot
			ts.Slots = []*otav1.SlotInfo{{Name: target.FileSlot, Version: vers[target.FileSlot], Active: true}}
		}
		out.Targets = append(out.Targets, ts)
	}
	if u := e.record.LastUpdate; u != nil {
		out.LastUpdate = &otav1.UpdateInfo{JobId: u.JobID, Target: u.Target, Slot: u.Slot, Version: u.Version, Reason: otav1.Reason(u.Reason)}
		if out.ImageState == otav1.ImageState_IMAGE_STATE_ROLLED_BACK && out.LastUpdate.Reason == otav1.Reason_REASON_UNSPECIFIED {
			out.LastUpdate.Reason = otav1.Reason_REASON_ROLLED_BACK
		}
	}
	e.recMu.Unlock()
	for _, s := range e.sessionList() {
		if info := s.info(); info != nil {
			out.Sessions = append(out.Sessions, info)
		}
	}
	return out, nil
}

func (e *Engine) sessionList() []*session {
	e.mu.RLock()
	defer e.mu.RUnlock()
	out := make([]*session, 0, len(e.sessions))
	for _, t := range e.targets {
		if s := e.byTarget[t.Name()]; s != nil {
			out = append(out, s)
		}
	}
	keys := make([]string, 0, len(e.byKey))
	for k := range e.byKey {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	for _, k := range keys {
		out = append(out, e.byKey[k])
	}
	return out
}

func (e *Engine) lookup(id string) (*session, error) {
	e.mu.RLock()
	s := e.sessions[id]
	e.mu.RUnlock()
	if s == nil {
		return nil, status.Errorf(otav1.Reason_REASON_BAD_FILE_HANDLE, "no session %q", trunc(id, 64))
	}
	return s, nil
}

func trunc(s string, n int) string {
	if len(s) > n {
		return s[:n] + "..."
	}
	return s
}

// drop forgets s: closes its medium, removes its journal and (file targets) its temporary
// file. The caller holds s.mu.
func (e *Engine) drop(s *session, why string) {
	if s.dropped {
		return
	}
	s.dropped = true
	if s.medium != nil {
		s.medium.Close()
		s.medium = nil
	}
	e.mu.Lock()
	if e.sessions[s.id] == s {
		delete(e.sessions, s.id)
	}
	if e.byTarget[s.meta.Target] == s {
		delete(e.byTarget, s.meta.Target)
	}
	if e.byKey[s.meta.Key()] == s {
		delete(e.byKey, s.meta.Key())
	}
	e.mu.Unlock()
	s.closeManifestLocked()
	if err := e.journal.RemoveSession(s.meta.Key()); err != nil {
		e.log.Error("journal: remove session", "session", s.id, "error", err)
	}
	if s.tgt != nil {
		if err := s.tgt.Discard(); err != nil {
			e.log.Error("discard temporary file", "target", s.meta.Target, "error", err)
		}
	}
	e.log.Info("session closed", "session", s.id, "job", s.meta.JobID, "target", s.meta.Target, "why", why)
}
