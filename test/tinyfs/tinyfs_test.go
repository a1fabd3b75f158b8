package tinyfs

import (
	"errors"
	"os"
	"path/filepath"
	"syscall"
	"testing"
)

func TestFullAndReadOnly(t *testing.T) {
	dir := Tmpfs(t, 64<<10)
	Fill(t, dir)
	if err := os.WriteFile(filepath.Join(dir, "x"), make([]byte, 8192), 0o600); !errors.Is(err, syscall.ENOSPC) {
		t.Fatalf("write on a filled tmpfs: %v, want ENOSPC", err)
	}
	Free(t, dir)
	if err := os.WriteFile(filepath.Join(dir, "x"), []byte("ok"), 0o600); err != nil {
		t.Fatalf("write after Free: %v", err)
	}
	undo := ReadOnly(t, dir)
	if err := os.WriteFile(filepath.Join(dir, "y"), []byte("no"), 0o600); !errors.Is(err, syscall.EROFS) {
		t.Fatalf("write on a read-only bind mount: %v, want EROFS", err)
	}
	undo()
	if err := os.WriteFile(filepath.Join(dir, "y"), []byte("ok"), 0o600); err != nil {
		t.Fatalf("write after undo: %v", err)
	}
}
