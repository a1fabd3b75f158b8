package sharedbuf

import (
	"bytes"
	"errors"
	"net"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"

	"github.com/hashicorp/go-hclog"
	"go.uber.org/goleak"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

// TestBufferLifecycle: a buffer is found only by its token and only for the uid it was
// handed to; what the client writes is what the writer copies out; once the client gives it
// back, the writer's copies fail with ErrClosed (never read an unmapped buffer).
func TestBufferLifecycle(t *testing.T) {
	sock := filepath.Join(t.TempDir(), "s")
	ln, err := net.ListenUnix("unix", &net.UnixAddr{Name: sock, Net: "unix"})
	if err != nil {
		t.Fatal(err)
	}
	defer ln.Close()
	reg := NewRegistry(1<<20, 2, hclog.NewNullLogger())
	defer reg.Close()
	served := make(chan struct{})
	go func() {
		defer close(served)
		c, err := ln.AcceptUnix()
		if err != nil {
			return
		}
		reg.Serve(c, 1000)
	}()
	cl, err := Dial(t.Context(), sock)
	if err != nil {
		t.Fatal(err)
	}
	if cl.Size() != 1<<20 {
		t.Fatalf("size %d", cl.Size())
	}
	if _, err := reg.Lookup(cl.Token(), 1001); err == nil {
		t.Error("another uid found the buffer")
	}
	if _, err := reg.Lookup(bytes.Repeat([]byte{0}, 16), 1000); err == nil {
		t.Error("a made-up token found a buffer")
	}
	b, err := reg.Lookup(cl.Token(), 1000)
	if err != nil {
		t.Fatal(err)
	}
	// The writer's mapping is read-only; the client's (same process here) read-write.
	if perms := mappings(t); !slices.Contains(perms, "r--s") || !slices.Contains(perms, "rw-s") || len(perms) != 2 {
		t.Errorf("mappings of the buffer: %v, want one r--s (writer) and one rw-s (client)", perms)
	}
	want := []byte("block bytes at the end")
	if err := cl.Write(cl.Size()-int64(len(want)), [][]byte{want[:5], want[5:]}); err != nil {
		t.Fatal(err)
	}
	if err := cl.Write(cl.Size()-1, [][]byte{want}); err == nil {
		t.Error("client wrote past the buffer's end")
	}
	got := make([]byte, len(want))
	if err := b.Read(got, uint64(b.Size())-uint64(len(want))); err != nil || !bytes.Equal(got, want) {
		t.Fatalf("read %q, %v; want %q", got, err, want)
	}
	if err := b.Read(got, uint64(b.Size())-3); err == nil {
		t.Error("read past the buffer's end")
	}
	cl.Close()
	<-served
	if err := b.Read(got, 0); !errors.Is(err, ErrClosed) {
		t.Errorf("read of a given-back buffer: %v, want ErrClosed", err)
	}
	if _, err := reg.Lookup(cl.Token(), 1000); err == nil {
		t.Error("a given-back buffer is still found")
	}
}

// mappings lists the permissions of this process's mappings of shared buffers.
func mappings(t *testing.T) []string {
	t.Helper()
	b, err := os.ReadFile("/proc/self/maps")
	if err != nil {
		t.Fatal(err)
	}
	var perms []string
	for _, line := range strings.Split(string(b), "\n") {
		if f := strings.Fields(line); len(f) >= 6 && strings.Contains(line, "memfd:gwota-shared-blocks") {
			perms = append(perms, f[1])
		}
	}
	return perms
}
