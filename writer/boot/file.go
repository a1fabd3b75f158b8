package boot

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io/fs"
	"os"
	"path/filepath"
	"sync"

	"github.com/hashicorp/go-hclog"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// File is a boot backend that keeps the boot state in a JSON file and simulates the
// bootloader: Boot is what a bootloader would do at power-on, and the writer calls it once at
// startup. It is meant for tests, the demo, and boards without a supported bootloader (where
// "booting a slot" has no effect beyond this file).
//
// State machine (limit = bootLimit, the number of trial boots before the bootloader gives up):
//
//	NORMAL      Booted == Committed, no Pending, no Trial.
//	  Activate(s)  s != Booted          -> ACTIVATED (Pending = s, RolledBack and BootCount cleared)
//	ACTIVATED   Pending set, still running the committed slot.
//	  Activate(s)  s == Pending         -> ACTIVATED (idempotent)
//	  Reject                            -> ROLLED_BACK (Pending cleared, nothing to reboot)
//	  Boot                              -> TRIAL (Booted = Pending, BootCount = 1)
//	TRIAL       running Booted on trial, Committed is the previous slot.
//	  Commit                            -> NORMAL (Committed = Booted, BootCount = 0)
//	  Reject                            -> ROLLED_BACK, still running the rejected slot until
//	                                       the next Boot, which runs Committed
//	  Boot                              -> BootCount++, then
//	                 BootCount <= limit -> TRIAL (the slot gets limit boots in all)
//	                 BootCount >  limit -> ROLLED_BACK (Booted = Committed; BootCount kept)
//	ROLLED_BACK Trial false, RolledBack true.
//	  Boot                              -> ROLLED_BACK, Booted = Committed
//	  Activate(s)  after that Boot      -> ACTIVATED
//
// Every change is written to the file atomically (temp file, fsync, rename, directory fsync)
// before the call returns, so a crash leaves either the old or the new state.
type File struct {
	path  string
	limit int
	log   hclog.Logger

	mu     sync.Mutex
	st     State
	bootID string // the boot the last Boot step ran in (persisted)
}

// DefaultBootIDFile names the kernel's identity of the current boot: it changes at every
// power-on and stays the same across process restarts.
const DefaultBootIDFile = "/proc/sys/kernel/random/boot_id"

// fileState is the on-disk form. Version guards against reading a future format.
type fileState struct {
	Version    int    `json:"version"`
	Booted     string `json:"booted"`
	Committed  string `json:"committed"`
	Pending    string `json:"pending,omitempty"`
	Trial      bool   `json:"trial,omitempty"`
	RolledBack bool   `json:"rolled_back,omitempty"`
	BootCount  int    `json:"boot_count"`
	// BootID is the boot in which the last simulated bootloader step ran: a writer that
	// restarts within the same boot (a crash, systemd's Restart=) takes no bootloader step.
	BootID string `json:"boot_id,omitempty"`
}

const fileVersion = 1

var _ Backend = (*File)(nil)

// NewFile opens the state file at path, creating it (slot a booted and committed) when it does
// not exist. A file that exists but does not parse or holds an impossible state is an error,
// never silently reset: it may be the only record of which slot is good.
func NewFile(path string, bootLimit int, log hclog.Logger) (*File, error) {
	if bootLimit < 1 {
		return nil, controlErr("boot file %s: boot limit %d, want >= 1", path, bootLimit)
	}
	log = named(log)
	f := &File{path: path, limit: bootLimit, log: log}
	b, err := os.ReadFile(path)
	switch {
	case errors.Is(err, fs.ErrNotExist):
		f.st = State{Booted: SlotA, Committed: SlotA}
		if err := f.save(f.st, ""); err != nil {
			return nil, err
		}
		log.Info("boot state file created", "path", path, "slot", SlotA)
		return f, nil
	case err != nil:
		return nil, controlErr("boot file: %w", err)
	}
	st, id, err := decodeFileState(b)
	if err != nil {
		return nil, controlErr("boot file %s: %w", path, err)
	}
	f.st, f.bootID = st, id
	return f, nil
}

func decodeFileState(b []byte) (State, string, error) {
	var fsx fileState
	if err := json.Unmarshal(b, &fsx); err != nil {
		return State{}, "", err
	}
	if fsx.Version != fileVersion {
		return State{}, "", fmt.Errorf("format version %d, want %d", fsx.Version, fileVersion)
	}
	st, err := checkFileState(fsx)
	return st, fsx.BootID, err
}

func checkFileState(fsx fileState) (State, error) {
	st := State{Booted: fsx.Booted, Committed: fsx.Committed, Pending: fsx.Pending, Trial: fsx.Trial, RolledBack: fsx.RolledBack, BootCount: fsx.BootCount}
	switch {
	case !ValidSlot(st.Booted) || !ValidSlot(st.Committed):
		return State{}, fmt.Errorf("invalid slots booted=%q committed=%q", st.Booted, st.Committed)
	case st.Pending != "" && (!ValidSlot(st.Pending) || st.Pending == st.Booted):
		return State{}, fmt.Errorf("invalid pending slot %q", st.Pending)
	case st.Pending != "" && st.Trial:
		return State{}, fmt.Errorf("pending and trial at once")
	case st.Trial && st.Booted == st.Committed:
		return State{}, fmt.Errorf("trial of the committed slot %q", st.Booted)
	case st.BootCount < 0:
		return State{}, fmt.Errorf("negative boot count")
	}
	return st, nil
}

