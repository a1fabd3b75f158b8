package target

import (
	"errors"
	"fmt"
	"io"
	"os"
	"unsafe"

	"golang.org/x/sys/unix"
)

// Medium is what a session writes and verification reads back: an A/B slot or a plain-file
// target's temporary file. It is an interface so tests can put faults between the writer and
// the medium (writer/target/targettest); Target.Open returns the real one.
type Medium interface {
	// WriteAt writes p at off. The data may sit in a cache until Sync.
	WriteAt(p []byte, off int64) (int, error)
	// ReadAt reads what the medium holds now as the writer sees it (its own writes not yet
	// synced included, through the page cache). Only to skip writing bytes that are already
	// there (flash wear); verification reads through ReadBack.
	ReadAt(p []byte, off int64) (int, error)
	// Sync makes everything written so far durable (fdatasync: the data, and the metadata
	// needed to read it back). Only after it returns may the journal name the blocks.
	Sync() error
	// ReadBack opens a reader of what the medium holds, not of what the writer's own writes
	// left in the page cache. Verification reads the image through it; close it after.
	ReadBack() (ReadBack, error)
	// Path is the medium's path, for messages.
	Path() string
	Close() error
}

// ReadBack reads the medium.
type ReadBack interface {
	io.ReaderAt
	io.Closer
	// Direct reports whether reads bypass the page cache (O_DIRECT). When false, the cache
	// was dropped after the final sync and reads come from the medium anyway, except on
	// filesystems whose page cache is the medium (tmpfs).
	Direct() bool
}

// Unwrapper is implemented by a Medium that wraps another (a test's fault injector), so
// Install reaches the descriptors underneath.
type Unwrapper interface{ Unwrap() Medium }

func unwrap(m Medium) Medium {
	for {
		u, ok := m.(Unwrapper)
		if !ok {
			return m
		}
		m = u.Unwrap()
	}
}

// osMedium is a slot (block device or regular file) or a temporary file, open read-write.
type osMedium struct {
	f        *os.File
	path     string
	capacity int64 // -1: grows (regular file)
	block    bool
	// Plain-file targets: the destination directory and the temporary file's name in it.
	dir  *os.File
	name string
}

func (m *osMedium) Path() string                             { return m.path }
func (m *osMedium) WriteAt(p []byte, off int64) (int, error) { return m.f.WriteAt(p, off) }
func (m *osMedium) ReadAt(p []byte, off int64) (int, error)  { return m.f.ReadAt(p, off) }

func (m *osMedium) Sync() error {
	for {
		err := unix.Fdatasync(int(m.f.Fd()))
		if err != unix.EINTR {
			return err
		}
	}
}

func (m *osMedium) Close() error {
	err := m.f.Close()
	if m.dir != nil {
		m.dir.Close()
	}
	return err
}

// Alignment is the alignment of O_DIRECT buffers, offsets and lengths: a page, which covers
// devices with 512-byte and 4 KiB logical blocks. Readers that pass buffers aligned to it
// (writer/verify does) are read into directly.
const Alignment = 4096

// noDirect makes ReadBack skip O_DIRECT (tests of the fallback).
var noDirect = false

// ReadBack opens a second descriptor on the same file or device, through /proc/self/fd so no
// path is looked up again, with O_DIRECT: reads go to the device, past the page cache that
// holds what this process wrote. Where O_DIRECT is refused (tmpfs, some FUSE filesystems),
// the clean cached pages are dropped after an fdatasync (FADV_DONTNEED drops only clean
// pages) and the fresh descriptor reads through the cache, which then refills from the medium.
func (m *osMedium) ReadBack() (ReadBack, error) {
	if err := m.Sync(); err != nil {
		return nil, fmt.Errorf("sync before read-back: %w", err)
	}
	align := int64(Alignment)
	if m.block {
		if n, err := unix.IoctlGetInt(int(m.f.Fd()), unix.BLKSSZGET); err == nil && int64(n) > align {
			align = int64(n)
		}
	}
	if !noDirect {
		if f, err := m.reopen(unix.O_DIRECT); err == nil {
			return &directReader{f: f, align: align}, nil
		} else if !errors.Is(err, unix.EINVAL) && !errors.Is(err, unix.EOPNOTSUPP) && !errors.Is(err, unix.ENOENT) {
			return nil, err
		}
	}
	if err := unix.Fadvise(int(m.f.Fd()), 0, 0, unix.FADV_DONTNEED); err != nil {
		return nil, fmt.Errorf("drop cached pages of %s: %w", m.path, err)
	}
	f, err := m.reopen(0)
	if errors.Is(err, unix.ENOENT) {
		// No /proc: read through the writing descriptor; its cached pages were just dropped.
		return cachedReader{f: m.f, keep: true}, nil
	}
	if err != nil {
		return nil, err
	}
	return cachedReader{f: f}, nil
}

