//go:build !gwota_crashpoints

package crashpoint

// Enabled says whether this binary was built with crash points.
const Enabled = false

// Hit does nothing in a normal build.
func Hit(string) {}
