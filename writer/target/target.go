// Package target opens the media the writer may write: the inactive slot of an A/B pair
// (block device, partition or regular file) or the temporary file beside a plain-file
// target's destination. Paths come only from the configuration, never from a request, and an
// A/B target hands out only the slot that is not running.
package target

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"syscall"

	"golang.org/x/sys/unix"

	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/config"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// FileSlot is the slot name reported for plain-file targets.
const FileSlot = "file"

// Target is one configured target.
type Target struct {
	cfg config.Target
}

// New wraps a validated configuration entry.
func New(cfg config.Target) *Target { return &Target{cfg: cfg} }

// Name is the configured name.
func (t *Target) Name() string { return t.cfg.Name }

// IsAB reports whether the target is an A/B slot pair.
func (t *Target) IsAB() bool { return t.cfg.Kind == config.KindAB }

// Config returns the configuration entry.
func (t *Target) Config() config.Target { return t.cfg }

// Kind is the protocol's target kind.
func (t *Target) Kind() otav1.TargetKind {
	if t.IsAB() {
		return otav1.TargetKind_TARGET_KIND_AB
	}
	return otav1.TargetKind_TARGET_KIND_FILE
}

// Inactive returns the slot an update may write while booted runs.
func (t *Target) Inactive(booted string) (string, error) {
	if !t.IsAB() {
		return FileSlot, nil
	}
	if !boot.ValidSlot(booted) {
		return "", status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "target %s: running slot %q unknown, cannot tell the inactive one", t.cfg.Name, booted)
	}
	return boot.Other(booted), nil
}

// TempPath is where a plain-file target's new content is written before it is renamed into
// place: in the destination's directory, so the rename is atomic.
func (t *Target) TempPath() string {
	return filepath.Join(filepath.Dir(t.cfg.Path), "."+filepath.Base(t.cfg.Path)+".ota-new")
}

// mediumPath is the path behind slot ("a", "b" or FileSlot).
func (t *Target) mediumPath(slot string) (string, error) {
	switch {
	case !t.IsAB() && slot == FileSlot:
		return t.TempPath(), nil
	case t.IsAB() && slot == boot.SlotA:
		return t.cfg.Slots[0], nil
	case t.IsAB() && slot == boot.SlotB:
		return t.cfg.Slots[1], nil
	}
	return "", status.Errorf(otav1.Reason_REASON_OTHER, "target %s has no slot %q", t.cfg.Name, slot)
}

// Open opens slot for an image of size bytes. booted is the running slot; opening it is
// refused whatever the caller asks. fresh starts a new image (a plain file's temporary file
// is recreated); otherwise existing content is kept for resume. The capacity is checked
// (REASON_FILE_TOO_LARGE) and space is reserved where the filesystem supports it
// (REASON_STORAGE_FULL).
func (t *Target) Open(booted, slot string, size int64, fresh bool) (Medium, error) {
	if size <= 0 {
		return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "image size %d", size)
	}
	if t.IsAB() {
		inactive, err := t.Inactive(booted)
		if err != nil {
			return nil, err
		}
		if slot != inactive {
			return nil, status.Errorf(otav1.Reason_REASON_BAD_IMAGE_STATE, "target %s: slot %s is running, only slot %s may be written", t.cfg.Name, booted, inactive)
		}
	}
	if t.cfg.MaxSize > 0 && uint64(size) > t.cfg.MaxSize {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_TOO_LARGE, "image of %d bytes exceeds max_size %d of target %s", size, t.cfg.MaxSize, t.cfg.Name).
			WithMeta("max_size", fmt.Sprint(t.cfg.MaxSize))
	}
	p, err := t.mediumPath(slot)
	if err != nil {
		return nil, err
	}
	var m *osMedium
	if t.IsAB() {
		m, err = openSlot(p)
	} else {
		m, err = t.openTemp(fresh)
	}
	if err != nil {
		return nil, err
	}
	if m.capacity >= 0 && size > m.capacity {
		m.Close()
		return nil, status.Errorf(otav1.Reason_REASON_FILE_TOO_LARGE, "image of %d bytes exceeds slot %s of target %s (%d bytes)", size, slot, t.cfg.Name, m.capacity).
			WithMeta("capacity", fmt.Sprint(m.capacity))
	}
	if !m.block {
		// Reserve the space now so a full filesystem fails the session at its start, not
		// half-way. Never shrinks: a regular-file slot larger than the image keeps its size.
		if err := unix.Fallocate(int(m.f.Fd()), 0, 0, size); err != nil && !errors.Is(err, unix.EOPNOTSUPP) {
			m.Close()
			return nil, IOError(err, "reserve %d bytes in %s", size, p)
		}
	}
	return m, nil
}

