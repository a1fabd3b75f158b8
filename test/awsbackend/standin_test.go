package awsbackend

import (
	"bytes"
	"context"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"net"
	"net/http"
	"net/http/httptest"
	"net/url"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/aws/aws-sdk-go-v2/aws"
	v4 "github.com/aws/aws-sdk-go-v2/aws/signer/v4"
)

// standIn plays the AWS endpoints (IoT control plane, S3 path style, STS) on one local HTTP
// server. It records every request, asserts each is SigV4-signed, keeps just enough state to
// answer plausibly, and lets a test script what the device reports.
type standIn struct {
	t   *testing.T
	srv *httptest.Server

	mu            sync.Mutex
	reqs          []recorded
	objects       map[string][]byte // "bucket/key" -> body (nil when too large to record)
	objectSums    map[string]string // "bucket/key" -> hex SHA-256 of the body
	streams       map[string]bool
	jobs          map[string]json.RawMessage // job id -> CreateJob body
	stale         map[string][]staleExec     // status -> executions listed on pages of 1
	pending       map[string]int             // job id -> DescribeJobExecution 404s still to give
	scripts       map[string][]execState     // job id -> states, one per DescribeJobExecution
	deletionsLeft map[string]int             // job id -> DescribeJob answers before a deleting job is gone
	failOps       map[string]int             // "METHOD /path" -> HTTP status to answer with
	onDesc        func(n int)                // called after each DescribeJobExecution, n from 1
	nDesc         int
	assumeRq      url.Values

	openConns    int
	connsChanged chan struct{} // a token after every connection state change
}

type recorded struct {
	Method, Path string
	Query        url.Values
	Header       http.Header
	Body         []byte
}

type staleExec struct{ JobID string }

type execState struct {
	Status  string
	Details map[string]string
	Version int64
	At      time.Time
}

// maxRecordedBody is the largest request body the stand-in keeps.
const maxRecordedBody = 1 << 20

const (
	testRegion   = "eu-west-1"
	testThing    = "gw-test-1"
	testThingARN = "arn:aws:iot:eu-west-1:123456789012:thing/gw-test-1"
	testBucket   = "ota-bucket"
	testRole     = "arn:aws:iam::123456789012:role/iot-ota-service"
	testAKID     = "AKIDSTANDIN"
	assumedAKID  = "ASIAASSUMED"
)

