// Package journal keeps the writer's durable state in its state directory: one session file
// per target (metadata and the bitmap of blocks durable on the medium) and a record of the
// last activated update and of the image version in each slot.
//
// Every file is written as temp + fsync + rename + directory fsync, and carries a SHA-256 of
// its content: a corrupt or truncated file is detected on load and never trusted.
package journal

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"time"

	"github.com/gwota/gwota/internal/bitmap"
)

// ErrCorrupt marks a journal file that fails its checksum or cannot be decoded.
var ErrCorrupt = errors.New("journal file corrupt")

const (
	magic      = "GWOTAJ1\n"
	headerLen  = len(magic) + 4 + sha256.Size
	maxPayload = 64 << 20
	sessionExt = ".session"
	dataExt    = ".data"
	recordName = "record"
)

// WriteFile stores v as JSON in path atomically and durably.
func WriteFile(path string, v any) error {
	payload, err := json.Marshal(v)
	if err != nil {
		return err
	}
	sum := sha256.Sum256(payload)
	buf := make([]byte, 0, headerLen+len(payload))
	buf = append(buf, magic...)
	buf = binary.BigEndian.AppendUint32(buf, uint32(len(payload)))
	buf = append(buf, sum[:]...)
	buf = append(buf, payload...)

	tmp := path + ".tmp"
	f, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, 0o600)
	if err != nil {
		return err
	}
	if _, err := f.Write(buf); err != nil {
		f.Close()
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		return err
	}
	if err := f.Close(); err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	return syncDir(filepath.Dir(path))
}

// ReadFile loads v from path. A missing file is os.ErrNotExist; anything that does not pass
// the checksum or decode is ErrCorrupt.
func ReadFile(path string, v any) error {
	data, err := os.ReadFile(path)
	if err != nil {
		return err
	}
	if len(data) < headerLen || string(data[:len(magic)]) != magic {
		return fmt.Errorf("%s: %w: bad header", path, ErrCorrupt)
	}
	n := binary.BigEndian.Uint32(data[len(magic):])
	payload := data[headerLen:]
	if n > maxPayload || int(n) != len(payload) {
		return fmt.Errorf("%s: %w: length %d, have %d", path, ErrCorrupt, n, len(payload))
	}
	if sum := sha256.Sum256(payload); !bytes.Equal(sum[:], data[len(magic)+4:headerLen]) {
		return fmt.Errorf("%s: %w: checksum mismatch", path, ErrCorrupt)
	}
	dec := json.NewDecoder(bytes.NewReader(payload))
	dec.DisallowUnknownFields()
	if err := dec.Decode(v); err != nil {
		return fmt.Errorf("%s: %w: %v", path, ErrCorrupt, err)
	}
	return nil
}

// MkdirAll creates dir and its missing parents like os.MkdirAll, durably: each directory it
// creates is synced into its parent, so a power cut cannot take away a directory (and every
// file later made durable inside it) whose creation was never synced.
func MkdirAll(dir string, perm os.FileMode) error {
	dir = filepath.Clean(dir)
	fi, err := os.Stat(dir)
	if err == nil {
		if !fi.IsDir() {
			return fmt.Errorf("mkdir %s: not a directory", dir)
		}
		return nil
	}
	if !errors.Is(err, os.ErrNotExist) {
		return err
	}
	parent := filepath.Dir(dir)
	if parent != dir {
		if err := MkdirAll(parent, perm); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, perm); err != nil && !errors.Is(err, os.ErrExist) {
		return err
	}
	return syncDir(parent)
}

func syncDir(dir string) error {
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}

