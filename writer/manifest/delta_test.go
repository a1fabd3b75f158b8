package manifest

import (
	"context"
	"fmt"
	"io/fs"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"strings"
	"testing"
)

// need returns the path of a command, failing under CI (which installs everything through
// scripts/test.sh) and skipping elsewhere.
func need(t *testing.T, cmd string) string {
	t.Helper()
	p, err := exec.LookPath(cmd)
	if err == nil {
		return p
	}
	if p, err := exec.LookPath("/usr/sbin/" + cmd); err == nil {
		return p
	}
	if os.Getenv("CI") == "true" {
		t.Fatalf("%s missing (scripts/test.sh installs it)", cmd)
	}
	t.Skipf("%s missing", cmd)
	return ""
}

func run(t *testing.T, name string, args ...string) {
	t.Helper()
	if out, err := exec.Command(name, args...).CombinedOutput(); err != nil {
		t.Fatalf("%s %v: %v\n%s", name, args, err, out)
	}
}

// TestDeltaDownloadWithinPatchRatio is the small version of scripts/bench-delta.sh: two ext4
// images built with mkfs.ext4 -d from directory trees, v2 an upgrade of v1 (Go sources
// edited, a directory removed, another added, new random
// data, two programs added with their libraries), once in a tight image and once in one that
// is mostly zeros. A device holding v1
// downloads the manifest and the chunks holding a block it cannot find in v1: at most 1.5
// times `zstd -19 --patch-from=v1 v2`, and far less than the image.
func TestDeltaDownloadWithinPatchRatio(t *testing.T) {
	if testing.Short() {
		t.Skip("builds and compresses images")
	}
	mkfs, zstdCmd := need(t, "mkfs.ext4"), need(t, "zstd")
	goroot := runtime.GOROOT()
	tool := filepath.Join(goroot, "pkg", "tool", runtime.GOOS+"_"+runtime.GOARCH)
	dir := t.TempDir()
	v1, v2 := filepath.Join(dir, "v1"), filepath.Join(dir, "v2")
	cp := func(from, to string) {
		t.Helper()
		if err := os.CopyFS(to, os.DirFS(from)); err != nil {
			t.Fatal(err)
		}
	}
	cpFile := func(from, to string) {
		t.Helper()
		b, err := os.ReadFile(from)
		if err != nil {
			t.Fatal(err)
		}
		if err := os.MkdirAll(filepath.Dir(to), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(to, b, 0o755); err != nil {
			t.Fatal(err)
		}
	}
	cp(filepath.Join(goroot, "src", "net"), filepath.Join(v1, "usr/share/app/net"))
	cpFile(filepath.Join(tool, "cover"), filepath.Join(v1, "usr/bin/daemon"))
	cp(v1, v2)
	// v2: every 20th Go file edited, a directory removed, another added, 256 KiB of new
	// random data.
	i := 0
	if err := filepath.WalkDir(filepath.Join(v2, "usr/share/app/net"), func(p string, d fs.DirEntry, err error) error {
		if err != nil || d.IsDir() || !strings.HasSuffix(p, ".go") {
			return err
		}
		if i++; i%20 == 0 {
			f, err := os.OpenFile(p, os.O_APPEND|os.O_WRONLY, 0)
			if err != nil {
				return err
			}
			fmt.Fprintf(f, "\n// v2 %d\n", i)
			return f.Close()
		}
		return nil
	}); err != nil {
		t.Fatal(err)
	}
	if err := os.RemoveAll(filepath.Join(v2, "usr/share/app/net/http/httptest")); err != nil {
		t.Fatal(err)
	}
	cp(filepath.Join(goroot, "src", "encoding"), filepath.Join(v2, "usr/share/app/encoding"))
	// Packages added: two programs (native code, unrelated to v1).
	for _, prog := range []string{need(t, "openssl"), zstdCmd} {
		cpFile(prog, filepath.Join(v2, "usr/bin", filepath.Base(prog)))
	}
	r := rand.New(rand.NewPCG(1, 2))
	rnd := make([]byte, 256<<10)
	for j := range rnd {
		rnd[j] = byte(r.Uint32())
	}
	if err := os.WriteFile(filepath.Join(v2, "var/lib/app/blob"), rnd, 0o644); err != nil {
		if err := os.MkdirAll(filepath.Join(v2, "var/lib/app"), 0o755); err != nil {
			t.Fatal(err)
		}
		if err := os.WriteFile(filepath.Join(v2, "var/lib/app/blob"), rnd, 0o644); err != nil {
			t.Fatal(err)
		}
	}

	for _, sizeMiB := range []int{24, 96} {
		t.Run(fmt.Sprintf("%dMiB", sizeMiB), func(t *testing.T) {
			img := func(tree string) string {
				p := filepath.Join(dir, fmt.Sprintf("%s-%d.img", filepath.Base(tree), sizeMiB))
				run(t, mkfs, "-q", "-F", "-b", "4096", "-d", tree, p, fmt.Sprintf("%dM", sizeMiB))
				return p
			}
			i1, i2 := img(v1), img(v2)
			patch := filepath.Join(dir, "patch")
			run(t, zstdCmd, "-q", "-f", "-19", "--patch-from="+i1, i2, "-o", patch)
			ps, err := os.Stat(patch)
			if err != nil {
				t.Fatal(err)
			}
			f, err := measure(t, i2, i1, DefaultChunkSize)
			if err != nil {
				t.Fatal(err)
			}
			ratio := float64(f.download) / float64(ps.Size())
			t.Logf("image %d bytes, %d of %d blocks zero, %d found in v1; download %d (manifest %d + %d chunks %d) = %.2fx zstd --patch-from %d",
				f.image, f.zero, f.blocks, f.found, f.download, f.manifest, f.chunks, f.chunkBytes, ratio, ps.Size())
			if ratio > 1.5 {
				t.Errorf("download is %.2fx the zstd patch, target 1.5x", ratio)
			}
			if f.found < (f.blocks-f.zero)/4 || f.download > f.image/4 {
				t.Errorf("reuse too small for this pair: %+v", f)
			}
		})
	}
}

type figures struct {
	image, blocks, zero, found, manifest, chunkBytes, download uint64
	chunks                                                     int
}

// measure builds newImg's manifest with the defaults and returns what a device holding
// local downloads.
func measure(t *testing.T, newImg, local string, chunkSize uint32) (figures, error) {
	var f figures
	in, err := os.Open(newImg)
	if err != nil {
		return f, err
	}
	defer in.Close()
	mf, err := os.Create(filepath.Join(t.TempDir(), "m"))
	if err != nil {
		return f, err
	}
	defer mf.Close()
	cf, err := os.Create(filepath.Join(t.TempDir(), "c"))
	if err != nil {
		return f, err
	}
	defer cf.Close()
	p := params()
	p.Level, p.ChunkSize, p.TempDir = 0, chunkSize, t.TempDir()
	res, err := Build(context.Background(), in, p, cf, mf)
	if err != nil {
		return f, err
	}
	m, err := Open(mf, int64(res.ManifestSize))
	if err != nil {
		return f, err
	}
	l, err := os.Open(local)
	if err != nil {
		return f, err
	}
	defer l.Close()
	li, err := l.Stat()
	if err != nil {
		return f, err
	}
	have := make([]bool, m.Blocks())
	st, err := m.FindLocal(context.Background(), l, li.Size(), 0, func(mt Match, _ []byte) error {
		have[mt.Block] = true
		return nil
	})
	if err != nil {
		return f, err
	}
	need := m.NeededChunks(func(b uint64) bool { return !have[b] })
	f = figures{image: res.ImageSize, blocks: res.Blocks, zero: st.Zero, found: st.Found, manifest: res.ManifestSize, chunks: len(need)}
	for _, c := range need {
		f.chunkBytes += c.Size
	}
	f.download = f.manifest + f.chunkBytes
	return f, nil
}
