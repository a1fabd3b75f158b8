package agent

import (
	"context"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/netagent/blocksink"
	"github.com/gwota/gwota/netagent/httpdl"
	"github.com/gwota/gwota/netagent/jobs"
	"github.com/gwota/gwota/netagent/stream"
	"github.com/gwota/gwota/netagent/writerlink"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/api"
)

// Jobs is the AWS IoT Jobs client as the agent uses it (jobs.Client provides it).
type Jobs interface {
	Start(ctx context.Context) error
	Next() <-chan *jobs.Execution
	Describe(ctx context.Context, jobID string) (*jobs.Execution, error)
	Update(ctx context.Context, jobID string, u jobs.Update) (*jobs.ExecutionState, error)
}

// Writer is the writer as the agent drives it: the writer API's control plane (Abort also
// reconciles sessions whose job is gone), and sessions opened through the writer link, which
// streams their blocks. Errors carry the writer's typed reason (status.ReasonOf); an
// unreachable writer reads as REASON_WRITER_UNAVAILABLE.
type Writer interface {
	api.Control
	Begin(ctx context.Context, req *otav1.BeginSessionRequest) (Session, error)
}

// Session is one writer session (one file of a job).
type Session interface {
	ID() string
	BlockSize() int
	// Missing is the bitmap of blocks the writer does not hold durably.
	Missing() bitmap.Bitmap
	Info() *otav1.SessionInfo
	// ChunkSizes is a CHUNKS session's compressed size of every chunk (nil otherwise).
	ChunkSizes() []uint32
	// OpenSink opens the session's block sink; the agent closes it, the downloader uses it.
	OpenSink(ctx context.Context) (blocksink.Sink, error)
	Finish(ctx context.Context) (*otav1.FinishSessionResponse, error)
	Abort(ctx context.Context, reason otav1.Reason) error
}

// StreamDownloader downloads over MQTT streams (stream.Downloader provides it).
type StreamDownloader interface {
	Download(ctx context.Context, f stream.File, missing bitmap.Bitmap, sink blocksink.Sink) (stream.Stats, error)
}

// HTTPDownloader downloads from presigned URLs (httpdl.Downloader provides it).
type HTTPDownloader interface {
	Download(ctx context.Context, f httpdl.File, missing bitmap.Bitmap, sink blocksink.Sink, refresh httpdl.RefreshFunc) (httpdl.Stats, error)
}

var _ Writer = linkWriter{}

// LinkWriter adapts a writerlink.Link to Writer.
func LinkWriter(l *writerlink.Link) Writer { return linkWriter{l} }

type linkWriter struct{ *writerlink.Link }

func (w linkWriter) Begin(ctx context.Context, req *otav1.BeginSessionRequest) (Session, error) {
	s, err := w.Link.Begin(ctx, req)
	if err != nil {
		return nil, err
	}
	return linkSession{s}, nil
}

type linkSession struct{ *writerlink.Session }

func (s linkSession) OpenSink(ctx context.Context) (blocksink.Sink, error) {
	k, err := s.Session.Sink(ctx)
	if err != nil {
		return nil, err
	}
	return k, nil
}