func newStandIn(t *testing.T) *standIn {
	s := &standIn{
		t:             t,
		objects:       map[string][]byte{},
		objectSums:    map[string]string{},
		streams:       map[string]bool{},
		jobs:          map[string]json.RawMessage{},
		stale:         map[string][]staleExec{},
		pending:       map[string]int{},
		scripts:       map[string][]execState{},
		deletionsLeft: map[string]int{},
		failOps:       map[string]int{},
	}
	mux := http.NewServeMux()
	// IoT control plane, REST paths as the SDK's serializers build them.
	mux.HandleFunc("GET /things/{thing}", s.describeThing)
	mux.HandleFunc("GET /things/{thing}/jobs", s.listExecutionsForThing)
	mux.HandleFunc("PUT /things/{thing}/jobs/{job}/cancel", s.ok(`{}`))
	mux.HandleFunc("GET /things/{thing}/jobs/{job}", s.describeExecution)
	mux.HandleFunc("POST /streams/{stream}", s.createStream)
	mux.HandleFunc("DELETE /streams/{stream}", s.deleteStream)
	mux.HandleFunc("PUT /jobs/{job}", s.createJob)
	mux.HandleFunc("GET /jobs/{job}", s.describeJob)
	mux.HandleFunc("PUT /jobs/{job}/cancel", s.cancelJob)
	mux.HandleFunc("DELETE /jobs/{job}", s.deleteJob)
	// S3, path style.
	mux.HandleFunc("PUT /"+testBucket+"/{key...}", s.putObject)
	mux.HandleFunc("GET /"+testBucket+"/{key...}", s.getObject)
	mux.HandleFunc("DELETE /"+testBucket+"/{key...}", s.deleteObject)
	// STS query protocol.
	mux.HandleFunc("POST /{$}", s.sts)
	s.srv = httptest.NewUnstartedServer(http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		// Small bodies are recorded; large uploads stream through to the handler, so a test
		// can check that nothing on the client side buffers a whole image.
		var body []byte
		if r.ContentLength <= maxRecordedBody {
			var err error
			if body, err = io.ReadAll(r.Body); err != nil {
				t.Errorf("stand-in: read body: %v", err)
			}
			r.Body = io.NopCloser(bytes.NewReader(body))
		}
		presigned := r.URL.Query().Get("X-Amz-Signature") != ""
		if !presigned {
			if err := checkSigV4(r, body); err != nil {
				t.Errorf("stand-in: %s %s: %v", r.Method, r.URL.Path, err)
			}
		}
		s.mu.Lock()
		s.reqs = append(s.reqs, recorded{r.Method, r.URL.Path, r.URL.Query(), r.Header.Clone(), body})
		code, fail := s.failOps[r.Method+" "+r.URL.Path]
		s.mu.Unlock()
		if fail {
			iotError(w, code, "InvalidRequestException", "injected failure")
			return
		}
		// A request no route knows would read as a 404, which the backend may take for "not
		// there (yet)": make it a test failure instead.
		if _, pattern := mux.Handler(r); pattern == "" {
			t.Errorf("stand-in: no AWS operation at %s %s", r.Method, r.URL.Path)
		}
		mux.ServeHTTP(w, r)
	}))
	s.connsChanged = make(chan struct{}, 1)
	s.srv.Config.ConnState = func(_ net.Conn, st http.ConnState) {
		s.mu.Lock()
		switch st {
		case http.StateNew:
			s.openConns++
		case http.StateClosed, http.StateHijacked:
			s.openConns--
		}
		s.mu.Unlock()
		select {
		case s.connsChanged <- struct{}{}:
		default:
		}
	}
	s.srv.Start()
	t.Cleanup(s.srv.Close)
	return s
}

func (s *standIn) requests() []recorded {
	s.mu.Lock()
	defer s.mu.Unlock()
	return append([]recorded(nil), s.reqs...)
}

// waitConnsClosed blocks until no client connection is open, or ctx ends.
func (s *standIn) waitConnsClosed(ctx context.Context) error {
	for {
		s.mu.Lock()
		n := s.openConns
		s.mu.Unlock()
		if n == 0 {
			return nil
		}
		select {
		case <-s.connsChanged:
		case <-ctx.Done():
			return fmt.Errorf("%d connections still open: %w", n, ctx.Err())
		}
	}
}

// calls lists "METHOD /path" of every request, in order.
func (s *standIn) calls() []string {
	var out []string
	for _, r := range s.requests() {
		out = append(out, r.Method+" "+r.Path)
	}
	return out
}

// find returns the requests matching method and path.
func (s *standIn) find(method, path string) []recorded {
	var out []recorded
	for _, r := range s.requests() {
		if r.Method == method && r.Path == path {
			out = append(out, r)
		}
	}
	return out
}

func (s *standIn) ok(body string) http.HandlerFunc {
	return func(w http.ResponseWriter, r *http.Request) { writeJSON(w, body) }
}

func writeJSON(w http.ResponseWriter, v any) {
	w.Header().Set("Content-Type", "application/json")
	if s, ok := v.(string); ok {
		io.WriteString(w, s)
		return
	}
	json.NewEncoder(w).Encode(v)
}

// iotError answers the way AWS's REST-JSON services do.
func iotError(w http.ResponseWriter, code int, typ, msg string) {
	w.Header().Set("Content-Type", "application/json")
	w.Header().Set("X-Amzn-ErrorType", typ)
	w.WriteHeader(code)
	json.NewEncoder(w).Encode(map[string]string{"message": msg})
}

func (s *standIn) describeThing(w http.ResponseWriter, r *http.Request) {
	if r.PathValue("thing") != testThing {
		iotError(w, 404, "ResourceNotFoundException", "no such thing")
		return
	}
	writeJSON(w, map[string]any{"thingName": testThing, "thingArn": testThingARN, "version": 1})
}

