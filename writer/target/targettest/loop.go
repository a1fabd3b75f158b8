package targettest

import (
	"bytes"
	"encoding/binary"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"
	"unsafe"

	"golang.org/x/sys/unix"

	"github.com/gwota/gwota/test/testenv"
)

// Need skips t when ok is false, except under CI (CI=true), where every prerequisite is
// installed and a missing one must fail rather than hide a test.
func Need(t testing.TB, ok bool, why string) {
	t.Helper()
	testenv.Needf(t, ok, "%s", why)
}

// Loop attaches a loop device backed by a new zero-filled file of size bytes and returns the
// device and the backing file. The loop driver reads the backing file through its page cache
// (no --direct-io), so a change written to the backing file is what the device returns to a
// read that reaches it, while /dev/loopN's own page cache keeps what was written through it.
func Loop(t testing.TB, size int64) (dev, backing string) {
	t.Helper()
	Need(t, os.Geteuid() == 0, "loop devices need root")
	_, err := exec.LookPath("losetup")
	Need(t, err == nil, "losetup (util-linux) not installed")
	backing = filepath.Join(t.TempDir(), "loop.back")
	if err := os.WriteFile(backing, make([]byte, size), 0o600); err != nil {
		t.Fatal(err)
	}
	out, err := exec.Command("losetup", "--find", "--show", backing).CombinedOutput()
	Need(t, err == nil, "losetup cannot attach a loop device here: "+string(out))
	dev = strings.TrimSpace(string(out))
	t.Cleanup(func() {
		if out, err := exec.Command("losetup", "--detach", dev).CombinedOutput(); err != nil {
			t.Errorf("losetup --detach %s: %v %s", dev, err, out)
		}
	})
	return dev, backing
}

// Ext4 makes an ext4 filesystem on a loop device of size bytes, mounts it on a new directory
// and returns the mount point and the loop device's backing file. It is unmounted (before
// the loop device is detached) when the test ends.
func Ext4(t testing.TB, size int64) (mnt, backing string) {
	t.Helper()
	dev, backing := Loop(t, size)
	_, err := exec.LookPath("mkfs.ext4")
	Need(t, err == nil, "mkfs.ext4 (e2fsprogs) not installed")
	if out, err := exec.Command("mkfs.ext4", "-q", "-F", dev).CombinedOutput(); err != nil {
		t.Fatalf("mkfs.ext4: %v %s", err, out)
	}
	mnt = filepath.Join(t.TempDir(), "mnt")
	if err := os.Mkdir(mnt, 0o755); err != nil {
		t.Fatal(err)
	}
	err = unix.Mount(dev, mnt, "ext4", 0, "")
	Need(t, err == nil, "cannot mount ext4 here")
	t.Cleanup(func() {
		if err := unix.Unmount(mnt, 0); err != nil {
			t.Errorf("umount %s: %v", mnt, err)
		}
	})
	return mnt, backing
}

// Overwrite writes data into file at off and makes it durable: used on a loop device's backing
// file it changes what the medium holds without going through the device's page cache.
func Overwrite(t testing.TB, file string, off int64, data []byte) {
	t.Helper()
	f, err := os.OpenFile(file, os.O_WRONLY, 0)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if _, err := f.WriteAt(data, off); err != nil {
		t.Fatal(err)
	}
	if err := f.Sync(); err != nil {
		t.Fatal(err)
	}
}

// Cached fails t unless a buffered read of n bytes of path at off returns want: the page
// cache still holds what was written, so a test can tell a read of the cache from a read of
// the medium. The descriptor is closed again; the caller keeps its own open (the last close
// of a block device drops its cache).
func Cached(t testing.TB, path string, off int64, want []byte) {
	t.Helper()
	f, err := os.Open(path)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, len(want))
	if _, err := f.ReadAt(got, off); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(got, want) {
		t.Fatalf("%s: the page cache no longer holds the written bytes at %d: this test cannot tell the cache from the medium", path, off)
	}
}

// PhysicalOffset returns where logical offset off of file lies on the device of its
// filesystem (FIEMAP, after syncing the file); the extent must be written, not unwritten.
func PhysicalOffset(t testing.TB, file string, off int64) int64 {
	t.Helper()
	f, err := os.Open(file)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	const (
		fsIocFiemap    = 0xC020660B
		flagSync       = 0x1
		extentSize     = 56
		nExtents       = 64
		extUnwritten   = 0x800
		headerSize     = 32
		extentFlagsOff = 40
	)
	buf := make([]byte, headerSize+extentSize*nExtents)
	ne := binary.NativeEndian
	ne.PutUint64(buf[8:], ^uint64(0)) // fm_length: the whole file
	ne.PutUint32(buf[16:], flagSync)
	ne.PutUint32(buf[24:], nExtents)
	if _, _, e := unix.Syscall(unix.SYS_IOCTL, f.Fd(), fsIocFiemap, uintptr(unsafe.Pointer(&buf[0]))); e != 0 {
		t.Fatalf("FIEMAP %s: %v", file, e)
	}
	for i := range int(ne.Uint32(buf[20:])) {
		x := buf[headerSize+extentSize*i:]
		logical, physical, length := int64(ne.Uint64(x[0:])), int64(ne.Uint64(x[8:])), int64(ne.Uint64(x[16:]))
		if off >= logical && off < logical+length {
			if ne.Uint32(x[extentFlagsOff:])&extUnwritten != 0 {
				t.Fatalf("%s: offset %d lies in an unwritten extent", file, off)
			}
			return physical + off - logical
		}
	}
	t.Fatalf("%s: offset %d not mapped", file, off)
	return 0
}
