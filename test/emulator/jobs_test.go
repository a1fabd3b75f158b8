package emulator

import (
	"context"
	"encoding/json"
	"errors"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/test/backend"
)

const jobsPrefix = thingPrefix + "jobs/"

// The device never subscribes to accepted/rejected: on the embedded broker responses reach it
// anyway, as on AWS IoT.
func TestJobsLifecycleWithoutSubscriptions(t *testing.T) {
	events := make(chan UpdateEvent, 10)
	e := startEmulator(t, Options{OnUpdate: func(ev UpdateEvent) { events <- ev }})
	d := connectDevice(t, e.BrokerURL(), "gw-01")
	watcher := connectDevice(t, e.BrokerURL(), "watcher", jobsPrefix+"notify-next", jobsPrefix+"notify")

	// Nothing pending: $next is accepted without an execution.
	d.publishJSON(jobsPrefix+"$next/get", map[string]any{"clientToken": "t0"})
	m := decodeJSONMap(t, d.next(jobsPrefix+"$next/get/accepted").Payload)
	if _, ok := m["execution"]; ok || m["clientToken"] != "t0" || m["timestamp"] == nil {
		t.Fatalf("empty $next = %v", m)
	}

	path, _ := writeTestFile(t, 5000)
	createJob(t, e, "job-1", path, backend.ProtocolMQTT, backend.ProtocolHTTP)
	nn := decodeJSONMap(t, watcher.next(jobsPrefix+"notify-next").Payload)
	if ex, _ := nn["execution"].(map[string]any); ex["jobId"] != "job-1" || ex["status"] != "QUEUED" {
		t.Fatalf("notify-next = %v", nn)
	}
	nt := decodeJSONMap(t, watcher.next(jobsPrefix+"notify").Payload)
	if q := nt["jobs"].(map[string]any)["QUEUED"].([]any); len(q) != 1 {
		t.Fatalf("notify = %v", nt)
	}

	d.publishJSON(jobsPrefix+"$next/get", map[string]any{"clientToken": "t1", "includeJobDocument": true})
	m = decodeJSONMap(t, d.next(jobsPrefix+"$next/get/accepted").Payload)
	ex := m["execution"].(map[string]any)
	if ex["jobId"] != "job-1" || ex["thingName"] != "gw-01" || ex["status"] != "QUEUED" || ex["versionNumber"] != 1.0 || ex["executionNumber"] != 1.0 {
		t.Fatalf("execution = %v", ex)
	}
	ota := ex["jobDocument"].(map[string]any)["afr_ota"].(map[string]any)
	file := ota["files"].([]any)[0].(map[string]any)
	if !strings.HasPrefix(ota["streamname"].(string), "AFR_OTA-") || file["filesize"] != 5000.0 || file["fileid"] != 0.0 ||
		file["sig-sha256-ecdsa"] != "c2ln" || file["auth_scheme"] != "aws.s3.presigned" || !strings.HasPrefix(file["update_data_url"].(string), e.HTTPURL()) {
		t.Fatalf("document = %v", ota)
	}

	// GetPending lists it as queued.
	d.publishJSON(jobsPrefix+"get", map[string]any{"clientToken": "gp"})
	m = decodeJSONMap(t, d.next(jobsPrefix+"get/accepted").Payload)
	if len(m["queuedJobs"].([]any)) != 1 || len(m["inProgressJobs"].([]any)) != 0 {
		t.Fatalf("get pending = %v", m)
	}

	upd := jobsPrefix + "job-1/update"
	d.publishJSON(upd, map[string]any{"status": "IN_PROGRESS", "statusDetails": map[string]string{"self_test": "receiving", "progress": "0/20"},
		"expectedVersion": 1, "includeJobExecutionState": true, "includeJobDocument": true, "clientToken": "u1"})
	m = decodeJSONMap(t, d.next(upd+"/accepted").Payload)
	st := m["executionState"].(map[string]any)
	if st["status"] != "IN_PROGRESS" || st["versionNumber"] != 2.0 || m["clientToken"] != "u1" || m["jobDocument"] == nil {
		t.Fatalf("update accepted = %v", m)
	}

	// A stale expectedVersion is a VersionMismatch carrying the current state.
	d.publishJSON(upd, map[string]any{"status": "IN_PROGRESS", "expectedVersion": 1, "clientToken": "u2"})
	m = decodeJSONMap(t, d.next(upd+"/rejected").Payload)
	if m["code"] != CodeVersionMismatch || m["clientToken"] != "u2" || m["executionState"].(map[string]any)["versionNumber"] != 2.0 {
		t.Fatalf("version mismatch = %v", m)
	}

	d.publishJSON(upd, map[string]any{"status": "SUCCEEDED", "statusDetails": map[string]string{"self_test": "accepted"}})
	d.next(upd + "/accepted")
	nn = decodeJSONMap(t, watcher.next(jobsPrefix+"notify-next").Payload)
	if _, ok := nn["execution"]; ok {
		t.Fatalf("notify-next after success = %v, want no execution", nn)
	}

	// Terminal states are final.
	d.publishJSON(upd, map[string]any{"status": "IN_PROGRESS"})
	m = decodeJSONMap(t, d.next(upd+"/rejected").Payload)
	if m["code"] != CodeInvalidStateTransition || m["executionState"].(map[string]any)["status"] != "SUCCEEDED" {
		t.Fatalf("after terminal = %v", m)
	}
	d.publishJSON(jobsPrefix+"job-1/get", map[string]any{})
	if m = decodeJSONMap(t, d.next(jobsPrefix+"job-1/get/rejected").Payload); m["code"] != CodeTerminalStateReached {
		t.Fatalf("describe terminal = %v", m)
	}

	got := e.Updates("job-1")
	want := []backend.Update{
		{Status: "IN_PROGRESS", StatusDetails: map[string]string{"self_test": "receiving", "progress": "0/20"}},
		{Status: "SUCCEEDED", StatusDetails: map[string]string{"self_test": "accepted"}},
	}
	if diff := cmp.Diff(want, got, cmp.FilterPath(func(p cmp.Path) bool { return p.Last().String() == ".At" }, cmp.Ignore())); diff != "" {
		t.Errorf("updates (-want +got):\n%s", diff)
	}
	for _, u := range got {
		if u.At.IsZero() {
			t.Errorf("update without time: %+v", u)
		}
	}
	for _, want := range []struct {
		status  string
		version int64
	}{{"IN_PROGRESS", 2}, {"SUCCEEDED", 3}} {
		select {
		case ev := <-events:
			if ev.Status != want.status || ev.VersionNumber != want.version || ev.JobID != "job-1" || ev.Thing != "gw-01" || ev.Source != "device" {
				t.Errorf("OnUpdate got %+v, want %s v%d", ev, want.status, want.version)
			}
		case <-time.After(5 * time.Second):
			t.Fatalf("no OnUpdate for %s", want.status)
		}
	}
	ex2, err := e.Describe(context.Background(), "job-1")
	if err != nil || ex2.Status != "SUCCEEDED" || ex2.VersionNumber != 3 {
		t.Errorf("Describe = %+v, %v", ex2, err)
	}
}

