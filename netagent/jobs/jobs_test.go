package jobs_test

import (
	"context"
	"encoding/json"
	"errors"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/netagent/jobdoc"
	"github.com/gwota/gwota/netagent/jobs"
	"github.com/gwota/gwota/netagent/mqttconn"
	"github.com/gwota/gwota/netagent/mqttconn/mqtttest"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
)

func TestMain(m *testing.M) { mqtttest.VerifyTestMain(m) }

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

func logger(t *testing.T) hclog.Logger {
	if os.Getenv("JOBS_DEBUG") == "" {
		return hclog.NewNullLogger()
	}
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Trace})
}

func startEmulator(t *testing.T) *emulator.Emulator {
	t.Helper()
	e, err := emulator.Start(ctxT(t), emulator.Options{Logger: logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	return e
}

func connect(t *testing.T, url, thing string) *mqttconn.Conn {
	t.Helper()
	c, err := mqttconn.Dial(context.Background(), mqttconn.Config{
		BrokerURL: url, ClientID: thing, BackoffMin: 20 * time.Millisecond, BackoffMax: 200 * time.Millisecond,
		StateDir: t.TempDir(), Logger: logger(t).Named("mqtt"),
	})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	return c
}

func newClient(t *testing.T, mq jobs.MQTT, thing string, opts jobs.Options) *jobs.Client {
	t.Helper()
	opts.Logger = logger(t).Named("jobs")
	c, err := jobs.New(mq, thing, opts)
	if err != nil {
		t.Fatal(err)
	}
	if err := c.Start(ctxT(t)); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = c.Close(context.Background()) })
	return c
}

func createJob(t *testing.T, e *emulator.Emulator, id string) {
	t.Helper()
	img := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(img, make([]byte, 5000), 0o600); err != nil {
		t.Fatal(err)
	}
	err := e.CreateJob(ctxT(t), backend.JobSpec{JobID: id, Protocols: []string{backend.ProtocolMQTT}, Files: []backend.FileSpec{{
		LocalPath: img, DevicePath: "/fw", CertName: "c.pem", Signature: []byte{1, 2, 3}, SigAlgorithm: backend.SigSHA256ECDSA,
	}}})
	if err != nil {
		t.Fatal(err)
	}
}

// nextExec waits for a Next announcement satisfying ok.
func nextExec(t *testing.T, c *jobs.Client, ok func(*jobs.Execution) bool) *jobs.Execution {
	t.Helper()
	timeout := time.After(15 * time.Second)
	for {
		select {
		case e := <-c.Next():
			if ok(e) {
				return e
			}
		case <-timeout:
			t.Fatal("no matching next execution")
		}
	}
}

func isJob(id string) func(*jobs.Execution) bool {
	return func(e *jobs.Execution) bool { return e != nil && e.JobID == id }
}

func TestFollowAndUpdate(t *testing.T) {
	e := startEmulator(t)
	conn := connect(t, e.BrokerURL(), e.ThingName())
	c := newClient(t, conn, e.ThingName(), jobs.Options{})
	ctx := ctxT(t)

	// Nothing pending at start: $next/get answers with no execution.
	if got := nextExec(t, c, func(*jobs.Execution) bool { return true }); got != nil {
		t.Fatalf("next at start = %+v", got)
	}
	createJob(t, e, "job-1")
	ex := nextExec(t, c, isJob("job-1"))
	if ex.Status != jobs.StatusQueued {
		t.Fatalf("status %s", ex.Status)
	}
	doc, err := jobdoc.Parse(ex.JobDocument)
	if err != nil {
		t.Fatalf("document from notify-next: %v", err)
	}
	if doc.Files[0].Size != 5000 {
		t.Fatalf("doc %+v", doc)
	}

	st, err := c.Update(ctx, "job-1", jobs.Update{Status: jobs.StatusInProgress, StatusDetails: map[string]string{"self_test": "receiving", "progress": "0/5"}})
	if err != nil {
		t.Fatal(err)
	}
	if st.Status != jobs.StatusInProgress {
		t.Fatalf("state %+v", st)
	}
	d, err := c.Describe(ctx, "job-1")
	if err != nil {
		t.Fatal(err)
	}
	if d.Status != jobs.StatusInProgress || d.StatusDetails["progress"] != "0/5" || !jobdoc.IsOTA(d.JobDocument) {
		t.Fatalf("describe %+v", d)
	}
	if _, err := c.Update(ctx, "job-1", jobs.Update{Status: jobs.StatusSucceeded, StatusDetails: map[string]string{"self_test": "accepted"}}); err != nil {
		t.Fatal(err)
	}
	before := len(e.Updates("job-1"))
	// Leaving a terminal state is refused locally, without a request.
	_, err = c.Update(ctx, "job-1", jobs.Update{Status: jobs.StatusFailed})
	var te *jobs.TerminalError
	if !errors.As(err, &te) || te.Status != jobs.StatusSucceeded || !errors.Is(err, jobs.ErrTerminal) {
		t.Fatalf("update after SUCCEEDED: %v", err)
	}
	if n := len(e.Updates("job-1")); n != before {
		t.Fatalf("an update was sent from a terminal state (%d -> %d)", before, n)
	}
	// The same terminal update again is a no-op success (a retry whose response was lost).
	if _, err := c.Update(ctx, "job-1", jobs.Update{Status: jobs.StatusSucceeded}); err != nil {
		t.Fatal(err)
	}
	if got := nextExec(t, c, func(*jobs.Execution) bool { return true }); got != nil {
		t.Fatalf("next after success = %+v", got)
	}
}

