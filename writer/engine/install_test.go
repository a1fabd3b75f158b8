package engine

import (
	"os"
	"path/filepath"
	"testing"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

// TestActivateInstallsWhatWasVerified: a file renamed over the file target's temporary file
// between FinishSession (verified) and Activate is not installed.
func TestActivateInstallsWhatWasVerified(t *testing.T) {
	r := newRig(t, nil)
	os.WriteFile(r.appPath, []byte("old bundle"), 0o644)
	img := newImage(t, 20000)
	s := must[*otav1.BeginSessionResponse](t)(r.begin(img, 1, nil)).Session
	writeAll(t, r, s.SessionId, img, 4096)
	must[*otav1.FinishSessionResponse](t)(r.e.Finish(ctx, s.SessionId))

	evil := filepath.Join(filepath.Dir(r.appPath), "evil")
	os.WriteFile(evil, make([]byte, len(img.data)), 0o644)
	if err := os.Rename(evil, r.e.byName["app"].TempPath()); err != nil {
		t.Fatal(err)
	}
	_, err := r.e.Activate(ctx, s.SessionId)
	wantReason(t, err, otav1.Reason_REASON_FILE_CLOSE_FAILED)
	if b, _ := os.ReadFile(r.appPath); string(b) != "old bundle" {
		t.Fatalf("destination holds %d bytes after a swapped install, want the old bundle", len(b))
	}
}
