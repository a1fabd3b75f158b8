package main

import (
	"bytes"
	"crypto/sha256"
	"encoding/base64"
	"fmt"
	"math/rand/v2"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strings"
	"testing"

	"github.com/gwota/gwota/writer/manifest"
)

// docCommands returns the commands of the first sh block of docs/MANIFEST.md, continuation
// lines joined.
func docCommands(t *testing.T) [][]string {
	t.Helper()
	doc, err := os.ReadFile("../../docs/MANIFEST.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)```sh\n(.*?)```").FindSubmatch(doc)
	if m == nil {
		t.Fatal("no sh block in docs/MANIFEST.md")
	}
	var out [][]string
	for _, l := range strings.Split(strings.ReplaceAll(string(m[1]), "\\\n", " "), "\n") {
		if f := strings.Fields(l); len(f) > 0 {
			out = append(out, f)
		}
	}
	return out
}

// TestManifestCommandAsDocumented runs the commands of docs/MANIFEST.md's "Making an update"
// as written: openssl makes the key, `ota-writer manifest` writes the manifest, its .sig and
// the chunk file (never signed). The signature verifies with openssl over the manifest and
// is printed in base64; the manifest states what the command line said and the chunk file
// rebuilds the image. Without --key, the command prints the manifest's SHA-256 and writes no
// signature.
func TestManifestCommandAsDocumented(t *testing.T) {
	cmds := docCommands(t)
	t.Chdir(t.TempDir())
	img := make([]byte, 3<<20+100)
	for i := range img[1<<20 : 2<<20] {
		img[1<<20+i] = byte(i * 7 / 5)
	}
	if err := os.WriteFile("rootfs-4.3.0.img", img, 0o644); err != nil {
		t.Fatal(err)
	}
	if len(cmds) != 2 || cmds[0][0] != "openssl" || cmds[1][0] != "ota-writer" {
		t.Fatalf("documented commands: %q", cmds)
	}
	if out, err := exec.Command(cmds[0][0], cmds[0][1:]...).CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	var stdout, stderr bytes.Buffer
	if code := run(cmds[1][1:], &stdout, &stderr); code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if out, err := exec.Command("openssl", "ec", "-in", "signer.key", "-pubout", "-out", "signer.pub").CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	if _, err := os.Stat("rootfs.chunks.sig"); !os.IsNotExist(err) {
		t.Errorf("chunk file signed: %v", err)
	}
	for _, f := range []string{"rootfs.gwota-manifest"} {
		if out, err := exec.Command("openssl", "dgst", "-sha256", "-verify", "signer.pub", "-signature", f+".sig", f).CombinedOutput(); err != nil {
			t.Errorf("%s.sig does not verify: %v\n%s", f, err, out)
		}
		sig, err := os.ReadFile(f + ".sig")
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("signature %s.sig (sig-sha256-ecdsa): %s\n", f, base64.StdEncoding.EncodeToString(sig)); !strings.Contains(stdout.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, stdout.String())
		}
	}
	mf, err := os.ReadFile("rootfs.gwota-manifest")
	if err != nil {
		t.Fatal(err)
	}
	m, err := manifest.Open(bytes.NewReader(mf), int64(len(mf)))
	if err != nil {
		t.Fatal(err)
	}
	sum := sha256.Sum256(img)
	if m.Target() != "rootfs" || m.Compatible() != "acme,gw-1" || m.Version() != "4.3.0" || m.BlockSize() != 4096 ||
		m.ImageSize() != uint64(len(img)) || !bytes.Equal(m.ImageSHA256(), sum[:]) || m.ZeroBlocks() != 513 || // the short last block is zeros too
		m.Chunk(0).Blocks != 4 { // 16 KiB by default
		t.Errorf("manifest states %v", m.Header())
	}
	chunks, err := os.ReadFile("rootfs.chunks")
	if err != nil {
		t.Fatal(err)
	}
	d, err := m.NewChunkDecoder()
	if err != nil {
		t.Fatal(err)
	}
	defer d.Close()
	got := make([]byte, len(img))
	for k := range m.Chunks() {
		c := m.Chunk(k)
		if err := d.Decode(k, chunks[c.Offset:c.Offset+c.Size], func(b uint64, data []byte) error {
			copy(got[b*4096:], data)
			return nil
		}); err != nil {
			t.Fatal(err)
		}
	}
	if !bytes.Equal(got, img) || m.ChunkFileSize() != uint64(len(chunks)) {
		t.Error("the chunk file does not rebuild the image")
	}

	// Without --key: the digests to sign, no .sig.
	args := []string{}
	for i := 1; i < len(cmds[1]); i++ {
		switch a := cmds[1][i]; {
		case a == "--key":
			i++
		case a == "-o":
			args, i = append(args, "-o", "u.gwota-manifest"), i+1
		case a == "--chunks":
			args, i = append(args, "--chunks", "u.chunks"), i+1
		default:
			args = append(args, a)
		}
	}
	stdout.Reset()
	if code := run(args, &stdout, &stderr); code != exitOK {
		t.Fatalf("exit %d: %s", code, stderr.String())
	}
	if _, err := os.Stat("u.chunks"); err != nil {
		t.Error(err)
	}
	for _, f := range []string{"u.gwota-manifest"} {
		b, err := os.ReadFile(f)
		if err != nil {
			t.Fatal(err)
		}
		if want := fmt.Sprintf("sha256 %s: %x\n", f, sha256.Sum256(b)); !strings.Contains(stdout.String(), want) {
			t.Errorf("output lacks %q:\n%s", want, stdout.String())
		}
		if _, err := os.Stat(f + ".sig"); !os.IsNotExist(err) {
			t.Errorf("%s.sig written without --key: %v", f, err)
		}
	}
}

