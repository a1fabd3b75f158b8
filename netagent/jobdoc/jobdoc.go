// Package jobdoc parses and validates AWS IoT OTA ("afr_ota") job documents the way the AWS
// OTA C agent accepts them: numbers as JSON numbers, or strings holding decimal or 0x hex;
// every field optional except protocols, files, and each file's filesize and fileid. It also
// handles every file of the list (the C agent and rustot take only the first) and this
// project's signature extensions. Documents come from the network: everything is bounded and
// every failure is a typed *status.Error (job_document_invalid or invalid_protocol).
package jobdoc

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/url"
	"strconv"
	"strings"
	"unicode"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// Protocols as named in the document.
const (
	ProtocolMQTT = "MQTT"
	ProtocolHTTP = "HTTP"
)

// Limits on hostile input.
const (
	// MaxDocumentSize: AWS caps a job document at 32 KB; presigned URLs substituted into it
	// can add a little, so allow twice that.
	MaxDocumentSize = 64 * 1024
	MaxFiles        = 32
	MaxSignatureLen = 1024 // raw bytes; RSA-4096 is 512, ECDSA P-256 DER at most 72
	MaxFileSize     = 1 << 40
	MaxFileID       = 255
	maxStringLen    = 2048
	maxURLLen       = 8192
)

// SigKeys maps the afr_ota signature key to the writer's algorithm. The sha256-rsa-pss and
// sha256-ed25519 keys are this project's extensions.
var SigKeys = map[string]otav1.SigAlgorithm{
	"sig-sha256-ecdsa":   otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256,
	"sig-sha256-rsa":     otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256,
	"sig-sha256-rsa-pss": otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256,
	"sig-sha256-ed25519": otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256,
	"sig-sha1-ecdsa":     otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1,
	"sig-sha1-rsa":       otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA1,
}

// ErrNotOTA: the job document is valid JSON but has no afr_ota member (a custom job).
var ErrNotOTA = errors.New("not an afr_ota job document")

// Document is a validated afr_ota document.
type Document struct {
	// Protocols as listed (upper-cased, known ones only, in document order, deduplicated).
	Protocols []string
	// StreamName is the MQTT stream (empty if absent).
	StreamName string
	Files      []File
}

// File is one validated entry of "files".
type File struct {
	// Index in the document's "files".
	Index int
	Path  string // "filepath" (selects a writer target; never a path ota-net opens)
	Size  uint64
	// FileID is the stream file id (0..255).
	FileID uint32
	// CertFile names the signer certificate among the writer's trusted keys.
	CertFile string
	// SigKey is the afr_ota key the signature came from ("" when the file is unsigned: the
	// writer will then refuse to activate it).
	SigKey       string
	SigAlgorithm otav1.SigAlgorithm
	Signature    []byte
	// FileType is the document's fileType, if present.
	FileType *int32
	// UpdateDataURL is the presigned HTTP URL, if present.
	UpdateDataURL string
	AuthScheme    string
	Attr          uint32
	// Version is an optional "version" (this project's extension) for the writer's version
	// policy.
	Version string
}

// HasHTTP reports whether the document offers HTTP and f has a URL.
func (d *Document) HasHTTP(f File) bool {
	return d.offers(ProtocolHTTP) && f.UpdateDataURL != ""
}

// HasMQTT reports whether the document offers MQTT with a stream name.
func (d *Document) HasMQTT() bool { return d.offers(ProtocolMQTT) && d.StreamName != "" }

func (d *Document) offers(p string) bool {
	for _, q := range d.Protocols {
		if q == p {
			return true
		}
	}
	return false
}

// Choose picks the protocol for f: the preferred one when both are usable. No usable
// protocol is an invalid_protocol error.
func (d *Document) Choose(f File, preferHTTP bool) (string, error) {
	mq, ht := d.HasMQTT(), d.HasHTTP(f)
	switch {
	case ht && (preferHTTP || !mq):
		return ProtocolHTTP, nil
	case mq:
		return ProtocolMQTT, nil
	}
	return "", status.Errorf(otav1.Reason_REASON_INVALID_PROTOCOL,
		"file %d: no usable protocol in %v (MQTT needs streamname, HTTP needs update_data_url)", f.Index, d.Protocols)
}

