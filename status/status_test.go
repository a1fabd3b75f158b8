package status

import (
	"context"
	"errors"
	"fmt"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"
	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

func TestTableComplete(t *testing.T) {
	for num, name := range otav1.Reason_name {
		r := otav1.Reason(num)
		e, ok := Table[r]
		if !ok {
			t.Errorf("%s (%d) is not in status.Table", name, num)
			continue
		}
		if !ValidValue(e.Name) || strings.ToLower(e.Name) != e.Name {
			t.Errorf("%s: reason string %q is not a lower-case statusDetails value", name, e.Name)
		}
		if e.Code == codes.OK {
			t.Errorf("%s maps to gRPC OK", name)
		}
	}
	if len(Table) != len(otav1.Reason_name) {
		t.Errorf("Table has %d rows, the enum %d values", len(Table), len(otav1.Reason_name))
	}
}

// The numbers and strings shared with rustot (docs/REASONS.md) must not drift.
func TestRustotVocabulary(t *testing.T) {
	want := map[string]string{
		"1001": "sig_check_failed", "1002": "file_write_failed", "1003": "file_too_large",
		"1004": "file_close_failed", "1005": "bad_file_handle", "1006": "unsupported",
		"1007": "bad_image_state", "1008": "commit_failed", "1009": "version_check", "1099": "other",
		"2001": "newer_job", "2002": "failed_ingest", "2003": "momentum_abort", "2004": "state_mismatch",
		"2005": "invalid_protocol", "2006": "user_abort", "2007": "version_check",
	}
	got := map[string]string{}
	for r := range Table {
		if n := int(r); n > 1000 && n < 3000 {
			got[Code(r)] = Name(r)
		}
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("rustot vocabulary (-want +got):\n%s", d)
	}
}

func TestBuildExamples(t *testing.T) {
	ext := Fields{{"firmware_version", "4.2.0"}}
	tests := []struct {
		name string
		base Base
		ext  Fields
		want map[string]string
	}{
		{"receiving", Base{SelfTest: SelfTestReceiving, Received: 23, Total: 95}, ext,
			map[string]string{"self_test": "receiving", "progress": "23/95", "firmware_version": "4.2.0"}},
		{"failed", Base{SelfTest: SelfTestAborted, Received: 95, Total: 95, Reason: otav1.Reason_REASON_SIG_CHECK_FAILED}, ext,
			map[string]string{"self_test": "aborted", "progress": "95/95", "reason": "sig_check_failed", "error_code": "1001", "firmware_version": "4.2.0"}},
		{"accepted", Base{SelfTest: SelfTestAccepted}, Fields{{"firmware_version", "4.3.0"}, {"boot_slot", "b"}},
			map[string]string{"self_test": "accepted", "firmware_version": "4.3.0", "boot_slot": "b"}},
		{"base wins", Base{SelfTest: SelfTestReady}, Fields{{"self_test", "hacked"}, {"reason", "x"}, {"error_code", "0"}, {"progress", "1/1"}},
			map[string]string{"self_test": "ready"}},
		{"bad extensions dropped or cleaned", Base{SelfTest: SelfTestReady}, Fields{
			{"bad key", "v"}, {"", "v"}, {"empty", ""}, {"ctl", "a\nb\x00c"}, {"only_ctl", "\n\t"}, {strings.Repeat("k", 129), "v"},
			{"long", strings.Repeat("é", 1100)}, {"zw", "a\u200bb"},
		}, map[string]string{"self_test": "ready", "ctl": "a b c", "long": strings.Repeat("é", 1024), "zw": "a b"}},
		{"unspecified reason reports nothing", Base{SelfTest: SelfTestReceiving}, nil, map[string]string{"self_test": "receiving"}},
		{"first of a repeated key wins", Base{}, Fields{{"site", "a"}, {"site", "b"}}, map[string]string{"site": "a"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := Build(tc.base, tc.ext)
			if d := cmp.Diff(tc.want, got); d != "" {
				t.Errorf("Build (-want +got):\n%s", d)
			}
			if err := Validate(got); err != nil {
				t.Errorf("Build result invalid: %v", err)
			}
		})
	}
}

// numbered is n extension fields named prefix00.., in that order.
func numbered(prefix string, n int) Fields {
	var fs Fields
	for i := range n {
		fs = append(fs, Field{fmt.Sprintf("%s%02d", prefix, i), "v"})
	}
	return fs
}

// The 10-pair budget: base keys, then failure keys, always make it; extensions fill what is
// left in their own order (not in key order).
func TestBuildBudget(t *testing.T) {
	rollback := Fields{{"rollback_reason", "self_test_failed"}, {"rollback_code", "3005"}}
	tests := []struct {
		name string
		base Base
		ext  Fields
		want map[string]string
	}{
		{"extensions in their order, not key order", Base{SelfTest: SelfTestAborted, Received: 1, Total: 2, Reason: otav1.Reason_REASON_MOMENTUM_ABORT},
			append(Fields{{"zz_first", "1"}, {"yy_second", "2"}}, numbered("aa", 20)...),
			map[string]string{"self_test": "aborted", "progress": "1/2", "reason": "momentum_abort", "error_code": "2003",
				"zz_first": "1", "yy_second": "2", "aa00": "v", "aa01": "v", "aa02": "v", "aa03": "v"}},
		{"failure keys before any extension", Base{SelfTest: SelfTestRejected, Reason: otav1.Reason_REASON_ROLLED_BACK, Failure: rollback},
			numbered("a", 20),
			map[string]string{"self_test": "rejected", "reason": "rolled_back", "error_code": "3007",
				"rollback_reason": "self_test_failed", "rollback_code": "3005", "a00": "v", "a01": "v", "a02": "v", "a03": "v", "a04": "v"}},
		{"an extension cannot replace a failure key", Base{Reason: otav1.Reason_REASON_ROLLED_BACK, Failure: rollback},
			Fields{{"rollback_reason", "forged"}, {"site", "x"}},
			map[string]string{"reason": "rolled_back", "error_code": "3007", "rollback_reason": "self_test_failed", "rollback_code": "3005", "site": "x"}},
		{"failure keys cannot replace base keys", Base{SelfTest: SelfTestAborted, Reason: otav1.Reason_REASON_OTHER, Failure: Fields{{"reason", "forged"}, {"bad key", "x"}, {"detail", "kept"}}},
			nil,
			map[string]string{"self_test": "aborted", "reason": "other", "error_code": "1099", "detail": "kept"}},
		{"no reason: extensions get six more", Base{SelfTest: SelfTestAccepted}, numbered("e", 20),
			map[string]string{"self_test": "accepted", "e00": "v", "e01": "v", "e02": "v", "e03": "v", "e04": "v", "e05": "v", "e06": "v", "e07": "v", "e08": "v"}},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			got := Build(tc.base, tc.ext)
			if d := cmp.Diff(tc.want, got); d != "" {
				t.Errorf("Build (-want +got):\n%s", d)
			}
			if len(got) > MaxPairs {
				t.Errorf("%d pairs, budget %d", len(got), MaxPairs)
			}
		})
	}
}

