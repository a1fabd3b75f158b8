package target_test

import (
	"context"
	"crypto"
	"crypto/rand"
	"os"
	"path/filepath"
	"testing"

	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/target"
	"github.com/gwota/gwota/writer/target/targettest"
	"github.com/gwota/gwota/writer/verify"
)

// BenchmarkReadBack is the choice between O_DIRECT and dropping the cache (FADV_DONTNEED after
// fdatasync, then buffered reads with read-ahead), and against reading the page cache as the
// writer did before: a 64 MiB image hashed by verify.Digest from a regular-file slot and from
// a loop device.
func BenchmarkReadBack(b *testing.B) {
	const size = 64 << 20
	data := make([]byte, size)
	rand.Read(data)
	a := filepath.Join(b.TempDir(), "a.img")
	os.WriteFile(a, nil, 0o600)
	file := filepath.Join(b.TempDir(), "b.img")
	os.WriteFile(file, nil, 0o600)
	dev, _ := targettest.Loop(b, size)
	for _, slot := range []struct{ name, path string }{{"file", file}, {"loop", dev}} {
		tg := target.New(config.Target{Name: "r", Kind: config.KindAB, FileTypes: []int32{0}, Slots: []string{a, slot.path}})
		m, err := tg.Open("a", "b", size, true)
		if err != nil {
			b.Fatal(err)
		}
		if _, err := m.WriteAt(data, 0); err != nil {
			b.Fatal(err)
		}
		for _, mode := range []string{"direct", "dropcache", "pagecache"} {
			b.Run(slot.name+"/"+mode, func(b *testing.B) {
				defer target.SetNoDirect(mode != "direct")()
				b.SetBytes(size)
				for b.Loop() {
					rb, err := m.ReadBack()
					if err != nil {
						b.Fatal(err)
					}
					if mode == "pagecache" {
						// What the writer did before: read the pages its own writes left.
						rb.Close()
						b.StopTimer()
						f, _ := os.Open(slot.path)
						buf := make([]byte, 1<<20)
						for off := int64(0); off < size; off += int64(len(buf)) {
							f.ReadAt(buf, off)
						}
						b.StartTimer()
						if _, _, err := verify.Digest(context.Background(), f, size, crypto.SHA256); err != nil {
							b.Fatal(err)
						}
						f.Close()
						continue
					}
					if _, _, err := verify.Digest(context.Background(), rb, size, crypto.SHA256); err != nil {
						b.Fatal(err)
					}
					rb.Close()
				}
			})
		}
		m.Close()
	}
}
