package jobdoc_test

import (
	"encoding/base64"
	"encoding/json"
	"errors"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/netagent/jobdoc"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"

	"github.com/gwota/gwota/test/testenv"
)

const ecdsaSig = "MEQCIE1SFkIHHiZAvkPpu6McJtx7SYoD0u2zR3xXyQU/2aT5AiAgcHhuJ1gpx4dLrfuuS9pxnxqbLfCqqgSUd3g6BK3HQQ=="

func i32(v int32) *int32 { return &v }

func mustSig(t *testing.T, s string) []byte {
	b, err := base64.StdEncoding.DecodeString(s)
	if err != nil {
		t.Fatal(err)
	}
	return b
}

func TestParseAWSExample(t *testing.T) {
	doc := `{"afr_ota":{"protocols":["MQTT"],"streamname":"AFR_OTA-945d320b-a18b-441b-b9a4","files":[{
		"filepath":"/opt/fw/gateway.img","filesize":1164016,"fileid":0,"certfile":"ecdsa-sha256-signer.crt.pem",
		"sig-sha256-ecdsa":"` + ecdsaSig + `","fileType":0,"update_data_url":"https://bucket.example/x?sig=1",
		"auth_scheme":"aws.s3.presigned","attr":0}]}}`
	d, err := jobdoc.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	want := &jobdoc.Document{
		Protocols:  []string{"MQTT"},
		StreamName: "AFR_OTA-945d320b-a18b-441b-b9a4",
		Files: []jobdoc.File{{
			Path: "/opt/fw/gateway.img", Size: 1164016, FileID: 0, CertFile: "ecdsa-sha256-signer.crt.pem",
			SigKey: "sig-sha256-ecdsa", SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256,
			Signature: mustSig(t, ecdsaSig), FileType: i32(0), UpdateDataURL: "https://bucket.example/x?sig=1",
			AuthScheme: "aws.s3.presigned",
		}},
	}
	if diff := cmp.Diff(want, d); diff != "" {
		t.Fatalf("(-want +got)\n%s", diff)
	}
	// MQTT only is offered, even though the file has a URL.
	if p, err := d.Choose(d.Files[0], true); err != nil || p != jobdoc.ProtocolMQTT {
		t.Fatalf("Choose = %q, %v", p, err)
	}
}

func TestNumberForms(t *testing.T) {
	tests := []struct {
		in   string
		want uint64
		ok   bool
	}{
		{`1024`, 1024, true},
		{`"1024"`, 1024, true},
		{`"0x400"`, 1024, true},
		{`"0X400"`, 1024, true},
		{`" 12 "`, 12, true},
		{`0`, 0, true},
		{`"0"`, 0, true},
		{`18446744073709551615`, 1<<64 - 1, true},
		{`18446744073709551616`, 0, false},
		{`-1`, 0, false},
		{`"-1"`, 0, false},
		{`1.5`, 0, false},
		{`1e3`, 0, false},
		{`"010"`, 0, false}, // C would read octal: refuse the ambiguity
		{`"0x"`, 0, false},
		{`"0xZZ"`, 0, false},
		{`"0x1_0"`, 0, false},
		{`true`, 0, false},
		{`null`, 0, false},
		{`""`, 0, false},
		{`[1]`, 0, false},
		{`"12abc"`, 0, false},
	}
	for _, tt := range tests {
		got, err := jobdoc.Number(json.RawMessage(tt.in))
		if (err == nil) != tt.ok || got != tt.want {
			t.Errorf("Number(%s) = %d, %v; want %d ok=%v", tt.in, got, err, tt.want, tt.ok)
		}
	}
}

func TestCNumberFormsInDocument(t *testing.T) {
	doc := `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[
		{"filesize":"0x100","fileid":"3","fileType":"0x2","attr":"7"}]}}`
	d, err := jobdoc.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	f := d.Files[0]
	if f.Size != 256 || f.FileID != 3 || *f.FileType != 2 || f.Attr != 7 || f.SigKey != "" {
		t.Fatalf("got %+v", f)
	}
}