func TestThrottledUpdateRetries(t *testing.T) {
	e := startEmulator(t)
	conn := connect(t, e.BrokerURL(), e.ThingName())
	c := newClient(t, conn, e.ThingName(), jobs.Options{BackoffMin: 10 * time.Millisecond, BackoffMax: 50 * time.Millisecond})
	createJob(t, e, "job-t")
	nextExec(t, c, isJob("job-t"))
	e.SetFaults("job-t", emulator.Faults{ThrottleUpdates: 3})
	if _, err := c.Update(ctxT(t), "job-t", jobs.Update{Status: jobs.StatusInProgress}); err != nil {
		t.Fatal(err)
	}
	ups := e.Updates("job-t")
	if len(ups) != 1 || ups[0].Status != jobs.StatusInProgress {
		t.Fatalf("updates %+v", ups)
	}
	// More throttling than attempts: the rejection comes back typed.
	e.SetFaults("job-t", emulator.Faults{ThrottleUpdates: 100})
	c2 := newClient(t, conn, e.ThingName(), jobs.Options{Attempts: 2, BackoffMin: time.Millisecond})
	_, err := c2.Update(ctxT(t), "job-t", jobs.Update{Status: jobs.StatusInProgress})
	var rej *jobs.RejectedError
	if !errors.As(err, &rej) || rej.Code != jobs.CodeRequestThrottled {
		t.Fatalf("err %v", err)
	}
	if r := status.ReasonOf(err); r != otav1.Reason_REASON_JOB_UPDATE_FAILED {
		t.Fatalf("throttled past every attempt: reason %s, want job_update_failed", status.String(r))
	}
}

func TestCancelAndReplace(t *testing.T) {
	e := startEmulator(t)
	conn := connect(t, e.BrokerURL(), e.ThingName())
	c := newClient(t, conn, e.ThingName(), jobs.Options{})
	ctx := ctxT(t)
	createJob(t, e, "job-a")
	nextExec(t, c, isJob("job-a"))
	if _, err := c.Update(ctx, "job-a", jobs.Update{Status: jobs.StatusInProgress}); err != nil {
		t.Fatal(err)
	}
	createJob(t, e, "job-b")
	if err := e.CancelJob(ctx, "job-a", true); err != nil {
		t.Fatal(err)
	}
	// notify-next moves on to job-b: job-a was canceled or replaced.
	nextExec(t, c, isJob("job-b"))
	_, err := c.Update(ctx, "job-a", jobs.Update{Status: jobs.StatusFailed, StatusDetails: map[string]string{"reason": "user_abort"}})
	var te *jobs.TerminalError
	if !errors.As(err, &te) || te.Status != jobs.StatusCanceled {
		t.Fatalf("update of a canceled job: %v", err)
	}
	if err := e.DeleteJob(ctx, "job-b", true); err != nil {
		t.Fatal(err)
	}
	if got := nextExec(t, c, func(x *jobs.Execution) bool { return x == nil || x.JobID != "job-b" }); got != nil {
		t.Fatalf("next after delete = %+v", got)
	}
	if _, err := c.Describe(ctx, "job-b"); !errors.Is(err, jobs.ErrNotFound) {
		t.Fatalf("describe deleted: %v", err)
	}
}

func TestAskNextAfterReconnect(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	asks := make(chan string, 10)
	if err := b.Subscribe("$aws/things/gw-rc/jobs/$next/get", 1, func(_ string, _ []byte, origin string) { asks <- origin }); err != nil {
		t.Fatal(err)
	}
	conn := connect(t, b.URL(), "gw-rc")
	newClient(t, conn, "gw-rc", jobs.Options{})
	waitAsk := func() {
		t.Helper()
		select {
		case who := <-asks:
			if who != "gw-rc" {
				t.Fatalf("asked by %q", who)
			}
		case <-time.After(15 * time.Second):
			t.Fatal("no $next/get")
		}
	}
	waitAsk() // at start
	if !b.Kick("gw-rc") {
		t.Fatal("kick failed")
	}
	waitAsk() // after the reconnection
	b.Restart()
	waitAsk() // after a broker restart
}