func TestJobsRejections(t *testing.T) {
	e := startEmulator(t, Options{})
	d := connectDevice(t, e.BrokerURL(), "gw-01")
	path, _ := writeTestFile(t, 1000)
	createJob(t, e, "job-r", path)
	upd := jobsPrefix + "job-r/update"
	long := strings.Repeat("x", 1025)
	tests := []struct {
		name  string
		topic string
		body  string
		code  string
	}{
		{"invalid JSON", upd, `{"status":`, CodeInvalidJSON},
		{"not UTF-8", upd, "{\"status\":\"IN_PROGRESS\",\"statusDetails\":{\"a\":\"\xff\"}}", CodeInvalidJSON},
		{"no status", upd, `{"statusDetails":{"a":"b"}}`, CodeInvalidRequest},
		{"unknown status", upd, `{"status":"DONE"}`, CodeInvalidRequest},
		{"status not a string", upd, `{"status":5}`, CodeInvalidRequest},
		{"number value", upd, `{"status":"IN_PROGRESS","statusDetails":{"error_code":1001}}`, CodeInvalidRequest},
		{"bool value", upd, `{"status":"IN_PROGRESS","statusDetails":{"ok":true}}`, CodeInvalidRequest},
		{"empty value", upd, `{"status":"IN_PROGRESS","statusDetails":{"reason":""}}`, CodeInvalidRequest},
		{"newline in value", upd, `{"status":"IN_PROGRESS","statusDetails":{"reason":"a\nb"}}`, CodeInvalidRequest},
		{"invisible char", upd, `{"status":"IN_PROGRESS","statusDetails":{"reason":"a\u200bb"}}`, CodeInvalidRequest},
		{"value too long", upd, `{"status":"IN_PROGRESS","statusDetails":{"reason":"` + long + `"}}`, CodeInvalidRequest},
		{"key with space", upd, `{"status":"IN_PROGRESS","statusDetails":{"bad key":"v"}}`, CodeInvalidRequest},
		{"key too long", upd, `{"status":"IN_PROGRESS","statusDetails":{"` + strings.Repeat("k", 129) + `":"v"}}`, CodeInvalidRequest},
		{"details not an object", upd, `{"status":"IN_PROGRESS","statusDetails":["a"]}`, CodeInvalidRequest},
		{"step timeout 0", upd, `{"status":"IN_PROGRESS","stepTimeoutInMinutes":0}`, CodeInvalidRequest},
		{"step timeout too big", upd, `{"status":"IN_PROGRESS","stepTimeoutInMinutes":10081}`, CodeInvalidRequest},
		{"client token too long", upd, `{"status":"IN_PROGRESS","clientToken":"` + strings.Repeat("c", 65) + `"}`, CodeInvalidRequest},
		{"device sets QUEUED", upd, `{"status":"QUEUED"}`, CodeInvalidStateTransition},
		{"device sets CANCELED", upd, `{"status":"CANCELED"}`, CodeInvalidStateTransition},
		{"unknown job", jobsPrefix + "nope/update", `{"status":"IN_PROGRESS"}`, CodeResourceNotFound},
		{"wrong execution number", upd, `{"status":"IN_PROGRESS","executionNumber":7}`, CodeResourceNotFound},
		{"describe unknown job", jobsPrefix + "nope/get", `{}`, CodeResourceNotFound},
		{"topic maps to no API", jobsPrefix + "job-r/frobnicate", `{}`, CodeInvalidTopic},
		{"update $next", jobsPrefix + "$next/update", `{"status":"IN_PROGRESS"}`, CodeInvalidTopic},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			d.t = t
			d.publish(tt.topic, []byte(tt.body))
			m := decodeJSONMap(t, d.next(tt.topic+"/rejected").Payload)
			if m["code"] != tt.code {
				t.Errorf("code = %v (%v), want %s", m["code"], m["message"], tt.code)
			}
			if m["timestamp"] == nil || m["message"] == nil {
				t.Errorf("rejected body lacks timestamp or message: %v", m)
			}
		})
	}
	d.t = t
	// None of that changed the execution.
	if x, _ := e.Describe(context.Background(), "job-r"); x.Status != "QUEUED" || x.VersionNumber != 1 {
		t.Fatalf("after rejections: %+v", x)
	}

	// A valid edge case is accepted: 1024-character value, 128-character key, colon in a key.
	ok := `{"status":"IN_PROGRESS","stepTimeoutInMinutes":-1,"statusDetails":{"` + strings.Repeat("k", 128) + `":"` + long[:1024] + `","a:b_c-d":"é ü"}}`
	d.publish(upd, []byte(ok))
	d.next(upd + "/accepted")

	// Injected faults: throttling, then a chosen code.
	e.SetFaults("job-r", Faults{ThrottleUpdates: 2})
	for i := 0; i < 2; i++ {
		d.publishJSON(upd, map[string]any{"status": "IN_PROGRESS"})
		if m := decodeJSONMap(t, d.next(upd+"/rejected").Payload); m["code"] != CodeRequestThrottled {
			t.Fatalf("throttled = %v", m)
		}
	}
	d.publishJSON(upd, map[string]any{"status": "IN_PROGRESS"})
	d.next(upd + "/accepted")
	e.SetFaults("job-r", Faults{RejectCode: CodeInternalError})
	d.publishJSON(upd, map[string]any{"status": "IN_PROGRESS"})
	if m := decodeJSONMap(t, d.next(upd+"/rejected").Payload); m["code"] != CodeInternalError {
		t.Fatalf("injected = %v", m)
	}
	e.ClearFaults("job-r")
}

