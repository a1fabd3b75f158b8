package emulator

import (
	"errors"
	"fmt"
	"time"
)

// GetStream limits (docs/PROTOCOL.md section 2).
const (
	minBlockSize    = 256
	maxBlockSize    = 128 * 1024
	maxOffset       = 98304
	maxBlockCount   = 98304 // "n" above the offset range can never be served
	maxBitmapBytes  = 12288 // a bitmap must be under this size
	maxRequestBytes = 128 * 1024
	streamVersion   = 1
)

func (e *Emulator) handleStreams(m message, thing string, rest []string) {
	if len(rest) != 3 {
		return // not a request topic of the streams API; AWS gives no reply topic for it
	}
	stream, op, format := rest[0], rest[1], rest[2]
	switch op {
	case "data", "rejected", "description":
		return // our own responses
	}
	prefix := "$aws/things/" + thing + "/streams/" + stream + "/"
	if format != FormatCBOR && format != FormatJSON {
		e.streamReject(m.clientID, prefix, FormatJSON, StreamInvalidTopic, "unknown payload format "+format, "", 0)
		return
	}
	switch op {
	case "get":
		e.getStream(m, prefix, stream, format)
	case "describe":
		e.describeStream(m, prefix, stream, format)
	default:
		e.streamReject(m.clientID, prefix, format, StreamInvalidTopic, "unknown streams operation "+op, "", 0)
	}
}

func (e *Emulator) streamReject(clientID, prefix, format, code, msg, token string, delay time.Duration) {
	b, err := Marshal(format, StreamError{Code: code, Message: msg, ClientToken: token})
	if err != nil {
		e.log.Error("encode stream error", "error", err)
		return
	}
	e.send(clientID, jobReply{topic: prefix + "rejected/" + format, payload: b, delay: delay})
}

func decodeCode(format string, err error) string {
	if errors.Is(err, errSyntax) {
		if format == FormatJSON {
			return StreamInvalidJSON
		}
		return StreamInvalidCBOR
	}
	return StreamInvalidRequest
}

func (e *Emulator) describeStream(m message, prefix, stream, format string) {
	var req DescribeStreamRequest
	token := ""
	if len(m.payload) > 0 {
		var err error
		if format == FormatJSON {
			err = decodeJSON(m.payload, &req)
		} else {
			err = decodeCBOR(m.payload, &req)
		}
		if err != nil {
			e.streamReject(m.clientID, prefix, format, decodeCode(format, err), err.Error(), "", 0)
			return
		}
	}
	if req.ClientToken != nil {
		token = *req.ClientToken
		if len(token) > 64 {
			e.streamReject(m.clientID, prefix, format, StreamInvalidRequest, "client token longer than 64 bytes", "", 0)
			return
		}
	}
	e.mu.Lock()
	j, ok := e.streams[stream]
	var delay time.Duration
	if f := e.faultsLocked(stream, j.idOrEmpty()); f != nil {
		delay = f.Delay
	}
	e.mu.Unlock()
	if !ok {
		e.streamReject(m.clientID, prefix, format, StreamResourceNotFound, "stream "+stream+" not found", token, delay)
		return
	}
	resp := DescribeStreamResponse{ClientToken: token, Version: streamVersion, Description: "OTA job " + j.id, Files: []StreamFile{}}
	for _, f := range j.files {
		resp.Files = append(resp.Files, StreamFile{FileID: int64(f.spec.FileID), Size: f.size})
	}
	b, err := Marshal(format, resp)
	if err != nil {
		e.log.Error("encode description", "error", err)
		return
	}
	e.send(m.clientID, jobReply{topic: prefix + "description/" + format, payload: b, delay: delay})
}

func (j *job) idOrEmpty() string {
	if j == nil {
		return ""
	}
	return j.id
}

// blockPlan is what one GetStream request will publish.
type blockPlan struct {
	file       *jobFile
	blockSize  int64
	sent       []int
	token      string
	delay      time.Duration
	disconnect bool
	// corrupt are the indices in sent whose block goes out with byte corruptAt inverted.
	corrupt   map[int]bool
	corruptAt int64
}

