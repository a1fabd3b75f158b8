package engine

import (
	"io"

	"github.com/gwota/gwota/internal/crashpoint"
)

// halfwayHook returns r, or in a crash-point build a reader that passes the point
// WriterVerify once the read-back crosses half of the image.
func halfwayHook(r io.ReaderAt, size int64) io.ReaderAt {
	if !crashpoint.Enabled {
		return r
	}
	return &halfway{r: r, at: size / 2}
}

type halfway struct {
	r  io.ReaderAt
	at int64
}

func (h *halfway) ReadAt(p []byte, off int64) (int, error) {
	if off <= h.at && h.at < off+int64(len(p)) {
		crashpoint.Hit(crashpoint.WriterVerify)
	}
	return h.r.ReadAt(p, off)
}