func TestFields(t *testing.T) {
	fs := Fields{{"b", "1"}, {"a", "2"}, {"b", "3"}}
	if d := cmp.Diff(map[string]string{"a": "2", "b": "1"}, fs.Map()); d != "" {
		t.Errorf("Map (-want +got):\n%s", d)
	}
	if v, ok := fs.Get("b"); !ok || v != "1" {
		t.Errorf("Get(b) = %q, %v", v, ok)
	}
	if d := cmp.Diff(Fields{{"a", "2"}, {"b", "1"}}, SortedFields(map[string]string{"b": "1", "a": "2"})); d != "" {
		t.Errorf("SortedFields (-want +got):\n%s", d)
	}
}

func TestValidate(t *testing.T) {
	for _, tc := range []struct {
		d  map[string]string
		ok bool
	}{
		{map[string]string{"a": "b"}, true},
		{map[string]string{"a:b_c-D9": strings.Repeat("x", 1024)}, true},
		{map[string]string{"a": strings.Repeat("x", 1025)}, false},
		{map[string]string{"a": ""}, false},
		{map[string]string{"a b": "x"}, false},
		{map[string]string{"a": "x\ty"}, false},
		{map[string]string{"a": "\xff"}, false},
	} {
		if err := Validate(tc.d); (err == nil) != tc.ok {
			t.Errorf("Validate(%q) = %v, want ok=%v", tc.d, err, tc.ok)
		}
	}
}

