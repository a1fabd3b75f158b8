package server

import (
	"context"
	"errors"
	"io"

	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/mem"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/sharedbuf"
)

// service maps each RPC onto the api.Writer (the GRPCServer{Impl} of hashicorp/go-plugin's
// model). It returns the writer's errors unchanged (or typed *status.Error for what it checks
// itself); the interceptors convert them.
type service struct {
	otav1.UnimplementedWriterServer
	impl   api.Writer
	log    hclog.Logger
	maxMsg int
	codec  *blockCodec // releases the buffers WriteBlocksRequests alias
	bufs   *sharedbuf.Registry
}

func (s *service) Handshake(ctx context.Context, req *otav1.HandshakeRequest) (*otav1.HandshakeResponse, error) {
	resp, err := s.impl.Handshake(ctx, req)
	if err != nil {
		return nil, err
	}
	if resp == nil {
		resp = &otav1.HandshakeResponse{}
	}
	// The transport limit is the adapter's business, not the writer's; so is the buffer.
	resp.MaxMessageSize = uint32(s.maxMsg)
	if s.bufs != nil {
		resp.SharedBufferSize = uint32(s.bufs.Size())
	}
	s.log.Debug("handshake", "client", req.GetClient(), "protocol", req.GetProtocolVersion())
	return resp, nil
}

func (s *service) GetState(ctx context.Context, _ *otav1.GetStateRequest) (*otav1.DeviceState, error) {
	return s.impl.State(ctx)
}

func (s *service) BeginSession(ctx context.Context, req *otav1.BeginSessionRequest) (*otav1.BeginSessionResponse, error) {
	return s.impl.Begin(ctx, req)
}

func checkBatch(req *otav1.WriteBlocksRequest) error {
	if n := len(req.GetBlocks()); n > api.MaxBlocksPerMessage {
		return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "%d blocks in one message, at most %d", n, api.MaxBlocksPerMessage)
	}
	return nil
}

func ack(sessionID string, seq uint64, r api.WriteResult) *otav1.WriteAck {
	a := &otav1.WriteAck{SessionId: sessionID, DurableBlocks: r.Durable, TotalBlocks: r.Total, ReceivedBlocks: r.Received}
	if r.Synced {
		a.DurableSeq = seq
	}
	return a
}

// WriteBlocks: one session per stream, seq strictly increasing, an ack each time the writer
// reports everything so far durable. The first error ends the stream with its reason; the
// client reopens a stream and resumes from the last acknowledged seq. Blocks may instead
// refer to the stream's shared buffer (writer/sharedbuf): they are copied out of it first,
// and acks tell the client (released_seq) when the ranges it used are free again.
func (s *service) WriteBlocks(stream grpc.BidiStreamingServer[otav1.WriteBlocksRequest, otav1.WriteAck]) error {
	ctx := stream.Context()
	var sessionID string
	var lastSeq uint64
	first := true
	var sb *streamBuffer
	// req's blocks alias a received buffer, or copied (a mem.Buffer from the receive pool),
	// released once the engine has written them.
	var req *otav1.WriteBlocksRequest
	var copied mem.Buffer
	free := func() {
		s.codec.release(req)
		if copied != nil {
			copied.Free()
			copied = nil
		}
	}
	defer free()
	for {
		free()
		var err error
		req, err = stream.Recv()
		if errors.Is(err, io.EOF) {
			return nil
		}
		if err != nil {
			if ctx.Err() != nil {
				// The client closed the stream (ota-net's sink ends every stream this way,
				// after its last flush): the end of the blocks, not a failure. What was not
				// acknowledged durable is fetched again on a resume.
				s.log.Debug("block stream closed by the client", "session", sessionID, "last_seq", lastSeq)
				return nil
			}
			// grpc has already sent its own status for transport-level refusals (a message
			// over the size limit is ResourceExhausted); this only ends the handler.
			return err
		}
		if first {
			sessionID = req.GetSessionId()
		} else if req.GetSessionId() != sessionID {
			return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "one session per stream: got %q after %q", req.GetSessionId(), sessionID)
		}
		if !first && req.GetSeq() <= lastSeq {
			return status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "seq %d not above previous %d", req.GetSeq(), lastSeq)
		}
		first, lastSeq = false, req.GetSeq()
		if err := checkBatch(req); err != nil {
			return err
		}
		if err := s.bind(ctx, &sb, req); err != nil {
			return err
		}
		if hasRefs(req) {
			if copied, err = s.fill(sb, req); err != nil {
				return err
			}
			// The ranges are copied: the client may write them again while the engine
			// writes (and maybe syncs) this message.
			if sb.releaseDue() {
				if done, err := s.sendAck(stream, &otav1.WriteAck{SessionId: sessionID, ReleasedSeq: req.GetSeq()}); done {
					return err
				}
				sb.unreleased = 0
			}
		}
		res, err := s.impl.Write(ctx, sessionID, req.GetBlocks(), req.GetSync())
		if err != nil {
			return err
		}
		if !res.Synced {
			continue
		}
		a := ack(sessionID, req.GetSeq(), res)
		if sb != nil {
			a.ReleasedSeq, sb.unreleased = req.GetSeq(), 0
		}
		if done, err := s.sendAck(stream, a); done {
			return err
		}
	}
}

