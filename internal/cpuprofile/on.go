//go:build gwota_pprof

package cpuprofile

import (
	"fmt"
	"os"
	"path/filepath"
	"runtime/pprof"
)

// Enabled says whether this binary was built with the profiler.
const Enabled = true

// Env names the directory profiles are written to; unset: no profile.
const Env = "GWOTA_CPUPROFILE"

// Start begins a CPU profile into $GWOTA_CPUPROFILE/name-PID.prof; call the returned stop
// before the process exits (a process killed with SIGKILL leaves an unusable file).
func Start(name string) func() {
	dir := os.Getenv(Env)
	if dir == "" {
		return func() {}
	}
	f, err := os.Create(filepath.Join(dir, fmt.Sprintf("%s-%d.prof", name, os.Getpid())))
	if err != nil {
		fmt.Fprintln(os.Stderr, "cpuprofile:", err)
		return func() {}
	}
	if err := pprof.StartCPUProfile(f); err != nil {
		fmt.Fprintln(os.Stderr, "cpuprofile:", err)
		f.Close()
		return func() {}
	}
	return func() {
		pprof.StopCPUProfile()
		f.Close()
	}
}
