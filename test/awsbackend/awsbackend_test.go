package awsbackend

import (
	"bytes"
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/sha256"
	"crypto/x509"
	"encoding/base64"
	"encoding/json"
	"encoding/pem"
	"errors"
	"io"
	"net/http"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/credentials"
	"github.com/google/go-cmp/cmp"
	"go.uber.org/goleak"

	"github.com/gwota/gwota/test/backend"
)

func TestMain(m *testing.M) { goleak.VerifyTestMain(m) }

func testOptions(s *standIn) Options {
	return Options{
		Endpoint:       "abc123-ats.iot." + testRegion + ".amazonaws.com",
		Thing:          testThing,
		Bucket:         testBucket,
		ServiceRoleARN: testRole,
		BaseEndpoint:   s.srv.URL,
		Credentials:    credentials.NewStaticCredentialsProvider(testAKID, "secret", ""),
		PollMin:        time.Millisecond,
		PollMax:        4 * time.Millisecond,
	}
}

// newTestBackend connects to the stand-in and closes the backend when the test ends.
func newTestBackend(t *testing.T, s *standIn, mod func(*Options)) *Backend {
	t.Helper()
	o := testOptions(s)
	if mod != nil {
		mod(&o)
	}
	b, err := New(t.Context(), o)
	if err != nil {
		t.Fatalf("New: %v", err)
	}
	t.Cleanup(func() {
		if err := b.Close(); err != nil {
			t.Errorf("Close: %v", err)
		}
	})
	return b
}

// writeFile makes an image of n pseudo-random bytes.
func writeFile(t *testing.T, n int) (string, []byte) {
	t.Helper()
	data := make([]byte, n)
	rand.Read(data)
	p := filepath.Join(t.TempDir(), "gateway.img")
	if err := os.WriteFile(p, data, 0o600); err != nil {
		t.Fatal(err)
	}
	return p, data
}

func ecKeyPEM(t *testing.T) (*ecdsa.PrivateKey, []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	der, err := x509.MarshalPKCS8PrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return k, pem.EncodeToMemory(&pem.Block{Type: "PRIVATE KEY", Bytes: der})
}

// afrFile is one parsed entry of the document's files list.
type afrDoc struct {
	AfrOTA struct {
		Protocols  []string         `json:"protocols"`
		StreamName string           `json:"streamname"`
		Files      []map[string]any `json:"files"`
	} `json:"afr_ota"`
}

// createJobBody is the subset of CreateJob's JSON body the tests check.
type createJobBody struct {
	Targets            []string `json:"targets"`
	TargetSelection    string   `json:"targetSelection"`
	Document           string   `json:"document"`
	PresignedURLConfig *struct {
		RoleArn      string `json:"roleArn"`
		ExpiresInSec int64  `json:"expiresInSec"`
	} `json:"presignedUrlConfig"`
}

func decodeJSON[T any](t *testing.T, b []byte) T {
	t.Helper()
	var v T
	if err := json.Unmarshal(b, &v); err != nil {
		t.Fatalf("decode %s: %v", b, err)
	}
	return v
}

func TestRegionFromEndpoint(t *testing.T) {
	for _, tc := range []struct{ in, want string }{
		{"abc123-ats.iot.eu-west-1.amazonaws.com", "eu-west-1"},
		{"mqtts://abc123-ats.iot.us-east-2.amazonaws.com:8883", "us-east-2"},
		{"abc123-ats.iot.cn-north-1.amazonaws.com.cn", "cn-north-1"},
		{"localhost", ""},
		{"", ""},
	} {
		if got := regionFromEndpoint(tc.in); got != tc.want {
			t.Errorf("regionFromEndpoint(%q) = %q, want %q", tc.in, got, tc.want)
		}
	}
}

func TestConfigured(t *testing.T) {
	full := map[string]string{
		EnvEndpoint: "abc-ats.iot.eu-west-1.amazonaws.com", EnvThing: "gw", EnvBucket: "b",
		EnvServiceRoleARN: testRole, EnvRegion: "",
		"AWS_ACCESS_KEY_ID": "AKID", "AWS_SECRET_ACCESS_KEY": "s", "AWS_PROFILE": "",
		"AWS_WEB_IDENTITY_TOKEN_FILE": "", "AWS_CONTAINER_CREDENTIALS_FULL_URI": "",
		"AWS_CONTAINER_CREDENTIALS_RELATIVE_URI": "", EnvDefaultCredentials: "",
	}
	for _, tc := range []struct {
		name    string
		change  map[string]string
		ok      bool
		missing []string
	}{
		{"complete", nil, true, nil},
		{"no endpoint or thing", map[string]string{EnvEndpoint: "", EnvThing: ""}, false, []string{EnvEndpoint, EnvThing}},
		{"no bucket", map[string]string{EnvBucket: ""}, false, []string{EnvBucket}},
		{"no service role", map[string]string{EnvServiceRoleARN: ""}, false, []string{EnvServiceRoleARN}},
		{"region not derivable", map[string]string{EnvEndpoint: "iot.example.test"}, false, []string{EnvRegion}},
		{"region given", map[string]string{EnvEndpoint: "iot.example.test", EnvRegion: "eu-west-1"}, true, nil},
		{"no credentials", map[string]string{"AWS_ACCESS_KEY_ID": ""}, false, []string{"credentials"}},
		{"profile", map[string]string{"AWS_ACCESS_KEY_ID": "", "AWS_PROFILE": "ci"}, true, nil},
		{"default chain", map[string]string{"AWS_ACCESS_KEY_ID": "", EnvDefaultCredentials: "1"}, true, nil},
	} {
		t.Run(tc.name, func(t *testing.T) {
			for k, v := range full {
				t.Setenv(k, v)
			}
			for k, v := range tc.change {
				t.Setenv(k, v)
			}
			ok, why := Configured()
			if ok != tc.ok {
				t.Fatalf("Configured() = %v, %q; want ok %v", ok, why, tc.ok)
			}
			for _, m := range tc.missing {
				if !strings.Contains(why, m) {
					t.Errorf("why %q does not name %s", why, m)
				}
			}
			if ok && why != "" {
				t.Errorf("why %q with ok", why)
			}
			if !ok {
				if _, err := FromEnv(t.Context()); err == nil || err.Error() != why {
					t.Errorf("FromEnv error %v, want %q", err, why)
				}
			}
		})
	}
}

