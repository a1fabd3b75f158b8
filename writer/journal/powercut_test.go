package journal

import (
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/test/lazyfs"

	"github.com/gwota/gwota/test/testenv"
)

// lazyMount mounts a lazy FUSE file system (test/lazyfs): a cut loses everything not synced,
// directory entries included.
func lazyMount(t *testing.T) *lazyfs.FS {
	t.Helper()
	testenv.Need(t, lazyfs.Available())
	dir := t.TempDir()
	f, err := lazyfs.New(filepath.Join(dir, "fs"), filepath.Join(dir, "mnt"))
	if err != nil {
		t.Fatal(err)
	}
	if err := f.Mount(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		f.Release()
		if err := f.Unmount(); err != nil {
			t.Error(err)
		}
	})
	return f
}

// A session saved in a journal whose state directory was created by this process survives a
// power cut: the directories' creation is synced, not only the file inside them. (Found by
// test/powercut: the sessions directory vanished, and with it a session whose blocks had been
// acknowledged durable.)
func TestSessionSurvivesPowerCutOfNewStateDir(t *testing.T) {
	f := lazyMount(t)
	stateDir := filepath.Join(f.Mountpoint(), "var", "lib", "ota")
	j, err := Open(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	s := sample()
	if err := j.SaveSession(s); err != nil {
		t.Fatal(err)
	}
	if err := j.SaveRecord(&Record{Versions: map[string]map[string]string{"rootfs": {"b": "1.2"}}}); err != nil {
		t.Fatal(err)
	}
	if err := f.Cut(); err != nil {
		t.Fatal(err)
	}
	j2, err := Open(stateDir)
	if err != nil {
		t.Fatal(err)
	}
	got, dropped, err := j2.LoadSessions()
	if err != nil || len(dropped) != 0 {
		t.Fatal(err, dropped)
	}
	if d := cmp.Diff([]*Session{s}, got); d != "" {
		t.Fatalf("sessions after the cut (-want +got)\n%s", d)
	}
	r, err := j2.LoadRecord()
	if err != nil || r.Versions["rootfs"]["b"] != "1.2" {
		t.Fatalf("record after the cut: %+v, %v", r, err)
	}
}

func TestMkdirAllDurable(t *testing.T) {
	f := lazyMount(t)
	p := filepath.Join(f.Mountpoint(), "a", "b", "c")
	if err := MkdirAll(p, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := MkdirAll(p, 0o700); err != nil { // exists: fine
		t.Fatal(err)
	}
	if err := f.Cut(); err != nil {
		t.Fatal(err)
	}
	if fi, err := os.Stat(p); err != nil || !fi.IsDir() {
		t.Fatalf("after the cut: %v", err)
	}
	if err := os.WriteFile(filepath.Join(f.Mountpoint(), "file"), nil, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := MkdirAll(filepath.Join(f.Mountpoint(), "file", "x"), 0o700); err == nil {
		t.Fatal("MkdirAll under a regular file succeeded")
	}
}
