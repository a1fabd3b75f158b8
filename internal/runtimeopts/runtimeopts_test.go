package runtimeopts

import (
	"runtime"
	"runtime/debug"
	"testing"
)

func TestApply(t *testing.T) {
	oldProcs, oldLimit := runtime.GOMAXPROCS(0), debug.SetMemoryLimit(-1)
	t.Cleanup(func() { runtime.GOMAXPROCS(oldProcs); debug.SetMemoryLimit(oldLimit) })

	debug.SetMemoryLimit(1 << 40)
	runtime.GOMAXPROCS(2)
	lim, procs := Apply(func(string) string { return "" })
	if lim != MemoryLimit || debug.SetMemoryLimit(-1) != MemoryLimit {
		t.Errorf("memory limit %d, runtime %d; want %d", lim, debug.SetMemoryLimit(-1), MemoryLimit)
	}
	if procs != Procs || runtime.GOMAXPROCS(0) != Procs {
		t.Errorf("procs %d, runtime %d; want %d", procs, runtime.GOMAXPROCS(0), Procs)
	}

	// Variables set: the runtime already took them; Apply leaves both alone.
	debug.SetMemoryLimit(1 << 40)
	runtime.GOMAXPROCS(2)
	lim, procs = Apply(func(k string) string { return map[string]string{"GOMEMLIMIT": "1GiB", "GOMAXPROCS": "2"}[k] })
	if lim != -1 || debug.SetMemoryLimit(-1) != 1<<40 {
		t.Errorf("GOMEMLIMIT set: Apply returned %d, runtime limit %d", lim, debug.SetMemoryLimit(-1))
	}
	if procs != 2 || runtime.GOMAXPROCS(0) != 2 {
		t.Errorf("GOMAXPROCS set: Apply returned %d, runtime %d", procs, runtime.GOMAXPROCS(0))
	}
}