func TestNewUnknownThing(t *testing.T) {
	s := newStandIn(t)
	o := testOptions(s)
	o.Thing = "no-such-thing"
	_, err := New(t.Context(), o)
	if err == nil || !strings.Contains(err.Error(), "no-such-thing") || !isNotFound(err) {
		t.Fatalf("New with unknown thing: %v, want a not-found error naming it", err)
	}
}

func TestNewCancelsStaleExecutions(t *testing.T) {
	s := newStandIn(t)
	s.stale["QUEUED"] = []staleExec{{"old-q1"}, {"old-q2"}}
	s.stale["IN_PROGRESS"] = []staleExec{{"old-ip"}}
	newTestBackend(t, s, nil)

	want := []string{
		"GET /things/gw-test-1",
		"GET /things/gw-test-1/jobs", // QUEUED page 1
		"GET /things/gw-test-1/jobs", // QUEUED page 2
		"PUT /things/gw-test-1/jobs/old-q1/cancel",
		"PUT /things/gw-test-1/jobs/old-q2/cancel",
		"GET /things/gw-test-1/jobs", // IN_PROGRESS
		"PUT /things/gw-test-1/jobs/old-ip/cancel",
	}
	if diff := cmp.Diff(want, s.calls()); diff != "" {
		t.Fatalf("requests (-want +got):\n%s", diff)
	}
	reqs := s.requests()
	if got := reqs[1].Query.Get("status"); got != "QUEUED" {
		t.Errorf("first listing status %q", got)
	}
	if got := reqs[2].Query.Get("nextToken"); got != "page1" {
		t.Errorf("second page token %q, want page1", got)
	}
	if got := reqs[5].Query.Get("status"); got != "IN_PROGRESS" {
		t.Errorf("second listing status %q", got)
	}
	for _, i := range []int{3, 4} {
		if reqs[i].Query.Has("force") && reqs[i].Query.Get("force") != "false" {
			t.Errorf("QUEUED cancel %s forced: %v", reqs[i].Path, reqs[i].Query)
		}
	}
	if got := reqs[6].Query.Get("force"); got != "true" {
		t.Errorf("IN_PROGRESS cancel force=%q, want true", got)
	}
	for _, r := range reqs {
		if !strings.Contains(r.Header.Get("Authorization"), "Credential="+testAKID+"/") ||
			!strings.Contains(r.Header.Get("Authorization"), "/"+testRegion+"/iot/aws4_request") {
			t.Errorf("%s %s: Authorization %q", r.Method, r.Path, r.Header.Get("Authorization"))
		}
	}
}

func TestAssumeRole(t *testing.T) {
	s := newStandIn(t)
	const role = "arn:aws:iam::123456789012:role/gwota-e2e-runner"
	newTestBackend(t, s, func(o *Options) { o.AssumeRoleARN = role })
	s.mu.Lock()
	form := s.assumeRq
	s.mu.Unlock()
	if form.Get("RoleArn") != role || form.Get("RoleSessionName") == "" {
		t.Fatalf("AssumeRole form %v", form)
	}
	sts := s.find("POST", "/")
	if len(sts) != 1 || !strings.Contains(sts[0].Header.Get("Authorization"), "Credential="+testAKID+"/") ||
		!strings.Contains(sts[0].Header.Get("Authorization"), "/sts/aws4_request") {
		t.Fatalf("AssumeRole requests %d, Authorization %q", len(sts), sts[0].Header.Get("Authorization"))
	}
	thing := s.find("GET", "/things/"+testThing)
	if len(thing) == 0 {
		t.Fatal("no DescribeThing")
	}
	if a := thing[0].Header.Get("Authorization"); !strings.Contains(a, "Credential="+assumedAKID+"/") {
		t.Errorf("IoT request not signed with the assumed role: %q", a)
	}
	if tok := thing[0].Header.Get("X-Amz-Security-Token"); tok != "assumed-token" {
		t.Errorf("X-Amz-Security-Token %q", tok)
	}
}

