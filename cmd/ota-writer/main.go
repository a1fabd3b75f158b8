// Command ota-writer is the privileged half of the update agent: it owns the flash targets,
// the trust store and boot control, and serves them to ota-net on a Unix socket.
//
//	ota-writer serve  --config FILE              serve the gRPC API (SIGTERM/SIGINT: graceful stop)
//	ota-writer flash  --config FILE --target T --image IMG (--sig-file F | --sig B64) --sig-alg A
//	                  [--cert-name N] [--block-size N] [--activate]
//	ota-writer status [--config FILE] [--socket S] [--json]
//	ota-writer accept [--config FILE] [--socket S]  self test, then commit the trial boot
//	ota-writer reject [--config FILE] [--socket S]  roll back from the trial boot
//	ota-writer abort  [--config FILE] [--socket S] [--target T] [--job-id J]  drop sessions
//	ota-writer set-version --config FILE --target T --version V   record what runs now
//
// status, accept, reject and abort talk to the running writer over its socket. When no writer
// answers there and --config is given, they run the same engine in-process (a board where
// the writer is not running, or a recovery shell).
//
// Exit status:
//
//	0  success
//	1  the operation failed; the last line on stderr is "reason: <name>/<code>" (docs/REASONS.md)
//	2  usage or configuration error
//	   (flash while a writer serves the configuration's socket: session_busy/3012)
//	3  the writer is unavailable (not running and no --config to run in-process)
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"syscall"

	"github.com/gwota/gwota/internal/cpuprofile"
	"github.com/gwota/gwota/internal/runtimeopts"
	"github.com/gwota/gwota/status"
)

// Exit codes.
const (
	exitOK          = 0
	exitFailed      = 1
	exitUsage       = 2
	exitUnavailable = 3
)

// usageError marks bad flags or configuration (exit 2).
type usageError struct{ err error }

func (e usageError) Error() string { return e.err.Error() }
func (e usageError) Unwrap() error { return e.err }

func usagef(format string, args ...any) error { return usageError{fmt.Errorf(format, args...)} }

const usage = `usage: ota-writer <command> [flags]

commands:
  serve   --config FILE                     serve the writer API on its Unix socket
  flash   --config FILE --target NAME --image FILE (--sig-file FILE | --sig BASE64)
          --sig-alg ALG [--cert-name NAME] [--block-size N] [--activate]
  status  [--config FILE] [--socket PATH] [--json]
  accept  [--config FILE] [--socket PATH]   run the self test, then commit the trial boot
  reject  [--config FILE] [--socket PATH]   roll back from the trial boot
  abort   [--config FILE] [--socket PATH] [--target NAME] [--job-id ID]
                                            drop the session of a target (default: all)
  set-version --config FILE --target NAME --version V
                                            record the version that runs now (version policy)

Run "ota-writer <command> -h" for a command's flags.
`

func main() {
	runtimeopts.Apply(os.Getenv) // memory limit and GOMAXPROCS, unless set in the environment
	os.Exit(run(os.Args[1:], os.Stdout, os.Stderr))
}

func run(args []string, stdout, stderr io.Writer) int {
	defer cpuprofile.Start("ota-writer")()
	if len(args) < 1 {
		fmt.Fprint(stderr, usage)
		return exitUsage
	}
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGINT, syscall.SIGTERM)
	defer stop()
	var err error
	switch args[0] {
	case "serve":
		err = cmdServe(ctx, args[1:], stderr)
	case "flash":
		err = cmdFlash(ctx, args[1:], stdout, stderr)
	case "status":
		err = cmdStatus(ctx, args[1:], stdout, stderr)
	case "accept":
		err = cmdAcceptReject(ctx, args[1:], stdout, stderr, true)
	case "reject":
		err = cmdAcceptReject(ctx, args[1:], stdout, stderr, false)
	case "abort":
		err = cmdAbort(ctx, args[1:], stdout, stderr)
	case "set-version":
		err = cmdSetVersion(ctx, args[1:], stdout, stderr)
	case "manifest":
		err = cmdManifest(ctx, args[1:], stdout, stderr)
	case "-h", "--help", "help":
		fmt.Fprint(stdout, usage)
		return exitOK
	default:
		fmt.Fprintf(stderr, "ota-writer: unknown command %q\n%s", args[0], usage)
		return exitUsage
	}
	return report(err, stderr)
}

// report prints err and maps it to the exit status.
func report(err error, stderr io.Writer) int {
	if err == nil || errors.Is(err, flag.ErrHelp) {
		return exitOK
	}
	var ue usageError
	if errors.As(err, &ue) {
		fmt.Fprintf(stderr, "ota-writer: %v\n", err)
		return exitUsage
	}
	r := status.ReasonOf(err)
	fmt.Fprintf(stderr, "ota-writer: %v\n", err)
	fmt.Fprintf(stderr, "reason: %s\n", status.String(r))
	if status.ClassOf(r) == status.ClassUnavailable {
		return exitUnavailable
	}
	return exitFailed
}
