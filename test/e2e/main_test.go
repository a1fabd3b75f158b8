// Package e2e runs ota-net and ota-writer as real processes, built once per test binary by the
// harness, against the AWS IoT emulator on its embedded mochi broker and on mosquitto started
// as a separate process (and against real AWS IoT when test/awsbackend says it is configured).
// Every test asserts the exact sequence of status updates the cloud recorded (status,
// self_test, reason, error_code) and the device's slots and boot state afterwards.
package e2e

import (
	"context"
	"flag"
	"fmt"
	"os"
	"testing"
	"time"

	"github.com/gwota/gwota/test/harness"
)

// bin holds the binaries built by TestMain.
var bin *harness.Binaries

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	flag.Parse()
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	start := time.Now()
	b, err := harness.Build(ctx, harness.BuildOptions{Race: harness.RaceEnabled})
	if err != nil {
		fmt.Fprintf(os.Stderr, "e2e: building the binaries failed:\n%v\n", err)
		return 1
	}
	defer os.RemoveAll(b.Dir)
	if testing.Verbose() {
		fmt.Fprintf(os.Stderr, "e2e: built ota-writer and ota-net (race=%v) in %s\n", b.Race, time.Since(start).Round(time.Millisecond))
	}
	bin = b
	return m.Run()
}
