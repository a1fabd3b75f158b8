package jobdoc_test

import (
	"encoding/json"
	"errors"
	"net/url"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"unicode"
	"unicode/utf8"

	"github.com/gwota/gwota/netagent/jobdoc"
	"github.com/gwota/gwota/status"
)

// FuzzParse: any input gives a valid document, ErrNotOTA, or a typed status error; never a
// panic; accepted documents respect every bound.
func FuzzParse(f *testing.F) {
	for _, s := range []string{
		`{"afr_ota":{"protocols":["MQTT"],"streamname":"AFR_OTA-1","files":[{"filepath":"/fw","filesize":1164016,"fileid":0,"certfile":"c.pem","sig-sha256-ecdsa":"MEQCIE1S","fileType":0}]}}`,
		`{"afr_ota":{"protocols":["MQTT","HTTP"],"streamname":"s","files":[{"filesize":"0x400","fileid":"1","update_data_url":"https://h/x","sig-sha256-rsa":"AAAA"}]}}`,
		`{"afr_ota":{"protocols":"HTTP","files":[{"filesize":"10","fileid":0,"update_data_url":"http://h"}]}}`,
		`{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":1,"fileid":0},{"filesize":2,"fileid":1}]}}`,
		`{"operation":"custom"}`,
		`{"afr_ota":null}`,
		`{"afr_ota":{"files":[{"filesize":-1}]}}`,
		`[]`, ``, `{`, `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":1e3,"fileid":0}]}}`,
	} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, b []byte) {
		d, err := jobdoc.Parse(b)
		if err != nil {
			var se *status.Error
			if !errors.Is(err, jobdoc.ErrNotOTA) && !errors.As(err, &se) {
				t.Fatalf("untyped error %v", err)
			}
			if d != nil {
				t.Fatal("document with error")
			}
			return
		}
		if len(d.Protocols) == 0 || len(d.Files) == 0 || len(d.Files) > jobdoc.MaxFiles {
			t.Fatalf("accepted %+v", d)
		}
		for i, fl := range d.Files {
			if fl.Index != i || fl.Size == 0 || fl.Size > jobdoc.MaxFileSize || fl.FileID > jobdoc.MaxFileID || len(fl.Signature) > jobdoc.MaxSignatureLen {
				t.Fatalf("accepted file %+v", fl)
			}
			if (fl.SigKey == "") != (len(fl.Signature) == 0) {
				t.Fatalf("signature key/value mismatch %+v", fl)
			}
			if _, err := d.Choose(fl, true); err != nil {
				t.Fatalf("accepted file without protocol: %v", err)
			}
			if fl.SigKey != "" && jobdoc.SigKeys[fl.SigKey] != fl.SigAlgorithm {
				t.Fatalf("signature key %s with algorithm %s", fl.SigKey, fl.SigAlgorithm)
			}
			if fl.FileType != nil && *fl.FileType < 0 {
				t.Fatalf("negative file type %d", *fl.FileType)
			}
			for _, s := range []struct {
				v   string
				max int
			}{{fl.Path, 1024}, {fl.CertFile, 1024}, {fl.Version, 128}, {fl.AuthScheme, 128}, {fl.UpdateDataURL, 8192}} {
				if !printable(s.v) || len(s.v) > s.max {
					t.Fatalf("accepted string %q (limit %d)", s.v, s.max)
				}
			}
			if fl.UpdateDataURL != "" {
				u, err := url.Parse(fl.UpdateDataURL)
				if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" {
					t.Fatalf("accepted URL %q", fl.UpdateDataURL)
				}
			}
		}
		// The stream name becomes one level of an MQTT topic.
		if !printable(d.StreamName) || strings.ContainsAny(d.StreamName, "/+#") || len(d.StreamName) > 1024 {
			t.Fatalf("accepted stream name %q", d.StreamName)
		}
		if !jobdoc.IsOTA(b) {
			t.Fatal("parsed document is not an OTA for IsOTA")
		}
		again, err := jobdoc.Parse(b)
		if err != nil || !reflect.DeepEqual(d, again) {
			t.Fatalf("parse is not deterministic: %+v / %+v %v", d, again, err)
		}
	})
}

func printable(s string) bool {
	return utf8.ValidString(s) && !strings.ContainsFunc(s, func(r rune) bool { return r == utf8.RuneError || unicode.IsControl(r) })
}

// FuzzNumber: a number the parser accepts is one unambiguous unsigned integer: its decimal
// form is canonical (no sign, no leading zero, no exponent), its hex form reads the same.
func FuzzNumber(f *testing.F) {
	for _, s := range []string{`0`, `1164016`, `"0x400"`, `"0X1f"`, `"10"`, `" 7 "`, `01`, `1e3`, `-1`, `"0x"`, `"0x-1"`, `18446744073709551616`, `"0x_1"`, `1.0`, `"٣"`} {
		f.Add([]byte(s))
	}
	f.Fuzz(func(t *testing.T, raw []byte) {
		n, err := jobdoc.Number(raw)
		if err != nil {
			return
		}
		s := strings.TrimSpace(string(raw))
		if strings.HasPrefix(s, `"`) {
			if json.Unmarshal([]byte(s), &s) != nil {
				t.Fatalf("accepted %q, not a JSON string", raw)
			}
			s = strings.TrimSpace(s)
		}
		if h, ok := strings.CutPrefix(strings.ToLower(s), "0x"); ok {
			if v, err := strconv.ParseUint(h, 16, 64); err != nil || v != n || strings.ContainsAny(h, "_+-") {
				t.Fatalf("%q read as %d", raw, n)
			}
			return
		}
		if strconv.FormatUint(n, 10) != s {
			t.Fatalf("%q read as %d: not its canonical decimal", raw, n)
		}
	})
}