func TestCreateJob(t *testing.T) {
	type want struct {
		stream      bool   // a stream is created and named in the document
		urlPrefix   string // update_data_url prefix ("" = no URL)
		presignConf bool   // CreateJob carries presignedUrlConfig
	}
	placeholder := "${aws:iot:s3-presigned-url-v2:https://s3." + testRegion + ".amazonaws.com/" + testBucket + "/gwota-e2e/"
	for _, tc := range []struct {
		name      string
		protocols []string
		noRole    bool
		expiry    time.Duration
		want      want
	}{
		{"mqtt", []string{backend.ProtocolMQTT}, false, 0, want{stream: true}},
		{"http placeholder", []string{backend.ProtocolHTTP}, false, 10 * time.Minute, want{urlPrefix: placeholder, presignConf: true}},
		{"both", []string{backend.ProtocolMQTT, backend.ProtocolHTTP}, false, 0, want{stream: true, urlPrefix: placeholder, presignConf: true}},
		{"http presigned here", []string{backend.ProtocolHTTP}, true, 0, want{urlPrefix: "http://"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStandIn(t)
			b := newTestBackend(t, s, func(o *Options) {
				if tc.noRole {
					o.ServiceRoleARN = ""
				}
			})
			img, data := writeFile(t, 70_000)
			priv, keyPEM := ecKeyPEM(t)
			s.pending["job-1"] = 2 // the execution shows up on the third DescribeJobExecution
			err := b.CreateJob(t.Context(), backend.JobSpec{
				JobID: "job-1", Protocols: tc.protocols, URLExpiry: tc.expiry,
				Files: []backend.FileSpec{{
					LocalPath: img, DevicePath: "/opt/fw/gateway.img", FileType: 0, FileID: 0,
					CertName: "ecdsa-sha256-signer.crt.pem", SigningKeyPEM: keyPEM,
				}},
			})
			if err != nil {
				t.Fatalf("CreateJob: %v", err)
			}
			key := b.objectKey("job-1", 0, img)
			if want := "gwota-e2e/" + b.runID + "/job-1/0-gateway.img"; key != want {
				t.Fatalf("object key %q, want %q", key, want)
			}

			// S3: the exact bytes, with a payload hash that matches them.
			puts := s.find("PUT", "/"+testBucket+"/"+key)
			if len(puts) != 1 {
				t.Fatalf("%d S3 PUTs of %s, calls %v", len(puts), key, s.calls())
			}
			if !bytes.Equal(puts[0].Body, data) {
				t.Errorf("S3 PUT body differs from the file (%d vs %d bytes)", len(puts[0].Body), len(data))
			}
			sum := sha256.Sum256(data)
			if got := puts[0].Header.Get("X-Amz-Content-Sha256"); got != hexString(sum[:]) {
				t.Errorf("X-Amz-Content-Sha256 %q, want the body's SHA-256", got)
			}
			if !strings.Contains(puts[0].Header.Get("Authorization"), "/s3/aws4_request") {
				t.Errorf("S3 PUT Authorization %q", puts[0].Header.Get("Authorization"))
			}

			// Stream: file 0 is the object, read through the service role.
			streams := s.find("POST", "/streams/gwota-job-1")
			if got := len(streams) == 1; got != tc.want.stream {
				t.Fatalf("stream created %v, want %v (calls %v)", got, tc.want.stream, s.calls())
			}
			if tc.want.stream {
				type streamBody struct {
					Files []struct {
						FileID     int `json:"fileId"`
						S3Location struct {
							Bucket, Key, Version string
						} `json:"s3Location"`
					} `json:"files"`
					RoleArn string `json:"roleArn"`
				}
				got := decodeJSON[streamBody](t, streams[0].Body)
				wantBody := streamBody{RoleArn: testRole}
				wantBody.Files = append(wantBody.Files, got.Files...)
				if len(got.Files) == 1 {
					wantBody.Files[0].FileID = 0
					wantBody.Files[0].S3Location.Bucket = testBucket
					wantBody.Files[0].S3Location.Key = key
					wantBody.Files[0].S3Location.Version = "v1"
				}
				if diff := cmp.Diff(wantBody, got); diff != "" || len(got.Files) != 1 {
					t.Errorf("CreateStream body (-want +got):\n%s", diff)
				}
			}

			// Job: one snapshot target, the document, the presigned URL config.
			jobs := s.find("PUT", "/jobs/job-1")
			if len(jobs) != 1 {
				t.Fatalf("%d CreateJob requests", len(jobs))
			}
			body := decodeJSON[createJobBody](t, jobs[0].Body)
			if diff := cmp.Diff([]string{testThingARN}, body.Targets); diff != "" {
				t.Errorf("targets (-want +got):\n%s", diff)
			}
			if body.TargetSelection != "SNAPSHOT" {
				t.Errorf("targetSelection %q", body.TargetSelection)
			}
			if got := body.PresignedURLConfig != nil; got != tc.want.presignConf {
				t.Errorf("presignedUrlConfig present %v, want %v", got, tc.want.presignConf)
			} else if got {
				wantExp := int64(1800)
				if tc.expiry != 0 {
					wantExp = int64(tc.expiry / time.Second)
				}
				if body.PresignedURLConfig.RoleArn != testRole || body.PresignedURLConfig.ExpiresInSec != wantExp {
					t.Errorf("presignedUrlConfig %+v, want role %s, %d s", *body.PresignedURLConfig, testRole, wantExp)
				}
			}
			if strings.Contains(body.Document, `\u0026`) {
				t.Errorf("document has HTML-escaped '&': %s", body.Document)
			}
			doc := decodeJSON[afrDoc](t, []byte(body.Document))
			if diff := cmp.Diff(tc.protocols, doc.AfrOTA.Protocols); diff != "" {
				t.Errorf("protocols (-want +got):\n%s", diff)
			}
			wantStream := ""
			if tc.want.stream {
				wantStream = "gwota-job-1"
			}
			if doc.AfrOTA.StreamName != wantStream {
				t.Errorf("streamname %q, want %q", doc.AfrOTA.StreamName, wantStream)
			}
			if len(doc.AfrOTA.Files) != 1 {
				t.Fatalf("files %v", doc.AfrOTA.Files)
			}
			f := doc.AfrOTA.Files[0]
			sig, _ := base64.StdEncoding.DecodeString(f["sig-sha256-ecdsa"].(string))
			if !ecdsa.VerifyASN1(&priv.PublicKey, sum[:], sig) {
				t.Errorf("sig-sha256-ecdsa %q does not verify over the file", f["sig-sha256-ecdsa"])
			}
			url, _ := f["update_data_url"].(string)
			delete(f, "sig-sha256-ecdsa")
			delete(f, "update_data_url")
			wantFile := map[string]any{
				"filepath": "/opt/fw/gateway.img", "filesize": float64(len(data)), "fileid": float64(0),
				"fileType": float64(0), "certfile": "ecdsa-sha256-signer.crt.pem",
			}
			if tc.want.urlPrefix != "" {
				wantFile["auth_scheme"] = "aws.s3.presigned"
			}
			if diff := cmp.Diff(wantFile, f); diff != "" {
				t.Errorf("file entry (-want +got):\n%s", diff)
			}
			switch {
			case tc.want.urlPrefix == "":
				if url != "" {
					t.Errorf("update_data_url %q on an MQTT-only job", url)
				}
			case !strings.HasPrefix(url, tc.want.urlPrefix):
				t.Errorf("update_data_url %q, want prefix %q", url, tc.want.urlPrefix)
			case tc.noRole:
				// Presigned here: it must fetch the very object from the stand-in.
				checkPresignedURL(t, url, data)
			default:
				if url != placeholder+b.runID+"/job-1/0-gateway.img}" {
					t.Errorf("placeholder %q", url)
				}
			}

			// The execution was polled until it existed.
			if n := len(s.find("GET", "/things/"+testThing+"/jobs/job-1")); n != 3 {
				t.Errorf("%d DescribeJobExecution polls, want 3", n)
			}

			// Close removes the job, then the stream, then the object.
			if err := b.Close(); err != nil {
				t.Fatalf("Close: %v", err)
			}
			var removed []string
			for _, c := range s.calls() {
				if strings.HasPrefix(c, "DELETE ") {
					removed = append(removed, c)
				}
			}
			wantRemoved := []string{"DELETE /jobs/job-1"}
			if tc.want.stream {
				wantRemoved = append(wantRemoved, "DELETE /streams/gwota-job-1")
			}
			wantRemoved = append(wantRemoved, "DELETE /"+testBucket+"/"+key)
			if diff := cmp.Diff(wantRemoved, removed); diff != "" {
				t.Errorf("clean-up (-want +got):\n%s", diff)
			}
			if del := s.find("DELETE", "/jobs/job-1"); len(del) == 1 && del[0].Query.Get("force") != "true" {
				t.Errorf("DeleteJob on close not forced: %v", del[0].Query)
			}
			s.mu.Lock()
			left := len(s.objects) + len(s.streams) + len(s.jobs)
			s.mu.Unlock()
			if left != 0 {
				t.Errorf("%d resources left after Close", left)
			}
		})
	}
}