// Name implements Backend.
func (f *File) Name() string { return "file" }

// State implements Backend.
func (f *File) State(ctx context.Context) (State, error) {
	f.mu.Lock()
	defer f.mu.Unlock()
	return f.st, nil
}

// Boot simulates one power-on of the bootloader (see the type's state machine), once per
// boot: bootID identifies the current boot (the content of DefaultBootIDFile on a device). A
// writer restarted within the same boot finds its boot ID recorded and takes no step, so a
// crash of the writer is not mistaken for a reboot (it would otherwise start a trial of a
// slot that is only pending, without any reboot). An empty bootID always takes the step.
func (f *File) Boot(ctx context.Context, bootID string) error {
	f.mu.Lock()
	same := bootID != "" && bootID == f.bootID
	f.mu.Unlock()
	if same {
		f.log.Info("boot: same boot as the last start (writer restarted), no bootloader step", "boot_id", bootID)
		return nil
	}
	return f.updateBoot(bootID, func(st *State) error {
		switch {
		case st.Pending != "":
			st.Booted, st.Pending = st.Pending, ""
			st.Trial, st.RolledBack = true, false
			st.BootCount = 1
			f.log.Info("boot: trying slot", "slot", st.Booted, "boot_count", st.BootCount, "boot_limit", f.limit)
		case st.Trial:
			// Counted before the check, like U-Boot's bootcount/bootlimit.
			st.BootCount++
			if st.BootCount > f.limit {
				f.log.Warn("boot: trial slot reached the boot limit without commit, rolling back",
					"slot", st.Booted, "boot_count", st.BootCount, "committed", st.Committed)
				st.Booted, st.Trial, st.RolledBack = st.Committed, false, true
				break
			}
			f.log.Info("boot: trial slot again", "slot", st.Booted, "boot_count", st.BootCount, "boot_limit", f.limit)
		default:
			st.Booted = st.Committed
			f.log.Info("boot: committed slot", "slot", st.Booted)
		}
		return nil
	})
}

// Activate implements Backend.
func (f *File) Activate(ctx context.Context, slot string) error {
	return f.update(func(st *State) error {
		if err := checkActivate(*st, slot); err != nil {
			return err
		}
		st.Pending, st.RolledBack, st.BootCount = slot, false, 0
		return nil
	})
}

// Commit implements Backend.
func (f *File) Commit(ctx context.Context) error {
	err := f.update(func(st *State) error {
		if !st.Trial {
			return badState("commit: slot %s is not on trial", st.Booted)
		}
		st.Committed, st.Trial, st.BootCount = st.Booted, false, 0
		return nil
	})
	var se *status.Error
	if err != nil && errors.As(err, &se) && se.Reason == otav1.Reason_REASON_BOOT_CONTROL_FAILED {
		return status.Errorf(otav1.Reason_REASON_COMMIT_FAILED, "commit: %w", err)
	}
	return err
}

// Reject implements Backend.
func (f *File) Reject(ctx context.Context) error {
	return f.update(func(st *State) error {
		switch {
		case st.Trial:
			st.Trial, st.RolledBack = false, true
		case st.Pending != "":
			st.Pending, st.RolledBack = "", true
		default:
			return badState("reject: no trial and no activated slot")
		}
		return nil
	})
}

// update applies fn to a copy of the state and keeps it only once it is durable.
func (f *File) update(fn func(*State) error) error {
	f.mu.Lock()
	id := f.bootID
	f.mu.Unlock()
	return f.updateBoot(id, fn)
}

// updateBoot is update that also records bootID as the boot of the last bootloader step.
func (f *File) updateBoot(bootID string, fn func(*State) error) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	st := f.st
	if err := fn(&st); err != nil {
		return err
	}
	if st == f.st && bootID == f.bootID {
		return nil
	}
	if err := f.save(st, bootID); err != nil {
		return err
	}
	f.st, f.bootID = st, bootID
	return nil
}

func (f *File) save(st State, bootID string) error {
	b, err := json.MarshalIndent(fileState{
		Version: fileVersion, Booted: st.Booted, Committed: st.Committed, Pending: st.Pending,
		Trial: st.Trial, RolledBack: st.RolledBack, BootCount: st.BootCount, BootID: bootID,
	}, "", "  ")
	if err != nil {
		return controlErr("boot file: %w", err)
	}
	if err := writeFileAtomic(f.path, append(b, '\n'), 0o600); err != nil {
		return controlErr("boot file: %w", err)
	}
	return nil
}

// writeFileAtomic replaces path with data: temp file in the same directory, fsync, rename,
// fsync of the directory so the rename itself survives power loss.
func writeFileAtomic(path string, data []byte, perm os.FileMode) (err error) {
	dir := filepath.Dir(path)
	tmp, err := os.CreateTemp(dir, "."+filepath.Base(path)+".tmp*")
	if err != nil {
		return err
	}
	defer func() {
		if err != nil {
			_ = tmp.Close()
			_ = os.Remove(tmp.Name())
		}
	}()
	if err = tmp.Chmod(perm); err != nil {
		return err
	}
	if _, err = tmp.Write(data); err != nil {
		return err
	}
	if err = tmp.Sync(); err != nil {
		return err
	}
	if err = tmp.Close(); err != nil {
		return err
	}
	if err = os.Rename(tmp.Name(), path); err != nil {
		return err
	}
	d, err := os.Open(dir)
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
