// Package lazyfs is a FUSE file system for power-cut tests, in the style of LazyFS: a
// pass-through over a real directory that remembers what is durable and, on a cut, throws
// away everything else, the way a power cut loses what sat in the page cache.
//
// Model (stricter than ext4, like POSIX): fsync or fdatasync of a file makes its content
// (data and size) durable, and nothing else; fsync of a directory makes its entries durable
// (creates, renames, unlinks and links inside it). A rename or a create is therefore lost by
// a cut until the directory holding the new name is synced, even when the file itself was
// synced; a file whose entry is durable but whose data never was comes back empty. ext4 in
// its default mode often persists more (its journal commits a rename with the next fsync of
// anything), so a program that survives this model survives ext4, not the reverse.
//
// The served tree lives in a real directory; the durable state is kept beside it (file
// contents in a store, directory entries in memory). Cut unmounts, rebuilds the tree from the
// durable state and mounts again, so no kernel cache can serve stale pages. Files are opened
// with direct I/O and without FUSE passthrough, so every read and write reaches this server.
//
// Freeze arms a trigger: after the k-th operation of a kind, every later operation blocks
// until the cut, and then fails with EIO without effect. The process under test is killed
// while frozen, so the durable state is exactly the one after the k-th operation.
package lazyfs

import (
	"context"
	"errors"
	"fmt"
	"io"
	"os"
	"path/filepath"
	"sync"
	"syscall"
	"time"

	"github.com/hanwen/go-fuse/v2/fs"
	"github.com/hanwen/go-fuse/v2/fuse"
)

// Kind classifies operations for counting and for Freeze.
type Kind int

// Kinds of operations. Sync counts file and directory fsyncs (and fdatasyncs); Boundary
// counts syncs and renames (the points where what a cut keeps changes, or where a program
// relies on it having changed); Any counts every operation that changes the tree or makes
// something durable.
const (
	Sync Kind = iota
	Rename
	Boundary
	Write
	Any
)

func (k Kind) String() string {
	switch k {
	case Sync:
		return "sync"
	case Rename:
		return "rename"
	case Boundary:
		return "boundary"
	case Write:
		return "write"
	case Any:
		return "any"
	}
	return fmt.Sprintf("kind(%d)", int(k))
}

// Counts are the operations seen since the FS was created.
type Counts struct {
	Syncs, FileSyncs, DirSyncs, Renames, Writes, Any int
}

// Boundaries is the number of durability boundaries: syncs and renames.
func (c Counts) Boundaries() int { return c.Syncs + c.Renames }

// FS is one lazy file system.
type FS struct {
	live, store, mnt string

	server *fuse.Server

	mu      sync.Mutex
	nextID  uint64
	ids     map[uint64]uint64 // live inode number -> object id
	objs    map[uint64]*object
	counts  Counts
	trigger *trigger
	trace   []string // the boundaries, in order: "fsync <path>", "rename <old> <new>"
	frozen  bool
	release chan struct{} // closed by Release: blocked operations fail
}

// object is the durable state of one file, directory or symlink.
type object struct {
	mode    uint32            // type and permissions
	entries map[string]uint64 // directory: durable entries
	link    string            // symlink target
	data    bool              // file: durable content in the store
}

type trigger struct {
	kind  Kind
	k     int // fires when the kind's count reaches k
	fired chan struct{}
}

// rootID is the object id of the mounted directory.
const rootID = 1

// New prepares a lazy file system: dir holds its state (dir/live is the served tree, dir/store
// the durable contents), mnt is the mount point. Whatever dir/live holds when Mount is first
// called counts as durable.
func New(dir, mnt string) (*FS, error) {
	f := &FS{live: filepath.Join(dir, "live"), store: filepath.Join(dir, "store"), mnt: mnt}
	for _, p := range []string{f.live, f.store, mnt} {
		if err := os.MkdirAll(p, 0o755); err != nil {
			return nil, err
		}
	}
	return f, nil
}

// Live is the served tree's backing directory (for seeding content before the first Mount).
func (f *FS) Live() string { return f.live }

// Mountpoint is where the file system is mounted.
func (f *FS) Mountpoint() string { return f.mnt }