// sendAck sends a; done means the handler must return err (nil: the client closed the
// stream, which ends it without failure).
func (s *service) sendAck(stream grpc.BidiStreamingServer[otav1.WriteBlocksRequest, otav1.WriteAck], a *otav1.WriteAck) (done bool, err error) {
	if err := stream.Send(a); err != nil {
		if stream.Context().Err() != nil {
			s.log.Debug("block stream closed by the client before its ack", "session", a.GetSessionId())
			return true, nil
		}
		return true, err
	}
	return false, nil
}

func (s *service) WriteBatch(ctx context.Context, req *otav1.WriteBlocksRequest) (*otav1.WriteAck, error) {
	// The request's buffer is released by Server.unaryErrors, which sees every call.
	if err := checkBatch(req); err != nil {
		return nil, err
	}
	if hasRefs(req) || len(req.GetBufferToken()) > 0 {
		return nil, status.Errorf(otav1.Reason_REASON_INVALID_REQUEST, "a shared buffer is for WriteBlocks streams only")
	}
	res, err := s.impl.Write(ctx, req.GetSessionId(), req.GetBlocks(), req.GetSync())
	if err != nil {
		return nil, err
	}
	return ack(req.GetSessionId(), req.GetSeq(), res), nil
}

func (s *service) FinishSession(ctx context.Context, req *otav1.FinishSessionRequest) (*otav1.FinishSessionResponse, error) {
	return s.impl.Finish(ctx, req.GetSessionId())
}

func (s *service) AbortSession(ctx context.Context, req *otav1.AbortSessionRequest) (*otav1.AbortSessionResponse, error) {
	if err := s.impl.Abort(ctx, req.GetSessionId(), req.GetReason()); err != nil {
		return nil, err
	}
	return &otav1.AbortSessionResponse{}, nil
}

func (s *service) Activate(ctx context.Context, req *otav1.ActivateRequest) (*otav1.ActivateResponse, error) {
	return s.impl.Activate(ctx, req.GetSessionId())
}

func (s *service) Reboot(ctx context.Context, _ *otav1.RebootRequest) (*otav1.RebootResponse, error) {
	if err := s.impl.Reboot(ctx); err != nil {
		return nil, err
	}
	return &otav1.RebootResponse{}, nil
}

func (s *service) SelfTest(ctx context.Context, req *otav1.SelfTestRequest) (*otav1.SelfTestResponse, error) {
	return s.impl.SelfTest(ctx, req.GetJobId())
}

func (s *service) Commit(ctx context.Context, req *otav1.CommitRequest) (*otav1.CommitResponse, error) {
	return s.impl.Commit(ctx, req.GetJobId())
}

func (s *service) Reject(ctx context.Context, req *otav1.RejectRequest) (*otav1.RejectResponse, error) {
	return s.impl.Reject(ctx, req.GetJobId(), req.GetReason())
}

func (s *service) GetExtensions(ctx context.Context, _ *otav1.GetExtensionsRequest) (*otav1.GetExtensionsResponse, error) {
	v, err := s.impl.Extensions(ctx)
	if err != nil {
		return nil, err
	}
	resp := &otav1.GetExtensionsResponse{Values: v.Map()}
	for _, f := range v {
		resp.Fields = append(resp.Fields, &otav1.ExtensionField{Key: f.Key, Value: f.Value})
	}
	return resp, nil
}
