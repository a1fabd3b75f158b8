package target

import (
	"errors"
	"os"
	"path/filepath"

	"golang.org/x/sys/unix"
)

// Room is the largest image slot may take when its medium is a regular file, which grows
// with the image: the bytes the file already holds on disk plus the free space of its
// filesystem beyond reserve. grows is false for a block device, whose capacity bounds it
// (Open checks that). A file target's temporary file is measured as it stands; Open with
// fresh truncates it, which only frees space.
func (t *Target) Room(slot string, reserve uint64) (room uint64, grows bool, err error) {
	p, err := t.mediumPath(slot)
	if err != nil {
		return 0, false, err
	}
	var held uint64
	fi, err := os.Stat(p)
	switch {
	case err == nil && fi.Mode()&os.ModeDevice != 0:
		return 0, false, nil
	case err == nil && fi.Mode().IsRegular():
		if st, ok := fi.Sys().(*unix.Stat_t); ok {
			held = uint64(st.Blocks) * 512
		}
	case err != nil && !errors.Is(err, os.ErrNotExist):
		return 0, false, err
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(p), &fs); err != nil {
		return 0, false, err
	}
	free := fs.Bavail * uint64(fs.Bsize)
	if free > reserve {
		held += free - reserve
	}
	return held, true, nil
}

// FreeSpace is the free space, for an unprivileged writer, of the filesystem holding slot's
// medium (a regular file or a file target's directory).
func (t *Target) FreeSpace(slot string) (uint64, error) {
	p, err := t.mediumPath(slot)
	if err != nil {
		return 0, err
	}
	var fs unix.Statfs_t
	if err := unix.Statfs(filepath.Dir(p), &fs); err != nil {
		return 0, err
	}
	return fs.Bavail * uint64(fs.Bsize), nil
}