// Mount snapshots the backing tree as the durable state and mounts it.
func (f *FS) Mount() error {
	if err := f.snapshot(); err != nil {
		return err
	}
	root := &fs.LoopbackRoot{Path: f.live}
	var st syscall.Stat_t
	if err := syscall.Stat(f.live, &st); err != nil {
		return err
	}
	root.Dev = uint64(st.Dev)
	root.NewNode = func(r *fs.LoopbackRoot, parent *fs.Inode, name string, st *syscall.Stat_t) fs.InodeEmbedder {
		return &node{LoopbackNode: fs.LoopbackNode{RootData: r}, fs: f}
	}
	rootNode := root.NewNode(root, nil, "", &st)
	root.RootNode = rootNode
	zero := time.Duration(0)
	srv, err := fs.Mount(f.mnt, rootNode, &fs.Options{
		EntryTimeout: &zero, AttrTimeout: &zero, NegativeTimeout: &zero,
		MountOptions: fuse.MountOptions{
			DirectMountStrict: true,
			FsName:            "lazyfs",
			Name:              "lazyfs",
			// Several requests at once, like a real file system; ordering comes from the
			// lock around the durable state.
			MaxBackground: 16,
		},
	})
	if err != nil {
		return fmt.Errorf("lazyfs: mount %s: %w", f.mnt, err)
	}
	f.mu.Lock()
	f.server, f.frozen, f.release, f.trigger = srv, false, make(chan struct{}), nil
	f.mu.Unlock()
	return nil
}

// Unmount unmounts without losing anything (a clean shutdown: see Sync).
func (f *FS) Unmount() error {
	f.mu.Lock()
	srv := f.server
	f.server = nil
	f.mu.Unlock()
	if srv == nil {
		return nil
	}
	if err := srv.Unmount(); err != nil {
		return fmt.Errorf("lazyfs: unmount %s: %w", f.mnt, err)
	}
	return nil
}

// Counts returns the operations seen so far.
func (f *FS) Counts() Counts {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.counts
}

// Trace lists the boundaries seen so far, in order: "fsync <path>" (files and directories,
// relative to the mount) and "rename <old> <new>".
func (f *FS) Trace() []string {
	f.mu.Lock()
	defer f.mu.Unlock()
	return append([]string(nil), f.trace...)
}

func (f *FS) rel(p string) string {
	r, err := filepath.Rel(f.live, p)
	if err != nil {
		return p
	}
	return r
}

// Freeze arms the trigger: once k more operations of kind have completed (counted from now),
// the FS freezes and the returned channel is closed. k < 1 freezes at once.
func (f *FS) Freeze(kind Kind, k int) <-chan struct{} {
	f.mu.Lock()
	defer f.mu.Unlock()
	t := &trigger{kind: kind, k: f.count(kind) + k, fired: make(chan struct{})}
	f.trigger = t
	if k < 1 {
		f.fire()
	}
	return t.fired
}

// Frozen reports whether the FS is frozen.
func (f *FS) Frozen() bool {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.frozen
}

func (f *FS) count(kind Kind) int {
	switch kind {
	case Sync:
		return f.counts.Syncs
	case Rename:
		return f.counts.Renames
	case Boundary:
		return f.counts.Boundaries()
	case Write:
		return f.counts.Writes
	}
	return f.counts.Any
}

// fire freezes; f.mu held.
func (f *FS) fire() {
	if f.frozen {
		return
	}
	f.frozen = true
	if f.trigger != nil {
		close(f.trigger.fired)
	}
}

// Release fails every blocked and later operation with EIO (call it after killing the
// process under test: a killed process waits for its pending FUSE requests).
func (f *FS) Release() {
	f.mu.Lock()
	defer f.mu.Unlock()
	f.fire()
	select {
	case <-f.release:
	default:
		close(f.release)
	}
}

// Cut is the power cut: it freezes (if not yet), releases blocked operations, unmounts,
// throws away everything not durable and mounts the durable state. Every process using the
// mount must be dead.
func (f *FS) Cut() error {
	f.Release()
	if err := f.Unmount(); err != nil {
		return err
	}
	if err := f.rebuild(); err != nil {
		return fmt.Errorf("lazyfs: cut: %w", err)
	}
	return f.Mount()
}

// Sync makes everything durable, like the sync(2) of a clean shutdown.
func (f *FS) Sync() error {
	return f.snapshot()
}

