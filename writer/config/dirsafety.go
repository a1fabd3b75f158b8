package config

import (
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"strings"
	"syscall"
)

// TrustedOwner reports whether uid may own a directory on the way to a file target: root, or
// the user the writer runs as (a writer run by hand for tests owns its own directories).
func TrustedOwner(uid uint32) bool { return uid == 0 || int(uid) == os.Geteuid() }

// OthersCanWrite reports whether mode lets group or others create, rename or remove entries.
// POSIX ACLs that grant a named user or group write show in the group bits (the ACL mask), so
// the mode bits are enough.
func OthersCanWrite(mode fs.FileMode) bool { return mode.Perm()&0o022 != 0 }

// SafeDir checks that no user but root (or the writer's own user) can replace a file in dir
// or dir itself: every directory from / to dir, through symbolic links, is owned by a
// trusted user and not writable by group or others. An ancestor with the sticky bit (/tmp) is
// accepted, since others cannot rename or remove the root-owned entry below it; dir itself
// never is. A part of the path that does not exist yet is accepted only where no other user
// could create it (the target checks dir again when it opens it).
func SafeDir(dir string) error {
	if !filepath.IsAbs(dir) {
		return fmt.Errorf("%q is not absolute", dir)
	}
	pending := split(dir)
	cur := "/"
	fi, err := os.Stat(cur)
	if err != nil {
		return err
	}
	rootOpen, err := checkComponent(cur, fi, len(pending) == 0)
	if err != nil {
		return err
	}
	open := map[string]bool{cur: rootOpen} // checked directories: sticky and writable by others
	for links := 0; len(pending) > 0; {
		c := pending[0]
		pending = pending[1:]
		if c == ".." {
			cur = filepath.Dir(cur)
			continue
		}
		next := filepath.Join(cur, c)
		fi, err := os.Lstat(next)
		if errors.Is(err, fs.ErrNotExist) {
			if open[cur] {
				return fmt.Errorf("%s does not exist and any user may create it in %s", next, cur)
			}
			return nil
		}
		if err != nil {
			return err
		}
		if fi.Mode()&fs.ModeSymlink != 0 {
			if links++; links > 40 {
				return fmt.Errorf("%s: too many symbolic links", dir)
			}
			if uid := fi.Sys().(*syscall.Stat_t).Uid; !TrustedOwner(uid) {
				return fmt.Errorf("symbolic link %s is owned by uid %d: that user can point it elsewhere", next, uid)
			}
			to, err := os.Readlink(next)
			if err != nil {
				return err
			}
			if filepath.IsAbs(to) {
				cur = "/"
			}
			pending = append(split(to), pending...)
			continue
		}
		o, err := checkComponent(next, fi, len(pending) == 0)
		if err != nil {
			return err
		}
		open[next] = o
		cur = next
	}
	return nil
}

// checkComponent checks one directory on the way; open reports a sticky, writable ancestor.
func checkComponent(p string, fi fs.FileInfo, last bool) (open bool, err error) {
	if !fi.IsDir() {
		return false, fmt.Errorf("%s is not a directory", p)
	}
	if uid := fi.Sys().(*syscall.Stat_t).Uid; !TrustedOwner(uid) {
		return false, fmt.Errorf("directory %s is owned by uid %d, not root: that user can replace what it holds", p, uid)
	}
	if OthersCanWrite(fi.Mode()) {
		if last || fi.Mode()&fs.ModeSticky == 0 {
			return false, fmt.Errorf("directory %s (mode %04o) is writable by group or others: they can replace the file before or while it is installed", p, fi.Mode().Perm()|stickyBits(fi.Mode()))
		}
		return true, nil
	}
	return false, nil
}

func stickyBits(m fs.FileMode) fs.FileMode {
	if m&fs.ModeSticky != 0 {
		return 0o1000
	}
	return 0
}

func split(p string) []string {
	var out []string
	for _, c := range strings.Split(filepath.Clean(p), "/") {
		if c != "" && c != "." {
			out = append(out, c)
		}
	}
	return out
}
