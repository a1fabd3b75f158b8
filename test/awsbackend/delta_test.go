package awsbackend

import (
	"bytes"
	"context"
	"os"
	"path/filepath"
	"testing"

	"github.com/gwota/gwota/netagent/jobdoc"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/writer/manifest"
)

// TestCreateDeltaJob: a delta update made by manifest.Build goes to AWS as one job of two
// files (docs/MANIFEST.md, "One OTA update, two files"): both uploaded, both in the stream,
// the manifest signed and the chunk file not, in a document ota-net's parser accepts and
// pairs.
func TestCreateDeltaJob(t *testing.T) {
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	dir := t.TempDir()
	img := bytes.Repeat([]byte("gateway!"), 64<<10)
	var chunks, mf bytes.Buffer
	if _, err := manifest.Build(context.Background(), bytes.NewReader(img), manifest.Params{
		Target: "rootfs", Compatible: "acme,gw-1", Version: "4.3.0", BlockSize: 4096, TempDir: dir}, &chunks, &mf); err != nil {
		t.Fatal(err)
	}
	mPath, cPath := filepath.Join(dir, "rootfs.gwota-manifest"), filepath.Join(dir, "rootfs.chunks")
	if err := os.WriteFile(mPath, mf.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cPath, chunks.Bytes(), 0o600); err != nil {
		t.Fatal(err)
	}
	_, keyPEM := ecKeyPEM(t)
	files := backend.DeltaFiles(backend.FileSpec{LocalPath: mPath, DevicePath: "rootfs", CertName: "signer.crt.pem", SigningKeyPEM: keyPEM}, cPath)
	if err := b.CreateJob(t.Context(), backend.JobSpec{JobID: "delta-1", Protocols: []string{backend.ProtocolMQTT}, Files: files}); err != nil {
		t.Fatalf("CreateJob: %v", err)
	}
	for i, want := range [][]byte{mf.Bytes(), chunks.Bytes()} {
		key := b.objectKey("delta-1", i, files[i].LocalPath)
		puts := s.find("PUT", "/"+testBucket+"/"+key)
		if len(puts) != 1 || !bytes.Equal(puts[0].Body, want) {
			t.Errorf("file %d: %d PUTs of %s, want one with the file's %d bytes", i, len(puts), key, len(want))
		}
	}
	jobs := s.find("PUT", "/jobs/delta-1")
	if len(jobs) != 1 {
		t.Fatalf("%d CreateJob requests", len(jobs))
	}
	body := decodeJSON[createJobBody](t, jobs[0].Body)
	doc, err := jobdoc.Parse([]byte(body.Document))
	if err != nil {
		t.Fatalf("ota-net refuses the document: %v\n%s", err, body.Document)
	}
	if len(doc.Files) != 2 || doc.Files[0].Path != "rootfs.gwota-manifest" || doc.Files[0].Signature == nil ||
		doc.Files[1].Path != "rootfs" || doc.Files[1].Signature != nil || doc.Files[1].Size != uint64(chunks.Len()) || doc.Files[1].FileID != 1 {
		t.Fatalf("document files %+v", doc.Files)
	}
	pairs, err := manifest.PairFiles([]string{doc.Files[0].Path, doc.Files[1].Path})
	if err != nil || len(pairs) != 1 || pairs[0] != (manifest.Pair{Manifest: 0, Chunks: 1}) {
		t.Fatalf("PairFiles = %v, %v", pairs, err)
	}
}