func TestStartNextCancelAndTimeout(t *testing.T) {
	// Step timers run for real, but what they do on expiry waits for release: the update
	// below must be handled before start-next's 50 ms timer acts, which a loaded machine
	// does not promise.
	release := make(chan struct{})
	var releaseOnce sync.Once
	releaseTimers := func() { releaseOnce.Do(func() { close(release) }) }
	orig := timeAfterFunc
	timeAfterFunc = func(d time.Duration, f func()) interface{ Stop() bool } {
		return time.AfterFunc(d, func() { <-release; f() })
	}
	t.Cleanup(func() { releaseTimers(); timeAfterFunc = orig }) // after the emulator's Close
	e := startEmulator(t, Options{StepTimeoutUnit: 50 * time.Millisecond})
	d := connectDevice(t, e.BrokerURL(), "gw-01", jobsPrefix+"notify-next")
	path, _ := writeTestFile(t, 1000)
	createJob(t, e, "job-a", path)
	createJob(t, e, "job-b", path)
	createJob(t, e, "job-c", path)
	if m := decodeJSONMap(t, d.next(jobsPrefix+"notify-next").Payload); m["execution"].(map[string]any)["jobId"] != "job-a" {
		t.Fatalf("first notify-next = %v", m)
	}

	d.publishJSON(jobsPrefix+"start-next", map[string]any{"statusDetails": map[string]string{"self_test": "receiving"}, "stepTimeoutInMinutes": 1, "clientToken": "sn"})
	m := decodeJSONMap(t, d.next(jobsPrefix+"start-next/accepted").Payload)
	ex := m["execution"].(map[string]any)
	if ex["jobId"] != "job-a" || ex["status"] != "IN_PROGRESS" || ex["versionNumber"] != 2.0 || m["clientToken"] != "sn" {
		t.Fatalf("start-next = %v", m)
	}
	// An update without stepTimeoutInMinutes leaves the timer running.
	d.publishJSON(jobsPrefix+"job-a/update", map[string]any{"status": "IN_PROGRESS", "statusDetails": map[string]string{"progress": "1/2"}})
	d.next(jobsPrefix + "job-a/update/accepted")
	// The step timer fires: TIMED_OUT, and the next job becomes job-b.
	releaseTimers()
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := e.WaitStatus(ctx, "job-a", backend.StatusTimedOut); err != nil {
		t.Fatal(err)
	}
	if m := decodeJSONMap(t, d.next(jobsPrefix+"notify-next").Payload); m["execution"].(map[string]any)["jobId"] != "job-b" {
		t.Fatalf("notify-next after timeout = %v", m)
	}

	// Cancelling an in-progress job needs force; the device then sees notify-next move on, and
	// its next update is refused.
	d.publishJSON(jobsPrefix+"job-b/update", map[string]any{"status": "IN_PROGRESS"})
	d.next(jobsPrefix + "job-b/update/accepted")
	if err := e.CancelJob(ctx, "job-b", false); !errors.Is(err, ErrInvalidState) {
		t.Fatalf("cancel of an in-progress job without force: %v", err)
	}
	if err := e.CancelJob(ctx, "nope", true); !errors.Is(err, ErrNotFound) {
		t.Fatalf("cancel of an unknown job: %v", err)
	}
	if err := e.CancelJob(ctx, "job-b", true); err != nil {
		t.Fatal(err)
	}
	if m := decodeJSONMap(t, d.next(jobsPrefix+"notify-next").Payload); m["execution"].(map[string]any)["jobId"] != "job-c" {
		t.Fatalf("notify-next after cancel = %v", m)
	}
	d.publishJSON(jobsPrefix+"job-b/update", map[string]any{"status": "FAILED", "statusDetails": map[string]string{"reason": "user_abort"}})
	if m := decodeJSONMap(t, d.next(jobsPrefix+"job-b/update/rejected").Payload); m["code"] != CodeInvalidStateTransition {
		t.Fatalf("update after cancel = %v", m)
	}

	// Removing the last pending job: notify-next carries only a timestamp.
	if err := e.DeleteJob(ctx, "job-c", false); err != nil {
		t.Fatal(err)
	}
	raw := d.next(jobsPrefix + "notify-next").Payload
	if m := decodeJSONMap(t, raw); len(m) != 1 || m["timestamp"] == nil {
		t.Fatalf("notify-next after delete = %s", raw)
	}
	d.publishJSON(jobsPrefix+"job-c/get", map[string]any{})
	if m := decodeJSONMap(t, d.next(jobsPrefix+"job-c/get/rejected").Payload); m["code"] != CodeResourceNotFound {
		t.Fatalf("describe deleted = %v", m)
	}
	// start-next with nothing pending is accepted without an execution.
	d.publishJSON(jobsPrefix+"start-next", map[string]any{})
	if m := decodeJSONMap(t, d.next(jobsPrefix+"start-next/accepted").Payload); m["execution"] != nil {
		t.Fatalf("start-next, nothing pending = %v", m)
	}
}

