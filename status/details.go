package status

import (
	"fmt"
	"maps"
	"slices"
	"strings"
	"unicode"
	"unicode/utf8"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

// AWS IoT Jobs limits on statusDetails (docs/PROTOCOL.md section 1). An update that breaks them is
// rejected whole, so every pair is checked before it is published.
const (
	MaxPairs    = 10
	MaxKeyLen   = 128
	MaxValueLen = 1024
)

// Base statusDetails keys. They win over extension fields of the same name.
const (
	KeySelfTest  = "self_test"
	KeyProgress  = "progress"
	KeyReason    = "reason"
	KeyErrorCode = "error_code"
)

// self_test values.
const (
	SelfTestReceiving = "receiving"
	SelfTestReady     = "ready"
	SelfTestActive    = "active"
	SelfTestAccepted  = "accepted"
	SelfTestRejected  = "rejected"
	SelfTestAborted   = "aborted"
)

var baseKeys = []string{KeySelfTest, KeyProgress, KeyReason, KeyErrorCode}

// Field is one statusDetails pair. Ordered slices of fields carry the extension fields from
// the writer to the report, so the budget goes to them in the order the operator configured.
type Field struct {
	Key, Value string
}

// Fields is an ordered list of pairs; on a repeated key the first wins.
type Fields []Field

// Map returns the pairs as a map (the first of a repeated key wins).
func (fs Fields) Map() map[string]string {
	m := make(map[string]string, len(fs))
	for _, f := range fs {
		if _, dup := m[f.Key]; !dup {
			m[f.Key] = f.Value
		}
	}
	return m
}

// Get returns the value of key (the first one) and whether it is there.
func (fs Fields) Get(key string) (string, bool) {
	for _, f := range fs {
		if f.Key == key {
			return f.Value, true
		}
	}
	return "", false
}

// SortedFields turns a map into fields in key order (for a source that has no order).
func SortedFields(m map[string]string) Fields {
	out := make(Fields, 0, len(m))
	for _, k := range slices.Sorted(maps.Keys(m)) {
		out = append(out, Field{k, m[k]})
	}
	return out
}

// Base is what the agent itself reports.
type Base struct {
	SelfTest string
	// Received and Total blocks; Progress is set when Total > 0.
	Received, Total uint64
	// Reason, when not unspecified, adds reason and error_code.
	Reason otav1.Reason
	// Failure are further fields that explain the failure (rollback_reason, rollback_code):
	// they come right after the base keys, before any extension field.
	Failure Fields
}

// Progress renders "received/total".
func Progress(received, total uint64) string { return fmt.Sprintf("%d/%d", received, total) }

// Build returns the flat statusDetails map within MaxPairs: the base keys (self_test,
// progress, reason, error_code) always, then the failure fields, then the extension fields
// in their order until the budget is spent. Keys that are invalid, reserved or already set
// are skipped; values with control or invisible characters are cleaned, over-long ones
// truncated, empty ones dropped. The result always satisfies Validate.
func Build(b Base, ext Fields) map[string]string {
	out := make(map[string]string, MaxPairs)
	if b.SelfTest != "" {
		out[KeySelfTest] = b.SelfTest
	}
	if b.Total > 0 {
		out[KeyProgress] = Progress(b.Received, b.Total)
	}
	if b.Reason != otav1.Reason_REASON_UNSPECIFIED {
		out[KeyReason] = Name(b.Reason)
		out[KeyErrorCode] = Code(b.Reason)
	}
	for _, fs := range []Fields{b.Failure, ext} {
		for _, f := range fs {
			if len(out) >= MaxPairs {
				return out
			}
			if _, set := out[f.Key]; set || slices.Contains(baseKeys, f.Key) || !ValidKey(f.Key) {
				continue
			}
			if v, ok := CleanValue(f.Value); ok {
				out[f.Key] = v
			}
		}
	}
	return out
}

// ValidKey reports whether k is 1..128 characters of [a-zA-Z0-9:_-].
func ValidKey(k string) bool {
	if len(k) == 0 || len(k) > MaxKeyLen {
		return false
	}
	for _, c := range k {
		if !(c >= 'a' && c <= 'z' || c >= 'A' && c <= 'Z' || c >= '0' && c <= '9' || c == ':' || c == '_' || c == '-') {
			return false
		}
	}
	return true
}

// ValidValue reports whether v is 1..1024 characters with no control or invisible
// characters (AWS's [^\p{C}]+).
func ValidValue(v string) bool {
	if v == "" || !utf8.ValidString(v) || utf8.RuneCountInString(v) > MaxValueLen {
		return false
	}
	return !strings.ContainsFunc(v, isOther)
}

// CleanValue makes v valid: invalid UTF-8 and \p{C} characters become spaces (so "a\nb"
// stays readable), surrounding space is trimmed, and the result is cut to MaxValueLen
// characters. ok is false when nothing printable is left.
func CleanValue(v string) (string, bool) {
	v = strings.ToValidUTF8(v, " ")
	v = strings.Map(func(r rune) rune {
		if isOther(r) {
			return ' '
		}
		return r
	}, v)
	v = strings.TrimSpace(v)
	if utf8.RuneCountInString(v) > MaxValueLen {
		v = string([]rune(v)[:MaxValueLen])
		v = strings.TrimRightFunc(v, unicode.IsSpace)
	}
	return v, v != ""
}

// isOther is Unicode category C (control, format, surrogate, private use, unassigned).
func isOther(r rune) bool {
	return unicode.In(r, unicode.Cc, unicode.Cf, unicode.Co, unicode.Cs) || !unicode.In(r, unicode.L, unicode.M, unicode.N, unicode.P, unicode.S, unicode.Z)
}

// Validate checks a whole statusDetails map against the AWS limits.
func Validate(d map[string]string) error {
	if len(d) > MaxPairs {
		return fmt.Errorf("statusDetails has %d pairs, the budget is %d", len(d), MaxPairs)
	}
	for k, v := range d {
		if !ValidKey(k) {
			return fmt.Errorf("statusDetails key %q is not 1..%d of [a-zA-Z0-9:_-]", k, MaxKeyLen)
		}
		if !ValidValue(v) {
			return fmt.Errorf("statusDetails value of %q is empty, too long or has control characters", k)
		}
	}
	return nil
}

// Pairs builds Fields from alternating keys and values (a trailing key without a value is
// ignored).
func Pairs(kv ...string) Fields {
	out := make(Fields, 0, len(kv)/2)
	for i := 0; i+1 < len(kv); i += 2 {
		out = append(out, Field{Key: kv[i], Value: kv[i+1]})
	}
	return out
}
