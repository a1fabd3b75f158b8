// Package deptest proves the privilege split at link time: the network agent never links the
// writer's privileged code, and the writer never links MQTT code (nor the network agent). The
// checks of both binaries are in this package's TestSplit.
//
// DepChecker is the check itself (after tailscale's deptest.DepChecker). Every package it
// lists, forbidden or required, must exist: a renamed or removed package would otherwise turn
// a check into one that passes without checking anything.
package deptest

import (
	"bytes"
	"context"
	"fmt"
	"maps"
	"os/exec"
	"slices"
	"strings"
	"testing"
)

// DepChecker checks the packages linked into one package (a binary).
type DepChecker struct {
	// Dir is where go list runs (inside the module); "" is the current directory.
	Dir string
	// Package is the import path (or ".") whose linked packages are checked.
	Package string
	// BadDeps: packages that must not be linked, each with why. An entry stands for itself
	// and everything below it ("github.com/eclipse/paho.golang" is the whole module).
	BadDeps map[string]string
	// WantDeps: packages that must be linked (same matching), each with why: they show that
	// the list of linked packages is the real one and the check is not vacuous.
	WantDeps map[string]string
}

// Problems returns every problem found, empty when the check passes.
func (c DepChecker) Problems(ctx context.Context) []string {
	if c.Package == "" {
		return []string{"deptest: no package to check"}
	}
	if len(c.BadDeps) == 0 {
		return []string{fmt.Sprintf("deptest %s: no forbidden packages listed", c.Package)}
	}
	var problems []string
	bad, want := slices.Sorted(maps.Keys(c.BadDeps)), slices.Sorted(maps.Keys(c.WantDeps))
	// Existence first: a listed package that no longer exists is a failure, never a skip.
	listed := slices.Concat(bad, want)
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
			if _, ok := c.WantDeps[p]; ok {
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
		for _, f := range bad {
			if under(d, f) {
				problems = append(problems, fmt.Sprintf("%s links %s (forbidden: %s: %s)", c.Package, d, f, c.BadDeps[f]))
			}
		}
	}
	for _, r := range want {
		if !slices.ContainsFunc(deps, func(d string) bool { return under(d, r) }) {
			problems = append(problems, fmt.Sprintf("%s does not link %s, which it must: %s", c.Package, r, c.WantDeps[r]))
		}
	}
	return problems
}

// Check reports every problem as a test error.
func (c DepChecker) Check(t testing.TB) {
	t.Helper()
	for _, p := range c.Problems(t.Context()) {
		t.Error(p)
	}
}

// under reports whether pkg is p or below it.
func under(pkg, p string) bool { return pkg == p || strings.HasPrefix(pkg, p+"/") }

func (c DepChecker) goList(ctx context.Context, args ...string) ([]string, error) {
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