// IsOTA reports whether raw (an execution's jobDocument) has an afr_ota member. Malformed
// JSON is not an OTA either (Parse reports why).
func IsOTA(raw []byte) bool {
	var top map[string]json.RawMessage
	if json.Unmarshal(raw, &top) != nil {
		return false
	}
	_, ok := top["afr_ota"]
	return ok
}

func invalid(format string, args ...any) *status.Error {
	return status.Errorf(otav1.Reason_REASON_JOB_DOCUMENT_INVALID, format, args...)
}

// Parse validates an execution's jobDocument. It returns ErrNotOTA (plain, not a status error)
// for a custom job, otherwise a *status.Error with REASON_JOB_DOCUMENT_INVALID or
// REASON_INVALID_PROTOCOL on any problem.
func Parse(raw []byte) (*Document, error) {
	if len(raw) > MaxDocumentSize {
		return nil, invalid("job document is %d bytes (limit %d)", len(raw), MaxDocumentSize)
	}
	var top map[string]json.RawMessage
	if err := strictUnmarshal(raw, &top); err != nil {
		return nil, invalid("job document: %v", err)
	}
	ota, ok := top["afr_ota"]
	if !ok {
		return nil, ErrNotOTA
	}
	var m map[string]json.RawMessage
	if err := strictUnmarshal(ota, &m); err != nil || m == nil {
		return nil, invalid("afr_ota is not an object")
	}
	d := &Document{}

	praw, ok := m["protocols"]
	if !ok {
		return nil, invalid("afr_ota.protocols missing")
	}
	protos, err := parseProtocols(praw)
	if err != nil {
		return nil, err
	}
	d.Protocols = protos

	if s, ok := m["streamname"]; ok {
		if d.StreamName, err = str(s, "streamname", 1024); err != nil {
			return nil, err
		}
		if strings.ContainsAny(d.StreamName, "/+#") {
			return nil, invalid("streamname %q is not a single topic level", d.StreamName)
		}
	}

	fraw, ok := m["files"]
	if !ok {
		return nil, invalid("afr_ota.files missing")
	}
	var files []json.RawMessage
	if err := strictUnmarshal(fraw, &files); err != nil {
		return nil, invalid("afr_ota.files is not an array")
	}
	if len(files) == 0 {
		return nil, invalid("afr_ota.files is empty")
	}
	if len(files) > MaxFiles {
		return nil, invalid("afr_ota.files has %d entries (limit %d)", len(files), MaxFiles)
	}
	for i, fr := range files {
		f, err := parseFile(i, fr)
		if err != nil {
			return nil, err
		}
		d.Files = append(d.Files, f)
	}
	if len(d.Protocols) == 0 {
		return nil, status.Errorf(otav1.Reason_REASON_INVALID_PROTOCOL, "afr_ota.protocols has no protocol this agent speaks (MQTT, HTTP)")
	}
	for _, f := range d.Files {
		if _, err := d.Choose(f, false); err != nil {
			return nil, err
		}
	}
	return d, nil
}

func strictUnmarshal(b []byte, v any) error {
	dec := json.NewDecoder(bytes.NewReader(b))
	dec.UseNumber()
	if err := dec.Decode(v); err != nil {
		return err
	}
	if dec.More() {
		return errors.New("trailing data after JSON value")
	}
	if _, err := dec.Token(); err == nil {
		return errors.New("trailing data after JSON value")
	}
	return nil
}

