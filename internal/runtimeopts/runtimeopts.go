// Package runtimeopts is the Go runtime configuration of both processes. cmd/ota-net and
// cmd/ota-writer apply it at start, and so does the stream benchmark's downloader, so that
// measurements run as the agent does.
package runtimeopts

import (
	"runtime"
	"runtime/debug"
)

// MemoryLimit is the soft heap limit when GOMEMLIMIT is not set. Downloads churn through
// short-lived block buffers (paho allocates about 3.6 bytes per byte received); without a
// limit the Go runtime lets garbage grow with the heap target and peak RSS creeps past 25 MiB
// on large images. The writer's block messages are as short-lived: at 12 MiB (with the sized
// receive pool of writer/server) a serving writer peaked at 21.2..21.8 MiB from 16 to 256 MiB
// images, at the same throughput (scripts/bench-stream.sh -only real).
const MemoryLimit = 12 << 20

// Procs is GOMAXPROCS when the GOMAXPROCS variable is not set. ota-net is I/O bound and runs
// beside the gateway's own workload: with one P its goroutine hand-offs (MQTT receive,
// downloader, writer link) stay on one thread instead of waking others across cores. Measured
// on 2 cores (scripts/bench-stream.sh): about 30 % less CPU per downloaded byte and 5 MiB less
// peak RSS (fewer threads and per-P caches), no loss of throughput. The writer serves one
// block stream at a time and nothing in it runs in parallel (the read-back overlaps hashing
// through a blocking read; chunks decode with one goroutine); with a P per core its runtime
// woke a second thread on every block message: over HTTP on the LAN a 64 MiB download cost
// the writer 0.56 s of CPU and took 1.85x the time to ready of ota-net with the writer linked
// in, with one P 0.29-0.32 s and 1.32-1.47x (linkbench hop cells, alternately, quiet machine).
const Procs = 1

// Apply sets the memory limit and GOMAXPROCS, each unless its environment variable is set
// (getenv is os.Getenv). It returns what it set, for the log.
func Apply(getenv func(string) string) (memoryLimit int64, procs int) {
	memoryLimit, procs = -1, runtime.GOMAXPROCS(0)
	if getenv("GOMEMLIMIT") == "" {
		debug.SetMemoryLimit(MemoryLimit)
		memoryLimit = MemoryLimit
	}
	if getenv("GOMAXPROCS") == "" {
		runtime.GOMAXPROCS(Procs)
		procs = Procs
	}
	return memoryLimit, procs
}
