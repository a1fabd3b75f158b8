package emulator_test

import (
	"context"
	"fmt"
	"os"
	"path/filepath"
	"time"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
)

// A test starts the emulator, queues a job for the default thing, points the device at
// BrokerURL and waits for the outcome.
func Example() {
	ctx := context.Background()
	e, err := emulator.Start(ctx, emulator.Options{Thing: "gw-01", Seed: 7})
	if err != nil {
		panic(err)
	}
	defer e.Close()

	dir, _ := os.MkdirTemp("", "example")
	defer os.RemoveAll(dir)
	img := filepath.Join(dir, "fw.img")
	os.WriteFile(img, make([]byte, 4096), 0o600)
	err = e.CreateJob(ctx, backend.JobSpec{
		JobID:     "ota-1",
		Protocols: []string{backend.ProtocolMQTT, backend.ProtocolHTTP},
		Files:     []backend.FileSpec{{LocalPath: img, DevicePath: "/opt/fw/gateway.img", Signature: []byte("made elsewhere")}},
	})
	if err != nil {
		panic(err)
	}
	// Drop a fifth of the stream's blocks; the device must re-request them.
	e.SetFaults("ota-1", emulator.Faults{Drop: 0.2})

	// ... run the device against e.BrokerURL() ...

	wctx, cancel := context.WithTimeout(ctx, time.Second)
	defer cancel()
	x, _ := e.WaitStatus(wctx, "ota-1", backend.StatusQueued)
	fmt.Println(x.JobID, x.Status, x.VersionNumber)
	// Output: ota-1 QUEUED 1
}
