package agent

import (
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/netagent/jobdoc"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// TestPlanFiles: a manifest is installed right before its chunk file wherever the document
// lists it; plain files keep their order; a manifest without its chunk file refuses the job.
func TestPlanFiles(t *testing.T) {
	const (
		img = otav1.SessionKind_SESSION_KIND_UNSPECIFIED
		man = otav1.SessionKind_SESSION_KIND_MANIFEST
		chk = otav1.SessionKind_SESSION_KIND_CHUNKS
	)
	tests := []struct {
		name    string
		paths   []string
		want    []plannedFile
		wantErr otav1.Reason
	}{
		{"plain files", []string{"a", "b"}, []plannedFile{{index: 0}, {index: 1}}, 0},
		{"manifest first", []string{"rootfs.gwota-manifest", "rootfs"},
			[]plannedFile{{index: 0, kind: man}, {index: 1, kind: chk, manifest: 0}}, 0},
		{"manifest after its chunk file", []string{"app", "rootfs", "rootfs.gwota-manifest"},
			[]plannedFile{{index: 0, kind: img}, {index: 2, kind: man}, {index: 1, kind: chk, manifest: 2}}, 0},
		{"manifest without chunk file", []string{"rootfs.gwota-manifest"}, nil, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			doc := &jobdoc.Document{}
			for i, p := range tc.paths {
				doc.Files = append(doc.Files, jobdoc.File{Index: i, Path: p})
			}
			got, err := planFiles(doc)
			if status.ReasonOf(err) != tc.wantErr && (err != nil || tc.wantErr != 0) {
				t.Fatalf("err %v, want %v", err, tc.wantErr)
			}
			if diff := cmp.Diff(tc.want, got, cmp.AllowUnexported(plannedFile{})); diff != "" {
				t.Errorf("plan (-want +got):\n%s", diff)
			}
		})
	}
}

// TestChunkBlockSize: stream blocks of a chunk file are about half a chunk, a power of two,
// never under 1 KiB nor over the configured block size.
func TestChunkBlockSize(t *testing.T) {
	tests := []struct {
		sizes []uint32
		limit int
		want  int
	}{
		{[]uint32{16000, 16000, 0}, 65536, 4096},
		{[]uint32{6000, 7000}, 65536, 2048},
		{[]uint32{300, 200}, 65536, 1024},
		{[]uint32{1 << 20}, 65536, 65536},
		{[]uint32{1 << 20}, 512, 512},
		{[]uint32{0, 0}, 65536, 1024},
	}
	for _, tc := range tests {
		if got := chunkBlockSize(tc.sizes, tc.limit); got != tc.want {
			t.Errorf("chunkBlockSize(%v, %d) = %d, want %d", tc.sizes, tc.limit, got, tc.want)
		}
	}
}
