// Package status holds the reason table (proto enum -> statusDetails string and gRPC code),
// the typed error that carries a reason across the gRPC boundary, and the builder of the flat
// statusDetails map that AWS IoT Jobs accepts.
package status

import (
	"fmt"
	"strconv"

	"google.golang.org/grpc/codes"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

// Entry is one row of the reason table.
type Entry struct {
	// Name is the statusDetails "reason" string.
	Name string
	// Code is the gRPC code the writer returns with this reason.
	Code codes.Code
	// Class is what a caller may do after the failure; code branches on it, not on
	// particular reasons.
	Class Class
}

// Class groups reasons by what the caller does next (docs/REASONS.md, "Classes").
type Class int

const (
	// ClassFatal: this job cannot succeed as it is (its image, signature, document or
	// download is bad, or the failure is unknown). The job fails; nothing is retried.
	ClassFatal Class = iota
	// ClassUnavailable: the writer could not be reached, so nothing was decided. The same
	// call is repeated once it is back.
	ClassUnavailable
	// ClassRetryable: a fault of the medium, the state directory or the boot control in
	// this step. The writer keeps the session, so the same step may succeed when repeated.
	ClassRetryable
	// ClassRefused: the writer's configuration, policy or state refuses the call; nothing
	// changed.
	ClassRefused
	// ClassInvalid: the caller broke the protocol (a malformed field, a block outside the
	// file).
	ClassInvalid
	// ClassGone: the session is not there (any more), or not in the state the call needs:
	// begin it again. Aborting such a session has nothing left to do.
	ClassGone
	// ClassCanceled: stopped from outside the device (the job was canceled or replaced, the
	// caller went away). Not a fault of the device.
	ClassCanceled
	// ClassRollback: the trial image failed its self test or was rolled back.
	ClassRollback
)

var classNames = [...]string{"fatal", "unavailable", "retryable", "refused", "invalid", "gone", "canceled", "rollback"}

// String is the class's name as docs/REASONS.md writes it.
func (c Class) String() string {
	if int(c) < 0 || int(c) >= len(classNames) {
		return fmt.Sprintf("class(%d)", int(c))
	}
	return classNames[c]
}

// Table maps every Reason to its statusDetails string and gRPC code. TestTableComplete proves
// every enum value is here; everything else (docs, metrics) derives from it.
var Table = map[otav1.Reason]Entry{
	otav1.Reason_REASON_UNSPECIFIED: {"other", codes.Unknown, ClassFatal},

	otav1.Reason_REASON_SIG_CHECK_FAILED:  {"sig_check_failed", codes.FailedPrecondition, ClassFatal},
	otav1.Reason_REASON_FILE_WRITE_FAILED: {"file_write_failed", codes.Internal, ClassRetryable},
	otav1.Reason_REASON_FILE_TOO_LARGE:    {"file_too_large", codes.OutOfRange, ClassFatal},
	otav1.Reason_REASON_FILE_CLOSE_FAILED: {"file_close_failed", codes.Internal, ClassRetryable},
	otav1.Reason_REASON_BAD_FILE_HANDLE:   {"bad_file_handle", codes.NotFound, ClassGone},
	otav1.Reason_REASON_UNSUPPORTED:       {"unsupported", codes.Unimplemented, ClassFatal},
	otav1.Reason_REASON_BAD_IMAGE_STATE:   {"bad_image_state", codes.FailedPrecondition, ClassRefused},
	otav1.Reason_REASON_COMMIT_FAILED:     {"commit_failed", codes.Internal, ClassRetryable},
	otav1.Reason_REASON_VERSION_CHECK:     {"version_check", codes.FailedPrecondition, ClassRefused},
	otav1.Reason_REASON_OTHER:             {"other", codes.Internal, ClassFatal},

	otav1.Reason_REASON_NEWER_JOB:               {"newer_job", codes.Aborted, ClassCanceled},
	otav1.Reason_REASON_FAILED_INGEST:           {"failed_ingest", codes.InvalidArgument, ClassFatal},
	otav1.Reason_REASON_MOMENTUM_ABORT:          {"momentum_abort", codes.DeadlineExceeded, ClassFatal},
	otav1.Reason_REASON_STATE_MISMATCH:          {"state_mismatch", codes.FailedPrecondition, ClassRefused},
	otav1.Reason_REASON_INVALID_PROTOCOL:        {"invalid_protocol", codes.InvalidArgument, ClassFatal},
	otav1.Reason_REASON_USER_ABORT:              {"user_abort", codes.Canceled, ClassCanceled},
	otav1.Reason_REASON_SELF_TEST_VERSION_CHECK: {"version_check", codes.FailedPrecondition, ClassRollback},

	otav1.Reason_REASON_WRITER_UNAVAILABLE:   {"writer_unavailable", codes.Unavailable, ClassUnavailable},
	otav1.Reason_REASON_PERMISSION_DENIED:    {"permission_denied", codes.PermissionDenied, ClassRefused},
	otav1.Reason_REASON_TARGET_UNKNOWN:       {"target_unknown", codes.NotFound, ClassRefused},
	otav1.Reason_REASON_BLOCK_OUT_OF_RANGE:   {"block_out_of_range", codes.OutOfRange, ClassInvalid},
	otav1.Reason_REASON_SELF_TEST_FAILED:     {"self_test_failed", codes.FailedPrecondition, ClassRollback},
	otav1.Reason_REASON_SELF_TEST_TIMEOUT:    {"self_test_timeout", codes.DeadlineExceeded, ClassRollback},
	otav1.Reason_REASON_ROLLED_BACK:          {"rolled_back", codes.Aborted, ClassRollback},
	otav1.Reason_REASON_DOWNLOAD_FAILED:      {"download_failed", codes.Unavailable, ClassFatal},
	otav1.Reason_REASON_JOB_DOCUMENT_INVALID: {"job_document_invalid", codes.InvalidArgument, ClassFatal},
	otav1.Reason_REASON_STORAGE_FULL:         {"storage_full", codes.ResourceExhausted, ClassRetryable},
	otav1.Reason_REASON_INVALID_REQUEST:      {"invalid_request", codes.InvalidArgument, ClassInvalid},
	otav1.Reason_REASON_SESSION_BUSY:         {"session_busy", codes.AlreadyExists, ClassRefused},
	otav1.Reason_REASON_PROTOCOL_VERSION:     {"protocol_version", codes.FailedPrecondition, ClassRefused},
	otav1.Reason_REASON_REBOOT_FAILED:        {"reboot_failed", codes.Internal, ClassRetryable},
	otav1.Reason_REASON_UNTRUSTED_SIGNER:     {"untrusted_signer", codes.FailedPrecondition, ClassRefused},
	otav1.Reason_REASON_JOB_UPDATE_FAILED:    {"job_update_failed", codes.Unavailable, ClassFatal},
	otav1.Reason_REASON_SESSION_LOST:         {"session_lost", codes.NotFound, ClassGone},
	otav1.Reason_REASON_BOOT_CONTROL_FAILED:  {"boot_control_failed", codes.Internal, ClassRetryable},
	otav1.Reason_REASON_PROXY_FAILED:         {"proxy_failed", codes.Unavailable, ClassFatal},
	// Retryable: the writer keeps the session and wrote nothing of the batch; the same chunk
	// fetched again may succeed.
	otav1.Reason_REASON_BLOCK_HASH_MISMATCH: {"block_hash_mismatch", codes.DataLoss, ClassRetryable},
}

// Name is the statusDetails string of r ("other" for values outside the table).
func Name(r otav1.Reason) string {
	if e, ok := Table[r]; ok {
		return e.Name
	}
	return Table[otav1.Reason_REASON_OTHER].Name
}

// Code is the statusDetails error_code of r: its enum number, in decimal.
func Code(r otav1.Reason) string {
	if _, ok := Table[r]; !ok || r == otav1.Reason_REASON_UNSPECIFIED {
		r = otav1.Reason_REASON_OTHER
	}
	return strconv.Itoa(int(r))
}

// GRPCCode is the gRPC status code the writer returns with r.
func GRPCCode(r otav1.Reason) codes.Code {
	if e, ok := Table[r]; ok {
		return e.Code
	}
	return codes.Unknown
}

// ClassOf is the class of r (ClassFatal for values outside the table).
func ClassOf(r otav1.Reason) Class {
	if e, ok := Table[r]; ok {
		return e.Class
	}
	return ClassFatal
}

// String renders "name/code" for logs and command-line output.
func String(r otav1.Reason) string { return fmt.Sprintf("%s/%s", Name(r), Code(r)) }
