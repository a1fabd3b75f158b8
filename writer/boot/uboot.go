package boot

import (
	"context"
	"maps"
	"os"
	"slices"
	"strings"

	"github.com/hashicorp/go-hclog"
)

// UBootOptions configures the U-Boot backend (fw_printenv/fw_setenv from libubootenv).
//
// Board integration (U-Boot built with CONFIG_BOOTCOUNT_LIMIT and CONFIG_BOOTCOUNT_ENV, so
// U-Boot itself increments bootcount on every boot while upgrade_available=1 and runs
// altbootcmd once bootcount > bootlimit). With the default names and slot values:
//
//	bootcmd=... boot the root filesystem of slot ${boot_part} ...
//	altbootcmd=if test "${boot_part}" = a; then setenv boot_part b; else setenv boot_part a; fi; setenv upgrade_available 0; saveenv; run bootcmd
//
// Use a redundant environment (two copies in fw_env.config) on real flash: each change is
// one fw_setenv call, and with two copies the previous environment survives a power loss
// in the middle of a write.
type UBootOptions struct {
	Scheme
	// PrintEnv and SetEnv are the tools (default "fw_printenv", "fw_setenv" from PATH).
	PrintEnv, SetEnv string
	// Config is passed as -c (the fw_env.config); "" uses the tools' default.
	Config string
	// DefaultEnv is passed as -f: the environment used when the stored one is invalid.
	DefaultEnv string
	// ClassicScript writes the -s script as "name value" lines, for U-Boot's own
	// fw_setenv (u-boot-tools). libubootenv (the default) reads "name=value" lines.
	ClassicScript bool
}

// UBoot is the U-Boot environment backend; see Scheme for the variables.
type UBoot struct{ envBackend }

var _ Backend = (*UBoot)(nil)

// NewUBoot checks opts and returns the backend. It does not touch the environment.
func NewUBoot(opts UBootOptions, log hclog.Logger) (*UBoot, error) {
	if err := opts.Scheme.setDefaults(); err != nil {
		return nil, controlErr("uboot: %w", err)
	}
	if opts.PrintEnv == "" {
		opts.PrintEnv = "fw_printenv"
	}
	if opts.SetEnv == "" {
		opts.SetEnv = "fw_setenv"
	}
	return &UBoot{envBackend{name: "uboot", s: opts.Scheme, store: &fwEnv{o: opts}, log: named(log)}}, nil
}

type fwEnv struct{ o UBootOptions }

func (e *fwEnv) args() []string {
	var a []string
	if e.o.Config != "" {
		a = append(a, "-c", e.o.Config)
	}
	if e.o.DefaultEnv != "" {
		a = append(a, "-f", e.o.DefaultEnv)
	}
	return a
}

func (e *fwEnv) read(ctx context.Context) (map[string]string, error) {
	out, err := run(ctx, nil, e.o.PrintEnv, e.args()...)
	if err != nil {
		return nil, err
	}
	return parseEnv(out), nil
}

// write sets all variables in one fw_setenv -s call: the tool rewrites the environment
// once, so the variables change together or not at all.
func (e *fwEnv) write(ctx context.Context, vars map[string]string) error {
	var sb strings.Builder
	for _, k := range slices.Sorted(maps.Keys(vars)) {
		v := vars[k]
		if !validVarName(k) || !validVarValue(v) {
			return controlErr("uboot: refusing to write %q=%q", k, v)
		}
		switch {
		case !e.o.ClassicScript:
			sb.WriteString(k + "=" + v + "\n") // "name=" deletes
		case v == "":
			sb.WriteString(k + "\n") // a bare name deletes
		default:
			sb.WriteString(k + " " + v + "\n")
		}
	}
	f, err := os.CreateTemp("", "ota-fwenv-*.script")
	if err != nil {
		return controlErr("uboot: %w", err)
	}
	defer os.Remove(f.Name())
	if _, err := f.WriteString(sb.String()); err != nil {
		f.Close()
		return controlErr("uboot: %w", err)
	}
	if err := f.Close(); err != nil {
		return controlErr("uboot: %w", err)
	}
	_, err = run(ctx, nil, e.o.SetEnv, append(e.args(), "-s", f.Name())...)
	return err
}
