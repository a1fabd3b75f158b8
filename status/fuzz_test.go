package status

import (
	"bytes"
	"regexp"
	"strings"
	"testing"
	"unicode/utf8"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

// The AWS statusDetails limits as AWS writes them (docs/PROTOCOL.md section 1): an independent
// oracle for ValidKey/ValidValue.
var (
	awsKeyRE   = regexp.MustCompile(`^[a-zA-Z0-9:_-]+$`)
	awsValueRE = regexp.MustCompile(`^[^\p{C}]+$`)
)

func awsValid(k, v string) bool {
	return len(k) <= MaxKeyLen && awsKeyRE.MatchString(k) && utf8.ValidString(v) &&
		utf8.RuneCountInString(v) <= MaxValueLen && awsValueRE.MatchString(v)
}

// fieldsFromBytes cuts b into ordered key/value pairs at NUL bytes (k1 0 v1 0 k2 0 v2 ...);
// keys may repeat.
func fieldsFromBytes(b []byte) Fields {
	parts := bytes.Split(b, []byte{0})
	var fs Fields
	for i := 0; i+1 < len(parts); i += 2 {
		fs = append(fs, Field{string(parts[i]), string(parts[i+1])})
	}
	return fs
}

var selfTests = []string{"", SelfTestReceiving, SelfTestReady, SelfTestActive, SelfTestAccepted, SelfTestRejected, SelfTestAborted}

// FuzzBuild: whatever the writer's extension providers and the failure fields carry (any
// keys, repeated keys, any bytes, any number of pairs) and whatever reason number arrives,
// Build's output satisfies the AWS limits (<= 10 pairs, keys of [a-zA-Z0-9:_-]{1,128},
// values 1..1024 characters without \p{C}), base fields are never overridden, and the rest
// of the budget goes to the first usable fields in order (failure fields, then extensions),
// each with the cleaned value of its first usable occurrence.
func FuzzBuild(f *testing.F) {
	f.Add(uint8(1), uint64(23), uint64(95), int32(0), []byte(""), []byte("firmware_version\x004.2.0\x00boot_slot\x00a"))
	f.Add(uint8(6), uint64(95), uint64(95), int32(1001), []byte("rollback_reason\x00rolled_back\x00rollback_code\x003007"), []byte("reason\x00mine\x00error_code\x001\x00temp\x0042.5 C"))
	f.Add(uint8(4), uint64(0), uint64(0), int32(3017), []byte("k1\x00\x00k1\x00second"), []byte("k1\x00v\x00k2\x00v\x00k3\x00v\x00k4\x00v\x00k5\x00v\x00k6\x00v\x00k7\x00v\x00k8\x00v"))
	f.Add(uint8(2), uint64(1), uint64(2), int32(99999), []byte("self_test\x00x"), []byte("bad key\x00x\x00ok\x00line1\nline2\x00ctl\x00\x01\x02\x00inv\x00\xff\xfe"))
	f.Add(uint8(5), uint64(7), uint64(3), int32(-5), []byte(""), []byte("zw\x00\u200b\x00bidi\x00a\u202eb\x00"+strings.Repeat("k", 129)+"\x00v"))
	f.Add(uint8(0), uint64(1<<63), uint64(1<<64-1), int32(2001), []byte("long\x00"+strings.Repeat("é", 1100)), []byte("long\x00short"))
	f.Fuzz(func(t *testing.T, st uint8, received, total uint64, reason int32, failb, extb []byte) {
		b := Base{SelfTest: selfTests[int(st)%len(selfTests)], Received: received, Total: total, Reason: otav1.Reason(reason), Failure: fieldsFromBytes(failb)}
		ext := fieldsFromBytes(extb)
		out := Build(b, ext)
		if err := Validate(out); err != nil {
			t.Fatalf("Build output invalid: %v\n%q", err, out)
		}
		if len(out) > MaxPairs {
			t.Fatalf("%d pairs", len(out))
		}
		for k, v := range out {
			if !awsValid(k, v) {
				t.Fatalf("pair %q=%q breaks the AWS patterns", k, v)
			}
		}
		// Base fields are present and exactly the agent's.
		want := map[string]string{}
		if b.SelfTest != "" {
			want[KeySelfTest] = b.SelfTest
		}
		if total > 0 {
			want[KeyProgress] = Progress(received, total)
		}
		if b.Reason != otav1.Reason_REASON_UNSPECIFIED {
			want[KeyReason], want[KeyErrorCode] = Name(b.Reason), Code(b.Reason)
			if _, ok := Table[b.Reason]; !ok && (out[KeyReason] != "other" || out[KeyErrorCode] != "1099") {
				t.Fatalf("unknown reason %d reported as %q/%q, want other/1099", reason, out[KeyReason], out[KeyErrorCode])
			}
		}
		for k, v := range want {
			if out[k] != v {
				t.Fatalf("base %s = %q, want %q", k, out[k], v)
			}
		}
		for _, k := range baseKeys {
			if _, ok := want[k]; !ok {
				if _, ok := out[k]; ok {
					t.Fatalf("a field took the reserved key %s=%q", k, out[k])
				}
			}
		}
		// The rest: the first usable occurrence of each key, in order, until the budget ends.
		expect := map[string]string{}
		for _, fl := range append(append(Fields{}, b.Failure...), ext...) {
			if len(want)+len(expect) >= MaxPairs {
				break
			}
			if _, seen := expect[fl.Key]; seen || isBase(fl.Key) || !ValidKey(fl.Key) {
				continue
			}
			if v, ok := CleanValue(fl.Value); ok {
				expect[fl.Key] = v
			}
		}
		for k, v := range out {
			if _, base := want[k]; base {
				continue
			}
			if ev, ok := expect[k]; !ok || ev != v {
				t.Fatalf("field %q=%q, want %q (in the budget: %v)", k, v, ev, ok)
			}
		}
		if len(out) != len(want)+len(expect) {
			t.Fatalf("%d pairs, want %d base + %d fields", len(out), len(want), len(expect))
		}
	})
}

// FuzzCleanValue: CleanValue's result is a valid AWS value or reported empty, it is
// idempotent, and ValidKey/ValidValue never accept what AWS's own patterns refuse.
func FuzzCleanValue(f *testing.F) {
	for _, s := range []string{"4.2.0", " a\tb\n", "\x00", "\xff", "a\u200bb", "\U000F0000", strings.Repeat("x", 1025), "ab\u0301", " ", "key:with_dash-1"} {
		f.Add(s)
	}
	f.Fuzz(func(t *testing.T, s string) {
		v, ok := CleanValue(s)
		if ok != (v != "") {
			t.Fatalf("CleanValue(%q) = %q, %v", s, v, ok)
		}
		if ok {
			if !ValidValue(v) || !awsValid("k", v) {
				t.Fatalf("CleanValue(%q) = %q is not a valid value", s, v)
			}
			if v2, ok2 := CleanValue(v); !ok2 || v2 != v {
				t.Fatalf("CleanValue not idempotent: %q -> %q -> %q", s, v, v2)
			}
		}
		if ValidValue(s) {
			if !awsValid("k", s) {
				t.Fatalf("ValidValue accepts %q, AWS does not", s)
			}
			if cv, _ := CleanValue(s); cv != strings.TrimSpace(s) {
				t.Fatalf("CleanValue changed the valid %q to %q", s, cv)
			}
		}
		if ValidKey(s) != (len(s) <= MaxKeyLen && awsKeyRE.MatchString(s)) {
			t.Fatalf("ValidKey(%q) = %v disagrees with the AWS pattern", s, ValidKey(s))
		}
	})
}

func isBase(k string) bool {
	for _, b := range baseKeys {
		if b == k {
			return true
		}
	}
	return false
}
