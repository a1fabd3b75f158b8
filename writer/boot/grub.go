package boot

import (
	"context"
	"errors"
	"io/fs"
	"maps"
	"os"
	"path/filepath"
	"slices"

	"github.com/hashicorp/go-hclog"
)

// GRUBOptions configures the GRUB backend (grub-editenv on the GRUB environment block).
//
// GRUB has no boot counter of its own and no arithmetic, so grub.cfg counts with a chain of
// tests, for example (default names and slot values; the chain must count one past the
// configured boot limit, here up to a limit of 3):
//
//	load_env boot_part upgrade_available bootcount bootlimit
//	if [ "${upgrade_available}" = "1" ]; then
//	  if   [ "${bootcount}" = "0" ]; then set bootcount=1
//	  elif [ "${bootcount}" = "1" ]; then set bootcount=2
//	  elif [ "${bootcount}" = "2" ]; then set bootcount=3
//	  else set bootcount=4; fi
//	  if [ "${bootcount}" -gt "${bootlimit}" ]; then
//	    if [ "${boot_part}" = "a" ]; then set boot_part=b; else set boot_part=a; fi
//	    set upgrade_available=0
//	  fi
//	  save_env boot_part upgrade_available bootcount
//	fi
//	# then boot the menu entry of ${boot_part}
type GRUBOptions struct {
	Scheme
	// EditEnv is the tool (default "grub-editenv" from PATH).
	EditEnv string
	// EnvFile is the environment block, e.g. /boot/grub/grubenv. It must exist.
	EnvFile string
}

// GRUB is the GRUB environment backend; see Scheme for the variables.
type GRUB struct{ envBackend }

var _ Backend = (*GRUB)(nil)

// NewGRUB checks opts and returns the backend. It does not touch the environment.
func NewGRUB(opts GRUBOptions, log hclog.Logger) (*GRUB, error) {
	if err := opts.Scheme.setDefaults(); err != nil {
		return nil, controlErr("grub: %w", err)
	}
	if opts.EnvFile == "" {
		return nil, controlErr("grub: no environment file configured")
	}
	if opts.EditEnv == "" {
		opts.EditEnv = "grub-editenv"
	}
	return &GRUB{envBackend{name: "grub", s: opts.Scheme, store: &grubEnv{o: opts}, log: named(log)}}, nil
}

type grubEnv struct{ o GRUBOptions }

func (e *grubEnv) read(ctx context.Context) (map[string]string, error) {
	// grub-editenv lists a missing file as empty: that must not read as "no update".
	if _, err := os.Stat(e.o.EnvFile); err != nil {
		return nil, controlErr("grub: %w", err)
	}
	out, err := run(ctx, nil, e.o.EditEnv, e.o.EnvFile, "list")
	if err != nil {
		return nil, err
	}
	return parseEnv(out), nil
}

// write sets all variables with one grub-editenv call on a copy of the block, then renames
// the copy over the original. grub-editenv itself truncates and rewrites the file in place,
// which a power loss could leave empty; GRUB finds the file by name at every boot, so the
// rename is safe for it. Empty values are stored as empty (unset would need a second call).
func (e *grubEnv) write(ctx context.Context, vars map[string]string) error {
	args := []string{"", "set"}
	for _, k := range slices.Sorted(maps.Keys(vars)) {
		v := vars[k]
		if !validVarName(k) || !validVarValue(v) {
			return controlErr("grub: refusing to write %q=%q", k, v)
		}
		args = append(args, k+"="+v)
	}
	cur, err := os.ReadFile(e.o.EnvFile)
	if err != nil {
		return controlErr("grub: %w", err)
	}
	fi, err := os.Stat(e.o.EnvFile)
	if err != nil {
		return controlErr("grub: %w", err)
	}
	tmp, err := os.CreateTemp(filepath.Dir(e.o.EnvFile), "."+filepath.Base(e.o.EnvFile)+".tmp*")
	if err != nil {
		return controlErr("grub: %w", err)
	}
	tmpName := tmp.Name()
	done := false
	defer func() {
		if !done {
			_ = os.Remove(tmpName)
		}
	}()
	_, werr := tmp.Write(cur)
	if cerr := tmp.Close(); werr == nil {
		werr = cerr
	}
	if werr != nil {
		return controlErr("grub: %w", werr)
	}
	args[0] = tmpName
	if _, err := run(ctx, nil, e.o.EditEnv, args...); err != nil {
		return err
	}
	if err := syncRename(tmpName, e.o.EnvFile, fi.Mode().Perm()); err != nil {
		return controlErr("grub: %w", err)
	}
	done = true
	return nil
}

// syncRename fsyncs tmp, renames it to path and fsyncs the directory.
func syncRename(tmp, path string, perm fs.FileMode) error {
	f, err := os.OpenFile(tmp, os.O_RDWR, 0)
	if err != nil {
		return err
	}
	err = errors.Join(f.Chmod(perm), f.Sync(), f.Close())
	if err != nil {
		return err
	}
	if err := os.Rename(tmp, path); err != nil {
		return err
	}
	d, err := os.Open(filepath.Dir(path))
	if err != nil {
		return err
	}
	defer d.Close()
	return d.Sync()
}