func hexString(b []byte) string {
	const digits = "0123456789abcdef"
	out := make([]byte, 0, 2*len(b))
	for _, c := range b {
		out = append(out, digits[c>>4], digits[c&15])
	}
	return string(out)
}

// checkPresignedURL fetches url with no credentials and compares the body.
func checkPresignedURL(t *testing.T, url string, want []byte) {
	t.Helper()
	for _, q := range []string{"X-Amz-Signature=", "X-Amz-Expires=1800", "X-Amz-Credential=" + testAKID} {
		if !strings.Contains(url, q) {
			t.Errorf("presigned URL %q lacks %s", url, q)
		}
	}
	tr := &http.Transport{}
	defer tr.CloseIdleConnections()
	resp, err := (&http.Client{Transport: tr}).Get(url)
	if err != nil {
		t.Fatalf("GET presigned URL: %v", err)
	}
	defer resp.Body.Close()
	got, _ := io.ReadAll(resp.Body)
	if resp.StatusCode != 200 || !bytes.Equal(got, want) {
		t.Errorf("GET presigned URL: %s, %d bytes; want the file", resp.Status, len(got))
	}
}

// createSimpleJob creates an MQTT job with a pre-made signature.
func createSimpleJob(t *testing.T, b *Backend, jobID string) {
	t.Helper()
	img, _ := writeFile(t, 1000)
	err := b.CreateJob(t.Context(), backend.JobSpec{
		JobID: jobID, Protocols: []string{backend.ProtocolMQTT},
		Files: []backend.FileSpec{{LocalPath: img, DevicePath: "/opt/fw/a.img", Signature: []byte("sig"), SigAlgorithm: backend.SigSHA256RSA}},
	})
	if err != nil {
		t.Fatalf("CreateJob: %v", err)
	}
}

