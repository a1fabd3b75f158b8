package main

import (
	"os/exec"
	"strings"
	"testing"
)

// ota-net parses internet input: it must never link the writer's privileged code (nor a test
// broker).
func TestNoPrivilegedDeps(t *testing.T) {
	out, err := exec.Command("go", "list", "-deps", ".").Output()
	if err != nil {
		t.Fatal(err)
	}
	for _, dep := range strings.Fields(string(out)) {
		for _, bad := range []string{
			"github.com/gwota/gwota/writer/server", "github.com/gwota/gwota/writer/engine",
			"github.com/gwota/gwota/writer/target", "github.com/gwota/gwota/writer/boot",
			"github.com/gwota/gwota/writer/journal", "github.com/mochi-mqtt/",
		} {
			if strings.HasPrefix(dep, bad) {
				t.Errorf("ota-net links %s", dep)
			}
		}
	}
}
