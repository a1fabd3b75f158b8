package emulator

import (
	"bytes"
	"context"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/netagent/jobdoc"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/writer/manifest"
)

// TestDeltaUpdateTwoFiles: a delta update made by manifest.Build is one job of two files, as
// AWS lists them (docs/MANIFEST.md, "One OTA update, two files"): the signed manifest and the
// unsigned chunk file, each with its own file id, size and URL, which ota-net's parser
// accepts and pairs, and whose URLs serve the files' bytes.
func TestDeltaUpdateTwoFiles(t *testing.T) {
	e := startEmulator(t, Options{})
	dir := t.TempDir()
	img := make([]byte, 256<<10)
	for i := range img[:100<<10] {
		img[i] = byte(i*7 + i>>9)
	}
	var chunks, mf bytes.Buffer
	res, err := manifest.Build(context.Background(), bytes.NewReader(img), manifest.Params{
		Target: "rootfs", Compatible: "acme,gw-1", Version: "4.3.0", BlockSize: 4096, TempDir: dir}, &chunks, &mf)
	if err != nil {
		t.Fatal(err)
	}
	mPath, cPath := filepath.Join(dir, "m"), filepath.Join(dir, "c")
	for p, b := range map[string][]byte{mPath: mf.Bytes(), cPath: chunks.Bytes()} {
		if err := os.WriteFile(p, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	files := backend.DeltaFiles(backend.FileSpec{LocalPath: mPath, DevicePath: "rootfs", FileID: 3, CertName: "signer.crt.pem", Signature: []byte("sig")}, cPath)
	if err := e.CreateJob(context.Background(), backend.JobSpec{JobID: "delta", Protocols: []string{backend.ProtocolMQTT, backend.ProtocolHTTP}, Files: files}); err != nil {
		t.Fatal(err)
	}
	raw, err := e.JobDocument("delta")
	if err != nil {
		t.Fatal(err)
	}
	doc, err := jobdoc.Parse(raw)
	if err != nil {
		t.Fatalf("ota-net refuses the document: %v\n%s", err, raw)
	}
	type file struct {
		Path   string
		Size   uint64
		FileID uint32
		Signed bool
	}
	var got []file
	var paths []string
	for _, f := range doc.Files {
		got = append(got, file{f.Path, f.Size, f.FileID, f.Signature != nil})
		paths = append(paths, f.Path)
	}
	want := []file{{"rootfs.gwota-manifest", res.ManifestSize, 3, true}, {"rootfs", res.ChunkFileSize, 4, false}}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("files (-want +got):\n%s", diff)
	}
	pairs, err := manifest.PairFiles(paths)
	if err != nil || len(pairs) != 1 || pairs[0] != (manifest.Pair{Manifest: 0, Chunks: 1}) {
		t.Fatalf("PairFiles = %v, %v", pairs, err)
	}
	for i, b := range [][]byte{mf.Bytes(), chunks.Bytes()} {
		resp, err := http.Get(doc.Files[i].UpdateDataURL)
		if err != nil {
			t.Fatal(err)
		}
		body, _ := io.ReadAll(resp.Body)
		resp.Body.Close()
		if !bytes.Equal(body, b) {
			t.Errorf("file %d: URL serves %d bytes, not the file's %d", i, len(body), len(b))
		}
	}
}
