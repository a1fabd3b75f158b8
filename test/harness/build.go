// Package harness runs the real product for end-to-end tests and the demo: it builds
// ota-writer and ota-net once with `go build`, writes their configurations for a simulated
// device (file-backed A/B slots, the file boot backend), runs them as separate processes with
// their logs captured, simulates reboots, and waits on job status updates recorded by the
// cloud side (the emulator or real AWS, through backend.Backend).
//
// Everything waits on events (process exits, the writer's health service, status updates, a
// FIFO the writer's reboot command writes to), never on timers.
package harness

import (
	"bytes"
	"context"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
)

// Binaries are the built commands.
type Binaries struct {
	Dir    string
	Writer string // ota-writer
	Net    string // ota-net
	// NetInProc is ota-net's benchmark build with the writer engine linked in
	// (BuildOptions.InProcessNet; DeviceOptions.InProcess).
	NetInProc string
	// Race says the binaries were built with the race detector.
	Race bool
}

// BuildOptions configure Build.
type BuildOptions struct {
	// Dir receives the binaries (a new temporary directory when empty; Binaries.Dir).
	Dir string
	// Race builds with -race (end-to-end tests run under `go test -race` do, so data races
	// in the real processes are caught too).
	Race bool
	// Only builds these commands (names as in Commands); empty: all.
	Only []string
	// Tags are build tags (the crash campaign builds with gwota_crashpoints).
	Tags []string
	// InProcessNet also builds ota-net with the writer engine linked in (build tag
	// InProcTag) as NetInProc.
	InProcessNet bool
}

// InProcTag is the build tag of ota-net's benchmark build with the writer linked in
// (cmd/ota-net/inproc.go).
const InProcTag = "gwota_inproc"

// EnvInProcWriterConfig is where that build reads the writer configuration it serves
// (cmd/ota-net/inproc.go's EnvInProcWriterConfig).
const EnvInProcWriterConfig = "GWOTA_INPROC_WRITER_CONFIG"

// Commands are the packages Build compiles, by binary name.
var Commands = map[string]string{
	"ota-writer": "./cmd/ota-writer",
	"ota-net":    "./cmd/ota-net",
}

// EnvPrebuiltNet names an ota-net binary to use instead of building ./cmd/ota-net (to run
// the harness against an out-of-tree or older build).
const EnvPrebuiltNet = "GWOTA_HARNESS_OTA_NET"

// Build compiles ota-writer and ota-net from the module this code lives in.
func Build(ctx context.Context, opts BuildOptions) (*Binaries, error) {
	goBin, err := goTool()
	if err != nil {
		return nil, err
	}
	root, err := ModuleRoot(ctx)
	if err != nil {
		return nil, err
	}
	dir := opts.Dir
	if dir == "" {
		if dir, err = os.MkdirTemp("", "gwota-bin-"); err != nil {
			return nil, err
		}
	}
	b := &Binaries{Dir: dir, Writer: filepath.Join(dir, "ota-writer"), Net: filepath.Join(dir, "ota-net"), Race: opts.Race}
	args := []string{"build", "-o", dir + string(filepath.Separator)}
	if opts.Race {
		args = append(args, "-race")
	}
	if len(opts.Tags) > 0 {
		args = append(args, "-tags", strings.Join(opts.Tags, ","))
	}
	// One go build for all: the shared packages compile once.
	names := opts.Only
	if len(names) == 0 {
		names = []string{"ota-writer", "ota-net"}
	}
	prebuilt := os.Getenv(EnvPrebuiltNet)
	for _, n := range names {
		if n == "ota-net" && prebuilt != "" {
			if err := copyFile(prebuilt, b.Net); err != nil {
				return nil, fmt.Errorf("%s: %w", EnvPrebuiltNet, err)
			}
			continue
		}
		pkg, ok := Commands[n]
		if !ok {
			return nil, fmt.Errorf("harness: unknown command %q", n)
		}
		args = append(args, pkg)
	}
	if len(args) > 3+btoi(opts.Race)+2*btoi(len(opts.Tags) > 0) {
		if err := goBuild(ctx, goBin, root, args); err != nil {
			return nil, err
		}
	}
	if opts.InProcessNet {
		// Its own go build: one -o directory cannot hold two builds of one package.
		b.NetInProc = filepath.Join(dir, "ota-net-inproc")
		args := []string{"build", "-o", b.NetInProc, "-tags", strings.Join(append(append([]string(nil), opts.Tags...), InProcTag), ",")}
		if opts.Race {
			args = append(args, "-race")
		}
		if err := goBuild(ctx, goBin, root, append(args, Commands["ota-net"])); err != nil {
			return nil, err
		}
	}
	return b, nil
}

func goBuild(ctx context.Context, goBin, root string, args []string) error {
	cmd := exec.CommandContext(ctx, goBin, args...)
	cmd.Dir = root
	var out bytes.Buffer
	cmd.Stdout, cmd.Stderr = &out, &out
	if err := cmd.Run(); err != nil {
		return fmt.Errorf("go %s: %w\n%s", strings.Join(args, " "), err, out.String())
	}
	return nil
}

// ModuleRoot is the directory of the go.mod governing the working directory.
func ModuleRoot(ctx context.Context) (string, error) {
	goBin, err := goTool()
	if err != nil {
		return "", err
	}
	out, err := exec.CommandContext(ctx, goBin, "env", "GOMOD").Output()
	if err != nil {
		return "", fmt.Errorf("go env GOMOD: %w", err)
	}
	mod := strings.TrimSpace(string(out))
	if mod == "" || mod == os.DevNull {
		return "", fmt.Errorf("not inside a Go module (run from the gwota checkout)")
	}
	return filepath.Dir(mod), nil
}

// goTool finds the go command: PATH first, then the toolchain that built this program.
func goTool() (string, error) {
	if p, err := exec.LookPath("go"); err == nil {
		return p, nil
	}
	p := filepath.Join(runtime.GOROOT(), "bin", "go")
	if _, err := os.Stat(p); err != nil {
		return "", fmt.Errorf("go command not found in PATH or %s", p)
	}
	return p, nil
}

func btoi(b bool) int {
	if b {
		return 1
	}
	return 0
}

func copyFile(src, dst string) error {
	b, err := os.ReadFile(src)
	if err != nil {
		return err
	}
	return os.WriteFile(dst, b, 0o755)
}
