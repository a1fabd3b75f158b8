// Package tinyfs mounts real, small filesystems for tests that need a medium that is full
// (a size-limited tmpfs: writes fail with ENOSPC) or read-only (a read-only bind mount:
// writes fail with EROFS, whoever writes). It needs root; without it a test is skipped, and
// under CI=true (CI runs as root) it fails instead, so a skip never hides a failure there.
package tinyfs

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"
	"testing"

	"golang.org/x/sys/unix"

	"github.com/gwota/gwota/test/testenv"
)

// Need skips t (fails it under CI=true) unless the process may mount.
func Need(t testing.TB) {
	t.Helper()
	testenv.NeedRoot(t, "tinyfs: mounting")
}

// Tmpfs mounts a tmpfs of size bytes (rounded up to pages by the kernel) on a new directory
// and returns it; the mount is detached when t ends.
func Tmpfs(t testing.TB, size int64) string {
	t.Helper()
	Need(t)
	dir := filepath.Join(t.TempDir(), "tmpfs")
	if err := os.Mkdir(dir, 0o755); err != nil {
		t.Fatal(err)
	}
	MountTmpfs(t, dir, size)
	return dir
}

// MountTmpfs mounts a tmpfs of size bytes on the existing directory dir (hiding what it
// held) until t ends.
func MountTmpfs(t testing.TB, dir string, size int64) {
	t.Helper()
	Need(t)
	if err := unix.Mount("tinyfs", dir, "tmpfs", unix.MS_NOSUID|unix.MS_NODEV, fmt.Sprintf("size=%d,mode=0700", size)); err != nil {
		t.Fatalf("tinyfs: mount tmpfs on %s: %v", dir, err)
	}
	t.Cleanup(func() { unmount(t, dir) })
}

// Bind bind-mounts dir onto itself, writable, until t ends: a mount point that a later
// `mount -o remount,bind,ro dir` (say, from a command the code under test runs) turns
// read-only.
func Bind(t testing.TB, dir string) {
	t.Helper()
	Need(t)
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("tinyfs: bind %s: %v", dir, err)
	}
	t.Cleanup(func() { unmount(t, dir) })
}

// FillName is the file Fill writes.
const FillName = ".tinyfs-fill"

// Fill writes a file into dir until its filesystem has no block left, and checks that the
// filesystem really answers ENOSPC. Free undoes it.
func Fill(t testing.TB, dir string) {
	t.Helper()
	f, err := os.OpenFile(filepath.Join(dir, FillName), os.O_WRONLY|os.O_CREATE|os.O_APPEND, 0o600)
	if err != nil {
		t.Fatalf("tinyfs: %v", err)
	}
	defer f.Close()
	buf := make([]byte, 4096)
	for i := 0; ; i++ {
		_, err := f.Write(buf)
		if errors.Is(err, syscall.ENOSPC) {
			return
		}
		if err != nil {
			t.Fatalf("tinyfs: filling %s: %v", dir, err)
		}
		if i > 1<<20 {
			t.Fatalf("tinyfs: %s took 4 GiB without filling up: not a small filesystem", dir)
		}
	}
}

// Free removes what Fill wrote.
func Free(t testing.TB, dir string) {
	t.Helper()
	if err := os.Remove(filepath.Join(dir, FillName)); err != nil {
		t.Fatalf("tinyfs: %v", err)
	}
}

// ReadOnly bind-mounts dir onto itself read-only, until t ends or the returned function is
// called: every write below dir then fails with EROFS, root's included.
func ReadOnly(t testing.TB, dir string) (undo func()) {
	t.Helper()
	Need(t)
	if err := unix.Mount(dir, dir, "", unix.MS_BIND, ""); err != nil {
		t.Fatalf("tinyfs: bind %s: %v", dir, err)
	}
	if err := unix.Mount("", dir, "", unix.MS_BIND|unix.MS_REMOUNT|unix.MS_RDONLY, ""); err != nil {
		unmount(t, dir)
		t.Fatalf("tinyfs: remount %s read-only: %v", dir, err)
	}
	done := false
	undo = func() {
		if !done {
			done = true
			unmount(t, dir)
		}
	}
	t.Cleanup(undo)
	return undo
}

func unmount(t testing.TB, dir string) {
	if err := unix.Unmount(dir, unix.MNT_DETACH); err != nil && !errors.Is(err, unix.EINVAL) {
		t.Errorf("tinyfs: unmount %s: %v", dir, err)
	}
}
