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

// AWS IoT Jobs limits on statusDetails (PROTOCOL.md section 1). An update that breaks them is
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

// Base is what the agent itself reports.
type Base struct {
	SelfTest string
	// Received and Total blocks; Progress is set when Total > 0.
	Received, Total uint64
	// Reason, when not unspecified, adds reason and error_code.
	Reason otav1.Reason
}

// Progress renders "received/total".
func Progress(received, total uint64) string { return fmt.Sprintf("%d/%d", received, total) }

// Build returns the flat statusDetails map: base fields, then extension fields in key order,
// within MaxPairs. Extension keys that are invalid or reserved are dropped; values with
// control or invisible characters are cleaned, over-long ones truncated, empty ones dropped.
// The result always satisfies Validate.
func Build(b Base, ext map[string]string) map[string]string {
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
	for _, k := range slices.Sorted(maps.Keys(ext)) {
		if len(out) >= MaxPairs {
			break
		}
		if slices.Contains(baseKeys, k) || !ValidKey(k) {
			continue
		}
		if v, ok := CleanValue(ext[k]); ok {
			out[k] = v
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
