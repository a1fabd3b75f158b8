package agent

import (
	"context"
	"errors"
	"fmt"
	"slices"
	"strings"
	"time"

	"github.com/gwota/gwota/internal/bitmap"
	"github.com/gwota/gwota/netagent/blocksink"
	"github.com/gwota/gwota/netagent/chunksink"
	"github.com/gwota/gwota/netagent/jobdoc"
	"github.com/gwota/gwota/netagent/pathselect"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// KeyProtocol is the statusDetails key naming the protocol a file is (or was last) being
// downloaded with: "mqtt" or "http".
const KeyProtocol = "protocol"

// httpMaxAhead bounds the block data an HTTP download hands the writer beyond what the
// writer acknowledged durable: what a writer crash costs fetched again. Over MQTT the bound
// is the stream window (fetching again is held to AWS's 512 KiB/s quota); over HTTP it is
// not, so the bound is larger and the writer syncs every 8 MiB instead of every half window:
// each sync the bound waits for stalls the download (test/bench/httpvscurl measures it).
const httpMaxAhead = 16 << 20

// sentSink is a sink that hands block buffers back once it has sent them (*writerlink.Sink);
// recycler is a downloader that reuses them (*httpdl.Downloader).
type sentSink interface{ SetOnSent(func([]byte)) }
type recycler interface{ Recycle([]byte) }

// aheadSink is a sink whose bound can be set per protocol (*writerlink.Sink).
type aheadSink interface {
	MaxAhead() int64
	SetMaxAhead(n int64)
}

// newSelector builds the protocol selector of cfg. PreferHTTP (the older setting) is
// protocol = http when Protocol is not set.
func newSelector(cfg Config) *pathselect.Selector {
	mode := cfg.Protocol
	if mode == "" && cfg.PreferHTTP {
		mode = pathselect.OnlyHTTP
	}
	return pathselect.New(pathselect.Config{Mode: mode, LinkBandwidth: cfg.LinkBandwidth, File: cfg.BandwidthFile})
}

// protocols returns the protocols to try for f, best first (pathselect decides among the ones
// the job offers and ota-net has a downloader for). None is invalid_protocol.
func (a *Agent) protocols(doc *jobdoc.Document, f jobdoc.File) ([]string, error) {
	if _, err := doc.Choose(f, false); err != nil {
		return nil, err
	}
	order, why := a.path.Order(pathselect.Offer{MQTT: doc.HasMQTT() && a.stream != nil, HTTP: doc.HasHTTP(f) && a.http != nil})
	if len(order) == 0 {
		return nil, status.Errorf(otav1.Reason_REASON_INVALID_PROTOCOL, "file %d: no downloader for %v", f.Index, doc.Protocols)
	}
	a.log.Debug("protocol chosen", "file", f.Index, "order", order, "why", why)
	return order, nil
}

// useProtocol makes the job's reports name proto.
func (j *job) useProtocol(proto string) {
	j.rep.SetFields(status.Fields{{Key: KeyProtocol, Value: strings.ToLower(proto)}})
}

// fetch downloads f's missing blocks into sess over protos in order. When one fails at the
// download level (pathselect.Fallback: the server, URL, proxy or stream failed), what it
// delivered is made durable and the next protocol fetches only what the writer still misses,
// through the same session. Any other failure, or the last protocol's, is returned as it is
// (its typed reason is the job's). A completed download feeds the bandwidth estimate.
func (j *job) fetch(ctx context.Context, doc *jobdoc.Document, f jobdoc.File, protos []string, sess Session, dl *fileDownload) error {
	a := j.a
	var sink blocksink.Sink
	if err := a.call(ctx, "open sink", func(ctx context.Context) (err error) { sink, err = sess.OpenSink(ctx); return err }); err != nil {
		return err
	}
	defer sink.Close()
	raw := sink
	missing := sess.Missing()
	if dl.kind == otav1.SessionKind_SESSION_KIND_CHUNKS {
		// A chunk file: the downloaders fetch the stream blocks overlapping the chunks the
		// writer lacks, the chunk sink assembles whole chunks for the writer.
		w, ok := sink.(chunksink.Writer)
		if !ok {
			return status.Errorf(otav1.Reason_REASON_OTHER, "writer sink %T cannot take chunks", sink)
		}
		cs, err := chunksink.New(w, dl.layout, missing)
		if err != nil {
			return err
		}
		sink, missing = cs, cs.Missing()
		defer func() {
			j.log.Info("chunk file download", "stream_blocks", cs.Blocks(), "fetched_blocks", dl.total, "peak_chunk_bytes", cs.Peak)
		}()
	}
	tr := &tracker{Sink: sink, missing: slices.Clone(missing)}
	setAhead := func(string) {}
	if as, ok := raw.(aheadSink); ok && as.MaxAhead() > 0 {
		window := as.MaxAhead()
		setAhead = func(proto string) {
			if proto == pathselect.HTTP {
				as.SetMaxAhead(max(window, httpMaxAhead))
			} else {
				as.SetMaxAhead(window)
			}
		}
	}
	var err error
	for i, proto := range protos {
		if i > 0 {
			if ferr := tr.Flush(ctx); ferr != nil && !isResumed(ferr) {
				return ferr
			}
			missing = slices.Clone(tr.missing)
			j.log.Warn("download failed; going on with the other protocol", "failed", protos[i-1], "reason", status.String(status.ReasonOf(err)),
				"error", err, "protocol", proto, "missing_blocks", missing.Count())
			j.useProtocol(proto)
		}
		setAhead(proto) // nothing in flight: first attempt, or flushed above
		if ss, ok := raw.(sentSink); ok {
			// The HTTP downloader's blocks go to the writer's sink as they are (a chunk file's
			// go through the chunk sink, which assembles chunks in buffers of its own, and the
			// stream downloader's buffers are not recycled): only then may the sink hand them
			// back for reuse.
			rc, ok := a.http.(recycler)
			if proto == pathselect.HTTP && dl.kind != otav1.SessionKind_SESSION_KIND_CHUNKS && ok {
				ss.SetOnSent(rc.Recycle)
			} else {
				ss.SetOnSent(nil)
			}
		}
		tr.bytes = 0
		start := time.Now()
		err = j.download(ctx, doc, f, proto, dl, tr, missing)
		if err == nil {
			took := time.Since(start)
			// The download's own time: from the downloader's start to every block durable in
			// the writer (test/bench/httpvscurl reads it).
			j.log.Info("file downloaded", "file", f.Index, "protocol", proto, "bytes", tr.bytes,
				"seconds", fmt.Sprintf("%.3f", took.Seconds()), "rate", pathselect.FormatRate(float64(tr.bytes)/took.Seconds()))
			if oerr := a.path.Observe(proto, tr.bytes, took); oerr != nil {
				j.log.Warn("bandwidth estimate not saved", "error", oerr)
			}
			return nil
		}
		if ctx.Err() != nil || !pathselect.Fallback(err) {
			return err
		}
	}
	return err
}

// tracker passes blocks to the writer's sink and keeps the writer's missing bitmap as of the
// last Flush: a block leaves it once the sink took it (durable at the next nil Flush), and a
// resumed session replaces it with the writer's own.
type tracker struct {
	blocksink.Sink
	missing bitmap.Bitmap
	bytes   int64 // taken since the attempt started
}

func (t *tracker) seen(err error) error {
	var res *blocksink.ResumedError
	if errors.As(err, &res) {
		t.missing = slices.Clone(res.Missing)
	}
	return err
}

func (t *tracker) WriteBlock(ctx context.Context, i int, data []byte) error {
	n := len(data)
	if err := t.Sink.WriteBlock(ctx, i, data); err != nil {
		return t.seen(err)
	}
	t.missing.Clear(i)
	t.bytes += int64(n)
	return nil
}

func (t *tracker) Sync(ctx context.Context) error  { return t.seen(t.Sink.Sync(ctx)) }
func (t *tracker) Flush(ctx context.Context) error { return t.seen(t.Sink.Flush(ctx)) }

func isResumed(err error) bool {
	var res *blocksink.ResumedError
	return errors.As(err, &res)
}