func TestCreateJobValidation(t *testing.T) {
	e := startEmulator(t, Options{})
	path, _ := writeTestFile(t, 10)
	f := []backend.FileSpec{{LocalPath: path}}
	tests := []backend.JobSpec{
		{JobID: "", Files: f},
		{JobID: "bad id", Files: f},
		{JobID: strings.Repeat("j", 65), Files: f},
		{JobID: "j1", Files: nil},
		{JobID: "j1", Files: f, Protocols: []string{"FTP"}},
		{JobID: "j1", Files: f, Things: []string{"bad thing"}},
		{JobID: "j1", Files: f, URLExpiry: 30 * time.Second},
		{JobID: "j1", Files: []backend.FileSpec{{LocalPath: path, FileID: 256}}},
		{JobID: "j1", Files: []backend.FileSpec{{LocalPath: path}, {LocalPath: path}}},
		{JobID: "j1", Files: []backend.FileSpec{{LocalPath: "/nonexistent"}}},
	}
	for _, spec := range tests {
		if err := e.CreateJob(context.Background(), spec); err == nil {
			t.Errorf("CreateJob(%+v) accepted", spec)
		}
	}
	if err := e.CreateJob(context.Background(), backend.JobSpec{JobID: "j1", Files: f}); err != nil {
		t.Fatal(err)
	}
	if err := e.CreateJob(context.Background(), backend.JobSpec{JobID: "j1", Files: f}); err == nil {
		t.Error("duplicate job id accepted")
	}
}