// enter is called before an operation: it blocks while frozen and then fails it.
func (f *FS) enter(ctx context.Context) syscall.Errno {
	f.mu.Lock()
	frozen, rel := f.frozen, f.release
	f.mu.Unlock()
	if !frozen {
		return 0
	}
	select {
	case <-rel:
	case <-ctx.Done():
	}
	return syscall.EIO
}

// done counts a completed operation; f.mu held.
func (f *FS) done(kind Kind) {
	switch kind {
	case Sync:
		f.counts.Syncs++
	case Rename:
		f.counts.Renames++
	case Write:
		f.counts.Writes++
	}
	f.counts.Any++
	if t := f.trigger; t != nil && !f.frozen && f.count(t.kind) >= t.k {
		f.fire()
	}
}

// after counts a completed operation that only changed the live tree.
func (f *FS) after(kind Kind, errno syscall.Errno) syscall.Errno {
	return f.afterTrace(kind, errno, "")
}

// afterTrace is after, also tracing a boundary.
func (f *FS) afterTrace(kind Kind, errno syscall.Errno, trace string) syscall.Errno {
	if errno != 0 {
		return errno
	}
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.frozen {
		// Started before the freeze: its effect is lost with the cut like any other.
		return syscall.EIO
	}
	if trace != "" {
		f.trace = append(f.trace, trace)
	}
	f.done(kind)
	return 0
}

// idOf is the object id of the live inode ino; f.mu held.
func (f *FS) idOf(ino uint64) uint64 {
	if id, ok := f.ids[ino]; ok {
		return id
	}
	f.nextID++
	id := f.nextID
	f.ids[ino] = id
	return id
}

// victim returns the inode number of the name at p when removing the name removes the
// inode (its last link), else 0.
func victim(p string) uint64 {
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		return 0
	}
	if st.Mode&syscall.S_IFMT == syscall.S_IFDIR || st.Nlink <= 1 {
		return st.Ino
	}
	return 0
}

// removed counts a completed removal of the name whose inode was ino (victim): the inode
// number may be reused, and must then get a fresh object.
func (f *FS) removed(kind Kind, ino uint64, errno syscall.Errno, trace string) syscall.Errno {
	if errno == 0 && ino != 0 {
		f.mu.Lock()
		delete(f.ids, ino)
		f.mu.Unlock()
	}
	return f.afterTrace(kind, errno, trace)
}

// syncFile makes the content of the live file at p durable; f.mu held.
func (f *FS) syncFile(p string) error {
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		return err
	}
	id := f.idOf(st.Ino)
	if err := copyFile(p, filepath.Join(f.store, fmt.Sprint(id)), os.FileMode(st.Mode&0o7777)); err != nil {
		return err
	}
	o := f.obj(id, st.Mode)
	o.data = true
	return nil
}

// syncDir makes the entries of the live directory at p durable; f.mu held.
func (f *FS) syncDir(p string) error {
	var st syscall.Stat_t
	if err := syscall.Lstat(p, &st); err != nil {
		return err
	}
	id := f.idOf(st.Ino)
	if p == f.live {
		id = rootID
	}
	ents, err := os.ReadDir(p)
	if err != nil {
		return err
	}
	m := make(map[string]uint64, len(ents))
	for _, e := range ents {
		var cst syscall.Stat_t
		cp := filepath.Join(p, e.Name())
		if err := syscall.Lstat(cp, &cst); err != nil {
			return err
		}
		cid := f.idOf(cst.Ino)
		o := f.obj(cid, cst.Mode)
		if cst.Mode&syscall.S_IFMT == syscall.S_IFLNK {
			if o.link, err = os.Readlink(cp); err != nil {
				return err
			}
		}
		m[e.Name()] = cid
	}
	f.obj(id, st.Mode).entries = m
	return nil
}

// obj returns (creating) the durable object id; f.mu held.
func (f *FS) obj(id uint64, mode uint32) *object {
	o := f.objs[id]
	if o == nil {
		o = &object{}
		f.objs[id] = o
	}
	o.mode = mode
	return o
}