// TestManifestCommandRefuses: missing flags, a block size that is not a power of two, a key
// that is not ECDSA P-256 and a missing image are usage errors (exit 2) that leave no output.
func TestManifestCommandRefuses(t *testing.T) {
	dir := t.TempDir()
	t.Chdir(dir)
	if err := os.WriteFile("img", make([]byte, 10000), 0o644); err != nil {
		t.Fatal(err)
	}
	if out, err := exec.Command("openssl", "genpkey", "-algorithm", "ed25519", "-out", "ed.key").CombinedOutput(); err != nil {
		t.Fatalf("%v\n%s", err, out)
	}
	base := []string{"--image", "img", "--version", "1", "--target", "rootfs", "--compatible", "c", "-o", "m", "--chunks", "c"}
	for name, args := range map[string][]string{
		"no version":   {"--image", "img", "--target", "rootfs", "--compatible", "c", "-o", "m", "--chunks", "c"},
		"block 1000":   append([]string{"--block-size", "1000"}, base...),
		"chunk 6000":   append([]string{"--chunk-size", "6000"}, base...),
		"ed25519 key":  append([]string{"--key", "ed.key"}, base...),
		"no image":     append(append([]string{}, base[2:]...), "--image", "nope"),
		"bad level":    append([]string{"--level", "max"}, base...),
		"control char": {"--image", "img", "--version", "1\n2", "--target", "rootfs", "--compatible", "c", "-o", "m", "--chunks", "c"},
	} {
		var stdout, stderr bytes.Buffer
		if code := run(append([]string{"manifest"}, args...), &stdout, &stderr); code != exitUsage {
			t.Errorf("%s: exit %d, want %d: %s", name, code, exitUsage, stderr.String())
		}
		for _, f := range []string{"m", "c"} {
			if _, err := os.Stat(filepath.Join(dir, f)); !os.IsNotExist(err) {
				t.Errorf("%s: %s left behind", name, f)
				os.Remove(f)
			}
		}
	}
}

// TestManifestBaseDeltaChunks: `ota-writer manifest --base` adds delta chunks for the blocks
// the base lacks when their bytes are in it, shifted (an updated program), and says so;
// `--dict-size 0` makes none (format 1).
func TestManifestBaseDeltaChunks(t *testing.T) {
	dir := t.TempDir()
	rng := rand.New(rand.NewPCG(13, 14))
	v1 := make([]byte, 256<<10)
	for i := range v1 {
		v1[i] = byte(rng.Uint32())
	}
	var v2 []byte
	for i := 0; i < len(v1); i += 5000 {
		v2 = append(v2, v1[i:min(i+5000, len(v1))]...)
		v2 = append(v2, "v2"...)
	}
	base, img := filepath.Join(dir, "v1.img"), filepath.Join(dir, "v2.img")
	if err := os.WriteFile(base, v1, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(img, v2, 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		dict   string
		deltas bool
	}{{"1048576", true}, {"0", false}} {
		mf := filepath.Join(dir, "m"+tc.dict)
		stdout, stderr, code := runCLI(t, "manifest", "--image", img, "--base", base, "--dict-size", tc.dict, "--version", "2", "--target", "rootfs",
			"--compatible", "c", "-o", mf, "--chunks", filepath.Join(dir, "c"+tc.dict))
		if code != exitOK {
			t.Fatalf("manifest: exit %d: %s", code, stderr)
		}
		data, _ := os.ReadFile(mf)
		m, err := manifest.Open(bytes.NewReader(data), int64(len(data)))
		if err != nil {
			t.Fatal(err)
		}
		if (m.Deltas() > 0) != tc.deltas || strings.Contains(stdout, "delta chunks:") != tc.deltas {
			t.Errorf("--dict-size %s: %d delta chunks; stdout %q", tc.dict, m.Deltas(), stdout)
		}
	}
}
