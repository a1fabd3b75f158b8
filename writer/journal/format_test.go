package journal

import (
	"bytes"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/internal/bitmap"
)

// testdata/v1-rootfs.session was written by the journal before its durable bitmap became a
// bitmap.Bitmap (it was a []byte): it still loads, with the same blocks durable, and saving
// the loaded session writes the same bytes again. A writer upgraded in the middle of a
// download resumes it.
func TestFormatUnchanged(t *testing.T) {
	golden, err := os.ReadFile(filepath.Join("testdata", "v1-rootfs.session"))
	if err != nil {
		t.Fatal(err)
	}
	old := t.TempDir()
	j, err := Open(old)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(j.sessionPath("rootfs"), golden, 0o600); err != nil {
		t.Fatal(err)
	}
	got, dropped, err := j.LoadSessions()
	if err != nil || len(dropped) != 0 || len(got) != 1 {
		t.Fatalf("load: %v %v %v", got, dropped, err)
	}
	want := &Session{ID: "0123456789abcdef0123456789abcdef", JobID: "job-golden", FileIndex: 0, Target: "rootfs", Slot: "b",
		FileSize: 10000, BlockSize: 512, Signature: []byte{0x30, 0x45, 0x02, 0x21}, Algorithm: 1, CertName: "signer.crt.pem",
		Version: "1.2.3", State: 1, Durable: bitmap.Bitmap{0xFF, 0x13, 0x08}, Created: time.Date(2026, 12, 1, 10, 0, 0, 0, time.UTC),
		Updated: time.Date(2026, 12, 1, 10, 5, 0, 0, time.UTC)}
	if diff := cmp.Diff(want, got[0]); diff != "" {
		t.Fatalf("loaded session (-want +got):\n%s", diff)
	}
	if diff := cmp.Diff([]int{0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 12, 19}, got[0].Durable.Blocks()); diff != "" {
		t.Fatalf("durable blocks (-want +got):\n%s", diff)
	}
	j2, err := Open(t.TempDir())
	if err != nil {
		t.Fatal(err)
	}
	if err := j2.SaveSession(got[0]); err != nil {
		t.Fatal(err)
	}
	again, err := os.ReadFile(j2.sessionPath("rootfs"))
	if err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(again, golden) {
		t.Fatalf("saved again:\n%s\nwas:\n%s", again, golden)
	}
}
