package e2e

import (
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/harness"
)

// Device credentials for the real-AWS run (the thing's certificate and key as AWS IoT issued
// them; the CA defaults to the system roots).
const (
	envDeviceCert = "OTA_AWS_DEVICE_CERT"
	envDeviceKey  = "OTA_AWS_DEVICE_KEY"
	envDeviceCA   = "OTA_AWS_DEVICE_CA"
)

func getenv(k string) string { return os.Getenv(k) }

// awsHappyPath is TestHappyPath against any backend.Backend (real AWS here): only what the
// Backend interface offers, and the device's own state.
func awsHappyPath(t *testing.T, ctx context.Context, b backend.Backend, cert, key, ca string) {
	dir, err := os.MkdirTemp("", "e2eaws")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(dir) })
	signer, err := harness.NewSigner("e2e-aws-signer")
	if err != nil {
		t.Fatal(err)
	}
	dev, err := harness.NewDevice(bin, harness.DeviceOptions{
		Dir: dir, Thing: b.ThingName(), BrokerURL: b.BrokerURL(),
		CertFile: cert, KeyFile: key, CAFile: ca,
		Trusted: []*harness.Signer{signer},
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			t.Log(dev.Logs())
		}
		_ = dev.Close(false)
	})
	dctx, cancel := dev.Context(ctx)
	defer cancel()
	img := filepath.Join(dir, "v2.img")
	if err := harness.WriteImage(img, smallImage, 2); err != nil {
		t.Fatal(err)
	}
	if err := dev.Start(dctx); err != nil {
		t.Fatal(err)
	}
	jobID := "gwota-e2e-" + filepath.Base(dir)
	if err := b.CreateJob(dctx, backend.JobSpec{JobID: jobID, Protocols: []string{backend.ProtocolMQTT}, Files: []backend.FileSpec{signer.File(img)}}); err != nil {
		t.Fatal(err)
	}
	ex, err := b.WaitStatus(dctx, jobID, terminal...)
	if err != nil {
		t.Fatalf("%v (cause %v)", err, context.Cause(dctx))
	}
	if ex.Status != backend.StatusSucceeded || ex.StatusDetails["self_test"] != "accepted" {
		t.Fatalf("final %s %v, want SUCCEEDED accepted", ex.Status, ex.StatusDetails)
	}
	// Polling may miss short states; what it saw must be in order and end accepted.
	got := harness.Steps(b.Updates(jobID))
	order := map[harness.Step]int{receiving: 0, ready: 1, active: 2, accepted: 3}
	last := -1
	for _, s := range got {
		i, ok := order[s]
		if !ok || i < last {
			t.Fatalf("observed steps %v: %v out of place", got, s)
		}
		last = i
	}
}
