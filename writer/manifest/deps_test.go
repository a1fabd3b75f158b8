package manifest

import (
	"testing"

	"github.com/gwota/gwota/test/deptest"
)

// TestLinkableByOTANet: ota-net may read chunk tables with this package, so it must not link
// what cmd/ota-net is forbidden to link (test/deptest).
func TestLinkableByOTANet(t *testing.T) {
	const module = "github.com/gwota/gwota"
	const privileged = "the writer's privileged code: ota-net parses internet input"
	bad := map[string]string{}
	for _, p := range []string{"server", "engine", "target", "journal", "verify", "boot", "ext", "selftest", "config", "internal"} {
		bad[module+"/writer/"+p] = privileged
	}
	deptest.DepChecker{
		Package: module + "/writer/manifest",
		BadDeps: bad,
		WantDeps: map[string]string{
			module + "/proto/ota/v1":             "the manifest format",
			"github.com/klauspost/compress/zstd": "the chunks' compression",
		},
	}.Check(t)
}
