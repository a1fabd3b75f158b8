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
}

// Table maps every Reason to its statusDetails string and gRPC code. TestTableComplete proves
// every enum value is here; everything else (docs, metrics) derives from it.
var Table = map[otav1.Reason]Entry{
	otav1.Reason_REASON_UNSPECIFIED: {"other", codes.Unknown},

	otav1.Reason_REASON_SIG_CHECK_FAILED:  {"sig_check_failed", codes.FailedPrecondition},
	otav1.Reason_REASON_FILE_WRITE_FAILED: {"file_write_failed", codes.Internal},
	otav1.Reason_REASON_FILE_TOO_LARGE:    {"file_too_large", codes.OutOfRange},
	otav1.Reason_REASON_FILE_CLOSE_FAILED: {"file_close_failed", codes.Internal},
	otav1.Reason_REASON_BAD_FILE_HANDLE:   {"bad_file_handle", codes.NotFound},
	otav1.Reason_REASON_UNSUPPORTED:       {"unsupported", codes.Unimplemented},
	otav1.Reason_REASON_BAD_IMAGE_STATE:   {"bad_image_state", codes.FailedPrecondition},
	otav1.Reason_REASON_COMMIT_FAILED:     {"commit_failed", codes.Internal},
	otav1.Reason_REASON_VERSION_CHECK:     {"version_check", codes.FailedPrecondition},
	otav1.Reason_REASON_OTHER:             {"other", codes.Internal},

	otav1.Reason_REASON_NEWER_JOB:               {"newer_job", codes.Aborted},
	otav1.Reason_REASON_FAILED_INGEST:           {"failed_ingest", codes.InvalidArgument},
	otav1.Reason_REASON_MOMENTUM_ABORT:          {"momentum_abort", codes.DeadlineExceeded},
	otav1.Reason_REASON_STATE_MISMATCH:          {"state_mismatch", codes.FailedPrecondition},
	otav1.Reason_REASON_INVALID_PROTOCOL:        {"invalid_protocol", codes.InvalidArgument},
	otav1.Reason_REASON_USER_ABORT:              {"user_abort", codes.Canceled},
	otav1.Reason_REASON_SELF_TEST_VERSION_CHECK: {"version_check", codes.FailedPrecondition},

	otav1.Reason_REASON_WRITER_UNAVAILABLE:   {"writer_unavailable", codes.Unavailable},
	otav1.Reason_REASON_PERMISSION_DENIED:    {"permission_denied", codes.PermissionDenied},
	otav1.Reason_REASON_TARGET_UNKNOWN:       {"target_unknown", codes.NotFound},
	otav1.Reason_REASON_BLOCK_OUT_OF_RANGE:   {"block_out_of_range", codes.OutOfRange},
	otav1.Reason_REASON_SELF_TEST_FAILED:     {"self_test_failed", codes.FailedPrecondition},
	otav1.Reason_REASON_SELF_TEST_TIMEOUT:    {"self_test_timeout", codes.DeadlineExceeded},
	otav1.Reason_REASON_ROLLED_BACK:          {"rolled_back", codes.Aborted},
	otav1.Reason_REASON_DOWNLOAD_FAILED:      {"download_failed", codes.Unavailable},
	otav1.Reason_REASON_JOB_DOCUMENT_INVALID: {"job_document_invalid", codes.InvalidArgument},
	otav1.Reason_REASON_STORAGE_FULL:         {"storage_full", codes.ResourceExhausted},
	otav1.Reason_REASON_INVALID_REQUEST:      {"invalid_request", codes.InvalidArgument},
	otav1.Reason_REASON_SESSION_BUSY:         {"session_busy", codes.AlreadyExists},
	otav1.Reason_REASON_PROTOCOL_VERSION:     {"protocol_version", codes.FailedPrecondition},
	otav1.Reason_REASON_REBOOT_FAILED:        {"reboot_failed", codes.Internal},
	otav1.Reason_REASON_UNTRUSTED_SIGNER:     {"untrusted_signer", codes.FailedPrecondition},
	otav1.Reason_REASON_JOB_UPDATE_FAILED:    {"job_update_failed", codes.Unavailable},
	otav1.Reason_REASON_SESSION_LOST:         {"session_lost", codes.NotFound},
	otav1.Reason_REASON_BOOT_CONTROL_FAILED:  {"boot_control_failed", codes.Internal},
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

// String renders "name/code" for logs and command-line output.
func String(r otav1.Reason) string { return fmt.Sprintf("%s/%s", Name(r), Code(r)) }