func parseProtocols(raw json.RawMessage) ([]string, error) {
	var list []json.RawMessage
	if err := strictUnmarshal(raw, &list); err != nil {
		// The C agent also tolerates a single string.
		var one string
		if json.Unmarshal(raw, &one) != nil {
			return nil, invalid("afr_ota.protocols is not an array of strings")
		}
		list = []json.RawMessage{raw}
	}
	if len(list) > 16 {
		return nil, invalid("afr_ota.protocols has %d entries", len(list))
	}
	var out []string
	for _, r := range list {
		var p string
		if err := json.Unmarshal(r, &p); err != nil {
			return nil, invalid("afr_ota.protocols entry is not a string")
		}
		p = strings.ToUpper(strings.TrimSpace(p))
		if (p == ProtocolMQTT || p == ProtocolHTTP) && !contains(out, p) {
			out = append(out, p)
		}
	}
	return out, nil
}

func contains(l []string, s string) bool {
	for _, x := range l {
		if x == s {
			return true
		}
	}
	return false
}

// parseFile validates files[i], one group of fields after the other.
func parseFile(i int, raw json.RawMessage) (File, error) {
	var m map[string]json.RawMessage
	if err := strictUnmarshal(raw, &m); err != nil || m == nil {
		return File{}, invalid("files[%d] is not an object", i)
	}
	e := fileEntry{i: i, m: m}
	f := File{Index: i}
	for _, parse := range []func(*File) error{e.sizeAndID, e.texts, e.numbers, e.dataURL, e.signature} {
		if err := parse(&f); err != nil {
			return f, err
		}
	}
	return f, nil
}

// fileEntry is one raw entry of "files" being validated.
type fileEntry struct {
	i int
	m map[string]json.RawMessage
}

// field names key in error messages: files[i].key.
func (e fileEntry) field(k string) string { return fmt.Sprintf("files[%d].%s", e.i, k) }

// sizeAndID reads the two required fields, filesize and fileid.
func (e fileEntry) sizeAndID(f *File) error {
	sz, ok := e.m["filesize"]
	if !ok {
		return invalid("%s missing", e.field("filesize"))
	}
	n, err := Number(sz)
	if err != nil {
		return invalid("%s: %v", e.field("filesize"), err)
	}
	if n == 0 || n > MaxFileSize {
		return invalid("%s %d out of range 1..%d", e.field("filesize"), n, uint64(MaxFileSize))
	}
	f.Size = n

	id, ok := e.m["fileid"]
	if !ok {
		return invalid("%s missing", e.field("fileid"))
	}
	if n, err = Number(id); err != nil {
		return invalid("%s: %v", e.field("fileid"), err)
	}
	if n > MaxFileID {
		return invalid("%s %d out of range 0..%d", e.field("fileid"), n, MaxFileID)
	}
	f.FileID = uint32(n)
	return nil
}

// texts reads the optional string fields, each with its length limit.
func (e fileEntry) texts(f *File) error {
	for _, sf := range []struct {
		key string
		max int
		dst *string
	}{
		{"filepath", 1024, &f.Path},
		{"certfile", 1024, &f.CertFile},
		{"version", 128, &f.Version},
		{"auth_scheme", 128, &f.AuthScheme},
	} {
		r, ok := e.m[sf.key]
		if !ok {
			continue
		}
		v, err := str(r, e.field(sf.key), sf.max)
		if err != nil {
			return err
		}
		*sf.dst = v
	}
	return nil
}

// numbers reads the optional numeric fields fileType and attr.
func (e fileEntry) numbers(f *File) error {
	if r, ok := e.m["fileType"]; ok {
		n, err := Number(r)
		if err != nil || n > math.MaxInt32 {
			return invalid("%s: not a number 0..%d", e.field("fileType"), math.MaxInt32)
		}
		ft := int32(n)
		f.FileType = &ft
	}
	if r, ok := e.m["attr"]; ok {
		n, err := Number(r)
		if err != nil || n > math.MaxUint32 {
			return invalid("%s: not a 32-bit number", e.field("attr"))
		}
		f.Attr = uint32(n)
	}
	return nil
}

