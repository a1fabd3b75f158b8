// Package depcheck proves the privilege split at link time: the network agent never links the
// writer's server-side code, and the writer never links MQTT code (nor the network agent).
//
// Checker is the check itself, also used by cmd/ota-net. Every package it lists, forbidden or
// required, must exist: a renamed or removed package would otherwise turn a check into one
// that passes without checking anything (tailscale's deptest.DepChecker fails the same way).
package depcheck

import (
	"bytes"
	"context"
	"fmt"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// Checker checks the packages linked into one package (a binary).
type Checker struct {
	// Dir is where go list runs (inside the module); "" is the current directory.
	Dir string
	// Package is the import path (or ".") whose linked packages are checked.
	Package string
	// Forbidden: packages that must not be linked. An entry stands for itself and everything
	// below it ("github.com/eclipse/paho.golang" is the whole module).
	Forbidden []string
	// Required: packages that must be linked (same matching): they show that the list of
	// linked packages is the real one and the check is not vacuous.
	Required []string
}

// Problems returns every problem found, empty when the check passes.
func (c Checker) Problems(ctx context.Context) []string {
	if c.Package == "" {
		return []string{"depcheck: no package to check"}
	}
	if len(c.Forbidden) == 0 {
		return []string{fmt.Sprintf("depcheck %s: no forbidden packages listed", c.Package)}
	}
	var problems []string
	// Existence first: a listed package that no longer exists is a failure, never a skip.
	listed := slices.Concat(c.Forbidden, c.Required)
	patterns := make([]string, len(listed))
	for i, p := range listed {
		patterns[i] = p + "/..." // p itself and everything below it
	}
	known, err := c.goList(ctx, append([]string{"-e", "-f", "{{.ImportPath}}"}, patterns...)...)
	if err != nil {
		return []string{err.Error()}
	}
	for _, p := range listed {
		if !slices.ContainsFunc(known, func(k string) bool { return under(k, p) }) {
			kind := "forbidden"
			if slices.Contains(c.Required, p) {
				kind = "required"
			}
			problems = append(problems, fmt.Sprintf("%s: %s package %s does not exist (renamed or removed? update the list)", c.Package, kind, p))
		}
	}
	deps, err := c.goList(ctx, "-deps", c.Package)
	if err != nil {
		return append(problems, err.Error())
	}
	for _, d := range deps {
		for _, f := range c.Forbidden {
			if under(d, f) {
				problems = append(problems, fmt.Sprintf("%s links %s (forbidden: %s)", c.Package, d, f))
			}
		}
	}
	for _, r := range c.Required {
		if !slices.ContainsFunc(deps, func(d string) bool { return under(d, r) }) {
			problems = append(problems, fmt.Sprintf("%s does not link %s, which it must", c.Package, r))
		}
	}
	return problems
}

// Check reports every problem as a test error.
func (c Checker) Check(t testing.TB) {
	t.Helper()
	for _, p := range c.Problems(t.Context()) {
		t.Error(p)
	}
}

// under reports whether pkg is p or below it.
func under(pkg, p string) bool { return pkg == p || strings.HasPrefix(pkg, p+"/") }

func (c Checker) goList(ctx context.Context, args ...string) ([]string, error) {
	cmd := exec.CommandContext(ctx, "go", append([]string{"list"}, args...)...)
	cmd.Dir = c.Dir
	var stderr bytes.Buffer
	cmd.Stderr = &stderr
	out, err := cmd.Output()
	if err != nil {
		return nil, fmt.Errorf("go list %s: %v\n%s", strings.Join(args, " "), err, stderr.Bytes())
	}
	return strings.Fields(string(out)), nil
}
