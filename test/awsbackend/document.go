package awsbackend

import (
	"bytes"
	"encoding/base64"
	"encoding/json"
	"fmt"
)

// maxDocumentBytes is AWS IoT's job document limit.
const maxDocumentBytes = 32 * 1024

// docFile is what CreateJob needs to know about one uploaded file.
type docFile struct {
	DevicePath string
	Size       int64
	FileID     int
	FileType   int
	CertName   string
	SigKey     string // "" when unsigned
	Signature  []byte
	URL        string // update_data_url when HTTP is offered
}

// buildDocument returns the afr_ota job document in the shape the OTA service produces
// (docs/PROTOCOL.md section 3). streamName is empty when MQTT is not offered.
func buildDocument(protocols []string, streamName string, files []docFile) (string, error) {
	type afrOTA struct {
		Protocols  []string         `json:"protocols"`
		StreamName string           `json:"streamname,omitempty"`
		Files      []map[string]any `json:"files"`
	}
	doc := struct {
		AfrOTA afrOTA `json:"afr_ota"`
	}{afrOTA{Protocols: protocols, StreamName: streamName}}
	for _, f := range files {
		m := map[string]any{
			"filepath": f.DevicePath,
			"filesize": f.Size,
			"fileid":   f.FileID,
			"fileType": f.FileType,
		}
		if f.CertName != "" {
			m["certfile"] = f.CertName
		}
		if f.SigKey != "" {
			m[f.SigKey] = base64.StdEncoding.EncodeToString(f.Signature)
		}
		if f.URL != "" {
			m["update_data_url"] = f.URL
			m["auth_scheme"] = "aws.s3.presigned"
		}
		doc.AfrOTA.Files = append(doc.AfrOTA.Files, m)
	}
	// No HTML escaping: presigned URLs carry '&', and "\u0026" trips parsers that do not
	// unescape (coreJSON in AWS's C agent).
	var buf bytes.Buffer
	enc := json.NewEncoder(&buf)
	enc.SetEscapeHTML(false)
	if err := enc.Encode(doc); err != nil {
		return "", err
	}
	b := bytes.TrimSuffix(buf.Bytes(), []byte("\n"))
	if len(b) > maxDocumentBytes {
		return "", fmt.Errorf("job document is %d bytes, AWS allows %d", len(b), maxDocumentBytes)
	}
	return string(b), nil
}