// snapshot makes the whole live tree the durable state.
func (f *FS) snapshot() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := os.RemoveAll(f.store); err != nil {
		return err
	}
	if err := os.Mkdir(f.store, 0o755); err != nil {
		return err
	}
	f.ids, f.objs, f.nextID = map[uint64]uint64{}, map[uint64]*object{}, rootID
	var rst syscall.Stat_t
	if err := syscall.Lstat(f.live, &rst); err != nil {
		return err
	}
	f.ids[rst.Ino] = rootID
	return filepath.Walk(f.live, func(p string, fi os.FileInfo, err error) error {
		if err != nil {
			return err
		}
		switch {
		case fi.IsDir():
			return f.syncDir(p)
		case fi.Mode().IsRegular():
			return f.syncFile(p)
		}
		return nil
	})
}

// rebuild replaces the live tree with the durable state.
func (f *FS) rebuild() error {
	f.mu.Lock()
	defer f.mu.Unlock()
	ents, err := os.ReadDir(f.live)
	if err != nil {
		return err
	}
	for _, e := range ents {
		if err := os.RemoveAll(filepath.Join(f.live, e.Name())); err != nil {
			return err
		}
	}
	made := map[uint64]string{}
	seen := map[uint64]bool{rootID: true}
	var build func(id uint64, dir string) error
	build = func(id uint64, dir string) error {
		o := f.objs[id]
		if o == nil {
			return nil
		}
		for name, cid := range o.entries {
			c := f.objs[cid]
			p := filepath.Join(dir, name)
			switch c.mode & syscall.S_IFMT {
			case syscall.S_IFDIR:
				if seen[cid] { // a directory cycle left by unsynced moves: keep one place
					continue
				}
				seen[cid] = true
				if err := os.Mkdir(p, os.FileMode(c.mode&0o777)); err != nil {
					return err
				}
				if err := build(cid, p); err != nil {
					return err
				}
			case syscall.S_IFLNK:
				if err := os.Symlink(c.link, p); err != nil {
					return err
				}
			case syscall.S_IFREG:
				if first, ok := made[cid]; ok {
					if err := os.Link(first, p); err != nil {
						return err
					}
					continue
				}
				made[cid] = p
				if c.data {
					if err := copyFile(filepath.Join(f.store, fmt.Sprint(cid)), p, os.FileMode(c.mode&0o7777)); err != nil {
						return err
					}
				} else if err := os.WriteFile(p, nil, os.FileMode(c.mode&0o7777)); err != nil {
					return err
				}
			}
			// Other types (sockets, fifos, devices) do not survive a cut.
		}
		return nil
	}
	return build(rootID, f.live)
}

func copyFile(src, dst string, mode os.FileMode) error {
	in, err := os.Open(src)
	if err != nil {
		return err
	}
	defer in.Close()
	tmp := dst + ".tmp"
	out, err := os.OpenFile(tmp, os.O_WRONLY|os.O_CREATE|os.O_TRUNC, mode)
	if err != nil {
		return err
	}
	if _, err := io.Copy(out, in); err != nil {
		out.Close()
		return err
	}
	if err := out.Close(); err != nil {
		return err
	}
	if err := os.Chmod(tmp, mode); err != nil {
		return err
	}
	return os.Rename(tmp, dst)
}

// node is one served inode: the loopback node with durability bookkeeping.
type node struct {
	fs.LoopbackNode
	fs *FS
}

func (n *node) path() string {
	return filepath.Join(n.fs.live, n.Path(n.Root()))
}

func (n *node) isDir() bool { return n.StableAttr().Mode&syscall.S_IFMT == syscall.S_IFDIR }

var (
	_ fs.NodeFsyncer         = (*node)(nil)
	_ fs.NodeWriter          = (*node)(nil)
	_ fs.NodeOpener          = (*node)(nil)
	_ fs.NodeCreater         = (*node)(nil)
	_ fs.NodeRenamer         = (*node)(nil)
	_ fs.NodeUnlinker        = (*node)(nil)
	_ fs.NodeRmdirer         = (*node)(nil)
	_ fs.NodeOpendirHandler  = (*node)(nil)
	_ fs.NodeSetattrer       = (*node)(nil)
	_ fs.NodeMkdirer         = (*node)(nil)
	_ fs.NodeLinker          = (*node)(nil)
	_ fs.NodeSymlinker       = (*node)(nil)
	_ fs.NodeCopyFileRanger  = (*node)(nil)
	_ fs.FilePassthroughFder = (*handle)(nil)
)