func TestWaitStatusAndUpdates(t *testing.T) {
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	createSimpleJob(t, b, "job-w")
	t0 := time.Date(2026, 11, 30, 9, 0, 0, 0, time.UTC)
	at := func(s int) time.Time { return t0.Add(time.Duration(s) * time.Second) }
	recv := func(p string) map[string]string { return map[string]string{"self_test": "receiving", "progress": p} }
	// What polling sees: repeats, a stale read (older version), then the end.
	s.mu.Lock()
	s.scripts["job-w"] = []execState{
		{Status: "QUEUED", Version: 1},
		{Status: "IN_PROGRESS", Details: recv("1/4"), Version: 2, At: at(1)},
		{Status: "IN_PROGRESS", Details: recv("1/4"), Version: 2, At: at(1)},
		{Status: "IN_PROGRESS", Details: recv("3/4"), Version: 4, At: at(3)},
		{Status: "IN_PROGRESS", Details: recv("1/4"), Version: 2, At: at(1)}, // stale read
		{Status: "IN_PROGRESS", Details: map[string]string{"self_test": "ready"}, Version: 5, At: at(5)},
		{Status: "SUCCEEDED", Details: map[string]string{"self_test": "accepted", "firmware_version": "4.3.0"}, Version: 7, At: at(9)},
	}
	s.mu.Unlock()

	ex, err := b.WaitStatus(t.Context(), "job-w", backend.StatusSucceeded, backend.StatusFailed)
	if err != nil {
		t.Fatalf("WaitStatus: %v", err)
	}
	wantEx := backend.Execution{
		JobID: "job-w", ThingName: testThing, Status: "SUCCEEDED",
		StatusDetails: map[string]string{"self_test": "accepted", "firmware_version": "4.3.0"},
		VersionNumber: 7, ExecutionNumber: 1,
	}
	if diff := cmp.Diff(wantEx, ex); diff != "" {
		t.Errorf("execution (-want +got):\n%s", diff)
	}
	wantUps := []backend.Update{
		{At: at(1), Status: "IN_PROGRESS", StatusDetails: recv("1/4")},
		{At: at(3), Status: "IN_PROGRESS", StatusDetails: recv("3/4")},
		{At: at(5), Status: "IN_PROGRESS", StatusDetails: map[string]string{"self_test": "ready"}},
		{At: at(9), Status: "SUCCEEDED", StatusDetails: map[string]string{"self_test": "accepted", "firmware_version": "4.3.0"}},
	}
	if diff := cmp.Diff(wantUps, b.Updates("job-w")); diff != "" {
		t.Errorf("Updates (-want +got):\n%s", diff)
	}
	// Updates hands out copies.
	b.Updates("job-w")[0].StatusDetails["progress"] = "changed"
	if got := b.Updates("job-w")[0].StatusDetails["progress"]; got != "1/4" {
		t.Errorf("Updates shares its maps: %q", got)
	}
	if got := b.Updates("other"); len(got) != 0 {
		t.Errorf("Updates(other) = %v", got)
	}
}

func TestWaitStatusTerminal(t *testing.T) {
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	createSimpleJob(t, b, "job-f")
	failed := map[string]string{"self_test": "aborted", "reason": "sig_check_failed", "error_code": "1001"}
	s.mu.Lock()
	s.scripts["job-f"] = []execState{{Status: "IN_PROGRESS", Version: 2}, {Status: "FAILED", Details: failed, Version: 3}}
	s.mu.Unlock()
	ex, err := b.WaitStatus(t.Context(), "job-f", backend.StatusSucceeded)
	if !errors.Is(err, ErrTerminal) {
		t.Fatalf("WaitStatus error %v, want ErrTerminal", err)
	}
	for _, want := range []string{"FAILED", "sig_check_failed", "job-f"} {
		if !strings.Contains(err.Error(), want) {
			t.Errorf("error %q does not mention %s", err, want)
		}
	}
	if diff := cmp.Diff(failed, ex.StatusDetails); diff != "" || ex.Status != "FAILED" {
		t.Errorf("execution %s (-want +got):\n%s", ex.Status, diff)
	}
}

