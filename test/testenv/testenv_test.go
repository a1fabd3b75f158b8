package testenv

import (
	"errors"
	"testing"
)

// recorder captures what Need does to a test instead of ending the real one.
type recorder struct {
	testing.TB
	fatal, skip bool
}

func (r *recorder) Helper()               {}
func (r *recorder) Fatalf(string, ...any) { r.fatal = true }
func (r *recorder) Skip(...any)           { r.skip = true }

// TestNeedFailsUnderCI: a missing prerequisite fails under CI=true and skips otherwise; a
// present one does neither.
func TestNeedFailsUnderCI(t *testing.T) {
	for _, tc := range []struct {
		ci          string
		err         error
		fatal, skip bool
	}{
		{"true", errors.New("x missing"), true, false},
		{"", errors.New("x missing"), false, true},
		{"false", errors.New("x missing"), false, true},
		{"true", nil, false, false},
		{"", nil, false, false},
	} {
		t.Setenv("CI", tc.ci)
		r := &recorder{TB: t}
		Need(r, tc.err)
		if r.fatal != tc.fatal || r.skip != tc.skip {
			t.Errorf("CI=%q err=%v: fatal=%v skip=%v, want fatal=%v skip=%v", tc.ci, tc.err, r.fatal, r.skip, tc.fatal, tc.skip)
		}
	}
}

func TestLookTool(t *testing.T) {
	if err := LookTool("sh"); err != nil {
		t.Errorf("sh: %v", err)
	}
	if err := LookTool("gwota-no-such-tool"); err == nil {
		t.Error("a missing tool was found")
	}
}