// Fsync makes the file's content or the directory's entries durable.
func (n *node) Fsync(ctx context.Context, fh fs.FileHandle, flags uint32) syscall.Errno {
	if e := n.fs.enter(ctx); e != 0 {
		return e
	}
	f := n.fs
	f.mu.Lock()
	defer f.mu.Unlock()
	if f.frozen {
		return syscall.EIO
	}
	var err error
	if n.isDir() {
		err = f.syncDir(n.path())
		f.counts.DirSyncs++
	} else {
		err = f.syncFile(n.path())
		f.counts.FileSyncs++
	}
	if err != nil {
		return fs.ToErrno(err)
	}
	f.trace = append(f.trace, "fsync "+f.rel(n.path()))
	f.done(Sync)
	return 0
}

// Write goes to the live file only.
func (n *node) Write(ctx context.Context, fh fs.FileHandle, data []byte, off int64) (uint32, syscall.Errno) {
	if e := n.fs.enter(ctx); e != 0 {
		return 0, e
	}
	w, ok := fh.(fs.FileWriter)
	if !ok {
		return 0, syscall.EBADF
	}
	c, errno := w.Write(ctx, data, off)
	if errno = n.fs.after(Write, errno); errno != 0 {
		return 0, errno
	}
	return c, 0
}

// CopyFileRange is refused so the kernel falls back to reads and writes that this FS sees.
func (n *node) CopyFileRange(ctx context.Context, fhIn fs.FileHandle, offIn uint64, out *fs.Inode, fhOut fs.FileHandle, offOut uint64, len uint64, flags uint64) (uint32, syscall.Errno) {
	return 0, syscall.EOPNOTSUPP
}