func TestWaitStatusContextEnds(t *testing.T) {
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	createSimpleJob(t, b, "job-c")
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	start := 0
	s.mu.Lock()
	s.scripts["job-c"] = []execState{{Status: "IN_PROGRESS", Details: map[string]string{"self_test": "receiving"}, Version: 2}}
	// Cancel on the fifth poll of this wait: WaitStatus must then return, not spin.
	s.onDesc = func(n int) {
		if start == 0 {
			start = n
		}
		if n-start == 4 {
			cancel()
		}
	}
	s.mu.Unlock()
	ex, err := b.WaitStatus(ctx, "job-c", backend.StatusSucceeded)
	if !errors.Is(err, context.Canceled) {
		t.Fatalf("WaitStatus error %v, want context.Canceled", err)
	}
	if ex.Status != "IN_PROGRESS" || !strings.Contains(err.Error(), "IN_PROGRESS") {
		t.Errorf("last execution %+v, error %q: want the last state reported", ex, err)
	}
}

func TestWaitStatusWaitsForExecution(t *testing.T) {
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	createSimpleJob(t, b, "job-d")
	// Deleted and re-created elsewhere: not found for a while, then it appears.
	s.mu.Lock()
	s.pending["job-d"] = 3
	s.scripts["job-d"] = []execState{{Status: "SUCCEEDED", Version: 3}}
	s.mu.Unlock()
	if ex, err := b.WaitStatus(t.Context(), "job-d", backend.StatusSucceeded); err != nil || ex.Status != "SUCCEEDED" {
		t.Fatalf("WaitStatus = %+v, %v", ex, err)
	}
}

func TestCreateJobInvalid(t *testing.T) {
	img, _ := writeFile(t, 10)
	good := backend.FileSpec{LocalPath: img, DevicePath: "/x"}
	_, ecPEM := ecKeyPEM(t)
	for _, tc := range []struct {
		name   string
		spec   backend.JobSpec
		noRole bool
		want   string
	}{
		{"bad job id", backend.JobSpec{JobID: "a/b", Protocols: []string{"MQTT"}, Files: []backend.FileSpec{good}}, false, "invalid job id"},
		{"long job id", backend.JobSpec{JobID: strings.Repeat("j", 65), Protocols: []string{"MQTT"}, Files: []backend.FileSpec{good}}, false, "invalid job id"},
		{"no protocol", backend.JobSpec{JobID: "j", Files: []backend.FileSpec{good}}, false, "no protocol"},
		{"unknown protocol", backend.JobSpec{JobID: "j", Protocols: []string{"FTP"}, Files: []backend.FileSpec{good}}, false, `"FTP"`},
		{"mqtt without role", backend.JobSpec{JobID: "j", Protocols: []string{"MQTT"}, Files: []backend.FileSpec{good}}, true, EnvServiceRoleARN},
		{"no files", backend.JobSpec{JobID: "j", Protocols: []string{"MQTT"}}, false, "no file"},
		{"duplicate file id", backend.JobSpec{JobID: "j", Protocols: []string{"MQTT"}, Files: []backend.FileSpec{good, good}}, false, "duplicate file id"},
		{"file id range", backend.JobSpec{JobID: "j", Protocols: []string{"MQTT"}, Files: []backend.FileSpec{{LocalPath: img, FileID: 256}}}, false, "outside 0..255"},
		{"bad thing", backend.JobSpec{JobID: "j", Things: []string{"a b"}, Protocols: []string{"MQTT"}, Files: []backend.FileSpec{good}}, false, "invalid thing"},
		{"url expiry", backend.JobSpec{JobID: "j", URLExpiry: 2 * time.Hour, Protocols: []string{"HTTP"}, Files: []backend.FileSpec{good}}, false, "60..3600"},
		{"missing file", backend.JobSpec{JobID: "j", Protocols: []string{"MQTT"}, Files: []backend.FileSpec{{LocalPath: img + ".missing"}}}, false, "no such file"},
		{"key/algorithm mismatch", backend.JobSpec{JobID: "j", Protocols: []string{"MQTT"}, Files: []backend.FileSpec{{LocalPath: img, SigningKeyPEM: ecPEM, SigAlgorithm: backend.SigSHA256RSA}}}, false, "cannot make sha256-rsa"},
		{"garbage key", backend.JobSpec{JobID: "j", Protocols: []string{"MQTT"}, Files: []backend.FileSpec{{LocalPath: img, SigningKeyPEM: []byte("nope")}}}, false, "no PEM block"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			s := newStandIn(t)
			b := newTestBackend(t, s, func(o *Options) {
				if tc.noRole {
					o.ServiceRoleARN = ""
				}
			})
			before := len(s.requests())
			err := b.CreateJob(t.Context(), tc.spec)
			if err == nil || !strings.Contains(err.Error(), tc.want) {
				t.Fatalf("CreateJob error %v, want one containing %q", err, tc.want)
			}
			if got := s.calls()[before:]; len(got) != 0 {
				t.Errorf("invalid job sent requests: %v", got)
			}
		})
	}
}