func TestMultipleFilesAndProtocols(t *testing.T) {
	doc := `{"afr_ota":{"protocols":["http","MQTT","MQTT","ftp"],"streamname":"s","files":[
		{"filesize":10,"fileid":0,"update_data_url":"https://h/a","sig-sha256-ed25519":"` + base64.StdEncoding.EncodeToString(make([]byte, 64)) + `"},
		{"filesize":20,"fileid":1,"filepath":"/etc/app.conf","sig-sha256-rsa-pss":"` + base64.RawStdEncoding.EncodeToString(make([]byte, 256)) + `","version":"1.2.3"}]}}`
	d, err := jobdoc.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]string{"HTTP", "MQTT"}, d.Protocols); diff != "" {
		t.Fatal(diff)
	}
	if len(d.Files) != 2 || d.Files[1].Index != 1 || d.Files[1].Version != "1.2.3" {
		t.Fatalf("files %+v", d.Files)
	}
	if d.Files[0].SigAlgorithm != otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256 ||
		d.Files[1].SigAlgorithm != otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256 || len(d.Files[1].Signature) != 256 {
		t.Fatalf("signatures %+v", d.Files)
	}
	for _, tt := range []struct {
		file       int
		preferHTTP bool
		want       string
	}{{0, true, "HTTP"}, {0, false, "MQTT"}, {1, true, "MQTT"}} {
		if got, err := d.Choose(d.Files[tt.file], tt.preferHTTP); err != nil || got != tt.want {
			t.Errorf("Choose(file %d, preferHTTP=%v) = %q, %v", tt.file, tt.preferHTTP, got, err)
		}
	}
}

func TestSigKeysMapping(t *testing.T) {
	want := map[string]otav1.SigAlgorithm{
		"sig-sha256-ecdsa":   otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256,
		"sig-sha256-rsa":     otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256,
		"sig-sha1-rsa":       otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA1,
		"sig-sha1-ecdsa":     otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA1,
		"sig-sha256-rsa-pss": otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256,
		"sig-sha256-ed25519": otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256,
	}
	for key, alg := range want {
		doc := `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":1,"fileid":0,"` + key + `":"AAAA"}]}}`
		d, err := jobdoc.Parse([]byte(doc))
		if err != nil {
			t.Fatalf("%s: %v", key, err)
		}
		if d.Files[0].SigAlgorithm != alg || d.Files[0].SigKey != key {
			t.Errorf("%s -> %v", key, d.Files[0].SigAlgorithm)
		}
	}
}