// Open opens the live file with direct I/O: no page cache can hold or serve data.
func (n *node) Open(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	if e := n.fs.enter(ctx); e != 0 {
		return nil, 0, e
	}
	fh, ff, errno := n.LoopbackNode.Open(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	if flags&syscall.O_TRUNC != 0 {
		if errno := n.fs.after(Any, 0); errno != 0 {
			fh.(fs.FileReleaser).Release(ctx)
			return nil, 0, errno
		}
	}
	return &handle{LoopbackFile: fh.(*fs.LoopbackFile)}, ff | fuse.FOPEN_DIRECT_IO, 0
}

// Create creates in the live tree; the entry is durable once the directory is synced.
func (n *node) Create(ctx context.Context, name string, flags uint32, mode uint32, out *fuse.EntryOut) (*fs.Inode, fs.FileHandle, uint32, syscall.Errno) {
	if e := n.fs.enter(ctx); e != 0 {
		return nil, nil, 0, e
	}
	ch, fh, ff, errno := n.LoopbackNode.Create(ctx, name, flags, mode, out)
	if errno != 0 {
		return nil, nil, 0, errno
	}
	if errno := n.fs.after(Any, 0); errno != 0 {
		fh.(fs.FileReleaser).Release(ctx)
		return nil, nil, 0, errno
	}
	return ch, &handle{LoopbackFile: fh.(*fs.LoopbackFile)}, ff | fuse.FOPEN_DIRECT_IO, 0
}

// Mkdir creates in the live tree.
func (n *node) Mkdir(ctx context.Context, name string, mode uint32, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if e := n.fs.enter(ctx); e != 0 {
		return nil, e
	}
	ch, errno := n.LoopbackNode.Mkdir(ctx, name, mode, out)
	return ch, n.fs.after(Any, errno)
}

// Symlink creates in the live tree.
func (n *node) Symlink(ctx context.Context, target, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if e := n.fs.enter(ctx); e != 0 {
		return nil, e
	}
	ch, errno := n.LoopbackNode.Symlink(ctx, target, name, out)
	return ch, n.fs.after(Any, errno)
}

// Link links in the live tree.
func (n *node) Link(ctx context.Context, target fs.InodeEmbedder, name string, out *fuse.EntryOut) (*fs.Inode, syscall.Errno) {
	if e := n.fs.enter(ctx); e != 0 {
		return nil, e
	}
	ch, errno := n.LoopbackNode.Link(ctx, target, name, out)
	return ch, n.fs.after(Any, errno)
}

// Rename renames in the live tree; durable once the directories are synced.
func (n *node) Rename(ctx context.Context, name string, newParent fs.InodeEmbedder, newName string, flags uint32) syscall.Errno {
	if e := n.fs.enter(ctx); e != 0 {
		return e
	}
	np, ok := newParent.(*node)
	if !ok {
		return syscall.EXDEV
	}
	var ino uint64
	from, to := filepath.Join(n.path(), name), filepath.Join(np.path(), newName)
	if flags&unixRenameExchange == 0 {
		ino = victim(to)
	}
	errno := n.LoopbackNode.Rename(ctx, name, newParent, newName, flags)
	return n.fs.removed(Rename, ino, errno, "rename "+n.fs.rel(from)+" "+n.fs.rel(to))
}

const unixRenameExchange = 2 // RENAME_EXCHANGE

// Unlink unlinks in the live tree.
func (n *node) Unlink(ctx context.Context, name string) syscall.Errno {
	if e := n.fs.enter(ctx); e != 0 {
		return e
	}
	ino := victim(filepath.Join(n.path(), name))
	return n.fs.removed(Any, ino, n.LoopbackNode.Unlink(ctx, name), "")
}

// Rmdir removes in the live tree.
func (n *node) Rmdir(ctx context.Context, name string) syscall.Errno {
	if e := n.fs.enter(ctx); e != 0 {
		return e
	}
	ino := victim(filepath.Join(n.path(), name))
	return n.fs.removed(Any, ino, n.LoopbackNode.Rmdir(ctx, name), "")
}

// Setattr (truncate, chmod, ...) changes the live tree only.
func (n *node) Setattr(ctx context.Context, fh fs.FileHandle, in *fuse.SetAttrIn, out *fuse.AttrOut) syscall.Errno {
	if e := n.fs.enter(ctx); e != 0 {
		return e
	}
	return n.fs.after(Any, n.LoopbackNode.Setattr(ctx, fh, in, out))
}

// OpendirHandle wraps the directory stream so fsync of a directory handle comes here.
func (n *node) OpendirHandle(ctx context.Context, flags uint32) (fs.FileHandle, uint32, syscall.Errno) {
	fh, ff, errno := n.LoopbackNode.OpendirHandle(ctx, flags)
	if errno != 0 {
		return nil, 0, errno
	}
	return &dirHandle{inner: fh, n: n}, ff, 0
}

// handle is an open file: the loopback file without passthrough (the kernel would otherwise
// write to the backing file directly, around this FS).
type handle struct {
	*fs.LoopbackFile
}

// PassthroughFd refuses passthrough.
func (h *handle) PassthroughFd() (int, bool) { return -1, false }

type dirHandle struct {
	inner fs.FileHandle
	n     *node
}

func (d *dirHandle) Readdirent(ctx context.Context) (*fuse.DirEntry, syscall.Errno) {
	r, ok := d.inner.(fs.FileReaddirenter)
	if !ok {
		return nil, syscall.ENOTSUP
	}
	return r.Readdirent(ctx)
}

func (d *dirHandle) Seekdir(ctx context.Context, off uint64) syscall.Errno {
	s, ok := d.inner.(fs.FileSeekdirer)
	if !ok {
		return syscall.ENOTSUP
	}
	return s.Seekdir(ctx, off)
}

func (d *dirHandle) Releasedir(ctx context.Context, flags uint32) {
	if r, ok := d.inner.(fs.FileReleasedirer); ok {
		r.Releasedir(ctx, flags)
	}
}

func (d *dirHandle) Fsyncdir(ctx context.Context, flags uint32) syscall.Errno {
	return d.n.Fsync(ctx, d, flags)
}

// ErrNoFUSE is returned by Available when this machine cannot mount FUSE file systems.
var ErrNoFUSE = errors.New("lazyfs: FUSE not available (need /dev/fuse and root)")

// Available reports whether a lazy FS can be mounted here: /dev/fuse and root (DirectMount
// calls mount(2) itself; no fusermount needed).
func Available() error {
	if _, err := os.Stat("/dev/fuse"); err != nil {
		return fmt.Errorf("%w: %v", ErrNoFUSE, err)
	}
	if os.Geteuid() != 0 {
		return fmt.Errorf("%w: not root", ErrNoFUSE)
	}
	return nil
}
