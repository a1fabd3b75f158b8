package journal

import (
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
)

func sample() *Session {
	return &Session{ID: "s1", JobID: "job-1", FileIndex: 0, Target: "rootfs", Slot: "b", FileSize: 10000,
		BlockSize: 4096, Signature: []byte{1, 2, 3}, Algorithm: 1, CertName: "c.pem", Version: "1.2", State: 1,
		Durable: []byte{0b101}, Created: time.Date(2026, 1, 2, 3, 4, 5, 0, time.UTC)}
}

func TestSessionRoundTrip(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	s := sample()
	if err := j.SaveSession(s); err != nil {
		t.Fatal(err)
	}
	s.Durable[0] = 0b111
	if err := j.SaveSession(s); err != nil {
		t.Fatal(err)
	}
	j2, _ := Open(dir)
	got, dropped, err := j2.LoadSessions()
	if err != nil || len(dropped) != 0 {
		t.Fatal(err, dropped)
	}
	if d := cmp.Diff([]*Session{s}, got); d != "" {
		t.Fatalf("(-want +got)\n%s", d)
	}
	if err := j2.RemoveSession("rootfs"); err != nil {
		t.Fatal(err)
	}
	if got, _, _ := j2.LoadSessions(); len(got) != 0 {
		t.Fatalf("removed session still loads: %v", got)
	}
	if err := j2.RemoveSession("rootfs"); err != nil {
		t.Fatalf("removing twice: %v", err)
	}
}

func TestCorruptSessionDropped(t *testing.T) {
	for _, tc := range []struct {
		name   string
		damage func([]byte) []byte
	}{
		{"truncated", func(b []byte) []byte { return b[:len(b)-5] }},
		{"header only", func(b []byte) []byte { return b[:headerLen] }},
		{"empty", func([]byte) []byte { return nil }},
		{"bit flip in bitmap", func(b []byte) []byte { b[len(b)-20] ^= 1; return b }},
		{"bad magic", func(b []byte) []byte { b[0] = 'X'; return b }},
		{"appended", func(b []byte) []byte { return append(b, '}') }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			dir := t.TempDir()
			j, _ := Open(dir)
			good := sample()
			good.Target = "app"
			j.SaveSession(good)
			j.SaveSession(sample())
			p := filepath.Join(dir, "sessions", "rootfs.session")
			b, _ := os.ReadFile(p)
			os.WriteFile(p, tc.damage(b), 0o600)
			got, dropped, err := j.LoadSessions()
			if err != nil {
				t.Fatal(err)
			}
			if len(dropped) != 1 || !errors.Is(dropped[0], ErrCorrupt) {
				t.Fatalf("dropped = %v, want one ErrCorrupt", dropped)
			}
			if len(got) != 1 || got[0].Target != "app" {
				t.Fatalf("loaded %v, want only the intact session", got)
			}
			if _, err := os.Stat(p); !errors.Is(err, os.ErrNotExist) {
				t.Fatalf("corrupt file kept: %v", err)
			}
		})
	}
}

func TestMisfiledSessionDropped(t *testing.T) {
	dir := t.TempDir()
	j, _ := Open(dir)
	j.SaveSession(sample())
	os.Rename(filepath.Join(dir, "sessions", "rootfs.session"), filepath.Join(dir, "sessions", "app.session"))
	os.WriteFile(filepath.Join(dir, "sessions", "app.session.tmp"), []byte("half"), 0o600)
	got, dropped, _ := j.LoadSessions()
	if len(got) != 0 || len(dropped) != 1 {
		t.Fatalf("got %v dropped %v", got, dropped)
	}
	if _, err := os.Stat(filepath.Join(dir, "sessions", "app.session.tmp")); !errors.Is(err, os.ErrNotExist) {
		t.Fatal("temp file of an interrupted save kept")
	}
}

func TestRecord(t *testing.T) {
	dir := t.TempDir()
	j, _ := Open(dir)
	r, err := j.LoadRecord()
	if err != nil || r.LastUpdate != nil {
		t.Fatalf("empty: %v %v", r, err)
	}
	want := &Record{LastUpdate: &Update{JobID: "j", Target: "rootfs", Slot: "b", Version: "2", Outcome: OutcomeActivated,
		Time: time.Date(2026, 1, 1, 0, 0, 0, 0, time.UTC)}, Versions: map[string]map[string]string{"rootfs": {"a": "1", "b": "2"}}}
	if err := j.SaveRecord(want); err != nil {
		t.Fatal(err)
	}
	got, err := j.LoadRecord()
	if err != nil {
		t.Fatal(err)
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Fatalf("(-want +got)\n%s", d)
	}
	p := filepath.Join(dir, "record")
	b, _ := os.ReadFile(p)
	os.WriteFile(p, b[:len(b)/2], 0o600)
	got, err = j.LoadRecord()
	if !errors.Is(err, ErrCorrupt) || got == nil || got.LastUpdate != nil {
		t.Fatalf("corrupt record: %v %v", got, err)
	}
}