func TestCreateJobFailureLeavesNothing(t *testing.T) {
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	s.mu.Lock()
	s.failOps["PUT /jobs/job-x"] = http.StatusBadRequest
	s.mu.Unlock()
	img, _ := writeFile(t, 100)
	err := b.CreateJob(t.Context(), backend.JobSpec{
		JobID: "job-x", Protocols: []string{"MQTT"}, Files: []backend.FileSpec{{LocalPath: img}},
	})
	if err == nil || !strings.Contains(err.Error(), "create job job-x") {
		t.Fatalf("CreateJob error %v", err)
	}
	if err := b.Close(); err != nil {
		t.Fatalf("Close: %v", err)
	}
	s.mu.Lock()
	objs, streams, jobs := len(s.objects), len(s.streams), len(s.jobs)
	s.mu.Unlock()
	if objs+streams+jobs != 0 {
		t.Errorf("left behind: %d objects, %d streams, %d jobs", objs, streams, jobs)
	}
	// The rejected CreateJob may have acted before failing: Close tries it too.
	if len(s.find("DELETE", "/jobs/job-x")) != 1 {
		t.Errorf("Close did not try the job whose creation failed: %v", s.calls())
	}
}

func TestCloseAfterPanic(t *testing.T) {
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	// As t.Cleanup does for a panicking test: the deferred Close still runs.
	func() {
		defer func() {
			if r := recover(); r != "boom" {
				t.Errorf("recovered %v", r)
			}
		}()
		defer b.Close()
		createSimpleJob(t, b, "job-p")
		panic("boom")
	}()
	s.mu.Lock()
	left := len(s.objects) + len(s.streams) + len(s.jobs)
	s.mu.Unlock()
	if left != 0 {
		t.Errorf("%d resources left after a panic", left)
	}
	if err := b.CreateJob(t.Context(), backend.JobSpec{JobID: "late"}); err == nil {
		t.Error("CreateJob after Close succeeded")
	}
}

func TestCloseContinuesPastFailures(t *testing.T) {
	s := newStandIn(t)
	b, err := New(t.Context(), testOptions(s))
	if err != nil {
		t.Fatal(err)
	}
	createSimpleJob(t, b, "job-e")
	s.mu.Lock()
	s.failOps["DELETE /streams/gwota-job-e"] = http.StatusBadRequest
	s.mu.Unlock()
	err = b.Close()
	if err == nil || !strings.Contains(err.Error(), "remove stream gwota-job-e") {
		t.Fatalf("Close error %v, want the stream failure", err)
	}
	s.mu.Lock()
	objs, jobs := len(s.objects), len(s.jobs)
	s.mu.Unlock()
	if objs+jobs != 0 {
		t.Errorf("a failed stream removal stopped the rest: %d objects, %d jobs left", objs, jobs)
	}
	n := len(s.requests())
	if err2 := b.Close(); err2 == nil || err2.Error() != err.Error() {
		t.Errorf("second Close = %v, want the first result", err2)
	}
	if len(s.requests()) != n {
		t.Error("second Close sent requests")
	}
}

func TestCancelAndDeleteJob(t *testing.T) {
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	createSimpleJob(t, b, "job-k")
	if err := b.CancelJob(t.Context(), "job-k", true); err != nil {
		t.Fatal(err)
	}
	if err := b.DeleteJob(t.Context(), "job-k", false); err != nil {
		t.Fatal(err)
	}
	c := s.find("PUT", "/jobs/job-k/cancel")
	d := s.find("DELETE", "/jobs/job-k")
	if len(c) != 1 || c[0].Query.Get("force") != "true" {
		t.Errorf("CancelJob requests %v", c)
	}
	// The SDK leaves force out when false.
	if len(d) != 1 || d[0].Query.Has("force") {
		t.Errorf("DeleteJob requests %v", d)
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if got := len(s.find("DELETE", "/jobs/job-k")); got != 1 {
		t.Errorf("Close deleted the already deleted job again (%d DELETEs)", got)
	}
	if err := b.DeleteJob(t.Context(), "job-k", true); err == nil {
		t.Error("DeleteJob after Close succeeded")
	}
}

func TestDescribeNotFound(t *testing.T) {
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	_, err := b.Describe(t.Context(), "nope")
	if err == nil || !isNotFound(err) || !strings.Contains(err.Error(), "nope") {
		t.Fatalf("Describe(nope) = %v", err)
	}
}

func TestIdentity(t *testing.T) {
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	got := []string{b.Name(), b.ThingName(), b.BrokerURL()}
	want := []string{"aws", testThing, "mqtts://abc123-ats.iot." + testRegion + ".amazonaws.com:8883"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("(-want +got):\n%s", diff)
	}
}

func TestCreateJobAfterEarlierRun(t *testing.T) {
	s := newStandIn(t)
	b := newTestBackend(t, s, nil)
	// An earlier run's job "again" is still being deleted, and its stream was left behind.
	s.mu.Lock()
	s.jobs["again"] = []byte(`{}`)
	s.deletionsLeft["again"] = 2
	s.streams["gwota-again"] = true
	s.jobs["foreign"] = []byte(`{}`)
	s.mu.Unlock()
	createSimpleJob(t, b, "again")
	want := []string{
		"POST /streams/gwota-again", "DELETE /streams/gwota-again", "POST /streams/gwota-again",
		"PUT /jobs/again", "GET /jobs/again", "GET /jobs/again", "GET /jobs/again", "PUT /jobs/again",
	}
	var got []string
	for _, c := range s.calls() {
		if strings.Contains(c, "/streams/") || strings.HasSuffix(c, "/jobs/again") && !strings.Contains(c, "/things/") {
			got = append(got, c)
		}
	}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Errorf("requests (-want +got):\n%s", diff)
	}

	// A job in any other state is not ours to remove: a clear error, nothing deleted.
	img, _ := writeFile(t, 10)
	err := b.CreateJob(t.Context(), backend.JobSpec{JobID: "foreign", Protocols: []string{"HTTP"}, Files: []backend.FileSpec{{LocalPath: img}}})
	if err == nil || !strings.Contains(err.Error(), "earlier run") {
		t.Fatalf("CreateJob over an existing job: %v", err)
	}
	// The same id twice in one run: the second fails, the first is still removed by Close.
	err = b.CreateJob(t.Context(), backend.JobSpec{JobID: "again", Protocols: []string{"HTTP"}, Files: []backend.FileSpec{{LocalPath: img}}})
	if err == nil {
		t.Fatal("second CreateJob with the same id succeeded")
	}
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	if len(s.find("DELETE", "/jobs/foreign")) != 0 {
		t.Error("deleted a job this backend did not create")
	}
	if len(s.find("DELETE", "/jobs/again")) != 1 {
		t.Errorf("job 'again' not removed once by Close: %v", s.calls())
	}
	s.mu.Lock()
	delete(s.jobs, "foreign")
	s.mu.Unlock()
}

