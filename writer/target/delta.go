package target

import (
	"errors"
	"io"
	"os"

	"golang.org/x/sys/unix"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/boot"
)

// OpenStateFile opens a file of the writer's own state directory (a MANIFEST session's
// manifest) as a Medium of size bytes: created when fresh (anything under the name is
// replaced), kept for resume otherwise, its space reserved.
func OpenStateFile(path string, size int64, fresh bool) (Medium, error) {
	if size <= 0 {
		return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "file size %d", size)
	}
	flags := os.O_RDWR | unix.O_NOFOLLOW | unix.O_CLOEXEC
	if fresh {
		if err := os.Remove(path); err != nil && !errors.Is(err, os.ErrNotExist) {
			return nil, IOError(err, "remove old %s", path)
		}
		flags |= os.O_CREATE | os.O_EXCL
	}
	f, err := os.OpenFile(path, flags, 0o600)
	if err != nil {
		return nil, IOError(err, "open %s", path)
	}
	if err := unix.Fallocate(int(f.Fd()), 0, 0, size); err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
		f.Close()
		return nil, IOError(err, "reserve %d bytes in %s", size, path)
	}
	return &osMedium{f: f, path: path, capacity: -1}, nil
}

// Local is what the device runs now on a target, read-only: the running slot of an A/B
// target, the installed file of a plain-file target. A delta update reuses its blocks (each
// checked against the manifest's hash before use).
type Local interface {
	io.ReaderAt
	io.Closer
	Size() int64
}

type localFile struct {
	*os.File
	size int64
}

func (l localFile) Size() int64 { return l.size }

// OpenRunning opens what runs now on t (booted is the running slot of an A/B target). A
// plain-file target without its file yet has nothing local: (nil, nil).
func (t *Target) OpenRunning(booted string) (Local, error) {
	var p string
	switch {
	case !t.IsAB():
		p = t.cfg.Path
	case booted == boot.SlotA:
		p = t.cfg.Slots[0]
	case booted == boot.SlotB:
		p = t.cfg.Slots[1]
	default:
		return nil, status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "target %s: running slot %q unknown", t.cfg.Name, booted)
	}
	f, err := os.OpenFile(p, os.O_RDONLY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		if !t.IsAB() && errors.Is(err, os.ErrNotExist) {
			return nil, nil
		}
		return nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "open running %s: %w", p, err)
	}
	fi, err := f.Stat()
	if err != nil {
		f.Close()
		return nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "stat running %s: %w", p, err)
	}
	switch {
	case fi.Mode().IsRegular():
		return localFile{f, fi.Size()}, nil
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		n, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
		if err != nil {
			f.Close()
			return nil, status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, "running %s: size: %w", p, err)
		}
		return localFile{f, int64(n)}, nil
	}
	f.Close()
	return nil, status.Errorf(otav1.Reason_REASON_UNSUPPORTED, "running %s is a %s, not a block device or regular file", p, fi.Mode().Type())
}
