package manifest

import (
	"strings"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// PathSuffix marks a manifest in a job document: a file whose filepath (the fileName given to
// create-ota-update) ends with it is the manifest of the file whose filepath is the same
// without it, the chunk file. The chunk file's filepath and fileType select the writer
// target as for any file; the manifest names the target too, signed, and the writer checks
// both agree.
const PathSuffix = ".gwota-manifest"

// Pair is a manifest and the chunk file it describes, as indices into the job document's
// files.
type Pair struct{ Manifest, Chunks int }

// PairFiles finds the manifests among a job document's file paths, in document order. A
// manifest whose chunk file is not listed, or a manifest or chunk file listed twice under one
// path (which file would it describe?), is REASON_JOB_DOCUMENT_INVALID. Files that are
// neither (plain images) are not in the result, and plain images may share a path as they
// always could: the writer decides what two files for one target mean.
func PairFiles(paths []string) ([]Pair, error) {
	idx := make(map[string]int, len(paths))
	dup := map[string]int{}
	for i, p := range paths {
		if _, seen := idx[p]; seen {
			if _, first := dup[p]; !first {
				dup[p] = i
			}
			continue
		}
		idx[p] = i
	}
	var out []Pair
	for i, p := range paths {
		base, ok := strings.CutSuffix(p, PathSuffix)
		if !ok {
			continue
		}
		for _, q := range []string{p, base} {
			if j, twice := dup[q]; twice {
				return nil, status.Errorf(otav1.Reason_REASON_JOB_DOCUMENT_INVALID, "files[%d]: filepath %q of a delta update listed twice", j, q)
			}
		}
		j, ok := idx[base]
		if !ok || base == "" {
			return nil, status.Errorf(otav1.Reason_REASON_JOB_DOCUMENT_INVALID, "files[%d]: manifest %q without its chunk file %q", i, p, base)
		}
		if strings.HasSuffix(base, PathSuffix) {
			return nil, status.Errorf(otav1.Reason_REASON_JOB_DOCUMENT_INVALID, "files[%d]: manifest %q of a manifest", i, p)
		}
		out = append(out, Pair{Manifest: i, Chunks: j})
	}
	return out, nil
}
