package server

import (
	"errors"
	"fmt"
	"io/fs"
	"net"
	"os"
	"os/user"
	"path/filepath"
	"strconv"
	"syscall"
	"time"
)

// MaxSocketPath is the longest Unix socket path the kernel accepts: sun_path is 108 bytes
// including the terminating NUL.
const MaxSocketPath = 107

// ListenConfig says how the writer's socket file is created.
type ListenConfig struct {
	// Mode of the socket file; 0660 when zero.
	Mode fs.FileMode
	// Group owning the socket (name or numeric gid); empty keeps the process's group.
	Group string
}

// Listen creates the writer's Unix socket at path. A stale socket left by a crashed writer is
// removed, but only if it is a socket and nobody answers a connect; anything else at path is
// an error. The socket is bound under a temporary name, given its mode and group, and only
// then renamed into place, so there is no moment where path is reachable with loose
// permissions.
func Listen(path string, cfg ListenConfig) (net.Listener, error) {
	if path == "" {
		return nil, errors.New("listen: empty socket path")
	}
	tmp := filepath.Join(filepath.Dir(path), fmt.Sprintf(".%s.%d", filepath.Base(path), os.Getpid()))
	for _, p := range []string{path, tmp} {
		if len(p) > MaxSocketPath {
			return nil, fmt.Errorf("listen: socket path %q is %d bytes, the kernel allows at most %d (sun_path); use a shorter path", p, len(p), MaxSocketPath)
		}
	}
	mode := cfg.Mode
	if mode == 0 {
		mode = 0o660
	}
	gid := -1
	if cfg.Group != "" {
		g, err := lookupGroup(cfg.Group)
		if err != nil {
			return nil, fmt.Errorf("listen: socket group: %w", err)
		}
		gid = g
	}
	if err := removeStale(path); err != nil {
		return nil, err
	}
	_ = os.Remove(tmp) // our own pid's leftover, if any
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: tmp, Net: "unix"})
	if err != nil {
		return nil, fmt.Errorf("listen: %w", err)
	}
	// The listener would unlink its bind name on Close; after the rename that is path, which
	// the wrapper removes itself.
	ln.SetUnlinkOnClose(false)
	fail := func(err error) (net.Listener, error) {
		ln.Close()
		os.Remove(tmp)
		return nil, err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return fail(fmt.Errorf("listen: chmod socket: %w", err))
	}
	if gid >= 0 {
		if err := os.Chown(tmp, -1, gid); err != nil {
			return fail(fmt.Errorf("listen: chown socket to group %s: %w", cfg.Group, err))
		}
	}
	if err := os.Rename(tmp, path); err != nil {
		return fail(fmt.Errorf("listen: rename socket into place: %w", err))
	}
	return &unixListener{UnixListener: ln, path: path}, nil
}

// unixListener removes its socket file on Close.
type unixListener struct {
	*net.UnixListener
	path string
}

func (l *unixListener) Addr() net.Addr { return &net.UnixAddr{Name: l.path, Net: "unix"} }

func (l *unixListener) Close() error {
	err := l.UnixListener.Close()
	os.Remove(l.path)
	return err
}

func removeStale(path string) error {
	fi, err := os.Lstat(path)
	if errors.Is(err, fs.ErrNotExist) {
		return nil
	}
	if err != nil {
		return fmt.Errorf("listen: %w", err)
	}
	if fi.Mode().Type() != fs.ModeSocket {
		return fmt.Errorf("listen: %s exists and is not a socket (%s); refusing to remove it", path, fi.Mode().Type())
	}
	c, err := net.DialTimeout("unix", path, time.Second)
	if err == nil {
		c.Close()
		return fmt.Errorf("listen: %s is in use: another writer is serving on it", path)
	}
	if !errors.Is(err, syscall.ECONNREFUSED) {
		return fmt.Errorf("listen: probing existing socket %s: %w", path, err)
	}
	if err := os.Remove(path); err != nil && !errors.Is(err, fs.ErrNotExist) {
		return fmt.Errorf("listen: removing stale socket: %w", err)
	}
	return nil
}

func lookupGroup(name string) (int, error) {
	if n, err := strconv.Atoi(name); err == nil && n >= 0 {
		return n, nil
	}
	g, err := user.LookupGroup(name)
	if err != nil {
		return 0, err
	}
	return strconv.Atoi(g.Gid)
}
