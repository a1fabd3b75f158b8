package agent

import (
	"fmt"
	"strconv"
	"strings"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/netagent/chunksink"
	"github.com/gwota/gwota/netagent/jobdoc"
	"github.com/gwota/gwota/netagent/stream"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/manifest"
)

// KeyReused is the statusDetails key of a delta update's final reports: "n/N", the image
// blocks the writer did not need to download (taken from the running slot or all-zero) of
// the image's blocks.
const KeyReused = "reused"

// Smallest and default stream block for a chunk file: a block overlapping a missing chunk is
// fetched whole, so blocks of about a chunk's size waste little; the request window keeps the
// bytes of the usual block size (stream.File.RequestBytes).
const minChunkBlockSize = 1024

// plannedFile is one file of a job in install order.
type plannedFile struct {
	index    int
	kind     otav1.SessionKind
	manifest int // CHUNKS: the manifest's file index
}

// planFiles orders a job's files: a manifest (docs/MANIFEST.md, "One OTA update, two files")
// right before its chunk file, which the writer accepts only once the manifest is verified;
// plain images in document order. A job without a manifest is unchanged.
func planFiles(doc *jobdoc.Document) ([]plannedFile, error) {
	paths := make([]string, len(doc.Files))
	for i, f := range doc.Files {
		paths[i] = f.Path
	}
	pairs, err := manifest.PairFiles(paths)
	if err != nil {
		return nil, err
	}
	manifestOf := map[int]int{}
	isManifest := map[int]bool{}
	for _, p := range pairs {
		manifestOf[p.Chunks] = p.Manifest
		isManifest[p.Manifest] = true
	}
	var out []plannedFile
	for i := range doc.Files {
		m, chunks := manifestOf[i]
		switch {
		case isManifest[i]:
			// Installed right before its chunk file.
		case chunks:
			out = append(out,
				plannedFile{index: m, kind: otav1.SessionKind_SESSION_KIND_MANIFEST},
				plannedFile{index: i, kind: otav1.SessionKind_SESSION_KIND_CHUNKS, manifest: m})
		default:
			out = append(out, plannedFile{index: i})
		}
	}
	return out, nil
}

// fileDownload is what one file's download fetches.
type fileDownload struct {
	kind      otav1.SessionKind
	blockSize int // the downloader's block size
	// requestBytes sizes stream requests of a chunk file (0: the downloader's default).
	requestBytes int
	// have and total are what the progress reports start with.
	have, total uint64
	// Chunk files: the chunk table, the stream blocks not to fetch, the chunks missing.
	layout        chunksink.Layout
	base          int
	chunksMissing int
}

func newDownload(a *Agent, f jobdoc.File, sess Session, kind otav1.SessionKind) (*fileDownload, error) {
	d := &fileDownload{kind: kind, blockSize: sess.BlockSize()}
	if kind != otav1.SessionKind_SESSION_KIND_CHUNKS {
		d.total = sess.Info().GetTotalBlocks()
		d.have = d.total - uint64(sess.Missing().Count())
		return d, nil
	}
	sizes := sess.ChunkSizes()
	var sum uint64
	for _, n := range sizes {
		sum += uint64(n)
	}
	if sum != f.Size {
		return nil, status.Errorf(otav1.Reason_REASON_OTHER, "chunk file %d: the writer's chunks add up to %d bytes, the job's file has %d", f.Index, sum, f.Size)
	}
	d.blockSize = chunkBlockSize(sizes, a.cfg.BlockSize)
	// Requests keep the window the stream downloader is configured for in bytes.
	perReq := stream.DefaultBlocksPerRequest
	if sd, ok := a.stream.(interface{ Config() stream.Config }); ok && sd.Config().BlocksPerRequest > 0 {
		perReq = sd.Config().BlocksPerRequest
	}
	d.requestBytes = perReq * a.cfg.BlockSize
	d.layout = chunksink.Layout{Sizes: sizes, BlockSize: d.blockSize}
	blocks := int((sum + uint64(d.blockSize) - 1) / uint64(d.blockSize))
	need := chunksink.StreamMissing(d.layout, sess.Missing()).Count()
	d.base = blocks - need
	d.total = uint64(need)
	for k, n := range sizes {
		if n > 0 && bitmap.Bitmap(sess.Missing()).Has(k) {
			d.chunksMissing++
		}
	}
	return d, nil
}

// chunkBlockSize picks the stream block size of a chunk file: the largest power of two not
// above half the mean non-empty chunk, within minChunkBlockSize..max (the configured block
// size).
func chunkBlockSize(sizes []uint32, limit int) int {
	var sum, n uint64
	for _, s := range sizes {
		if s > 0 {
			sum += uint64(s)
			n++
		}
	}
	bs := minChunkBlockSize
	if n > 0 {
		for bs*2 <= int(sum/n/2) {
			bs *= 2
		}
	}
	return max(min(bs, limit), min(minChunkBlockSize, limit))
}

// reused renders DeltaInfo as "n/N" image blocks not downloaded.
func reused(d *otav1.DeltaInfo) string {
	return fmt.Sprintf("%d/%d", d.GetReusedBlocks()+d.GetZeroBlocks(), d.GetImageBlocks())
}

func deltaLog(d *otav1.DeltaInfo) string {
	if d == nil {
		return ""
	}
	return fmt.Sprintf("image_blocks=%d reused=%d zero=%d download_bytes=%d writes_saved=%d",
		d.GetImageBlocks(), d.GetReusedBlocks(), d.GetZeroBlocks(), d.GetDownloadBytes(), d.GetWritesSaved())
}

// carrySummary keeps a delta update's "reused" across the reboot into the trial: the process
// that downloaded the update is gone, and the job's statusDetails, as the ready (or active)
// update left them, are where the value survives. Only a well-formed "n/N" is carried.
func (j *job) carrySummary() {
	v := j.ex.StatusDetails[KeyReused]
	n, total, ok := strings.Cut(v, "/")
	if !ok {
		return
	}
	a, err1 := strconv.ParseUint(n, 10, 64)
	b, err2 := strconv.ParseUint(total, 10, 64)
	if err1 != nil || err2 != nil || a > b {
		return
	}
	j.rep.SetSummary(status.Fields{{Key: KeyReused, Value: v}})
}
