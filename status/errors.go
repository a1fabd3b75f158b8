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

// Fields is the metadata as statusDetails pairs, in key order: the failure's own evidence
// (the read-back sha256, the refused cert_name, the stream_error, ...) that the report puts
// right after the base keys.
func (e *Error) Fields() Fields {
	if e == nil {
		return nil
	}
	return SortedFields(e.Meta)
}

// Class is the class of e's reason.
func (e *Error) Class() Class { return ClassOf(e.Reason) }

// ReasonOf reads the typed reason from any error (see FromError); nil is
// REASON_UNSPECIFIED. Never looks at message text.
func ReasonOf(err error) otav1.Reason {
	if err == nil {
		return otav1.Reason_REASON_UNSPECIFIED
	}
	return FromError(err).Reason
}

// IsClass tells whether err carries a reason of class c (nil never does).
func IsClass(err error, c Class) bool {
	return err != nil && ClassOf(ReasonOf(err)) == c
}

// FromError returns err as an *Error: itself if one is in its chain, decoded from a gRPC
// status with a ReasonDetail, or wrapped with a reason by kind. This is the one place where a
// gRPC status becomes a reason (ToGRPC is the other direction). A status without a detail
// comes from grpc itself, not from the writer's code: an unreachable writer, a refused peer,
// a canceled call, or a message over the size limit (refused before any handler ran: a
// malformed request). Context cancellation is user_abort; anything else REASON_OTHER.
// Nil stays nil.
func FromError(err error) *Error {
	if err == nil {
		return nil
	}
	var e *Error
	if errors.As(err, &e) {
		return e
	}
	r := otav1.Reason_REASON_OTHER
	if st, ok := grpcstatus.FromError(err); ok {
		for _, d := range st.Details() {
			if rd, ok := d.(*otav1.ReasonDetail); ok {
				return &Error{Reason: rd.GetReason(), Msg: rd.GetMessage(), Meta: maps.Clone(rd.GetMetadata()), Err: err}
			}
		}
		if gr, ok := grpcReasons[st.Code()]; ok {
			r = gr
		}
	}
	if errors.Is(err, context.Canceled) {
		r = otav1.Reason_REASON_USER_ABORT
	}
	return &Error{Reason: r, Msg: err.Error(), Err: err}
}

// grpcReasons reads a gRPC status that carries no ReasonDetail.
var grpcReasons = map[codes.Code]otav1.Reason{
	codes.Unavailable:       otav1.Reason_REASON_WRITER_UNAVAILABLE,
	codes.PermissionDenied:  otav1.Reason_REASON_PERMISSION_DENIED,
	codes.Unauthenticated:   otav1.Reason_REASON_PERMISSION_DENIED,
	codes.Canceled:          otav1.Reason_REASON_USER_ABORT,
	codes.ResourceExhausted: otav1.Reason_REASON_INVALID_REQUEST,
}

// ToGRPC converts any error to a gRPC status error carrying a ReasonDetail (the writer's
// server interceptors call it). The code comes from the reason table; a deadline keeps its
// natural code.
func ToGRPC(err error) error {
	if err == nil {
		return nil
	}
	e := FromError(err)
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
