//go:build !gwota_pprof

// Package cpuprofile lets a benchmark profile the real ota-net and ota-writer processes: built
// with the gwota_pprof tag (test/bench/httpvscurl -cpuprofile), a process writes a CPU profile
// of its whole run into the directory named by GWOTA_CPUPROFILE. A normal build has none of it.
package cpuprofile

// Enabled says whether this binary was built with the profiler.
const Enabled = false

// Start does nothing in a normal build; the returned stop does nothing either.
func Start(string) func() { return func() {} }