// With a broker where nobody answers, requests give up with ErrNoResponse.
func TestNoResponse(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	conn := connect(t, b.URL(), "gw-silent")
	c := newClient(t, conn, "gw-silent", jobs.Options{ResponseTimeout: 50 * time.Millisecond, Attempts: 2, BackoffMin: time.Millisecond})
	_, err := c.Update(ctxT(t), "job-x", jobs.Update{Status: jobs.StatusInProgress})
	if !errors.Is(err, jobs.ErrNoResponse) {
		t.Fatalf("err %v", err)
	}
	// Unanswered is not refused: the cloud may never have seen it.
	if r := status.ReasonOf(err); r == otav1.Reason_REASON_JOB_UPDATE_FAILED {
		t.Fatalf("no response typed as %s", status.String(r))
	}
}

// Responses delivered twice (subscribed and unsubscribed on AWS) and hostile messages on the
// job topics are tolerated.
func TestDuplicateAndHostileResponses(t *testing.T) {
	b := mqtttest.Start(t, mqtttest.Options{})
	conn := connect(t, b.URL(), "gw-dup")
	prefix := "$aws/things/gw-dup/jobs/"
	if err := b.Subscribe(prefix+"+/update", 1, func(topic string, p []byte, _ string) {
		var req map[string]any
		_ = json.Unmarshal(p, &req)
		resp, _ := json.Marshal(map[string]any{"clientToken": req["clientToken"], "executionState": map[string]any{"status": req["status"]}})
		for range 2 {
			_ = b.Publish(topic+"/accepted", resp, 1)
		}
		_ = b.Publish(topic+"/accepted", []byte("{not json"), 1)
		_ = b.Publish(prefix+"notify-next", []byte(`{"execution":{"jobId":"../../x","status":"QUEUED"}}`), 1)
		_ = b.Publish(prefix+"notify-next", []byte(`[]`), 1)
	}); err != nil {
		t.Fatal(err)
	}
	c := newClient(t, conn, "gw-dup", jobs.Options{ResponseTimeout: 5 * time.Second})
	for range 3 {
		st, err := c.Update(ctxT(t), "job-d", jobs.Update{Status: jobs.StatusInProgress})
		if err != nil || st.Status != jobs.StatusInProgress {
			t.Fatalf("%+v %v", st, err)
		}
	}
	select {
	case x := <-c.Next():
		t.Fatalf("hostile notify-next delivered: %+v", x)
	default:
	}
}

func TestValidation(t *testing.T) {
	if _, err := jobs.New(nil, "bad/thing", jobs.Options{}); err == nil {
		t.Fatal("thing with slash accepted")
	}
	for id, want := range map[string]bool{"job-1": true, "a_B-9": true, "": false, "$next": false, "a/b": false, "+": false} {
		if jobs.ValidJobID(id) != want {
			t.Errorf("ValidJobID(%q) != %v", id, want)
		}
	}
}

// A VersionMismatch (or any non-retryable rejection) comes back typed after the client
// checked where the execution really is; an InternalError is retried.
func TestRejectionCodes(t *testing.T) {
	e := startEmulator(t)
	conn := connect(t, e.BrokerURL(), e.ThingName())
	c := newClient(t, conn, e.ThingName(), jobs.Options{Attempts: 3, BackoffMin: time.Millisecond})
	createJob(t, e, "job-v")
	nextExec(t, c, isJob("job-v"))
	ctx := ctxT(t)
	for _, code := range []string{jobs.CodeVersionMismatch, jobs.CodeInvalidRequest, jobs.CodeInternalError} {
		e.SetFaults("job-v", emulator.Faults{RejectCode: code})
		_, err := c.Update(ctx, "job-v", jobs.Update{Status: jobs.StatusInProgress})
		var rej *jobs.RejectedError
		if !errors.As(err, &rej) || rej.Code != code {
			t.Fatalf("%s: err %v", code, err)
		}
		if rej.Retryable() != (code == jobs.CodeInternalError) {
			t.Fatalf("%s: retryable %v", code, rej.Retryable())
		}
		if r := status.ReasonOf(err); r != otav1.Reason_REASON_JOB_UPDATE_FAILED {
			t.Fatalf("%s: reason %s, want job_update_failed", code, status.String(r))
		}
	}
	e.ClearFaults("job-v")
	if _, err := c.Update(ctx, "job-v", jobs.Update{Status: jobs.StatusInProgress}); err != nil {
		t.Fatal(err)
	}
}
