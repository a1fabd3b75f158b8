package status

import (
	"context"
	"errors"
	"fmt"
	"maps"

	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

// Error is a failure with a typed reason. The writer's core returns these; the gRPC adapter
// turns them into statuses with a ReasonDetail (ToGRPC), and clients get them back (FromError).
type Error struct {
	Reason otav1.Reason
	// Msg is for humans and logs; code never branches on it.
	Msg  string
	Meta map[string]string
	// Err is the underlying cause, if any (kept for errors.Is/As, not sent over the wire).
	Err error
}

// Errorf builds an *Error. A %w verb in format becomes the Err cause.
func Errorf(r otav1.Reason, format string, args ...any) *Error {
	err := fmt.Errorf(format, args...)
	return &Error{Reason: r, Msg: err.Error(), Err: errors.Unwrap(err)}
}

// WithMeta returns e with k=v added to its metadata.
func (e *Error) WithMeta(k, v string) *Error {
	if e.Meta == nil {
		e.Meta = map[string]string{}
	}
	e.Meta[k] = v
	return e
}

func (e *Error) Error() string {
	if e.Msg == "" {
		return String(e.Reason)
	}
	return e.Msg + " (" + String(e.Reason) + ")"
}

func (e *Error) Unwrap() error { return e.Err }

// ReasonOf reads the typed reason from any error: an *Error in its chain, or a gRPC status
// carrying a ReasonDetail. Errors without one map by kind: context cancellation and deadline,
// unreachable writer, otherwise REASON_OTHER. Never looks at message text.
func ReasonOf(err error) otav1.Reason {
	if err == nil {
		return otav1.Reason_REASON_UNSPECIFIED
	}
	var e *Error
	if errors.As(err, &e) {
		return e.Reason
	}
	if st, ok := grpcstatus.FromError(err); ok {
		for _, d := range st.Details() {
			if rd, ok := d.(*otav1.ReasonDetail); ok {
				return rd.GetReason()
			}
		}
		switch st.Code() {
		case codes.Unavailable:
			return otav1.Reason_REASON_WRITER_UNAVAILABLE
		case codes.PermissionDenied, codes.Unauthenticated:
			return otav1.Reason_REASON_PERMISSION_DENIED
		case codes.Canceled:
			return otav1.Reason_REASON_USER_ABORT
		case codes.ResourceExhausted:
			// grpc-go refuses an oversize message before any interceptor can attach a reason.
			return otav1.Reason_REASON_INVALID_REQUEST
		}
	}
	if errors.Is(err, context.Canceled) {
		return otav1.Reason_REASON_USER_ABORT
	}
	return otav1.Reason_REASON_OTHER
}

// FromError returns err as an *Error: itself if it is one, decoded from a gRPC status with a
// ReasonDetail, or wrapped with ReasonOf(err). Nil stays nil.
func FromError(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	if st, ok := grpcstatus.FromError(err); ok {
		for _, d := range st.Details() {
			if rd, ok := d.(*otav1.ReasonDetail); ok {
				return &Error{Reason: rd.GetReason(), Msg: rd.GetMessage(), Meta: maps.Clone(rd.GetMetadata()), Err: err}
			}
		}
	}
	return &Error{Reason: ReasonOf(err), Msg: err.Error(), Err: err}
}

// ToGRPC converts any error to a gRPC status error carrying a ReasonDetail. It is the one
// boundary where reasons become gRPC codes (the writer's server interceptors call it).
// Context errors keep their natural codes.
func ToGRPC(err error) error {
	if err == nil {
		return nil
	}
	if st, ok := grpcstatus.FromError(err); ok {
		for _, d := range st.Details() {
			if _, ok := d.(*otav1.ReasonDetail); ok {
				return st.Err()
			}
		}
	}
	var e *Error
	if !errors.As(err, &e) {
		switch {
		case errors.Is(err, context.Canceled):
			e = &Error{Reason: otav1.Reason_REASON_USER_ABORT, Msg: err.Error()}
		case errors.Is(err, context.DeadlineExceeded):
			e = &Error{Reason: otav1.Reason_REASON_OTHER, Msg: err.Error()}
		default:
			e = &Error{Reason: otav1.Reason_REASON_OTHER, Msg: err.Error()}
		}
	}
	code := GRPCCode(e.Reason)
	if errors.Is(err, context.DeadlineExceeded) {
		code = codes.DeadlineExceeded
	}
	st := grpcstatus.New(code, e.Error())
	withDetail, derr := st.WithDetails(&otav1.ReasonDetail{Reason: e.Reason, Message: e.Msg, Metadata: e.Meta})
	if derr != nil {
		return st.Err()
	}
	return withDetail.Err()
}