func TestStepTimeoutCleared(t *testing.T) {
	// One "minute" is 2 s: long enough for the next update to arrive first.
	e := startEmulator(t, Options{StepTimeoutUnit: 2 * time.Second})
	d := connectDevice(t, e.BrokerURL(), "gw-01")
	path, _ := writeTestFile(t, 100)
	createJob(t, e, "job-t", path)
	upd := jobsPrefix + "job-t/update"
	d.publishJSON(upd, map[string]any{"status": "IN_PROGRESS", "stepTimeoutInMinutes": 1})
	d.next(upd + "/accepted")
	d.publishJSON(upd, map[string]any{"status": "IN_PROGRESS", "stepTimeoutInMinutes": -1})
	d.next(upd + "/accepted")
	d.publishJSON(jobsPrefix+"job-t/get", map[string]any{})
	if ex := decodeJSONMap(t, d.next(jobsPrefix+"job-t/get/accepted").Payload)["execution"].(map[string]any); ex["approximateSecondsBeforeTimedOut"] != nil {
		t.Errorf("timer not cleared: %v", ex)
	}
	// Replace with a long timer, then finish: the job must end SUCCEEDED, never TIMED_OUT.
	d.publishJSON(upd, map[string]any{"status": "IN_PROGRESS", "stepTimeoutInMinutes": 10080})
	d.publishJSON(jobsPrefix+"job-t/get", map[string]any{"includeJobDocument": false})
	d.next(upd + "/accepted")
	m := decodeJSONMap(t, d.next(jobsPrefix+"job-t/get/accepted").Payload)
	ex := m["execution"].(map[string]any)
	if ex["approximateSecondsBeforeTimedOut"] == nil || ex["jobDocument"] != nil {
		t.Errorf("describe with a step timer = %v", ex)
	}
	d.publishJSON(upd, map[string]any{"status": "SUCCEEDED"})
	d.next(upd + "/accepted")
	if x, _ := e.Describe(context.Background(), "job-t"); x.Status != backend.StatusSucceeded {
		t.Fatalf("status %s", x.Status)
	}
}