// reopen opens m's file again read-only, checking it is the same file.
func (m *osMedium) reopen(flags int) (*os.File, error) {
	p := fmt.Sprintf("/proc/self/fd/%d", m.f.Fd())
	fd, err := unix.Open(p, unix.O_RDONLY|unix.O_CLOEXEC|flags, 0)
	if err != nil {
		return nil, fmt.Errorf("reopen %s for read-back: %w", m.path, err)
	}
	f := os.NewFile(uintptr(fd), m.path)
	var a, b unix.Stat_t
	if err := unix.Fstat(int(m.f.Fd()), &a); err != nil {
		f.Close()
		return nil, err
	}
	if err := unix.Fstat(fd, &b); err != nil || a.Dev != b.Dev || a.Ino != b.Ino || a.Rdev != b.Rdev {
		f.Close()
		return nil, fmt.Errorf("reopen %s for read-back: another file", m.path)
	}
	return f, nil
}

type cachedReader struct {
	f    *os.File
	keep bool // f is the medium's own descriptor: not closed with the reader
}

func (r cachedReader) ReadAt(p []byte, off int64) (int, error) { return r.f.ReadAt(p, off) }
func (r cachedReader) Direct() bool                            { return false }

func (r cachedReader) Close() error {
	if r.keep {
		return nil
	}
	return r.f.Close()
}

// directReader reads an O_DIRECT descriptor. Aligned requests go straight into the caller's
// buffer; the rest (the image's last, partial block) through a small aligned bounce buffer.
type directReader struct {
	f      *os.File
	align  int64
	bounce []byte
}

func (r *directReader) Direct() bool { return true }
func (r *directReader) Close() error { return r.f.Close() }

func (r *directReader) ReadAt(p []byte, off int64) (int, error) {
	if off < 0 {
		return 0, fmt.Errorf("read-back: negative offset")
	}
	if r.aligned(p, off) {
		return r.pread(p, off)
	}
	n := 0
	for n < len(p) {
		start := (off + int64(n)) &^ (r.align - 1)
		skip := off + int64(n) - start
		if r.bounce == nil {
			r.bounce = alignedBuffer(int(4*r.align), int(r.align))
		}
		want := min(int64(len(r.bounce)), (skip+int64(len(p)-n)+r.align-1)&^(r.align-1))
		got, err := r.pread(r.bounce[:want], start)
		c := 0
		if int64(got) > skip {
			c = copy(p[n:], r.bounce[skip:got])
		}
		n += c
		if n == len(p) {
			return n, nil
		}
		if err != nil {
			return n, err
		}
		if c == 0 {
			return n, io.EOF
		}
	}
	return n, nil
}

func (r *directReader) aligned(p []byte, off int64) bool {
	return len(p) > 0 && off%r.align == 0 && int64(len(p))%r.align == 0 &&
		int64(uintptr(unsafe.Pointer(&p[0])))%r.align == 0
}

// pread fills p from off; a short read means the end of the file or device (io.EOF).
func (r *directReader) pread(p []byte, off int64) (int, error) {
	n := 0
	for n < len(p) {
		got, err := unix.Pread(int(r.f.Fd()), p[n:], off+int64(n))
		if err == unix.EINTR {
			continue
		}
		if err != nil {
			return n, fmt.Errorf("read-back at offset %d: %w", off+int64(n), err)
		}
		if got == 0 {
			return n, io.EOF
		}
		n += got
		if int64(got)%r.align != 0 {
			// O_DIRECT returns a partial block only at the end of the file.
			if n < len(p) {
				return n, io.EOF
			}
		}
	}
	return n, nil
}

// AlignedBuffer returns a buffer of n bytes whose start is aligned to Alignment, as O_DIRECT
// needs. The Go heap does not move it.
func AlignedBuffer(n int) []byte { return alignedBuffer(n, Alignment) }

func alignedBuffer(n, align int) []byte {
	b := make([]byte, n+align)
	skip := 0
	if a := int(uintptr(unsafe.Pointer(&b[0])) % uintptr(align)); a != 0 {
		skip = align - a
	}
	return b[skip : skip+n : skip+n]
}