func (e *Emulator) getStream(m message, prefix, stream, format string) {
	req, err := DecodeGetStreamRequest(format, m.payload)
	rec := StreamRequest{At: time.Now(), ClientID: m.clientID, Stream: stream, Format: format}
	token := ""
	if req.ClientToken != nil {
		token = *req.ClientToken
	}
	reject := func(code, msg string, delay time.Duration) {
		rec.Rejected = code
		e.mu.Lock()
		e.records[stream] = append(e.records[stream], rec)
		e.notifyLocked()
		e.mu.Unlock()
		e.streamReject(m.clientID, prefix, format, code, msg, token, delay)
	}
	if err != nil {
		token = ""
		reject(decodeCode(format, err), err.Error(), 0)
		return
	}
	rec.Bitmap = req.Bitmap
	if req.FileID != nil {
		rec.FileID = *req.FileID
	}
	if req.BlockSize != nil {
		rec.BlockSize = *req.BlockSize
	}
	if req.Offset != nil {
		rec.Offset = *req.Offset
	}
	if req.NumBlocks != nil {
		rec.Count = *req.NumBlocks
	}
	if len(token) > 64 {
		token = ""
		reject(StreamInvalidRequest, "client token longer than 64 bytes", 0)
		return
	}

	e.mu.Lock()
	j := e.streams[stream]
	fs := e.faultsLocked(stream, j.idOrEmpty())
	e.mu.Unlock()
	var delay time.Duration
	if fs != nil {
		delay = fs.Delay
	}
	plan, code, msg := e.planBlocks(j, fs, req, &rec) // records the request
	if code != "" {
		e.streamReject(m.clientID, prefix, format, code, msg, token, delay)
		return
	}
	plan.token, plan.delay = token, delay
	e.sendTo(m.clientID, delay, func() { e.sendBlocks(m.clientID, prefix, format, plan) })
}

// planBlocks validates a request and decides, under the lock, which blocks go out (faults
// included), so the seeded random source is used in request order.
func (e *Emulator) planBlocks(j *job, fs *faultState, req GetStreamRequest, rec *StreamRequest) (blockPlan, string, string) {
	if j == nil {
		return blockPlan{}, StreamResourceNotFound, "stream not found"
	}
	e.mu.Lock()
	defer func() {
		e.records[rec.Stream] = append(e.records[rec.Stream], *rec)
		e.notifyLocked()
		e.mu.Unlock()
	}()
	if fs != nil && fs.RejectCode != "" {
		rec.Rejected = fs.RejectCode
		return blockPlan{}, fs.RejectCode, "injected fault"
	}
	reject := func(code, msg string) (blockPlan, string, string) {
		rec.Rejected = code
		return blockPlan{}, code, msg
	}
	if req.StreamVersion != nil && *req.StreamVersion != streamVersion {
		return reject(StreamVersionMismatch, fmt.Sprintf("stream version is %d, request expects %d", streamVersion, *req.StreamVersion))
	}
	if req.FileID == nil {
		return reject(StreamInvalidRequest, "file id (f) is required")
	}
	var file *jobFile
	for _, f := range j.files {
		if int64(f.spec.FileID) == *req.FileID {
			file = f
		}
	}
	if file == nil {
		return reject(StreamResourceNotFound, fmt.Sprintf("file id %d not in stream", *req.FileID))
	}
	if req.BlockSize == nil || *req.BlockSize < minBlockSize || *req.BlockSize > maxBlockSize {
		return reject(StreamBlockSizeOutOfBounds, fmt.Sprintf("block size must be %d..%d", minBlockSize, maxBlockSize))
	}
	l := *req.BlockSize
	o := int64(0)
	if req.Offset != nil {
		o = *req.Offset
	}
	numBlocks := (file.size + l - 1) / l
	if o < 0 || o > maxOffset || o >= numBlocks {
		return reject(StreamOffsetOutOfBounds, fmt.Sprintf("offset %d outside the file's %d blocks", o, numBlocks))
	}
	if len(req.Bitmap) >= maxBitmapBytes {
		return reject(StreamBlockBitmapLimit, fmt.Sprintf("bitmap of %d bytes, must be under %d", len(req.Bitmap), maxBitmapBytes))
	}
	if req.NumBlocks != nil && *req.NumBlocks > maxBlockCount {
		return reject(StreamBlockCountLimitExceeded, fmt.Sprintf("block count %d over %d", *req.NumBlocks, maxBlockCount))
	}
	if req.NumBlocks != nil && *req.NumBlocks < 0 {
		return reject(StreamInvalidRequest, "block count (n) must not be negative")
	}
	// At most 128 KB of data per request: the rest is silently not sent. Without n the count
	// is that cap, 131072 / l blocks from o; n = 0 counts as absent (docs/PROTOCOL.md,
	// section 2: AWS does not say, and a request for nothing would never be answered).
	limit := maxRequestBytes / l
	if req.NumBlocks != nil && *req.NumBlocks > 0 && *req.NumBlocks < limit {
		limit = *req.NumBlocks
	}
	var wanted []int
	if req.Bitmap != nil {
		for k := 0; k < len(req.Bitmap)*8 && int64(len(wanted)) < limit; k++ {
			if req.Bitmap[k>>3]&(1<<(k&7)) != 0 && o+int64(k) < numBlocks {
				wanted = append(wanted, int(o)+k)
			}
		}
	} else {
		for b := o; b < numBlocks && b-o < limit; b++ {
			wanted = append(wanted, int(b))
		}
	}
	rec.Wanted = wanted
	plan := blockPlan{file: file, blockSize: l}
	for _, b := range wanted {
		if fs == nil {
			plan.sent = append(plan.sent, b)
			continue
		}
		drop, dup := fs.rng.Float64(), fs.rng.Float64() // always two draws: replayable
		if drop < fs.Drop {
			rec.Dropped = append(rec.Dropped, b)
			continue
		}
		plan.sent = append(plan.sent, b)
		if dup < fs.Duplicate {
			plan.sent = append(plan.sent, b)
		}
	}
	if fs != nil && fs.Reorder {
		fs.rng.Shuffle(len(plan.sent), func(a, b int) { plan.sent[a], plan.sent[b] = plan.sent[b], plan.sent[a] })
	}
	if fs != nil && fs.StallAfterBlocks > 0 {
		if left := max(fs.StallAfterBlocks-fs.blocksSent, 0); left < len(plan.sent) {
			rec.Dropped = append(rec.Dropped, plan.sent[left:]...)
			plan.sent = plan.sent[:left]
		}
	}
	if fs != nil && fs.DisconnectAfterBlocks > 0 && !fs.disconnected {
		if left := fs.DisconnectAfterBlocks - fs.blocksSent; left <= len(plan.sent) {
			plan.sent = plan.sent[:left]
			plan.disconnect = true
			fs.disconnected = true
		}
	}
	if fs != nil && fs.CorruptBlocks > 0 && int64(file.spec.FileID) == int64(fs.CorruptFileID) {
		for i, b := range plan.sent {
			if fs.corrupted < fs.CorruptBlocks && int64(b) == fs.CorruptOffset/l {
				if plan.corrupt == nil {
					plan.corrupt = map[int]bool{}
				}
				plan.corrupt[i], plan.corruptAt = true, fs.CorruptOffset
				fs.corrupted++
				rec.Corrupted = append(rec.Corrupted, b)
			}
		}
	}
	if fs != nil {
		fs.blocksSent += len(plan.sent)
	}
	rec.Sent = append([]int(nil), plan.sent...)
	return plan, "", ""
}

