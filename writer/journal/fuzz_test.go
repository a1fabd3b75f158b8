package journal

import (
	"bytes"
	"crypto/sha256"
	"encoding/binary"
	"errors"
	"os"
	"path/filepath"
	"regexp"
	"testing"
	"time"
	"unicode/utf8"

	"github.com/google/go-cmp/cmp"
)

func frame(t testing.TB, v any) []byte {
	t.Helper()
	p := filepath.Join(t.TempDir(), "f")
	if err := WriteFile(p, v); err != nil {
		t.Fatal(err)
	}
	b, err := os.ReadFile(p)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

// FuzzReadFile: whatever bytes lie in a journal file (a torn write, a bad sector, another
// program), ReadFile returns ErrCorrupt or a value whose file is exactly a well-formed,
// checksummed frame of it; never a panic, never a partial value.
func FuzzReadFile(f *testing.F) {
	f.Add(frame(f, sample()))
	f.Add(frame(f, &Record{LastUpdate: &Update{JobID: "j", Target: "rootfs", Slot: "b", Outcome: OutcomeActivated}, Versions: map[string]map[string]string{"rootfs": {"a": "1", "b": "2"}}}))
	f.Add([]byte(magic))
	f.Add(append([]byte(magic), 0xff, 0xff, 0xff, 0xff))
	f.Add(frame(f, map[string]any{"id": "x", "unknown": 1}))
	f.Fuzz(func(t *testing.T, data []byte) {
		p := filepath.Join(t.TempDir(), "f")
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		for _, v := range []any{&Session{}, &Record{}} {
			err := ReadFile(p, v)
			if err != nil {
				if !errors.Is(err, ErrCorrupt) {
					t.Fatalf("untyped error %v", err)
				}
				continue
			}
			if len(data) < headerLen || string(data[:len(magic)]) != magic {
				t.Fatal("accepted without the magic")
			}
			payload := data[headerLen:]
			sum := sha256.Sum256(payload)
			if binary.BigEndian.Uint32(data[len(magic):]) != uint32(len(payload)) || !bytes.Equal(sum[:], data[len(magic)+4:headerLen]) {
				t.Fatal("accepted a frame whose length or checksum does not match")
			}
			// What was read is what gets written back and read again.
			q := filepath.Join(t.TempDir(), "g")
			if err := WriteFile(q, v); err != nil {
				t.Fatal(err)
			}
			again := newOf(v)
			if err := ReadFile(q, again); err != nil || !cmp.Equal(v, again) {
				t.Fatalf("rewrite of %+v reads back %+v, %v", v, again, err)
			}
		}
	})
}

func newOf(v any) any {
	switch v.(type) {
	case *Session:
		return &Session{}
	default:
		return &Record{}
	}
}

// FuzzCorruptSession: any change to a valid session file (bit flips anywhere, truncation,
// appended bytes) is detected: LoadSessions drops and removes the file and never returns the
// session.
func FuzzCorruptSession(f *testing.F) {
	f.Add([]byte{0, 0, 1}, uint16(0), []byte{})
	f.Add([]byte{}, uint16(10), []byte{})
	f.Add([]byte{}, uint16(0), []byte{'\n'})
	f.Add([]byte{200, 0, 0x20, 255, 0, 0x01}, uint16(0), []byte{})
	f.Add([]byte{8, 0, 0x80}, uint16(0), []byte{})
	f.Fuzz(func(t *testing.T, flips []byte, cut uint16, tail []byte) {
		dir := t.TempDir()
		j, err := Open(dir)
		if err != nil {
			t.Fatal(err)
		}
		s := sample()
		if err := j.SaveSession(s); err != nil {
			t.Fatal(err)
		}
		p := j.sessionPath(s.Target)
		orig, err := os.ReadFile(p)
		if err != nil {
			t.Fatal(err)
		}
		data := bytes.Clone(orig)
		for i := 0; i+2 < len(flips); i += 3 {
			pos := int(binary.LittleEndian.Uint16(flips[i:])) % len(data)
			data[pos] ^= flips[i+2]
		}
		data = data[:len(data)-int(cut)%(len(data)+1)]
		data = append(data, tail...)
		if err := os.WriteFile(p, data, 0o600); err != nil {
			t.Fatal(err)
		}
		got, dropped, err := j.LoadSessions()
		if err != nil {
			t.Fatal(err)
		}
		if bytes.Equal(data, orig) {
			if len(got) != 1 || len(dropped) != 0 || !cmp.Equal(got[0], s) {
				t.Fatalf("intact file: %v %v", got, dropped)
			}
			return
		}
		if len(got) != 0 {
			t.Fatalf("corrupt file trusted: %+v", got[0])
		}
		if len(dropped) != 1 || !errors.Is(dropped[0], ErrCorrupt) {
			t.Fatalf("dropped %v", dropped)
		}
		if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
			t.Fatalf("corrupt file left in place: %v", err)
		}
	})
}

// JSON times are years 1..9999.
const minUnix, maxUnix = -62135596800, 253402300799

var targetRE = regexp.MustCompile(`^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$`)

// FuzzSessionRoundTrip: every session the engine can save (its strings come from protobuf,
// so they are valid UTF-8; the target is a configured name) loads back identical, bitmap
// included.
func FuzzSessionRoundTrip(f *testing.F) {
	s := sample()
	f.Add(s.ID, s.JobID, s.FileIndex, s.Target, s.Slot, s.FileSize, s.BlockSize, s.Signature, s.Algorithm, s.CertName, s.Version, s.State, []byte(s.Durable), s.SHA256, int64(1767323045), uint32(0))
	f.Add("", "", uint32(1<<32-1), "a", "", uint64(1<<64-1), uint32(0), []byte(nil), int32(-1), "../../x", "", int32(99), []byte{}, "zz", int64(0), uint32(999999999))
	f.Fuzz(func(t *testing.T, id, job string, idx uint32, tgt, slot string, size uint64, bs uint32, sig []byte, alg int32, cert, ver string, st int32, durable []byte, sum string, sec int64, nsec uint32) {
		for _, s := range []string{id, job, slot, cert, ver, sum} {
			if !utf8.ValidString(s) {
				return
			}
		}
		if !targetRE.MatchString(tgt) {
			return
		}
		in := &Session{ID: id, JobID: job, FileIndex: idx, Target: tgt, Slot: slot, FileSize: size, BlockSize: bs,
			Signature: sig, Algorithm: alg, CertName: cert, Version: ver, State: st, Durable: durable, SHA256: sum,
			Created: time.Unix(minUnix+int64(uint64(sec)%uint64(maxUnix-minUnix)), int64(nsec%1e9)).UTC()}
		j, err := Open(t.TempDir())
		if err != nil {
			t.Fatal(err)
		}
		if err := j.SaveSession(in); err != nil {
			t.Fatal(err)
		}
		got, dropped, err := j.LoadSessions()
		if err != nil || len(dropped) != 0 || len(got) != 1 {
			t.Fatalf("load: %v %v %v", got, dropped, err)
		}
		// JSON has no nil/empty distinction for byte slices; the journal does not need one.
		opt := cmp.Comparer(func(a, b []byte) bool { return bytes.Equal(a, b) })
		if d := cmp.Diff(in, got[0], opt); d != "" {
			t.Fatalf("round trip (-saved +loaded):\n%s", d)
		}
	})
}
