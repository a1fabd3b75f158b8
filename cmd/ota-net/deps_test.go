package main

import (
	"testing"

	"github.com/gwota/gwota/test/depcheck"
)

// ota-net parses internet input: it must never link the writer's privileged code (nor a test
// broker). Every listed package must exist, so a rename cannot silently empty the check.
func TestNoPrivilegedDeps(t *testing.T) {
	depcheck.Checker{
		Package: ".",
		Forbidden: []string{
			"github.com/gwota/gwota/writer/server", "github.com/gwota/gwota/writer/engine",
			"github.com/gwota/gwota/writer/target", "github.com/gwota/gwota/writer/boot",
			"github.com/gwota/gwota/writer/journal", "github.com/mochi-mqtt/server/v2",
		},
		Required: []string{"github.com/gwota/gwota/writer/client"},
	}.Check(t)
}