func openSlot(p string) (*osMedium, error) {
	fi, err := os.Stat(p)
	if err != nil {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_WRITE_FAILED, "slot: %w", err)
	}
	switch {
	case fi.Mode()&os.ModeDevice != 0 && fi.Mode()&os.ModeCharDevice == 0:
		// O_EXCL on a block device fails with EBUSY while it is mounted or otherwise in use:
		// the writer never writes a mounted filesystem.
		f, err := os.OpenFile(p, os.O_RDWR|syscall.O_EXCL, 0)
		if err != nil {
			return nil, status.Errorf(otav1.Reason_REASON_FILE_WRITE_FAILED, "slot: %w", err)
		}
		n, err := unix.IoctlGetUint64(int(f.Fd()), unix.BLKGETSIZE64)
		if err != nil {
			f.Close()
			return nil, status.Errorf(otav1.Reason_REASON_FILE_WRITE_FAILED, "slot %s: size: %w", p, err)
		}
		return &osMedium{f: f, path: p, capacity: int64(n), block: true}, nil
	case fi.Mode().IsRegular():
		f, err := os.OpenFile(p, os.O_RDWR, 0)
		if err != nil {
			return nil, status.Errorf(otav1.Reason_REASON_FILE_WRITE_FAILED, "slot: %w", err)
		}
		return &osMedium{f: f, path: p, capacity: -1}, nil
	default:
		return nil, status.Errorf(otav1.Reason_REASON_UNSUPPORTED, "slot %s is a %s, not a block device or regular file", p, fi.Mode().Type())
	}
}

// openTemp opens the temporary file of a plain-file target relative to its directory, which
// is opened once (O_NOFOLLOW|O_DIRECTORY) and kept: every later step (install included) goes
// through these two descriptors, never through a path that could be swapped.
func (t *Target) openTemp(fresh bool) (*osMedium, error) {
	dirPath, name := filepath.Dir(t.cfg.Path), "."+filepath.Base(t.cfg.Path)+".ota-new"
	dfd, err := unix.Open(dirPath, unix.O_RDONLY|unix.O_DIRECTORY|unix.O_NOFOLLOW|unix.O_CLOEXEC, 0)
	if err != nil {
		return nil, IOError(err, "open directory %s", dirPath)
	}
	dir := os.NewFile(uintptr(dfd), dirPath)
	m, err := t.openTempIn(dir, name, fresh)
	if err != nil {
		dir.Close()
		return nil, err
	}
	return m, nil
}

func (t *Target) openTempIn(dir *os.File, name string, fresh bool) (*osMedium, error) {
	var st unix.Stat_t
	if err := unix.Fstat(int(dir.Fd()), &st); err != nil {
		return nil, IOError(err, "stat directory %s", dir.Name())
	}
	// The configuration checked the directory at load; it may have changed since.
	if !t.cfg.AllowWritableDir && (!config.TrustedOwner(st.Uid) || st.Mode&0o022 != 0) {
		return nil, status.Errorf(otav1.Reason_REASON_FILE_WRITE_FAILED,
			"directory %s (uid %d, mode %04o) can be written by another user: not installing there", dir.Name(), st.Uid, st.Mode&0o7777)
	}
	p := filepath.Join(dir.Name(), name)
	flags := unix.O_RDWR | unix.O_NOFOLLOW | unix.O_CLOEXEC
	if fresh {
		// A new file of our own: whatever was left under the name (even a hard link to some
		// other file) is unlinked, never truncated.
		if err := unix.Unlinkat(int(dir.Fd()), name, 0); err != nil && !errors.Is(err, unix.ENOENT) {
			return nil, IOError(err, "remove old %s", p)
		}
		flags |= unix.O_CREAT | unix.O_EXCL
	}
	fd, err := unix.Openat(int(dir.Fd()), name, flags, 0o600)
	if err != nil {
		return nil, IOError(err, "open %s", p)
	}
	f := os.NewFile(uintptr(fd), p)
	if err := unix.Fstat(fd, &st); err != nil || st.Mode&unix.S_IFMT != unix.S_IFREG || st.Nlink != 1 || int(st.Uid) != os.Geteuid() {
		f.Close()
		return nil, status.Errorf(otav1.Reason_REASON_FILE_WRITE_FAILED, "%s is not a regular file of the writer's own", p)
	}
	if fresh {
		if err := dir.Sync(); err != nil {
			f.Close()
			return nil, IOError(err, "sync directory")
		}
	}
	return &osMedium{f: f, path: p, capacity: -1, dir: dir, name: name}, nil
}

