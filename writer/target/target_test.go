package target

import (
	"bytes"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"strings"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/config"
)

func mkfile(t *testing.T, p string, size int64) {
	t.Helper()
	f, err := os.Create(p)
	if err != nil {
		t.Fatal(err)
	}
	defer f.Close()
	if err := f.Truncate(size); err != nil {
		t.Fatal(err)
	}
}

func abTarget(t *testing.T, a, b string, maxSize uint64) *Target {
	return New(config.Target{Name: "rootfs", Kind: config.KindAB, FileTypes: []int32{0}, Slots: []string{a, b}, MaxSize: maxSize})
}

func reason(err error) otav1.Reason { return status.ReasonOf(err) }

func TestABRegularFiles(t *testing.T) {
	dir := t.TempDir()
	a, b := filepath.Join(dir, "a.img"), filepath.Join(dir, "b.img")
	mkfile(t, a, 1<<20)
	mkfile(t, b, 1<<20)
	tg := abTarget(t, a, b, 4<<20)

	if _, err := tg.Open("a", "a", 4096, true); reason(err) != otav1.Reason_REASON_BAD_IMAGE_STATE {
		t.Fatalf("opening the running slot: got %v", err)
	}
	if _, err := tg.Open("x", "b", 4096, true); reason(err) != otav1.Reason_REASON_BAD_IMAGE_STATE {
		t.Fatalf("unknown running slot: got %v", err)
	}
	if _, err := tg.Open("a", "b", 4<<20+1, true); reason(err) != otav1.Reason_REASON_FILE_TOO_LARGE {
		t.Fatalf("over max_size: got %v", err)
	}
	if s, _ := tg.Inactive("b"); s != "a" {
		t.Fatalf("inactive of b = %q", s)
	}
	// A regular-file slot smaller than the image grows; one larger is never truncated.
	m, err := tg.Open("a", "b", 2<<20, true)
	if err != nil {
		t.Fatal(err)
	}
	data := make([]byte, 8192)
	rand.Read(data)
	if _, err := m.WriteAt(data, 2<<20-8192); err != nil {
		t.Fatal(err)
	}
	if err := m.Sync(); err != nil {
		t.Fatal(err)
	}
	got := make([]byte, len(data))
	rb, err := m.ReadBack()
	if err != nil {
		t.Fatal(err)
	}
	if _, err := rb.ReadAt(got, 2<<20-8192); err != nil || !bytes.Equal(got, data) {
		t.Fatalf("read back: %v", err)
	}
	rb.Close()
	m.Close()
	m, err = tg.Open("a", "b", 4096, true)
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
	if fi, _ := os.Stat(b); fi.Size() != 2<<20 {
		t.Fatalf("slot b is %d bytes after a smaller image, want 2 MiB kept", fi.Size())
	}
	if fi, _ := os.Stat(a); fi.Size() != 1<<20 {
		t.Fatalf("slot a changed: %d", fi.Size())
	}
}

func TestSlotKinds(t *testing.T) {
	dir := t.TempDir()
	a := filepath.Join(dir, "a.img")
	mkfile(t, a, 4096)
	for _, tc := range []struct {
		name, slotB string
		want        otav1.Reason
	}{
		{"missing", filepath.Join(dir, "none"), otav1.Reason_REASON_FILE_WRITE_FAILED},
		{"char device", "/dev/null", otav1.Reason_REASON_UNSUPPORTED},
		{"directory", dir, otav1.Reason_REASON_UNSUPPORTED},
	} {
		t.Run(tc.name, func(t *testing.T) {
			_, err := abTarget(t, a, tc.slotB, 0).Open("a", "b", 4096, true)
			if reason(err) != tc.want {
				t.Fatalf("got %v, want %s", err, tc.want)
			}
		})
	}
}

func TestFileTarget(t *testing.T) {
	dir := t.TempDir()
	dest := filepath.Join(dir, "bundle.tar")
	os.WriteFile(dest, []byte("old"), 0o644)
	tg := New(config.Target{Name: "app", Kind: config.KindFile, FileTypes: []int32{1}, Path: dest, MaxSize: 1 << 20})
	if _, err := tg.Open("", FileSlot, 1<<20+1, true); reason(err) != otav1.Reason_REASON_FILE_TOO_LARGE {
		t.Fatalf("over max_size: %v", err)
	}
	m, err := tg.Open("", FileSlot, 5, true)
	if err != nil {
		t.Fatal(err)
	}
	if filepath.Dir(m.Path()) != dir || !strings.HasSuffix(m.Path(), ".ota-new") {
		t.Fatalf("temp file %s not beside the destination", m.Path())
	}
	m.WriteAt([]byte("new!!"), 0)
	if b, _ := os.ReadFile(dest); string(b) != "old" {
		t.Fatalf("destination touched before install: %q", b)
	}
	m.Close()
	// Resume keeps what was written; a fresh open starts over.
	m, err = tg.Open("", FileSlot, 5, false)
	if err != nil {
		t.Fatal(err)
	}
	if err := tg.Install(m); err != nil {
		t.Fatal(err)
	}
	if b, _ := os.ReadFile(dest); string(b) != "new!!" {
		t.Fatalf("destination after install: %q", b)
	}
	if _, err := os.Stat(tg.TempPath()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("temp file left: %v", err)
	}
	m, _ = tg.Open("", FileSlot, 5, true)
	m.Close()
	if err := tg.Discard(); err != nil {
		t.Fatal(err)
	}
	if _, err := os.Stat(tg.TempPath()); !errors.Is(err, os.ErrNotExist) {
		t.Fatalf("temp file left after discard: %v", err)
	}
	if b, _ := os.ReadFile(dest); string(b) != "new!!" {
		t.Fatalf("destination after discard: %q", b)
	}
}

func TestFileTargetMissingDir(t *testing.T) {
	tg := New(config.Target{Name: "app", Kind: config.KindFile, FileTypes: []int32{1}, Path: filepath.Join(t.TempDir(), "no", "x")})
	if _, err := tg.Open("", FileSlot, 5, true); reason(err) != otav1.Reason_REASON_FILE_WRITE_FAILED {
		t.Fatalf("got %v", err)
	}
}