func TestForTestSkipsWhenNotConfigured(t *testing.T) {
	t.Setenv(EnvEndpoint, "")
	t.Setenv(EnvThing, "")
	var sub *testing.T
	reached := false
	t.Run("e2e", func(t *testing.T) {
		sub = t
		ForTest(t)
		reached = true
	})
	if !sub.Skipped() || reached {
		t.Fatalf("skipped %v, reached %v: want a skip", sub.Skipped(), reached)
	}
}

// TestForTestFromEnv runs the whole environment path (the SDK's own AWS_ENDPOINT_URL and
// credential variables) against the stand-in.
func TestForTestFromEnv(t *testing.T) {
	s := newStandIn(t)
	for k, v := range map[string]string{
		EnvEndpoint: "abc123-ats.iot." + testRegion + ".amazonaws.com", EnvThing: testThing,
		EnvBucket: testBucket, EnvServiceRoleARN: testRole, EnvRegion: "", EnvRoleARN: "",
		EnvKeyPrefix: "ci/run-7/", EnvDefaultCredentials: "",
		"AWS_ENDPOINT_URL": s.srv.URL, "AWS_ACCESS_KEY_ID": testAKID, "AWS_SECRET_ACCESS_KEY": "secret",
		"AWS_SESSION_TOKEN": "", "AWS_PROFILE": "", "AWS_CONFIG_FILE": os.DevNull,
		"AWS_SHARED_CREDENTIALS_FILE": os.DevNull,
	} {
		t.Setenv(k, v)
	}
	var key string
	t.Run("e2e", func(t *testing.T) {
		b := ForTest(t)
		createSimpleJob(t, b, "env-job")
		key = b.objectKey("env-job", 0, "gateway.img")
	})
	if !strings.HasPrefix(key, "ci/run-7/") || len(s.find("PUT", "/jobs/env-job")) != 1 || len(s.find("PUT", "/"+testBucket+"/"+key)) != 1 {
		t.Errorf("requests %v", s.calls())
	}
	s.mu.Lock()
	left := len(s.objects) + len(s.streams) + len(s.jobs)
	s.mu.Unlock()
	if left != 0 {
		t.Errorf("%d resources left after the test's clean-up", left)
	}
}

// TestCloseReleasesConnections: the backend's keep-alive connections end with Close, not when
// the server goes away.
func TestCloseReleasesConnections(t *testing.T) {
	s := newStandIn(t)
	b, err := New(t.Context(), testOptions(s))
	if err != nil {
		t.Fatal(err)
	}
	createSimpleJob(t, b, "job-conn")
	if err := b.Close(); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 10*time.Second)
	defer cancel()
	if err := s.waitConnsClosed(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestObjectKeys(t *testing.T) {
	b := &Backend{opts: Options{KeyPrefix: "ci/run 7+/", Bucket: testBucket, Region: testRegion}, runID: "RUN"}
	for _, tc := range []struct{ local, key, placeholder string }{
		{"/tmp/gateway.img", "ci/run 7+/RUN/j/0-gateway.img",
			"${aws:iot:s3-presigned-url-v2:https://s3.eu-west-1.amazonaws.com/ota-bucket/ci/run%207%2B/RUN/j/0-gateway.img}"},
		{"/tmp/fw v1+{2}.bin", "ci/run 7+/RUN/j/0-fw_v1__2_.bin",
			"${aws:iot:s3-presigned-url-v2:https://s3.eu-west-1.amazonaws.com/ota-bucket/ci/run%207%2B/RUN/j/0-fw_v1__2_.bin}"},
	} {
		key := b.objectKey("j", 0, tc.local)
		if diff := cmp.Diff([]string{tc.key, tc.placeholder}, []string{key, b.presignedPlaceholder(key)}); diff != "" {
			t.Errorf("%s (-want +got):\n%s", tc.local, diff)
		}
	}
}
