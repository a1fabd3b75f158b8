//go:build gwota_crashpoints

package crashpoint

import (
	"fmt"
	"os"
	"strconv"
	"strings"
	"sync"
	"syscall"
)

// Enabled says whether this binary was built with crash points.
const Enabled = true

var (
	once   sync.Once
	point  string
	nth    = 1
	marker string

	mu   sync.Mutex
	hits int
)

func load() {
	spec := os.Getenv("GWOTA_CRASHPOINT")
	marker = os.Getenv("GWOTA_CRASHPOINT_FILE")
	if i := strings.LastIndexByte(spec, '#'); i >= 0 {
		if n, err := strconv.Atoi(spec[i+1:]); err == nil && n > 0 {
			nth = n
		}
		spec = spec[:i]
	}
	point = spec
}

// Hit kills this process with SIGKILL when name is the configured point, on its n-th hit,
// once per marker file.
func Hit(name string) {
	once.Do(load)
	if point == "" || name != point || marker == "" {
		return
	}
	mu.Lock()
	hits++
	h := hits
	mu.Unlock()
	if h != nth {
		return
	}
	f, err := os.OpenFile(marker, os.O_WRONLY|os.O_CREATE|os.O_EXCL, 0o600)
	if err != nil {
		return // fired already in an earlier run of this process
	}
	fmt.Fprintf(f, "%s %d\n", name, os.Getpid())
	f.Sync()
	f.Close()
	syscall.Kill(os.Getpid(), syscall.SIGKILL)
	select {} // never returns: the kill is asynchronous only in theory
}