func TestJobForManyThingsAndDelay(t *testing.T) {
	e := startEmulator(t, Options{})
	path, _ := writeTestFile(t, 100)
	if err := e.CreateJob(context.Background(), backend.JobSpec{JobID: "fleet", Things: []string{"gw-01", "gw-02"}, Files: []backend.FileSpec{{LocalPath: path}}}); err != nil {
		t.Fatal(err)
	}
	d2 := connectDevice(t, e.BrokerURL(), "gw-02")
	e.SetFaults("fleet", Faults{Delay: 300 * time.Millisecond})
	start := time.Now()
	d2.publishJSON("$aws/things/gw-02/jobs/fleet/update", map[string]any{"status": "IN_PROGRESS"})
	d2.next("$aws/things/gw-02/jobs/fleet/update/accepted")
	if el := time.Since(start); el < 300*time.Millisecond {
		t.Errorf("delayed response came after %v", el)
	}
	if x, _ := e.DescribeThing("gw-02", "fleet"); x.Status != backend.StatusInProgress {
		t.Errorf("gw-02: %+v", x)
	}
	if x, _ := e.Describe(context.Background(), "fleet"); x.Status != backend.StatusQueued {
		t.Errorf("gw-01 changed too: %+v", x)
	}
	if u := e.ThingUpdates("gw-02", "fleet"); len(u) != 1 {
		t.Errorf("gw-02 updates: %+v", u)
	}
}

// A callback may call back into the emulator: here it cancels the job on the first progress
// report, as a test of cloud-side cancellation would.
func TestOnUpdateMayCallEmulator(t *testing.T) {
	var e *Emulator
	canceled := make(chan error, 1)
	e = startEmulator(t, Options{OnUpdate: func(ev UpdateEvent) {
		if ev.Status == backend.StatusInProgress {
			canceled <- e.CancelJob(context.Background(), ev.JobID, true)
		}
	}})
	d := connectDevice(t, e.BrokerURL(), "gw-01")
	path, _ := writeTestFile(t, 100)
	createJob(t, e, "job-cb", path)
	d.publishJSON(jobsPrefix+"job-cb/update", map[string]any{"status": "IN_PROGRESS"})
	select {
	case err := <-canceled:
		if err != nil {
			t.Fatal(err)
		}
	case <-time.After(5 * time.Second):
		t.Fatal("callback never ran or deadlocked")
	}
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	if _, err := e.WaitStatus(ctx, "job-cb", backend.StatusCanceled); err != nil {
		t.Fatal(err)
	}
}

func TestCustomJobAndDocumentRewrite(t *testing.T) {
	e := startEmulator(t, Options{})
	d := connectDevice(t, e.BrokerURL(), "gw-01")
	ctx := context.Background()
	if err := e.CreateCustomJob(ctx, "custom-1", []byte(`{"operation":"reboot"}`)); err != nil {
		t.Fatal(err)
	}
	for _, bad := range []string{`[1]`, `{"a":`, `{"a":"` + strings.Repeat("x", 33*1024) + `"}`} {
		if err := e.CreateCustomJob(ctx, "custom-bad", []byte(bad)); err == nil {
			t.Errorf("CreateCustomJob(%.20s) accepted", bad)
		}
	}
	d.publishJSON(jobsPrefix+"custom-1/get", map[string]any{})
	m := decodeJSONMap(t, d.next(jobsPrefix+"custom-1/get/accepted").Payload)
	if doc := m["execution"].(map[string]any)["jobDocument"].(map[string]any); doc["operation"] != "reboot" || len(doc) != 1 {
		t.Fatalf("custom document = %v", doc)
	}

	path, _ := writeTestFile(t, 300)
	createJob(t, e, "ota-rw", path)
	// Quote the file size, as some job authors do; the stream keeps working.
	err := e.RewriteDocument("ota-rw", func(doc json.RawMessage) json.RawMessage {
		return json.RawMessage(strings.Replace(string(doc), `"filesize":300`, `"filesize":"300"`, 1))
	})
	if err != nil {
		t.Fatal(err)
	}
	d.publishJSON(jobsPrefix+"ota-rw/get", map[string]any{})
	raw := string(d.next(jobsPrefix + "ota-rw/get/accepted").Payload)
	if !strings.Contains(raw, `"filesize":"300"`) {
		t.Fatalf("rewritten document not sent: %s", raw)
	}
	if err := e.RewriteDocument("nope", nil); !errors.Is(err, ErrNotFound) {
		t.Errorf("RewriteDocument(unknown) = %v", err)
	}
}
