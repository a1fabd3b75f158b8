// Package depcheck proves the privilege split at link time: the network agent never links the
// writer's server-side code, and the writer never links MQTT code (nor the network agent).
package depcheck

import (
	"os"
	"os/exec"
	"strings"
	"testing"
)

const module = "github.com/gwota/gwota"

func deps(t *testing.T, pkg string) []string {
	t.Helper()
	if _, err := os.Stat("../../" + strings.TrimPrefix(pkg, module+"/")); err != nil {
		t.Skipf("%s does not exist yet", pkg)
	}
	out, err := exec.Command("go", "list", "-deps", pkg).CombinedOutput()
	if err != nil {
		t.Fatalf("go list -deps %s: %v\n%s", pkg, err, out)
	}
	return strings.Fields(string(out))
}

func TestSplit(t *testing.T) {
	tests := []struct {
		binary    string
		forbidden []string
	}{
		{module + "/cmd/ota-net", []string{
			module + "/writer/server", module + "/writer/engine", module + "/writer/target",
			module + "/writer/journal", module + "/writer/verify", module + "/writer/boot",
			module + "/writer/ext", module + "/writer/selftest", module + "/writer/config",
		}},
		{module + "/cmd/ota-writer", []string{
			"github.com/eclipse/paho.golang", "github.com/mochi-mqtt/server/v2", module + "/netagent", "github.com/aws/aws-sdk-go-v2",
		}},
	}
	for _, tc := range tests {
		t.Run(tc.binary, func(t *testing.T) {
			for _, d := range deps(t, tc.binary) {
				for _, f := range tc.forbidden {
					if d == f || strings.HasPrefix(d, f+"/") {
						t.Errorf("%s links %s", tc.binary, d)
					}
				}
			}
		})
	}
}