func TestErrorRoundTrip(t *testing.T) {
	cause := errors.New("disk on fire")
	e := Errorf(otav1.Reason_REASON_FILE_WRITE_FAILED, "writing block 7: %w", cause).WithMeta("block", "7")
	if !errors.Is(e, cause) {
		t.Fatal("cause lost")
	}
	wire := ToGRPC(fmt.Errorf("session x: %w", e))
	st, ok := grpcstatus.FromError(wire)
	if !ok || st.Code() != codes.Internal {
		t.Fatalf("status = %v, want Internal", wire)
	}
	back := FromError(fmt.Errorf("client: %w", wire))
	if back.Reason != otav1.Reason_REASON_FILE_WRITE_FAILED || back.Meta["block"] != "7" || back.Msg != "writing block 7: disk on fire" {
		t.Errorf("round trip = %+v", back)
	}
	if ReasonOf(wire) != otav1.Reason_REASON_FILE_WRITE_FAILED {
		t.Errorf("ReasonOf = %v", ReasonOf(wire))
	}
}

func TestReasonOfWithoutDetail(t *testing.T) {
	for _, tc := range []struct {
		err  error
		want otav1.Reason
	}{
		{nil, otav1.Reason_REASON_UNSPECIFIED},
		{grpcstatus.Error(codes.Unavailable, "connection refused"), otav1.Reason_REASON_WRITER_UNAVAILABLE},
		{grpcstatus.Error(codes.PermissionDenied, "no"), otav1.Reason_REASON_PERMISSION_DENIED},
		{grpcstatus.Error(codes.ResourceExhausted, "message larger than max"), otav1.Reason_REASON_INVALID_REQUEST},
		{fmt.Errorf("x: %w", context.Canceled), otav1.Reason_REASON_USER_ABORT},
		{errors.New("sig_check_failed"), otav1.Reason_REASON_OTHER}, // message text is never read
	} {
		if got := ReasonOf(tc.err); got != tc.want {
			t.Errorf("ReasonOf(%v) = %v, want %v", tc.err, got, tc.want)
		}
	}
	if got := ToGRPC(errors.New("plain")); grpcstatus.Code(got) != codes.Internal || ReasonOf(got) != otav1.Reason_REASON_OTHER {
		t.Errorf("plain error -> %v", got)
	}
}

