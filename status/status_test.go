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

// The numbers and strings shared with rustot (REASONS.md) must not drift.
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
	ext := map[string]string{"firmware_version": "4.2.0"}
	tests := []struct {
		name string
		base Base
		ext  map[string]string
		want map[string]string
	}{
		{"receiving", Base{SelfTest: SelfTestReceiving, Received: 23, Total: 95}, ext,
			map[string]string{"self_test": "receiving", "progress": "23/95", "firmware_version": "4.2.0"}},
		{"failed", Base{SelfTest: SelfTestAborted, Received: 95, Total: 95, Reason: otav1.Reason_REASON_SIG_CHECK_FAILED}, ext,
			map[string]string{"self_test": "aborted", "progress": "95/95", "reason": "sig_check_failed", "error_code": "1001", "firmware_version": "4.2.0"}},
		{"accepted", Base{SelfTest: SelfTestAccepted}, map[string]string{"firmware_version": "4.3.0", "boot_slot": "b"},
			map[string]string{"self_test": "accepted", "firmware_version": "4.3.0", "boot_slot": "b"}},
		{"base wins", Base{SelfTest: SelfTestReady}, map[string]string{"self_test": "hacked", "reason": "x", "error_code": "0", "progress": "1/1"},
			map[string]string{"self_test": "ready"}},
		{"bad extensions dropped or cleaned", Base{SelfTest: SelfTestReady}, map[string]string{
			"bad key": "v", "": "v", "empty": "", "ctl": "a\nb\x00c", "only_ctl": "\n\t", strings.Repeat("k", 129): "v",
			"long": strings.Repeat("é", 1100), "zw": "a\u200bb",
		}, map[string]string{"self_test": "ready", "ctl": "a b c", "long": strings.Repeat("é", 1024), "zw": "a b"}},
		{"unspecified reason reports nothing", Base{SelfTest: SelfTestReceiving}, nil, map[string]string{"self_test": "receiving"}},
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

func TestBuildBudget(t *testing.T) {
	ext := map[string]string{}
	for i := range 20 {
		ext[fmt.Sprintf("ext_%02d", i)] = "v"
	}
	got := Build(Base{SelfTest: SelfTestAborted, Received: 1, Total: 2, Reason: otav1.Reason_REASON_MOMENTUM_ABORT}, ext)
	if len(got) != MaxPairs {
		t.Fatalf("got %d pairs, want %d", len(got), MaxPairs)
	}
	for _, k := range []string{"self_test", "progress", "reason", "error_code", "ext_00", "ext_05"} {
		if _, ok := got[k]; !ok {
			t.Errorf("missing %s in %v", k, got)
		}
	}
	if _, ok := got["ext_06"]; ok {
		t.Errorf("ext_06 should be past the budget: %v", got)
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