// listExecutionsForThing pages one execution at a time so pagination is exercised.
func (s *standIn) listExecutionsForThing(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	st := r.URL.Query().Get("status")
	list := s.stale[st]
	i := 0
	if tok := r.URL.Query().Get("nextToken"); tok != "" {
		fmt.Sscanf(tok, "page%d", &i)
	}
	out := map[string]any{"executionSummaries": []any{}}
	if i < len(list) {
		out["executionSummaries"] = []any{map[string]any{
			"jobId":               list[i].JobID,
			"jobExecutionSummary": map[string]any{"status": st, "executionNumber": 1},
		}}
	}
	if i+1 < len(list) {
		out["nextToken"] = fmt.Sprintf("page%d", i+1)
	}
	writeJSON(w, out)
}

func (s *standIn) describeExecution(w http.ResponseWriter, r *http.Request) {
	job := r.PathValue("job")
	s.mu.Lock()
	s.nDesc++
	n, hook := s.nDesc, s.onDesc
	var (
		st    execState
		found bool
	)
	if _, ok := s.jobs[job]; ok {
		if s.pending[job] > 0 {
			s.pending[job]--
		} else if sc := s.scripts[job]; len(sc) > 0 {
			st, found = sc[0], true
			if len(sc) > 1 {
				s.scripts[job] = sc[1:]
			}
		} else {
			st, found = execState{Status: "QUEUED", Version: 1}, true
		}
	}
	s.mu.Unlock()
	defer func() {
		if hook != nil {
			hook(n)
		}
	}()
	if !found || r.PathValue("thing") != testThing {
		iotError(w, 404, "ResourceNotFoundException", "no such execution")
		return
	}
	ex := map[string]any{
		"jobId": job, "thingArn": testThingARN, "status": st.Status,
		"versionNumber": st.Version, "executionNumber": 1,
	}
	if st.Details != nil {
		ex["statusDetails"] = map[string]any{"detailsMap": st.Details}
	}
	if !st.At.IsZero() {
		ex["lastUpdatedAt"] = float64(st.At.UnixMilli()) / 1000
	}
	writeJSON(w, map[string]any{"execution": ex})
}

func (s *standIn) createStream(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("stream")
	s.mu.Lock()
	exists := s.streams[id]
	s.streams[id] = true
	s.mu.Unlock()
	if exists {
		iotError(w, 409, "ResourceAlreadyExistsException", "stream exists")
		return
	}
	writeJSON(w, map[string]any{"streamId": id, "streamArn": "arn:aws:iot:eu-west-1:123456789012:stream/" + id, "streamVersion": 1})
}

func (s *standIn) deleteStream(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if !s.streams[r.PathValue("stream")] {
		iotError(w, 404, "ResourceNotFoundException", "no such stream")
		return
	}
	delete(s.streams, r.PathValue("stream"))
	writeJSON(w, `{}`)
}

func (s *standIn) createJob(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("job")
	body, _ := io.ReadAll(r.Body)
	s.mu.Lock()
	_, exists := s.jobs[id]
	if !exists {
		s.jobs[id] = body
	}
	s.mu.Unlock()
	if exists {
		iotError(w, 409, "ResourceAlreadyExistsException", "job exists")
		return
	}
	writeJSON(w, map[string]any{"jobId": id, "jobArn": "arn:aws:iot:eu-west-1:123456789012:job/" + id})
}

// describeJob reports a job in deletionsLeft as DELETION_IN_PROGRESS that many times, then
// removes it.
func (s *standIn) describeJob(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("job")
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.jobs[id]; !ok {
		iotError(w, 404, "ResourceNotFoundException", "no such job")
		return
	}
	status := "IN_PROGRESS"
	if n, ok := s.deletionsLeft[id]; ok {
		status = "DELETION_IN_PROGRESS"
		if n <= 1 {
			delete(s.jobs, id)
			delete(s.deletionsLeft, id)
		} else {
			s.deletionsLeft[id] = n - 1
		}
	}
	writeJSON(w, map[string]any{"job": map[string]any{"jobId": id, "status": status}})
}