// sendBlocks reads each block from the file with ReadAt: a block at a time, never the file.
// CBOR blocks are read straight into the message after its encoded header (the same bytes
// Marshal makes, without two more copies of every block).
func (e *Emulator) sendBlocks(clientID, prefix, format string, p blockPlan) {
	var buf []byte
	if format != FormatCBOR {
		buf = make([]byte, p.blockSize)
	}
	topic := prefix + "data/" + format
	for si, b := range p.sent {
		select {
		case <-e.stop:
			return
		default:
		}
		off := int64(b) * p.blockSize
		n := p.blockSize
		if off+n > p.file.size {
			n = p.file.size - off
		}
		blk := DataBlock{ClientToken: p.token, FileID: int64(p.file.spec.FileID), BlockID: int64(b), Length: n}
		var payload, data []byte
		var err error
		if format == FormatCBOR {
			// A fresh message per block: the embedded broker may still hold the previous one.
			if payload, err = cborBlockHeader(blk, int(n)); err == nil {
				data = payload[len(payload)-int(n):]
			}
		} else {
			data = buf[:n]
		}
		if err != nil {
			e.log.Error("encode block", "error", err)
			return
		}
		if _, err := p.file.f.ReadAt(data, off); err != nil {
			e.log.Error("read block", "block", b, "error", err)
			e.streamReject(clientID, prefix, format, StreamInternalError, "read failed", p.token, 0)
			return
		}
		if p.corrupt[si] {
			data[p.corruptAt-off] ^= 0xff
			e.log.Info("fault: block sent altered", "block", b, "offset", p.corruptAt)
		}
		if format != FormatCBOR {
			blk.Payload = data
			if payload, err = Marshal(format, blk); err != nil {
				e.log.Error("encode block", "error", err)
				return
			}
		}
		if err := e.tr.respond(clientID, topic, payload, false); err != nil {
			e.log.Warn("send block", "block", b, "error", err)
			return
		}
	}
	if p.disconnect {
		e.log.Info("fault: disconnecting client after blocks", "client", clientID)
		e.tr.disconnect(clientID)
	}
}
