package emulator

import (
	"bytes"
	"context"
	"encoding/json"
	"io"
	"net/http"
	"os"
	"strings"
	"testing"

	"github.com/gwota/gwota/test/backend"
)

func docURL(t testing.TB, doc []byte) string {
	t.Helper()
	var d struct {
		AfrOTA struct {
			Files []struct {
				URL string `json:"update_data_url"`
			} `json:"files"`
		} `json:"afr_ota"`
	}
	if err := json.Unmarshal(doc, &d); err != nil || len(d.AfrOTA.Files) == 0 || d.AfrOTA.Files[0].URL == "" {
		t.Fatalf("no URL in %s (%v)", doc, err)
	}
	return d.AfrOTA.Files[0].URL
}

func httpGet(t *testing.T, url string, hdr ...string) (int, []byte) {
	t.Helper()
	req, err := http.NewRequest(http.MethodGet, url, nil)
	if err != nil {
		t.Fatal(err)
	}
	for i := 0; i+1 < len(hdr); i += 2 {
		req.Header.Set(hdr[i], hdr[i+1])
	}
	resp, err := http.DefaultClient.Do(req)
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	b, err := io.ReadAll(resp.Body)
	if err != nil {
		t.Fatal(err)
	}
	return resp.StatusCode, b
}

func TestHTTPPresignedDownloads(t *testing.T) {
	e := startEmulator(t, Options{})
	path, _ := writeTestFile(t, 100000)
	data, _ := os.ReadFile(path)
	createJob(t, e, "job-h", path, backend.ProtocolHTTP)
	doc, err := e.JobDocument("job-h")
	if err != nil {
		t.Fatal(err)
	}
	if strings.Contains(string(doc), "streamname") {
		t.Errorf("HTTP-only document has a stream: %s", doc)
	}
	url := docURL(t, doc)

	if code, body := httpGet(t, url); code != 200 || !bytes.Equal(body, data) {
		t.Fatalf("GET = %d, %d bytes", code, len(body))
	}
	if code, body := httpGet(t, url, "Range", "bytes=4096-8191"); code != http.StatusPartialContent || !bytes.Equal(body, data[4096:8192]) {
		t.Fatalf("ranged GET = %d, %d bytes", code, len(body))
	}
	tampered := strings.Replace(url, "X-Amz-Expires=1800", "X-Amz-Expires=3600", 1)
	if code, body := httpGet(t, tampered); code != 403 || !strings.Contains(string(body), "SignatureDoesNotMatch") {
		t.Fatalf("tampered URL = %d %s", code, body)
	}
	if code, _ := httpGet(t, strings.Split(url, "?")[0]); code != 403 {
		t.Fatalf("unsigned URL = %d", code)
	}

	// Expire URLs early: the one issued now is refused like S3 refuses an expired URL.
	e.SetFaults("job-h", Faults{ExpireURLAfter: 1})
	doc, _ = e.JobDocument("job-h")
	expired := docURL(t, doc)
	if code, body := httpGet(t, expired); code != 403 || !strings.Contains(string(body), "<Code>AccessDenied</Code>") || !strings.Contains(string(body), "expired") {
		t.Fatalf("expired URL = %d %s", code, body)
	}
	// DescribeJobExecution re-signs: a device asking again gets a URL that works.
	e.ClearFaults("job-h")
	d := connectDevice(t, e.BrokerURL(), "gw-01")
	d.publishJSON(thingPrefix+"jobs/job-h/get", map[string]any{"includeJobDocument": true})
	var acc struct {
		Execution struct {
			JobDocument json.RawMessage `json:"jobDocument"`
		} `json:"execution"`
	}
	if err := json.Unmarshal(d.next(thingPrefix+"jobs/job-h/get/accepted").Payload, &acc); err != nil {
		t.Fatal(err)
	}
	fresh := docURL(t, acc.Execution.JobDocument)
	if code, body := httpGet(t, fresh, "Range", "bytes=99990-"); code != http.StatusPartialContent || !bytes.Equal(body, data[99990:]) {
		t.Fatalf("re-signed URL = %d, %d bytes", code, len(body))
	}

	// A deleted job's file is gone.
	if err := e.DeleteJob(context.Background(), "job-h", true); err != nil {
		t.Fatal(err)
	}
	if code, body := httpGet(t, fresh); code != 404 || !strings.Contains(string(body), "NoSuchKey") {
		t.Fatalf("after delete = %d %s", code, body)
	}
}