// Session is one session's durable state.
type Session struct {
	ID        string `json:"id"`
	JobID     string `json:"job_id"`
	FileIndex uint32 `json:"file_index"`
	Target    string `json:"target"`
	Slot      string `json:"slot"`
	FileSize  uint64 `json:"file_size"`
	BlockSize uint32 `json:"block_size"`
	Signature []byte `json:"signature"`
	Algorithm int32  `json:"algorithm"` // otav1.SigAlgorithm
	CertName  string `json:"cert_name"`
	Version   string `json:"version"`
	State     int32  `json:"state"` // otav1.SessionState
	// Durable: block k is set when it is on the medium (fdatasync returned), never for a
	// block only written. JSON holds it as base64, as any []byte.
	Durable bitmap.Bitmap `json:"durable"`
	SHA256  string        `json:"sha256,omitempty"` // hex digest read back, once verified
	Created time.Time     `json:"created"`
	// Updated: the last progress (blocks made durable, verified); an operator tells a stuck
	// session by it.
	Updated time.Time `json:"updated,omitzero"`

	// Kind is the otav1.SessionKind (0: an image). A MANIFEST session keeps the manifest's
	// bytes in DataPath(Key()); Target is empty until the manifest is verified. A CHUNKS
	// session's units are the manifest's chunks; its manifest (the same signature fields as
	// above, which are the manifest's) is in DataPath(Key()).
	Kind int32 `json:"kind,omitempty"`
	// CHUNKS sessions: the job's manifest file, the image the chunks make up, whether the
	// local fill of Begin completed, and the delta figures.
	ManifestFileIndex uint32 `json:"manifest_file_index,omitempty"`
	ImageSize         uint64 `json:"image_size,omitempty"`
	ImageSHA256       []byte `json:"image_sha256,omitempty"`
	FillDone          bool   `json:"fill_done,omitempty"`
	// OnBase: the local fill found the running slot to be the manifest's delta base, so the
	// delta chunks of the chunks it lacks were asked for instead of those chunks.
	OnBase        bool   `json:"on_base,omitempty"`
	ReusedBlocks  uint64 `json:"reused_blocks,omitempty"`
	ZeroBlocks    uint64 `json:"zero_blocks,omitempty"`
	DownloadBytes uint64 `json:"download_bytes,omitempty"`
	WritesSaved   uint64 `json:"writes_saved,omitempty"`
}

// kindManifest is otav1.SESSION_KIND_MANIFEST (this package does not import the protocol).
const kindManifest = 2

// ManifestKey names the files of job's MANIFEST session for file index: it starts with "_",
// which no target name does.
func ManifestKey(jobID string, fileIndex uint32) string {
	return fmt.Sprintf("_m_%s_%d", jobID, fileIndex)
}

// Key names s's files: its target's name, or ManifestKey for a MANIFEST session (which holds
// no target, and of which one job may have several).
func (s *Session) Key() string {
	if s.Kind == kindManifest {
		return ManifestKey(s.JobID, s.FileIndex)
	}
	return s.Target
}

// Update names the last activated update, so state after a reboot can name its job.
type Update struct {
	JobID   string    `json:"job_id"`
	Target  string    `json:"target"`
	Slot    string    `json:"slot"`
	Version string    `json:"version"`
	Reason  int32     `json:"reason,omitempty"` // otav1.Reason of a rollback
	Outcome string    `json:"outcome"`          // activated | committed | rejected
	Time    time.Time `json:"time"`
}

// Record is the writer's long-lived state.
type Record struct {
	LastUpdate *Update `json:"last_update,omitempty"`
	// Versions: target -> slot -> image version written there ("" unknown).
	Versions map[string]map[string]string `json:"versions,omitempty"`
	// SelfTest is the last self test of a trial boot; a commit needs one that passed in
	// this boot (same kernel boot id, slot and boot count).
	SelfTest *SelfTestRun `json:"self_test,omitempty"`
}

// SelfTestRun is the outcome of one self test and the boot it ran in.
type SelfTestRun struct {
	BootID    string    `json:"boot_id"`
	Slot      string    `json:"slot"`
	BootCount int       `json:"boot_count"`
	JobID     string    `json:"job_id"`
	Passed    bool      `json:"passed"`
	Reason    int32     `json:"reason,omitempty"` // otav1.Reason of a failure
	Time      time.Time `json:"time"`
}

// Outcomes of an update.
const (
	OutcomeActivated = "activated"
	OutcomeCommitted = "committed"
	OutcomeRejected  = "rejected"
)

// Journal is the state directory. Callers serialise writes of the same file (one session per
// target; the record under the engine's lock).
type Journal struct {
	dir string
}

// Open creates (if needed) and opens the journal under stateDir.
func Open(stateDir string) (*Journal, error) {
	dir := filepath.Join(stateDir, "sessions")
	if err := MkdirAll(dir, 0o700); err != nil {
		return nil, fmt.Errorf("journal: %w", err)
	}
	return &Journal{dir: stateDir}, nil
}

