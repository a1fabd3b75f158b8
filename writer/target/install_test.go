package target

import (
	"errors"
	"io/fs"
	"os"
	"path/filepath"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/config"
)

// verifiedTemp opens a file target in a new directory whose destination holds "old", writes
// and syncs "new!!" into the temporary file and reads it back as verification does.
func verifiedTemp(t *testing.T) (*Target, Medium, string) {
	t.Helper()
	dest := filepath.Join(t.TempDir(), "bundle.tar")
	os.WriteFile(dest, []byte("old"), 0o644)
	tg := New(config.Target{Name: "app", Kind: config.KindFile, FileTypes: []int32{1}, Path: dest})
	m, err := tg.Open("", FileSlot, 5, true)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := m.WriteAt([]byte("new!!"), 0); err != nil {
		t.Fatal(err)
	}
	rb, err := m.ReadBack()
	if err != nil {
		t.Fatal(err)
	}
	got := make([]byte, 5)
	if _, err := rb.ReadAt(got, 0); err != nil || string(got) != "new!!" {
		t.Fatalf("read back %q %v", got, err)
	}
	rb.Close()
	return tg, m, dest
}

func TestInstallModeAndContent(t *testing.T) {
	tg, m, dest := verifiedTemp(t)
	if err := tg.Install(m); err != nil {
		t.Fatal(err)
	}
	fi, err := os.Lstat(dest)
	if err != nil || !fi.Mode().IsRegular() || fi.Mode().Perm() != 0o644 {
		t.Fatalf("installed %v %v, want a regular file of mode 0644", fi.Mode(), err)
	}
	if b, _ := os.ReadFile(dest); string(b) != "new!!" {
		t.Fatalf("destination %q", b)
	}
}

// TestInstallSwappedAfterVerify: a file renamed over the temporary file's name after
// verification is not what gets installed.
func TestInstallSwappedAfterVerify(t *testing.T) {
	tg, m, dest := verifiedTemp(t)
	evil := filepath.Join(filepath.Dir(dest), "evil")
	os.WriteFile(evil, []byte("evil!"), 0o644)
	if err := os.Rename(evil, tg.TempPath()); err != nil {
		t.Fatal(err)
	}
	err := tg.Install(m)
	if reason(err) != otav1.Reason_REASON_FILE_CLOSE_FAILED {
		t.Errorf("install of a swapped file: got %v, want file_close_failed", err)
	}
	if b, _ := os.ReadFile(dest); string(b) != "old" {
		t.Fatalf("destination %q after the swap, want the old content kept", b)
	}
}

// TestInstallDoesNotFollowSymlink: a symbolic link put in the temporary file's place after
// verification neither gets the chmod (on the file it points to) nor is installed.
func TestInstallDoesNotFollowSymlink(t *testing.T) {
	tg, m, dest := verifiedTemp(t)
	secret := filepath.Join(t.TempDir(), "secret")
	os.WriteFile(secret, []byte("key"), 0o600)
	os.Remove(tg.TempPath())
	if err := os.Symlink(secret, tg.TempPath()); err != nil {
		t.Fatal(err)
	}
	if err := tg.Install(m); reason(err) != otav1.Reason_REASON_FILE_CLOSE_FAILED {
		t.Errorf("install over a symlink: got %v, want file_close_failed", err)
	}
	if fi, err := os.Stat(secret); err != nil || fi.Mode().Perm() != 0o600 {
		t.Fatalf("file behind the symlink: %v %v, want mode 0600 untouched", fi.Mode(), err)
	}
	if fi, err := os.Lstat(dest); err != nil || !fi.Mode().IsRegular() {
		t.Fatalf("destination %v %v, want the old regular file", fi.Mode(), err)
	}
	if b, _ := os.ReadFile(dest); string(b) != "old" {
		t.Fatalf("destination %q", b)
	}
}

// TestTempRefusesWritableDir: the directory is checked again when the temporary file is
// opened (it may have changed since the configuration was loaded), unless allowed.
func TestTempRefusesWritableDir(t *testing.T) {
	dir := t.TempDir()
	if err := os.Chmod(dir, 0o777); err != nil {
		t.Fatal(err)
	}
	cfg := config.Target{Name: "app", Kind: config.KindFile, FileTypes: []int32{1}, Path: filepath.Join(dir, "x")}
	if _, err := New(cfg).Open("", FileSlot, 5, true); reason(err) != otav1.Reason_REASON_FILE_WRITE_FAILED {
		t.Fatalf("open in a world-writable directory: got %v", err)
	}
	if _, err := os.Lstat(New(cfg).TempPath()); !errors.Is(err, fs.ErrNotExist) {
		t.Fatalf("temporary file created: %v", err)
	}
	cfg.AllowWritableDir = true
	m, err := New(cfg).Open("", FileSlot, 5, true)
	if err != nil {
		t.Fatal(err)
	}
	m.Close()
}

// TestTempResumeRefusesForeignFile: on resume, a temporary file that is not the writer's own
// regular file (a hard link to another file, a symlink) is refused, never written.
func TestTempResumeRefusesForeignFile(t *testing.T) {
	dir := t.TempDir()
	cfg := config.Target{Name: "app", Kind: config.KindFile, FileTypes: []int32{1}, Path: filepath.Join(dir, "x")}
	tg := New(cfg)
	other := filepath.Join(dir, "other")
	os.WriteFile(other, []byte("keep"), 0o600)
	if err := os.Link(other, tg.TempPath()); err != nil {
		t.Fatal(err)
	}
	if _, err := tg.Open("", FileSlot, 5, false); reason(err) != otav1.Reason_REASON_FILE_WRITE_FAILED {
		t.Fatalf("resume on a hard link: got %v", err)
	}
	// A fresh open unlinks the name and creates its own file: the other file keeps its bytes.
	m, err := tg.Open("", FileSlot, 5, true)
	if err != nil {
		t.Fatal(err)
	}
	m.WriteAt([]byte("new!!"), 0)
	m.Close()
	if b, _ := os.ReadFile(other); string(b) != "keep" {
		t.Fatalf("linked file changed: %q", b)
	}
}
