package journal

import (
	"os"
	"path/filepath"
	"slices"
	"testing"

	"github.com/google/go-cmp/cmp"
)

// A MANIFEST session (kind 2) is filed under its job and file index, never a target's name;
// a data file lives and dies with its session: linked to a second name it keeps its bytes
// when the first session goes, removed with its session, and one left without a session is
// removed at load.
func TestSessionDataFiles(t *testing.T) {
	dir := t.TempDir()
	j, err := Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	mf := sample()
	mf.Kind, mf.Target, mf.Slot = 2, "", ""
	if got := mf.Key(); got != "_m_job-1_0" || got != ManifestKey("job-1", 0) {
		t.Fatalf("key %q", got)
	}
	chunks := sample()
	chunks.Kind, chunks.ID = 3, "s2"
	for _, s := range []*Session{mf, chunks} {
		if err := j.SaveSession(s); err != nil {
			t.Fatal(err)
		}
	}
	if err := os.WriteFile(j.DataPath(mf.Key()), []byte("manifest"), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := j.LinkData(mf.Key(), chunks.Key()); err != nil {
		t.Fatal(err)
	}
	orphan := j.DataPath("gone")
	if err := os.WriteFile(orphan, []byte("x"), 0o600); err != nil {
		t.Fatal(err)
	}
	got, dropped, err := j.LoadSessions()
	if err != nil || len(dropped) != 0 {
		t.Fatal(err, dropped)
	}
	slices.SortFunc(got, func(a, b *Session) int { return int(a.Kind - b.Kind) })
	if d := cmp.Diff([]*Session{mf, chunks}, got); d != "" {
		t.Fatalf("(-want +got)\n%s", d)
	}
	if _, err := os.Stat(orphan); !os.IsNotExist(err) {
		t.Fatalf("orphan data file: %v", err)
	}
	if err := j.RemoveSession(mf.Key()); err != nil {
		t.Fatal(err)
	}
	if b, err := os.ReadFile(j.DataPath(chunks.Key())); err != nil || string(b) != "manifest" {
		t.Fatalf("linked data after the first session went: %q %v", b, err)
	}
	if err := j.RemoveSession(chunks.Key()); err != nil {
		t.Fatal(err)
	}
	left, _ := filepath.Glob(filepath.Join(dir, "sessions", "*"))
	if len(left) != 0 {
		t.Fatalf("left: %v", left)
	}
}
