// Package assemble builds the writer engine from its configuration: boot backend, extension
// collector and self test. ota-writer's commands use it, and so does the benchmark build of
// ota-net that links the engine in-process (cmd/ota-net/inproc.go, build tag gwota_inproc):
// one assembly, so both run the same writer.
package assemble

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"strings"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/writer/boot"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/engine"
	"github.com/gwota/gwota/writer/ext"
	"github.com/gwota/gwota/writer/journal"
	"github.com/gwota/gwota/writer/selftest"
)

// BootStateFile is the file boot backend's state, inside state_dir.
const BootStateFile = "boot-state.json"

// NewEngine wires the engine to its boot backend, extension collector and self test, all
// from the configuration. serve says this is the writer's start: only then does the file
// backend simulate the bootloader's power-on (flash, status, accept and reject must not
// count as a boot).
func NewEngine(ctx context.Context, cfg *config.Config, log hclog.Logger, serve bool) (*engine.Engine, error) {
	b, err := newBoot(ctx, cfg, log, serve)
	if err != nil {
		return nil, err
	}
	cmds := make([]ext.Command, 0, len(cfg.ExtensionCommands))
	for _, c := range cfg.ExtensionCommands {
		cmds = append(cmds, ext.Command{Name: c.Name, Argv: c.Command, Timeout: c.Timeout})
	}
	deps := engine.Deps{
		Boot:       b,
		Extensions: ext.New(ext.Config{Static: cfg.StaticExtensions(), Commands: cmds, StateDir: cfg.StateDir}, log),
		SelfTest:   newSelfTest(cfg, log),
	}
	return engine.New(ctx, cfg, deps, log)
}

func newBoot(ctx context.Context, cfg *config.Config, log hclog.Logger, serve bool) (engine.Boot, error) {
	scheme := boot.Scheme{BootLimit: cfg.Boot.BootLimit, CmdlineKey: cfg.Boot.SlotFromCmdline, CmdlineValues: cfg.Boot.CmdlineSlotValues}
	switch cfg.Boot.Backend {
	case config.BootFile:
		// Durably: the boot state file inside must not vanish with an unsynced directory.
		if err := journal.MkdirAll(cfg.StateDir, 0o700); err != nil {
			return nil, fmt.Errorf("state dir: %w", err)
		}
		f, err := boot.NewFile(filepath.Join(cfg.StateDir, BootStateFile), cfg.Boot.BootLimit, log)
		if err != nil {
			return nil, err
		}
		if serve {
			idFile := cfg.Boot.BootIDFile
			if idFile == "" {
				idFile = boot.DefaultBootIDFile
			}
			id, err := os.ReadFile(idFile)
			if err != nil {
				return nil, fmt.Errorf("boot id: %w", err)
			}
			if err := f.Boot(ctx, strings.TrimSpace(string(id))); err != nil {
				return nil, fmt.Errorf("simulated boot: %w", err)
			}
		}
		return f, nil
	case config.BootUBoot:
		return boot.NewUBoot(boot.UBootOptions{Scheme: scheme, PrintEnv: cfg.Boot.FwPrintenv, SetEnv: cfg.Boot.FwSetenv, Config: cfg.Boot.FwEnvConfig}, log)
	case config.BootGRUB:
		return boot.NewGRUB(boot.GRUBOptions{Scheme: scheme, EditEnv: cfg.Boot.GrubEditenv, EnvFile: cfg.Boot.GrubEnv}, log)
	}
	// config.Load refuses other backends.
	return nil, fmt.Errorf("boot backend %q unknown", cfg.Boot.Backend)
}

// newSelfTest returns the configured health checks.
func newSelfTest(cfg *config.Config, log hclog.Logger) engine.SelfTester {
	checks := make([]selftest.Check, 0, len(cfg.Checks))
	for _, c := range cfg.Checks {
		checks = append(checks, selftest.Check{Name: c.Name, Argv: c.Command, Timeout: c.Timeout})
	}
	return selftest.New(checks, cfg.SelfTestTimeout, log)
}
