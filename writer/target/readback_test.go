package target_test

import (
	"bytes"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/target"
	"github.com/gwota/gwota/writer/target/targettest"
)

// readBack reads n bytes at off through m.ReadBack.
func readBack(t *testing.T, m target.Medium, off int64, n int, wantDirect bool) []byte {
	t.Helper()
	rb, err := m.ReadBack()
	if err != nil {
		t.Fatal(err)
	}
	defer rb.Close()
	if rb.Direct() != wantDirect {
		t.Fatalf("read-back direct = %v, want %v", rb.Direct(), wantDirect)
	}
	got := make([]byte, n)
	if _, err := rb.ReadAt(got, off); err != nil {
		t.Fatal(err)
	}
	return got
}

// checkReadBack writes data through m at off, changes the medium underneath (change: a write
// that does not pass through m's page cache), checks that a buffered read still sees data (the
// cache is stale) and that the read-back sees the new bytes, with O_DIRECT and with the
// fallback.
func checkReadBack(t *testing.T, open func() target.Medium, cachePath string, change func(data []byte)) {
	for _, tc := range []struct {
		name   string
		direct bool
	}{{"O_DIRECT", true}, {"drop cache", false}} {
		t.Run(tc.name, func(t *testing.T) {
			defer target.SetNoDirect(!tc.direct)()
			m := open()
			defer m.Close()
			const off = 3 * 4096
			data := make([]byte, 3*4096+1234) // ends within a block: the reader's unaligned path
			rand.Read(data)
			if _, err := m.WriteAt(data, off); err != nil {
				t.Fatal(err)
			}
			if err := m.Sync(); err != nil {
				t.Fatal(err)
			}
			if got := readBack(t, m, off, len(data), tc.direct); !bytes.Equal(got, data) {
				t.Fatal("read-back differs from what was written before the medium changed")
			}
			bad := bytes.Clone(data)
			bad[len(bad)-1] ^= 0xFF
			bad[0] ^= 0xFF
			change(bad)
			targettest.Cached(t, cachePath, off, data)
			if got := readBack(t, m, off, len(data), tc.direct); !bytes.Equal(got, bad) {
				t.Fatal("read-back returned the page cache's bytes, not the medium's")
			}
		})
	}
}

// TestReadBackReachesLoopDevice: a block-device slot whose backing file changes after the
// writes. /dev/loopN's page cache keeps the written bytes; the read-back must not.
func TestReadBackReachesLoopDevice(t *testing.T) {
	dev, backing := targettest.Loop(t, 1<<20)
	a := filepath.Join(t.TempDir(), "a.img")
	os.WriteFile(a, nil, 0o600)
	tg := target.New(config.Target{Name: "rootfs", Kind: config.KindAB, FileTypes: []int32{0}, Slots: []string{a, dev}})
	open := func() target.Medium {
		m, err := tg.Open("a", "b", 1<<20, true)
		if err != nil {
			t.Fatal(err)
		}
		return m
	}
	checkReadBack(t, open, dev, func(data []byte) { targettest.Overwrite(t, backing, 3*4096, data) })
}

// TestReadBackReachesFileSystemDisk: a regular-file slot and a file target's temporary file on
// ext4, whose blocks change on the disk underneath (the loop device's backing file) after the
// writes. The file's page cache keeps the written bytes; the read-back must not.
func TestReadBackReachesFileSystemDisk(t *testing.T) {
	mnt, backing := targettest.Ext4(t, 32<<20)
	slot := filepath.Join(mnt, "b.img")
	os.WriteFile(slot, nil, 0o600)
	os.WriteFile(filepath.Join(mnt, "a.img"), nil, 0o600)
	ab := target.New(config.Target{Name: "rootfs", Kind: config.KindAB, FileTypes: []int32{0}, Slots: []string{filepath.Join(mnt, "a.img"), slot}})
	os.Mkdir(filepath.Join(mnt, "app"), 0o755)
	file := target.New(config.Target{Name: "app", Kind: config.KindFile, FileTypes: []int32{1}, Path: filepath.Join(mnt, "app", "bundle.tar")})
	for _, tc := range []struct {
		name string
		tg   *target.Target
		path string
		slot string
	}{
		{"ab slot file", ab, slot, "b"},
		{"file target", file, file.TempPath(), target.FileSlot},
	} {
		t.Run(tc.name, func(t *testing.T) {
			open := func() target.Medium {
				m, err := tc.tg.Open("a", tc.slot, 1<<20, true)
				if err != nil {
					t.Fatal(err)
				}
				return m
			}
			checkReadBack(t, open, tc.path, func(data []byte) {
				targettest.Overwrite(t, backing, targettest.PhysicalOffset(t, tc.path, 3*4096), data[:4096])
				targettest.Overwrite(t, backing, targettest.PhysicalOffset(t, tc.path, 6*4096), data[3*4096:])
			})
		})
	}
}

func TestLoopDeviceSlots(t *testing.T) {
	a, _ := targettest.Loop(t, 4<<20)
	b, _ := targettest.Loop(t, 4<<20)
	tg := target.New(config.Target{Name: "rootfs", Kind: config.KindAB, FileTypes: []int32{0}, Slots: []string{a, b}})
	if _, err := tg.Open("a", "b", 4<<20+512, true); status.ReasonOf(err) != otav1.Reason_REASON_FILE_TOO_LARGE {
		t.Fatalf("image larger than the device: got %v", err)
	}
	m, err := tg.Open("a", "b", 4<<20, true)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 65536)
	rand.Read(data)
	if _, err := m.WriteAt(data, 4<<20-65536); err != nil {
		t.Fatal(err)
	}
	if err := m.Sync(); err != nil {
		t.Fatal(err)
	}
	// While the writer holds it, nobody else can take the device exclusively (and a mounted
	// device could not have been opened at all).
	if f, err := os.OpenFile(b, os.O_RDWR|os.O_EXCL, 0); err == nil {
		f.Close()
		t.Fatal("second exclusive open of the slot succeeded")
	}
	m.Close()
	f, err := os.Open(b)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	got := make([]byte, 65536)
	if _, err := f.ReadAt(got, 4<<20-65536); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("device content differs: %v", err)
	}
}