func (s *standIn) cancelJob(w http.ResponseWriter, r *http.Request) {
	id := r.PathValue("job")
	writeJSON(w, map[string]any{"jobId": id, "jobArn": "arn:aws:iot:eu-west-1:123456789012:job/" + id})
}

func (s *standIn) deleteJob(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if _, ok := s.jobs[r.PathValue("job")]; !ok {
		iotError(w, 404, "ResourceNotFoundException", "no such job")
		return
	}
	delete(s.jobs, r.PathValue("job"))
	w.WriteHeader(http.StatusOK)
}

func (s *standIn) putObject(w http.ResponseWriter, r *http.Request) {
	h := sha256.New()
	var body bytes.Buffer
	out := io.Writer(h)
	if r.ContentLength <= maxRecordedBody {
		out = io.MultiWriter(h, &body)
	}
	n, err := io.Copy(out, r.Body)
	if err != nil {
		s.t.Errorf("stand-in: S3 PUT body: %v", err)
	}
	if n != r.ContentLength {
		s.t.Errorf("stand-in: S3 PUT body %d bytes, Content-Length %d", n, r.ContentLength)
	}
	if got, want := hex.EncodeToString(h.Sum(nil)), r.Header.Get("X-Amz-Content-Sha256"); got != want && want != "UNSIGNED-PAYLOAD" {
		s.t.Errorf("stand-in: S3 PUT body SHA-256 %s, X-Amz-Content-Sha256 %s", got, want)
	}
	id := testBucket + "/" + r.PathValue("key")
	s.mu.Lock()
	s.objects[id] = body.Bytes()
	s.objectSums[id] = hex.EncodeToString(h.Sum(nil))
	s.mu.Unlock()
	w.Header().Set("ETag", `"etag"`)
	w.Header().Set("x-amz-version-id", "v1")
	w.WriteHeader(http.StatusOK)
}

func (s *standIn) getObject(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	b, ok := s.objects[testBucket+"/"+r.PathValue("key")]
	s.mu.Unlock()
	if !ok {
		http.NotFound(w, r)
		return
	}
	w.Write(b)
}

func (s *standIn) deleteObject(w http.ResponseWriter, r *http.Request) {
	s.mu.Lock()
	delete(s.objects, testBucket+"/"+r.PathValue("key"))
	delete(s.objectSums, testBucket+"/"+r.PathValue("key"))
	s.mu.Unlock()
	w.WriteHeader(http.StatusNoContent)
}

func (s *standIn) sts(w http.ResponseWriter, r *http.Request) {
	if err := r.ParseForm(); err != nil {
		s.t.Errorf("stand-in: sts form: %v", err)
	}
	s.mu.Lock()
	s.assumeRq = r.PostForm
	s.mu.Unlock()
	if r.PostForm.Get("Action") != "AssumeRole" {
		w.WriteHeader(http.StatusBadRequest)
		return
	}
	w.Header().Set("Content-Type", "text/xml")
	fmt.Fprintf(w, `<AssumeRoleResponse xmlns="https://sts.amazonaws.com/doc/2011-06-15/">
<AssumeRoleResult><Credentials><AccessKeyId>%s</AccessKeyId><SecretAccessKey>assumed-secret</SecretAccessKey>
<SessionToken>assumed-token</SessionToken><Expiration>%s</Expiration></Credentials>
<AssumedRoleUser><Arn>%s/gwota-e2e</Arn><AssumedRoleId>AROA:gwota-e2e</AssumedRoleId></AssumedRoleUser>
</AssumeRoleResult><ResponseMetadata><RequestId>req-1</RequestId></ResponseMetadata></AssumeRoleResponse>`,
		assumedAKID, time.Now().Add(time.Hour).UTC().Format(time.RFC3339), r.PostForm.Get("RoleArn"))
}

// secrets are the stand-in's credentials by access key id: the base pair and the assumed role.
var secrets = map[string]aws.Credentials{
	testAKID:    {AccessKeyID: testAKID, SecretAccessKey: "secret"},
	assumedAKID: {AccessKeyID: assumedAKID, SecretAccessKey: "assumed-secret", SessionToken: "assumed-token"},
}

