package target

// SetNoDirect makes ReadBack take its fallback (drop the cache, read through it) for a test.
func SetNoDirect(v bool) (restore func()) {
	old := noDirect
	noDirect = v
	return func() { noDirect = old }
}