func (j *Journal) sessionPath(target string) string {
	return filepath.Join(j.dir, "sessions", target+sessionExt)
}

// SaveSession persists s (its Key names the file).
func (j *Journal) SaveSession(s *Session) error {
	if err := WriteFile(j.sessionPath(s.Key()), s); err != nil {
		return fmt.Errorf("journal: save session %s: %w", s.ID, err)
	}
	return nil
}

// RemoveSession deletes the session file of key (a target's name or a ManifestKey) and its
// data file.
func (j *Journal) RemoveSession(target string) error {
	if err := os.Remove(j.DataPath(target)); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("journal: remove data of %s: %w", target, err)
	}
	err := os.Remove(j.sessionPath(target))
	if err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("journal: remove session of %s: %w", target, err)
	}
	if err == nil {
		return syncDir(filepath.Join(j.dir, "sessions"))
	}
	return nil
}

// LoadSessions reads every session file. Files that are corrupt are removed and reported in
// dropped (the caller logs them); the sessions are lost, never trusted.
func (j *Journal) LoadSessions() (sessions []*Session, dropped []error, err error) {
	dir := filepath.Join(j.dir, "sessions")
	ents, err := os.ReadDir(dir)
	if err != nil {
		return nil, nil, fmt.Errorf("journal: %w", err)
	}
	for _, e := range ents {
		name := e.Name()
		p := filepath.Join(dir, name)
		if strings.HasSuffix(name, ".tmp") { // an interrupted save: the previous file stands
			os.Remove(p)
			continue
		}
		if !strings.HasSuffix(name, sessionExt) {
			continue
		}
		var s Session
		if err := ReadFile(p, &s); err != nil {
			dropped = append(dropped, err)
			os.Remove(p)
			continue
		}
		if s.Key()+sessionExt != name {
			dropped = append(dropped, fmt.Errorf("%s: %w: names target %q", p, ErrCorrupt, s.Key()))
			os.Remove(p)
			os.Remove(j.DataPath(strings.TrimSuffix(name, sessionExt)))
			continue
		}
		sessions = append(sessions, &s)
	}
	// A data file whose session is gone (removed, or lost before it was saved) is garbage.
	for _, e := range ents {
		if key, ok := strings.CutSuffix(e.Name(), dataExt); ok {
			if _, err := os.Stat(j.sessionPath(key)); errors.Is(err, os.ErrNotExist) {
				os.Remove(filepath.Join(dir, e.Name()))
			}
		}
	}
	return sessions, dropped, nil
}

// DataPath is the data file of the session of key: a MANIFEST session's manifest bytes, a
// CHUNKS session's manifest. It is removed with the session.
func (j *Journal) DataPath(key string) string {
	return filepath.Join(j.dir, "sessions", key+dataExt)
}

// LinkData makes the data file of key to a second name of the data file of from (a hard
// link: the same bytes, durable once the directory is synced). An existing file of to is
// replaced.
func (j *Journal) LinkData(from, to string) error {
	dst := j.DataPath(to)
	if err := os.Remove(dst); err != nil && !errors.Is(err, os.ErrNotExist) {
		return fmt.Errorf("journal: link data: %w", err)
	}
	if err := os.Link(j.DataPath(from), dst); err != nil {
		return fmt.Errorf("journal: link data: %w", err)
	}
	return syncDir(filepath.Join(j.dir, "sessions"))
}

// SaveRecord persists r.
func (j *Journal) SaveRecord(r *Record) error {
	if err := WriteFile(filepath.Join(j.dir, recordName), r); err != nil {
		return fmt.Errorf("journal: save record: %w", err)
	}
	return nil
}

// LoadRecord reads the record; a missing file is an empty record. A corrupt one is returned
// as an empty record with an ErrCorrupt error for the caller to log.
func (j *Journal) LoadRecord() (*Record, error) {
	r := &Record{}
	err := ReadFile(filepath.Join(j.dir, recordName), r)
	switch {
	case err == nil:
		return r, nil
	case errors.Is(err, os.ErrNotExist):
		return &Record{}, nil
	default:
		return &Record{}, err
	}
}