// checkSigV4 recomputes the request's SigV4 signature from the headers it claims to sign, the
// way AWS does, and compares. body is nil for large streamed uploads, which carry their
// payload hash in X-Amz-Content-Sha256 (checked against the body by the S3 handler).
func checkSigV4(r *http.Request, body []byte) error {
	auth := r.Header.Get("Authorization")
	const algo = "AWS4-HMAC-SHA256 "
	if !strings.HasPrefix(auth, algo) {
		return fmt.Errorf("not SigV4-signed: Authorization %q", auth)
	}
	fields := map[string]string{}
	for _, kv := range strings.Split(strings.TrimPrefix(auth, algo), ", ") {
		k, v, _ := strings.Cut(kv, "=")
		fields[k] = v
	}
	scope := strings.Split(fields["Credential"], "/") // AKID/date/region/service/aws4_request
	if len(scope) != 5 || scope[4] != "aws4_request" {
		return fmt.Errorf("credential scope %q", fields["Credential"])
	}
	creds, ok := secrets[scope[0]]
	if !ok {
		return fmt.Errorf("unknown access key %q", scope[0])
	}
	when, err := time.Parse("20060102T150405Z", r.Header.Get("X-Amz-Date"))
	if err != nil {
		return fmt.Errorf("X-Amz-Date: %v", err)
	}
	payload := r.Header.Get("X-Amz-Content-Sha256")
	if payload == "" {
		sum := sha256.Sum256(body)
		payload = hex.EncodeToString(sum[:])
	}
	re, err := http.NewRequest(r.Method, "http://"+r.Host+r.URL.RequestURI(), nil)
	if err != nil {
		return err
	}
	re.ContentLength = r.ContentLength
	for _, h := range strings.Split(fields["SignedHeaders"], ";") {
		if h != "host" && h != "content-length" {
			re.Header[http.CanonicalHeaderKey(h)] = r.Header.Values(h)
		}
	}
	signer := v4.NewSigner(func(o *v4.SignerOptions) { o.DisableURIPathEscaping = scope[3] == "s3" })
	if err := signer.SignHTTP(context.Background(), creds, re, payload, scope[3], scope[2], when); err != nil {
		return err
	}
	want := re.Header.Get("Authorization")
	if want != auth {
		return fmt.Errorf("bad SigV4 signature:\n got %s\nwant %s", auth, want)
	}
	return nil
}

// TestCheckSigV4 shows the stand-in's signature check can fail.
func TestCheckSigV4(t *testing.T) {
	body := []byte(`{"a":1}`)
	sign := func(creds aws.Credentials) *http.Request {
		r, _ := http.NewRequest("PUT", "http://127.0.0.1:1/jobs/j1?force=true", bytes.NewReader(body))
		r.Header.Set("Content-Type", "application/json")
		sum := sha256.Sum256(body)
		if err := v4.NewSigner().SignHTTP(context.Background(), creds, r, hex.EncodeToString(sum[:]), "iot", testRegion, time.Now()); err != nil {
			t.Fatal(err)
		}
		return r
	}
	if err := checkSigV4(sign(secrets[testAKID]), body); err != nil {
		t.Fatalf("good signature rejected: %v", err)
	}
	wrong := secrets[testAKID]
	wrong.SecretAccessKey = "wrong"
	if err := checkSigV4(sign(wrong), body); err == nil {
		t.Error("signature with the wrong secret accepted")
	}
	if err := checkSigV4(sign(secrets[testAKID]), []byte(`{"a":2}`)); err == nil {
		t.Error("signature over another body accepted")
	}
	r := sign(secrets[testAKID])
	r.URL.RawQuery = "force=false"
	if err := checkSigV4(r, body); err == nil {
		t.Error("signature over another query accepted")
	}
	r = sign(secrets[testAKID])
	r.Header.Del("Authorization")
	if err := checkSigV4(r, body); err == nil {
		t.Error("unsigned request accepted")
	}
}
