package lazyfs

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"github.com/gwota/gwota/test/testenv"
)

// mount gives a mounted lazy FS, seeded by seed (paths relative to the mount, contents)
// before the mount: the seed is durable. Without FUSE it skips, except in CI where it fails.
func mount(t *testing.T, seed map[string]string) *FS {
	t.Helper()
	testenv.Need(t, Available())
	dir := t.TempDir()
	f, err := New(filepath.Join(dir, "state"), filepath.Join(dir, "mnt"))
	if err != nil {
		t.Fatal(err)
	}
	for p, c := range seed {
		full := filepath.Join(f.Live(), p)
		if err := os.MkdirAll(filepath.Dir(full), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(full, []byte(c), 0o644); err != nil {
			t.Fatal(err)
		}
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

func (f *FS) p(name string) string { return filepath.Join(f.Mountpoint(), name) }

func cut(t *testing.T, f *FS) {
	t.Helper()
	if err := f.Cut(); err != nil {
		t.Fatal(err)
	}
}

func want(t *testing.T, path, content string) {
	t.Helper()
	b, err := os.ReadFile(path)
	if err != nil {
		t.Fatalf("%s: %v", path, err)
	}
	if string(b) != content {
		t.Fatalf("%s holds %q, want %q", path, b, content)
	}
}

func wantGone(t *testing.T, path string) {
	t.Helper()
	if _, err := os.Lstat(path); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("%s: want it gone, stat says %v", path, err)
	}
}

func writeAt(t *testing.T, path string, off int64, data string, sync bool) {
	t.Helper()
	fh, err := os.OpenFile(path, os.O_RDWR|os.O_CREATE, 0o644)
	if err != nil {
		t.Fatal(err)
	}
	defer fh.Close()
	if _, err := fh.WriteAt([]byte(data), off); err != nil {
		t.Fatal(err)
	}
	if sync {
		if err := syscall.Fdatasync(int(fh.Fd())); err != nil {
			t.Fatal(err)
		}
	}
}

func syncDir(t *testing.T, dir string) {
	t.Helper()
	d, err := os.Open(dir)
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	if err := d.Sync(); err != nil {
		t.Fatal(err)
	}
}

func TestUnsyncedWriteLostSyncedKept(t *testing.T) {
	f := mount(t, map[string]string{"slot": "0000000000"})
	writeAt(t, f.p("slot"), 0, "AAAA", true)   // fdatasync: durable
	writeAt(t, f.p("slot"), 4, "BBBB", false)  // not synced
	writeAt(t, f.p("slot"), 10, "CCCC", false) // grows the file, not synced
	// Before the cut every reader sees the new bytes.
	want(t, f.p("slot"), "AAAABBBB00CCCC")
	cut(t, f)
	want(t, f.p("slot"), "AAAA000000")
	// A sync through another descriptor makes the whole file durable, like fsync of an inode.
	writeAt(t, f.p("slot"), 4, "DD", false)
	writeAt(t, f.p("slot"), 8, "EE", true)
	cut(t, f)
	want(t, f.p("slot"), "AAAADD00EE")
}

func TestCreateNeedsDirectorySync(t *testing.T) {
	f := mount(t, map[string]string{"d/keep": "k"})
	// Directory synced, file data not: the name survives, empty.
	writeAt(t, f.p("d/new2"), 0, "two", false)
	syncDir(t, f.p("d"))
	// Both synced: survives whole.
	writeAt(t, f.p("d/new3"), 0, "three", true)
	syncDir(t, f.p("d"))
	// Created and fsynced after the last directory sync: the name is lost.
	writeAt(t, f.p("d/new4"), 0, "four", true)
	cut(t, f)
	want(t, f.p("d/new2"), "")
	want(t, f.p("d/new3"), "three")
	wantGone(t, f.p("d/new4"))
	want(t, f.p("d/keep"), "k")
}

func TestRenameRevertsUntilDirectorySync(t *testing.T) {
	f := mount(t, map[string]string{"state/record": "old"})
	// The atomic-replace idiom without the directory sync: the rename reverts.
	writeAt(t, f.p("state/record.tmp"), 0, "new", true)
	if err := os.Rename(f.p("state/record.tmp"), f.p("state/record")); err != nil {
		t.Fatal(err)
	}
	want(t, f.p("state/record"), "new")
	cut(t, f)
	want(t, f.p("state/record"), "old")
	wantGone(t, f.p("state/record.tmp"))

	// With the directory sync it stays.
	writeAt(t, f.p("state/record.tmp"), 0, "new", true)
	if err := os.Rename(f.p("state/record.tmp"), f.p("state/record")); err != nil {
		t.Fatal(err)
	}
	syncDir(t, f.p("state"))
	cut(t, f)
	want(t, f.p("state/record"), "new")
	wantGone(t, f.p("state/record.tmp"))

	// Synced rename, but the file's data was never synced: the new name holds nothing.
	writeAt(t, f.p("state/record.tmp"), 0, "newer", false)
	if err := os.Rename(f.p("state/record.tmp"), f.p("state/record")); err != nil {
		t.Fatal(err)
	}
	syncDir(t, f.p("state"))
	cut(t, f)
	want(t, f.p("state/record"), "")
}

func TestUnlinkRevertsUntilDirectorySync(t *testing.T) {
	f := mount(t, map[string]string{"s/a": "a", "s/b": "b"})
	if err := os.Remove(f.p("s/a")); err != nil {
		t.Fatal(err)
	}
	if err := os.Remove(f.p("s/b")); err != nil {
		t.Fatal(err)
	}
	syncDir(t, f.p("s"))
	// A new file may reuse a's inode number: it must not inherit a's durable data.
	writeAt(t, f.p("s/c"), 0, "c", false)
	syncDir(t, f.p("s"))
	if err := os.Remove(f.p("s/c")); err != nil {
		t.Fatal(err)
	}
	cut(t, f)
	wantGone(t, f.p("s/a"))
	wantGone(t, f.p("s/b"))
	want(t, f.p("s/c"), "")
}

// The kernel's page cache must not hide the loss: writes reach the FS when write(2)
// returns (direct I/O, no write-back cache), and after a cut a reader that had the file open
// before sees the durable bytes, not cached ones.
func TestPageCacheCannotHideLoss(t *testing.T) {
	f := mount(t, map[string]string{"slot": "xxxxxxxx"})
	fh, err := os.OpenFile(f.p("slot"), os.O_RDWR, 0)
	if err != nil {
		t.Fatal(err)
	}
	before := f.Counts().Writes
	if _, err := fh.WriteAt([]byte("yyyy"), 0); err != nil {
		t.Fatal(err)
	}
	if got := f.Counts().Writes; got != before+1 {
		t.Fatalf("writes seen by the FS: %d, want %d (a cache holds the write)", got, before+1)
	}
	buf := make([]byte, 8)
	if _, err := fh.ReadAt(buf, 0); err != nil || string(buf) != "yyyyxxxx" {
		t.Fatalf("read %q, %v", buf, err)
	}
	fh.Close()
	cut(t, f)
	want(t, f.p("slot"), "xxxxxxxx")
}

// Freeze after the k-th sync: the durable state is the one after exactly k syncs; later
// operations fail once released, and nothing they did survives.
func TestFreezeAfterKthSync(t *testing.T) {
	f := mount(t, map[string]string{"f": "0000"})
	fired := f.Freeze(Sync, 2)
	writeAt(t, f.p("f"), 0, "1", true) // sync 1
	writeAt(t, f.p("f"), 1, "2", true) // sync 2: freezes
	select {
	case <-fired:
	default:
		t.Fatal("not frozen after the 2nd sync")
	}
	done := make(chan error, 1)
	go func() {
		fh, err := os.OpenFile(f.p("f"), os.O_RDWR, 0)
		if err != nil {
			done <- err
			return
		}
		defer fh.Close()
		if _, err := fh.WriteAt([]byte("3"), 2); err != nil {
			done <- err
			return
		}
		done <- fh.Sync()
	}()
	f.Release()
	if err := <-done; !errors.Is(err, syscall.EIO) {
		t.Fatalf("operation after the freeze: %v, want EIO", err)
	}
	cut(t, f)
	want(t, f.p("f"), "1200")
	if f.Frozen() {
		t.Fatal("still frozen after the cut")
	}
	writeAt(t, f.p("f"), 3, "4", true)
	cut(t, f)
	want(t, f.p("f"), "1204")
}

func TestCounts(t *testing.T) {
	f := mount(t, map[string]string{"d/x": "x"})
	c0 := f.Counts()
	writeAt(t, f.p("d/y"), 0, "y", true)
	if err := os.Rename(f.p("d/y"), f.p("d/z")); err != nil {
		t.Fatal(err)
	}
	syncDir(t, f.p("d"))
	c := f.Counts()
	if c.Syncs-c0.Syncs != 2 || c.FileSyncs-c0.FileSyncs != 1 || c.DirSyncs-c0.DirSyncs != 1 || c.Renames-c0.Renames != 1 || c.Writes-c0.Writes != 1 {
		t.Fatalf("counts %+v after %+v", c, c0)
	}
}
