package main

import (
	"context"
	"flag"
	"fmt"
	"io"

	"github.com/gwota/gwota/writer/assemble"
	"github.com/gwota/gwota/writer/config"
)

// cmdSetVersion records the version that runs now on a target: the factory step that gives
// the version policy something to compare with, and its repair after the record was lost or
// found corrupt. In-process only: a serving writer holds the record and would overwrite it.
func cmdSetVersion(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("set-version", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "writer configuration `file` (required)")
	target := fs.String("target", "", "configured target `name` (required)")
	version := fs.String("version", "", "the `version` that runs now on the target (required)")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	if *cfgPath == "" || *target == "" || *version == "" {
		return usagef("set-version: --config, --target and --version are required")
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return usageError{err}
	}
	if err := refuseIfServing(ctx, cfg.Socket); err != nil {
		return err
	}
	eng, err := assemble.NewEngine(ctx, cfg, newLogger(cfg, stderr), false)
	if err != nil {
		return err
	}
	defer eng.Close()
	slot, err := eng.SetRunningVersion(ctx, *target, *version)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "recorded: target %s slot %s runs version %s\n", *target, slot, *version)
	return nil
}