// A real RSA-4096 signature (512 bytes, 684 base64 characters) made by openssl: rustot
// panics on these.
func TestRealRSA4096Signature(t *testing.T) {
	testenv.NeedTools(t, "openssl")
	dir := t.TempDir()
	key, img, sig := filepath.Join(dir, "k.pem"), filepath.Join(dir, "img"), filepath.Join(dir, "sig")
	if err := os.WriteFile(img, []byte(strings.Repeat("firmware", 1000)), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, args := range [][]string{
		{"genpkey", "-algorithm", "RSA", "-pkeyopt", "rsa_keygen_bits:4096", "-out", key},
		{"dgst", "-sha256", "-sign", key, "-out", sig, img},
	} {
		if out, err := exec.Command("openssl", args...).CombinedOutput(); err != nil {
			t.Fatalf("openssl %v: %v\n%s", args, err, out)
		}
	}
	raw, err := os.ReadFile(sig)
	if err != nil {
		t.Fatal(err)
	}
	b64 := base64.StdEncoding.EncodeToString(raw)
	doc := `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":8000,"fileid":0,"certfile":"rsa.crt","sig-sha256-rsa":"` + b64 + `"}]}}`
	d, err := jobdoc.Parse([]byte(doc))
	if err != nil {
		t.Fatal(err)
	}
	if len(b64) != 684 || !cmp.Equal(d.Files[0].Signature, raw) {
		t.Fatalf("signature %d bytes, base64 %d", len(d.Files[0].Signature), len(b64))
	}
}

func TestCustomJob(t *testing.T) {
	for _, doc := range []string{`{"operation":"reboot"}`, `{}`, `{"afr":{"x":1}}`} {
		if _, err := jobdoc.Parse([]byte(doc)); !errors.Is(err, jobdoc.ErrNotOTA) {
			t.Errorf("Parse(%s) = %v, want ErrNotOTA", doc, err)
		}
		if jobdoc.IsOTA([]byte(doc)) {
			t.Errorf("IsOTA(%s)", doc)
		}
	}
	if !jobdoc.IsOTA([]byte(`{"afr_ota":null}`)) {
		t.Error("afr_ota:null is an (invalid) OTA document")
	}
}

func TestHostileDocuments(t *testing.T) {
	file := func(extra string) string {
		return `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":100,"fileid":1` + extra + `}]}}`
	}
	tests := []struct {
		name   string
		doc    string
		reason otav1.Reason
	}{
		{"not json", `{"afr_ota":`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"array top", `[1,2]`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"trailing", `{"afr_ota":{}} {}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"afr_ota null", `{"afr_ota":null}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"afr_ota string", `{"afr_ota":"x"}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"no protocols", `{"afr_ota":{"streamname":"s","files":[{"filesize":1,"fileid":0}]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"no files", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s"}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"empty files", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"files object", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":{}}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"file not object", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[7]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"no filesize", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"fileid":0}]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"no fileid", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":1}]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"zero size", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":0,"fileid":0}]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"huge size", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":"0xffffffffffffffff","fileid":0}]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"negative size", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":-5,"fileid":0}]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"fileid 256", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[{"filesize":5,"fileid":256}]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"bad base64", file(`,"sig-sha256-ecdsa":"!!!"`), otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"empty sig", file(`,"sig-sha256-ecdsa":""`), otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"sig too long", file(`,"sig-sha256-rsa":"` + base64.StdEncoding.EncodeToString(make([]byte, 2000)) + `"`), otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"two sigs", file(`,"sig-sha256-rsa":"AAAA","sig-sha256-ecdsa":"AAAA"`), otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"sig number", file(`,"sig-sha256-ecdsa":5`), otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"filepath control", file(`,"filepath":"/a\nb"`), otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"filepath long", file(`,"filepath":"` + strings.Repeat("a", 5000) + `"`), otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"url not http", file(`,"update_data_url":"file:///etc/shadow"`), otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"fileType big", file(`,"fileType":4294967296`), otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"streamname wildcard", `{"afr_ota":{"protocols":["MQTT"],"streamname":"a/#","files":[{"filesize":1,"fileid":0}]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"too many files", `{"afr_ota":{"protocols":["MQTT"],"streamname":"s","files":[` + strings.Repeat(`{"filesize":1,"fileid":0},`, 40) + `{"filesize":1,"fileid":0}]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"too big", `{"afr_ota":{"x":"` + strings.Repeat("a", jobdoc.MaxDocumentSize) + `"}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"protocols not list", `{"afr_ota":{"protocols":5,"streamname":"s","files":[{"filesize":1,"fileid":0}]}}`, otav1.Reason_REASON_JOB_DOCUMENT_INVALID},
		{"unknown protocol", `{"afr_ota":{"protocols":["BLE"],"streamname":"s","files":[{"filesize":1,"fileid":0}]}}`, otav1.Reason_REASON_INVALID_PROTOCOL},
		{"empty protocols", `{"afr_ota":{"protocols":[],"streamname":"s","files":[{"filesize":1,"fileid":0}]}}`, otav1.Reason_REASON_INVALID_PROTOCOL},
		{"mqtt without stream", `{"afr_ota":{"protocols":["MQTT"],"files":[{"filesize":1,"fileid":0}]}}`, otav1.Reason_REASON_INVALID_PROTOCOL},
		{"http without url", `{"afr_ota":{"protocols":["HTTP"],"files":[{"filesize":1,"fileid":0}]}}`, otav1.Reason_REASON_INVALID_PROTOCOL},
		{"http, one file without url", `{"afr_ota":{"protocols":["HTTP"],"files":[{"filesize":1,"fileid":0,"update_data_url":"https://h/x"},{"filesize":1,"fileid":1}]}}`, otav1.Reason_REASON_INVALID_PROTOCOL},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			_, err := jobdoc.Parse([]byte(tt.doc))
			var se *status.Error
			if !errors.As(err, &se) {
				t.Fatalf("error %v is not a *status.Error", err)
			}
			if se.Reason != tt.reason {
				t.Fatalf("reason %v, want %v (%v)", se.Reason, tt.reason, err)
			}
		})
	}
}

func TestSingleProtocolString(t *testing.T) {
	d, err := jobdoc.Parse([]byte(`{"afr_ota":{"protocols":"MQTT","streamname":"s","files":[{"filesize":1,"fileid":0}]}}`))
	if err != nil || d.Protocols[0] != "MQTT" {
		t.Fatalf("%+v %v", d, err)
	}
}
