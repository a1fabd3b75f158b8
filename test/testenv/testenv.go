// Package testenv is the one place a test states what it needs from the machine (a tool, root,
// FUSE, a package). Outside CI a missing prerequisite skips the test; under CI (CI=true) it
// fails it, because scripts/test.sh installs everything and runs as root there, so a skip
// would hide a test that never ran.
package testenv

import (
	"fmt"
	"os"
	"os/exec"
	"testing"
)

// InCI says whether the tests run under CI (CI=true), where nothing may be skipped for want
// of a prerequisite.
func InCI() bool { return os.Getenv("CI") == "true" }

// Need skips t when err is not nil, or fails it under CI. err says what is missing.
func Need(t testing.TB, err error) {
	t.Helper()
	if err == nil {
		return
	}
	if InCI() {
		t.Fatalf("prerequisite missing under CI (scripts/test.sh installs it and runs as root): %v", err)
		return
	}
	t.Skip(err)
}

// Needf is Need with a message, when ok is false.
func Needf(t testing.TB, ok bool, format string, args ...any) {
	t.Helper()
	if !ok {
		Need(t, fmt.Errorf(format, args...))
	}
}

// NeedTools needs every named command on PATH (or in /usr/sbin, where Debian puts some).
func NeedTools(t testing.TB, names ...string) {
	t.Helper()
	for _, n := range names {
		Need(t, LookTool(n))
	}
}

// LookTool finds a command on PATH or in /usr/sbin.
func LookTool(name string) error {
	if _, err := exec.LookPath(name); err == nil {
		return nil
	}
	if st, err := os.Stat("/usr/sbin/" + name); err == nil && st.Mode()&0o111 != 0 {
		return nil
	}
	return fmt.Errorf("%s is not installed", name)
}

// NeedRoot needs the test process to run as root; why says what for.
func NeedRoot(t testing.TB, why string) {
	t.Helper()
	Needf(t, os.Geteuid() == 0, "needs root: %s", why)
}
