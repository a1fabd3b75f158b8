package manifest

import (
	"testing"

	"github.com/gwota/gwota/test/depcheck"
)

// TestLinkableByOTANet: ota-net may read chunk tables with this package, so it must not link
// what cmd/ota-net is forbidden to link (test/depcheck).
func TestLinkableByOTANet(t *testing.T) {
	const module = "github.com/gwota/gwota"
	depcheck.Checker{
		Package: module + "/writer/manifest",
		Forbidden: []string{
			module + "/writer/server", module + "/writer/engine", module + "/writer/target",
			module + "/writer/journal", module + "/writer/verify", module + "/writer/boot",
			module + "/writer/ext", module + "/writer/selftest", module + "/writer/config",
		},
		Required: []string{module + "/proto/ota/v1", "github.com/klauspost/compress/zstd"},
	}.Check(t)
}