// Install moves a plain-file target's verified temporary file into place through the
// descriptors verification read: fsync, fchmod, a check that the name in the directory is
// still that file, renameat over the destination within the same directory descriptor, and an
// fsync of the directory. Nothing is looked up by path. m is closed.
func (t *Target) Install(m Medium) error {
	if t.IsAB() {
		return status.Errorf(otav1.Reason_REASON_OTHER, "install on A/B target %s", t.cfg.Name)
	}
	om, ok := unwrap(m).(*osMedium)
	if !ok || om.dir == nil {
		m.Close()
		return status.Errorf(otav1.Reason_REASON_OTHER, "install on target %s: not a temporary file", t.cfg.Name)
	}
	defer m.Close()
	fail := func(format string, args ...any) error {
		return status.Errorf(otav1.Reason_REASON_FILE_CLOSE_FAILED, format, args...)
	}
	fd, dfd := int(om.f.Fd()), int(om.dir.Fd())
	if err := om.f.Sync(); err != nil {
		return fail("sync %s: %w", om.path, err)
	}
	// The file was created 0600 by root; the destination gets ordinary read permissions.
	if err := unix.Fchmod(fd, 0o644); err != nil {
		return fail("chmod %s: %w", om.path, err)
	}
	var mine, named unix.Stat_t
	if err := unix.Fstat(fd, &mine); err != nil {
		return fail("stat %s: %w", om.path, err)
	}
	dest := filepath.Base(t.cfg.Path)
	if err := unix.Fstatat(dfd, om.name, &named, unix.AT_SYMLINK_NOFOLLOW); err != nil || !sameFile(&mine, &named) {
		return fail("%s is no longer the file that was verified: not installed", om.path)
	}
	if err := unix.Renameat(dfd, om.name, dfd, dest); err != nil {
		return fail("install %s: %w", t.cfg.Path, err)
	}
	if err := unix.Fstatat(dfd, dest, &named, unix.AT_SYMLINK_NOFOLLOW); err != nil || !sameFile(&mine, &named) {
		// Only a user who can write the directory can get here, which the configuration
		// refuses unless allow_writable_dir is set.
		return fail("%s was replaced while it was installed", t.cfg.Path)
	}
	if err := om.dir.Sync(); err != nil {
		return fail("sync directory of %s: %w", t.cfg.Path, err)
	}
	return nil
}

func sameFile(a, b *unix.Stat_t) bool { return a.Dev == b.Dev && a.Ino == b.Ino }

// Discard removes a plain-file target's temporary file (A/B slots are left as they are: an
// inactive slot is never booted without a verified activation).
func (t *Target) Discard() error {
	if t.IsAB() {
		return nil
	}
	if err := os.Remove(t.TempPath()); err != nil && !errors.Is(err, os.ErrNotExist) {
		return err
	}
	return nil
}

// IOError types a write-side I/O failure: ENOSPC/EDQUOT is REASON_STORAGE_FULL, anything else
// REASON_FILE_WRITE_FAILED.
func IOError(err error, format string, args ...any) *status.Error {
	r := otav1.Reason_REASON_FILE_WRITE_FAILED
	if errors.Is(err, syscall.ENOSPC) || errors.Is(err, syscall.EDQUOT) {
		r = otav1.Reason_REASON_STORAGE_FULL
	}
	return status.Errorf(r, "%s: %w", fmt.Sprintf(format, args...), err)
}