// dataURL reads the optional presigned HTTP(S) URL.
func (e fileEntry) dataURL(f *File) error {
	r, ok := e.m["update_data_url"]
	if !ok {
		return nil
	}
	s, err := str(r, e.field("update_data_url"), maxURLLen)
	if err != nil {
		return err
	}
	u, err := url.Parse(s)
	if err != nil || (u.Scheme != "https" && u.Scheme != "http") || u.Host == "" {
		return invalid("%s is not an http(s) URL", e.field("update_data_url"))
	}
	f.UpdateDataURL = s
	return nil
}

// signature reads the one signature key the entry may have (SigKeys).
func (e fileEntry) signature(f *File) error {
	for key, alg := range SigKeys {
		r, ok := e.m[key]
		if !ok {
			continue
		}
		if f.SigKey != "" {
			return invalid("files[%d] has two signatures (%s, %s)", e.i, f.SigKey, key)
		}
		s, err := str(r, e.field(key), 4*MaxSignatureLen)
		if err != nil {
			return err
		}
		sig, err := decodeBase64(s)
		if err != nil {
			return invalid("%s is not base64: %v", e.field(key), err)
		}
		if len(sig) == 0 || len(sig) > MaxSignatureLen {
			return invalid("%s is %d bytes (1..%d)", e.field(key), len(sig), MaxSignatureLen)
		}
		f.SigKey, f.SigAlgorithm, f.Signature = key, alg, sig
	}
	return nil
}

func decodeBase64(s string) ([]byte, error) {
	s = strings.Map(func(r rune) rune {
		if r == '\n' || r == '\r' || r == ' ' || r == '\t' {
			return -1
		}
		return r
	}, s)
	if b, err := base64.StdEncoding.DecodeString(s); err == nil {
		return b, nil
	}
	return base64.RawStdEncoding.DecodeString(s)
}

// str reads a JSON string field of at most max bytes, printable, no NUL.
func str(raw json.RawMessage, name string, max int) (string, error) {
	var s string
	if err := json.Unmarshal(raw, &s); err != nil {
		return "", invalid("%s is not a string", name)
	}
	if len(s) > max {
		return "", invalid("%s is %d bytes (limit %d)", name, len(s), max)
	}
	if strings.ContainsFunc(s, func(r rune) bool { return r == unicode.ReplacementChar || unicode.IsControl(r) }) {
		return "", invalid("%s has control or invalid characters", name)
	}
	return s, nil
}

// Number parses an unsigned integer the way the C agent does: a JSON number (integral), or
// a string holding decimal or 0x/0X hex. Leading zeros in decimal are refused (the C parser
// would read them as octal), as are signs, fractions, exponents and overflow.
func Number(raw json.RawMessage) (uint64, error) {
	s := strings.TrimSpace(string(raw))
	if strings.HasPrefix(s, `"`) {
		if err := json.Unmarshal(raw, &s); err != nil {
			return 0, errors.New("not a string")
		}
		s = strings.TrimSpace(s)
	} else if s == "" || !(s[0] >= '0' && s[0] <= '9') {
		return 0, fmt.Errorf("not a number: %.32q", s)
	}
	if len(s) > 2 && (s[:2] == "0x" || s[:2] == "0X") {
		n, err := strconv.ParseUint(s[2:], 16, 64)
		if err != nil || strings.ContainsAny(s[2:], "_+-") {
			return 0, fmt.Errorf("bad hex number %.32q", s)
		}
		return n, nil
	}
	if s == "" || strings.ContainsFunc(s, func(r rune) bool { return r < '0' || r > '9' }) {
		return 0, fmt.Errorf("not an unsigned integer: %.32q", s)
	}
	if len(s) > 1 && s[0] == '0' {
		return 0, fmt.Errorf("ambiguous leading zero in %.32q", s)
	}
	n, err := strconv.ParseUint(s, 10, 64)
	if err != nil {
		return 0, fmt.Errorf("number %.32q out of range", s)
	}
	return n, nil
}
