// Package blocksink declares what ota-net's two downloaders (netagent/stream over MQTT,
// netagent/httpdl over HTTP) share: the Sink their blocks go to, with its error contract, and
// the Progress they report. netagent/writerlink implements the Sink (blocks to the writer
// over gRPC); netagent/agent opens one per file and hands it to a downloader as it is.
package blocksink

import (
	"context"
	"fmt"

	"github.com/gwota/gwota/internal/bitmap"
)

// Sink takes the blocks of one writer session, in any order, and makes them durable. One
// goroutine uses it: the downloader's (Durable may be read from any).
//
// Errors: every method returns nil, a *ResumedError, or a final error.
//
//   - *ResumedError: the link to the writer broke and the sink repaired it itself (it waited
//     for the writer, began the session again and the writer resumed it). Blocks that were
//     not durable may be lost, the one of the failed call included. The downloader forgets
//     what it handed over, takes ResumedError.Missing as the blocks still to fetch, and goes
//     on with the same Sink.
//   - Any other error is final for the session: the writer refused the data (its typed
//     reason, status.ReasonOf), the writer did not come back within the sink's reconnect
//     timeout (writer_unavailable), the sink is closed, or ctx ended. The downloader stops
//     and returns it unchanged, so its reason reaches the job.
//
// Retrying is the sink's business: a downloader never repeats a failed call as it was.
type Sink interface {
	// WriteBlock takes block i of the session (every block has the session's block size
	// but the last). data belongs to the sink once the call returns nil; nil does not
	// mean durable (the sink batches).
	WriteBlock(ctx context.Context, i int, data []byte) error
	// Sync asks the writer to make every block taken so far durable, without waiting for
	// it. It costs nothing when nothing is pending. Downloaders call it when the network
	// goes quiet, so what they received survives a writer crash during the wait.
	Sync(ctx context.Context) error
	// Flush returns nil once every block taken so far is durable (Durable counts them).
	Flush(ctx context.Context) error
	// Durable is the number of the session's blocks the writer last acknowledged durable,
	// resumed sessions' earlier blocks included. It lags WriteBlock; it never drops but
	// after a *ResumedError.
	Durable() int
	// Close ends the sink without waiting (Flush first to keep everything). The owner that
	// opened the sink closes it, never a downloader. Safe to call more than once; later
	// calls of the other methods fail.
	Close()
}

// ResumedError is what a Sink returns after it repaired a broken link to the writer: the
// writer resumed the session and Missing is its bitmap of the blocks it does not hold
// durably (block k is bit k&7 of byte k>>3; exactly one bit per block of the file).
type ResumedError struct {
	// Cause is the failure that broke the link.
	Cause error
	// Missing is the writer's bitmap of missing blocks after the resume.
	Missing bitmap.Bitmap
}

func (e *ResumedError) Error() string {
	return fmt.Sprintf("writer stream broke (%v); session resumed", e.Cause)
}

func (e *ResumedError) Unwrap() error { return e.Cause }

// Progress of one download, in blocks.
type Progress struct {
	// Received counts the blocks the sink took (durable or not) and has not lost since.
	Received int
	// Durable is the sink's Durable.
	Durable int
	Total   int
}

// ProgressFunc is told a download's progress after every new block and after the download
// reloaded the writer's bitmap. It runs on the downloader's goroutine: keep it cheap.
type ProgressFunc func(Progress)
