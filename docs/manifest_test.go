package docs

import (
	"encoding/base64"
	"encoding/json"
	"fmt"
	"os"
	"regexp"
	"strings"
	"testing"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/netagent/jobdoc"
	"github.com/gwota/gwota/writer/manifest"
)

// TestManifestFilesJSON reads the files.json of MANIFEST.md, makes the job document AWS IoT
// makes from it (fileName as filepath, the files in order as stream file ids 0, 1, the custom
// signature under "sig-" + hash + "-" + signature algorithm, certificateName as certfile;
// the signature placeholder replaced by base64), and checks that ota-net's job document
// parser accepts it with an ECDSA signature on the manifest and none on the chunk file, and
// that the manifest is paired with its chunk file.
func TestManifestFilesJSON(t *testing.T) {
	doc, err := os.ReadFile("MANIFEST.md")
	if err != nil {
		t.Fatal(err)
	}
	m := regexp.MustCompile("(?s)```json\n(.*?)```").FindSubmatch(doc)
	if m == nil {
		t.Fatal("no json block in MANIFEST.md")
	}
	var files []struct {
		FileName     string `json:"fileName"`
		FileType     int    `json:"fileType"`
		FileLocation struct {
			S3Location struct{ Bucket, Key string } `json:"s3Location"`
		} `json:"fileLocation"`
		CodeSigning *struct {
			Custom struct {
				Signature struct {
					InlineDocument string `json:"inlineDocument"`
				} `json:"signature"`
				CertificateChain struct {
					CertificateName string `json:"certificateName"`
				} `json:"certificateChain"`
				HashAlgorithm      string `json:"hashAlgorithm"`
				SignatureAlgorithm string `json:"signatureAlgorithm"`
			} `json:"customCodeSigning"`
		} `json:"codeSigning"`
	}
	dec := json.NewDecoder(strings.NewReader(string(m[1])))
	dec.DisallowUnknownFields()
	if err := dec.Decode(&files); err != nil {
		t.Fatalf("files.json: %v", err)
	}
	var entries []map[string]any
	for i, f := range files {
		e := map[string]any{"filepath": f.FileName, "filesize": 1000 + i, "fileid": i, "fileType": f.FileType}
		if f.FileLocation.S3Location.Key == "" {
			t.Errorf("file %d: no S3 key", i)
		}
		if f.CodeSigning != nil {
			c := f.CodeSigning.Custom
			if !strings.HasPrefix(c.Signature.InlineDocument, "BASE64 OF ") {
				t.Errorf("file %d: signature %q", i, c.Signature.InlineDocument)
			}
			sigKey := fmt.Sprintf("sig-%s-%s", strings.ToLower(c.HashAlgorithm), strings.ToLower(c.SignatureAlgorithm))
			e[sigKey] = base64.StdEncoding.EncodeToString(make([]byte, 70))
			e["certfile"] = c.CertificateChain.CertificateName
		}
		entries = append(entries, e)
	}
	raw, err := json.Marshal(map[string]any{"afr_ota": map[string]any{"protocols": []string{"MQTT"}, "streamname": "AFR_OTA-x", "files": entries}})
	if err != nil {
		t.Fatal(err)
	}
	d, err := jobdoc.Parse(raw)
	if err != nil {
		t.Fatal(err)
	}
	var paths, sigs []string
	for _, f := range d.Files {
		paths, sigs = append(paths, f.Path), append(sigs, f.SigKey+" "+f.CertFile)
	}
	if diff := cmp.Diff([]string{"sig-sha256-ecdsa signer.crt.pem", " "}, sigs); diff != "" {
		t.Errorf("signatures (-want +got):\n%s", diff)
	}
	pairs, err := manifest.PairFiles(paths)
	if err != nil {
		t.Fatal(err)
	}
	if diff := cmp.Diff([]manifest.Pair{{Manifest: 0, Chunks: 1}}, pairs); diff != "" {
		t.Error(diff)
	}
}
