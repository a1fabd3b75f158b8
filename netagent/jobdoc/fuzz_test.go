package jobdoc_test

import (
	"errors"
	"testing"

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
		}
	})
}
