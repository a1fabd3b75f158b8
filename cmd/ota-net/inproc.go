//go:build gwota_inproc

// The benchmark build of ota-net: `go build -tags gwota_inproc ./cmd/ota-net` links the
// writer engine into ota-net behind the same api.Writer (writerlink.Local) in place of
// writer/client over the socket, so test/bench/linkbench can price the gRPC hop end to end
// (time to ready, goodput) against an agent that is otherwise this very one: same
// configuration, same serve. It must run as the writer would (it owns the slots and the trust
// store) and breaks the privilege split by construction: benchmarks only, never deployed
// (deploy/ and scripts build without the tag; test/deptest checks the default build).
package main

import (
	"context"
	"fmt"
	"os"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/netagent/writerlink"
	"github.com/gwota/gwota/writer/assemble"
	"github.com/gwota/gwota/writer/config"
)

// EnvInProcWriterConfig names the writer configuration the benchmark build serves
// in-process (as `ota-writer serve --config` would; its socket is not used).
const EnvInProcWriterConfig = "GWOTA_INPROC_WRITER_CONFIG"

func init() {
	dialWriter = func(ctx context.Context, _ Config, lc writerlink.Config, log hclog.Logger) (*writerlink.Link, error) {
		path := os.Getenv(EnvInProcWriterConfig)
		if path == "" {
			return nil, fmt.Errorf("the in-process build needs %s (the writer configuration)", EnvInProcWriterConfig)
		}
		wcfg, err := config.Load(path)
		if err != nil {
			return nil, err
		}
		// As ota-writer serve: this start is the writer's, so the file boot backend takes
		// its simulated boot here.
		eng, err := assemble.NewEngine(ctx, wcfg, log.Named("ota-writer"), true)
		if err != nil {
			return nil, err
		}
		log.Warn("benchmark build: the writer engine runs inside ota-net (no privilege split)", "writer_config", path)
		l, err := writerlink.New(ctx, writerlink.Local(eng), lc)
		if err != nil {
			eng.Close()
			return nil, err
		}
		return l, nil
	}
}