// The classes code branches on: one row per reason that a caller acts on by class.
func TestClassOf(t *testing.T) {
	got := map[otav1.Reason]Class{}
	for _, r := range []otav1.Reason{
		otav1.Reason_REASON_WRITER_UNAVAILABLE, otav1.Reason_REASON_FILE_CLOSE_FAILED, otav1.Reason_REASON_FILE_WRITE_FAILED,
		otav1.Reason_REASON_STORAGE_FULL, otav1.Reason_REASON_SIG_CHECK_FAILED, otav1.Reason_REASON_UNTRUSTED_SIGNER,
		otav1.Reason_REASON_BAD_FILE_HANDLE, otav1.Reason_REASON_SESSION_LOST, otav1.Reason_REASON_USER_ABORT,
		otav1.Reason_REASON_NEWER_JOB, otav1.Reason_REASON_INVALID_REQUEST, otav1.Reason_REASON_ROLLED_BACK,
		otav1.Reason_REASON_OTHER, otav1.Reason(4242),
	} {
		got[r] = ClassOf(r)
	}
	want := map[otav1.Reason]Class{
		otav1.Reason_REASON_WRITER_UNAVAILABLE: ClassUnavailable,
		otav1.Reason_REASON_FILE_CLOSE_FAILED:  ClassRetryable,
		otav1.Reason_REASON_FILE_WRITE_FAILED:  ClassRetryable,
		otav1.Reason_REASON_STORAGE_FULL:       ClassRetryable,
		otav1.Reason_REASON_SIG_CHECK_FAILED:   ClassFatal,
		otav1.Reason_REASON_UNTRUSTED_SIGNER:   ClassRefused,
		otav1.Reason_REASON_BAD_FILE_HANDLE:    ClassGone,
		otav1.Reason_REASON_SESSION_LOST:       ClassGone,
		otav1.Reason_REASON_USER_ABORT:         ClassCanceled,
		otav1.Reason_REASON_NEWER_JOB:          ClassCanceled,
		otav1.Reason_REASON_INVALID_REQUEST:    ClassInvalid,
		otav1.Reason_REASON_ROLLED_BACK:        ClassRollback,
		otav1.Reason_REASON_OTHER:              ClassFatal,
		otav1.Reason(4242):                     ClassFatal,
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Errorf("ClassOf (-want +got):\n%s", d)
	}
	for r, e := range Table {
		if s := e.Class.String(); strings.HasPrefix(s, "class(") {
			t.Errorf("%v has no named class (%s)", r, s)
		}
	}
}

// FromError is the one decoder: a writer's ReasonDetail, grpc's own statuses by code (the
// size-limit refusal included, so no caller needs a rule of its own), context cancellation.
func TestFromError(t *testing.T) {
	withDetail := ToGRPC(Errorf(otav1.Reason_REASON_SIG_CHECK_FAILED, "bad").WithMeta("sha256", "ab"))
	type out struct {
		Reason otav1.Reason
		Meta   map[string]string
		Class  string
	}
	for _, tc := range []struct {
		name string
		err  error
		want out
	}{
		{"detail", fmt.Errorf("client: %w", withDetail), out{otav1.Reason_REASON_SIG_CHECK_FAILED, map[string]string{"sha256": "ab"}, "fatal"}},
		{"unavailable", grpcstatus.Error(codes.Unavailable, "connection refused"), out{otav1.Reason_REASON_WRITER_UNAVAILABLE, nil, "unavailable"}},
		{"unauthenticated", grpcstatus.Error(codes.Unauthenticated, "no"), out{otav1.Reason_REASON_PERMISSION_DENIED, nil, "refused"}},
		{"over the size limit", grpcstatus.Error(codes.ResourceExhausted, "grpc: received message larger than max"), out{otav1.Reason_REASON_INVALID_REQUEST, nil, "invalid"}},
		{"canceled call", grpcstatus.Error(codes.Canceled, "context canceled"), out{otav1.Reason_REASON_USER_ABORT, nil, "canceled"}},
		{"context", fmt.Errorf("x: %w", context.Canceled), out{otav1.Reason_REASON_USER_ABORT, nil, "canceled"}},
		{"deadline", context.DeadlineExceeded, out{otav1.Reason_REASON_OTHER, nil, "fatal"}},
		{"internal without detail", grpcstatus.Error(codes.Internal, "boom"), out{otav1.Reason_REASON_OTHER, nil, "fatal"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			e := FromError(tc.err)
			got := out{e.Reason, e.Meta, e.Class().String()}
			if d := cmp.Diff(tc.want, got); d != "" {
				t.Errorf("FromError (-want +got):\n%s", d)
			}
			if FromError(e) != e {
				t.Error("an *Error is decoded again")
			}
		})
	}
}

func TestErrorFields(t *testing.T) {
	e := Errorf(otav1.Reason_REASON_SESSION_BUSY, "busy").WithMeta("target", "rootfs").WithMeta("job_id", "j1")
	if d := cmp.Diff(Fields{{"job_id", "j1"}, {"target", "rootfs"}}, e.Fields()); d != "" {
		t.Errorf("Fields (-want +got):\n%s", d)
	}
	if (*Error)(nil).Fields() != nil {
		t.Error("nil error has fields")
	}
}
