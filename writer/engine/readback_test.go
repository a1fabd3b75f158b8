package engine

import (
	"os"
	"path/filepath"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/target/targettest"
)

// finishAfterMediumChange writes img through the engine with every block durable, lets change
// alter the medium underneath (not through the writer's page cache), checks the cache still
// holds the written bytes at the changed offset, and returns what FinishSession says.
func finishAfterMediumChange(t *testing.T, r *rig, img image, fileType int32, cachePath func() string, change func(off int64, b []byte)) error {
	t.Helper()
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, fileType, nil)).Session
	writeAll(t, r, s.SessionId, img, 4096)
	const off = 5 * 4096
	bad := []byte{img.data[off] ^ 0x01}
	change(off, bad)
	targettest.Cached(t, cachePath(), off, img.data[off:off+1])
	_, err := r.e.Finish(ctx, s.SessionId)
	return err
}

// TestVerifyReadsTheDevice is the read-back on a block device: the image is written through
// the writer onto a loop device and made durable, then one byte of the loop device's backing
// file changes. /dev/loopN's page cache still holds the signed image; verification must read
// the device and refuse it.
func TestVerifyReadsTheDevice(t *testing.T) {
	dev, backing := targettest.Loop(t, 2<<20)
	r := newRig(t, func(c *config.Config) {
		c.Targets[0].Slots[1] = dev
		c.Targets[0].MaxSize = 0
	})
	img := newImage(t, 1<<20+777)
	err := finishAfterMediumChange(t, r, img, 0, func() string { return dev }, func(off int64, b []byte) {
		targettest.Overwrite(t, backing, off, b)
	})
	wantReason(t, err, otav1.Reason_REASON_SIG_CHECK_FAILED)
}

// TestVerifyReadsTheDisk is the read-back of files: A/B slot files and a file target's
// temporary file on ext4, one byte of which changes on the disk underneath after the writes.
// The file's page cache still holds the signed image; verification must read the disk.
func TestVerifyReadsTheDisk(t *testing.T) {
	mnt, backing := targettest.Ext4(t, 32<<20)
	slots := []string{filepath.Join(mnt, "a.img"), filepath.Join(mnt, "b.img")}
	for _, s := range slots {
		os.WriteFile(s, nil, 0o600)
	}
	os.Mkdir(filepath.Join(mnt, "app"), 0o755)
	reserve := uint64(1 << 20) // the 32 MiB filesystem is smaller than the default reserve
	r := newRig(t, func(c *config.Config) {
		c.Targets[0].Slots = slots
		c.Targets[1].Path = filepath.Join(mnt, "app", "bundle.tar")
		c.FreeSpaceReserve = &reserve
	})
	change := func(p func() string) func(int64, []byte) {
		return func(off int64, b []byte) { targettest.Overwrite(t, backing, targettest.PhysicalOffset(t, p(), off), b) }
	}
	t.Run("ab slot file", func(t *testing.T) {
		p := func() string { return slots[1] }
		err := finishAfterMediumChange(t, r, newImage(t, 1<<20+777), 0, p, change(p))
		wantReason(t, err, otav1.Reason_REASON_SIG_CHECK_FAILED)
	})
	t.Run("file target", func(t *testing.T) {
		p := func() string { return r.e.byName["app"].TempPath() }
		err := finishAfterMediumChange(t, r, newImage(t, 512<<10+99), 1, p, change(p))
		wantReason(t, err, otav1.Reason_REASON_SIG_CHECK_FAILED)
	})
}
