//go:build !race

package harness

// RaceEnabled says this program was built with -race (tests then build the binaries with it).
const RaceEnabled = false
