package report_test

import (
	"context"
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/netagent/jobs"
	"github.com/gwota/gwota/netagent/mqttconn"
	"github.com/gwota/gwota/netagent/mqttconn/mqtttest"
	"github.com/gwota/gwota/netagent/report"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
)

func TestMain(m *testing.M) { mqtttest.VerifyTestMain(m) }

func TestLimiter(t *testing.T) {
	t0 := time.Unix(1000, 0)
	type step struct {
		at         time.Duration
		rec, tot   uint64
		ok         bool
		wait       time.Duration
		recordIfOK bool
	}
	tests := []struct {
		name  string
		steps []step
	}{
		{"first always", []step{{0, 0, 100, true, 0, true}}},
		{"percent without time", []step{{0, 0, 100, true, 0, true}, {time.Second, 50, 100, false, 4 * time.Second, false}}},
		{"time without percent", []step{{0, 0, 100, true, 0, true}, {time.Minute, 4, 100, false, 0, false}}},
		{"both", []step{{0, 0, 100, true, 0, true}, {5 * time.Second, 5, 100, true, 0, true}, {10 * time.Second, 9, 100, false, 0, false}, {10 * time.Second, 10, 100, true, 0, true}}},
		{"completion needs only time", []step{{0, 0, 100, true, 0, true}, {6 * time.Second, 98, 100, true, 0, true}, {7 * time.Second, 100, 100, false, 4 * time.Second, false}, {11 * time.Second, 100, 100, true, 0, true}}},
		{"no total", []step{{0, 0, 0, false, 0, false}}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			l := &report.Limiter{Interval: 5 * time.Second, PercentStep: 5}
			for i, s := range tt.steps {
				now := t0.Add(s.at)
				ok, wait := l.Allow(now, s.rec, s.tot)
				if ok != s.ok || wait != s.wait {
					t.Fatalf("step %d: Allow = %v, %v; want %v, %v", i, ok, wait, s.ok, s.wait)
				}
				if ok && s.recordIfOK {
					l.Sent(now, s.rec, s.tot)
				}
			}
		})
	}
}

type env struct {
	e    *emulator.Emulator
	jobs *jobs.Client
	upd  chan emulator.UpdateEvent
}

func setup(t *testing.T, jobID string) env {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	upd := make(chan emulator.UpdateEvent, 1000)
	e, err := emulator.Start(ctx, emulator.Options{OnUpdate: func(u emulator.UpdateEvent) { upd <- u }})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = e.Close() })
	conn, err := mqttconn.Dial(ctx, mqttconn.Config{BrokerURL: e.BrokerURL(), ClientID: e.ThingName(), BackoffMin: 20 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = conn.Close(context.Background()) })
	jc, err := jobs.New(conn, e.ThingName(), jobs.Options{})
	if err != nil {
		t.Fatal(err)
	}
	if err := jc.Start(ctx); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { _ = jc.Close(context.Background()) })
	img := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(img, make([]byte, 1000), 0o600); err != nil {
		t.Fatal(err)
	}
	if err := e.CreateJob(ctx, backend.JobSpec{JobID: jobID, Files: []backend.FileSpec{{LocalPath: img, Signature: []byte{1}, SigAlgorithm: backend.SigSHA256ECDSA}}}); err != nil {
		t.Fatal(err)
	}
	return env{e, jc, upd}
}

func TestFlowWithExtensions(t *testing.T) {
	v := setup(t, "job-r1")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ext := map[string]string{
		"firmware_version": "4.2.0",
		"boot_slot":        "a",
		"reason":           "must not override",
		"bad key!":         "dropped",
		"multi":            "line1\nline2",
		"long":             strings.Repeat("x", 2000),
	}
	for i := range 10 {
		ext["z"+string(rune('a'+i))] = "filler"
	}
	calls := 0
	extFn := func(context.Context) (status.Fields, error) {
		calls++
		if calls == 2 {
			return nil, errors.New("writer away") // the last good values are used
		}
		return status.SortedFields(ext), nil
	}
	// A huge interval: only Start's update may go out during the download.
	r := report.New(v.jobs, extFn, "job-r1", report.Config{Interval: time.Hour})
	defer r.Close()
	if err := r.Start(ctx, 0, 40); err != nil {
		t.Fatal(err)
	}
	for i := range 40 {
		r.Progress(uint64(i+1), 40)
	}
	if err := r.Ready(ctx); err != nil {
		t.Fatal(err)
	}
	// The writer's typed error reaches the report whole: its read-back sha256 takes a pair
	// before any extension field.
	sigErr := status.Errorf(otav1.Reason_REASON_SIG_CHECK_FAILED, "signature does not verify").WithMeta("sha256", "9f86d081")
	if err := r.Failed(ctx, sigErr, ""); err != nil {
		t.Fatal(err)
	}
	ups := v.e.Updates("job-r1")
	var got []string
	for _, u := range ups {
		if err := status.Validate(u.StatusDetails); err != nil {
			t.Errorf("update %+v breaks AWS limits: %v", u, err)
		}
		got = append(got, u.Status+":"+u.StatusDetails["self_test"]+":"+u.StatusDetails["progress"])
	}
	want := []string{"IN_PROGRESS:receiving:0/40", "IN_PROGRESS:ready:40/40", "FAILED:aborted:40/40"}
	if diff := cmp.Diff(want, got); diff != "" {
		t.Fatalf("updates (-want +got)\n%s", diff)
	}
	last := ups[len(ups)-1].StatusDetails
	if last["reason"] != "sig_check_failed" || last["error_code"] != "1001" || last["sha256"] != "9f86d081" || last["boot_slot"] != "a" || last["firmware_version"] != "4.2.0" {
		t.Fatalf("failure details %v", last)
	}
	if len(last) != status.MaxPairs {
		t.Fatalf("details have %d pairs", len(last))
	}
	if ups[1].StatusDetails["boot_slot"] != "a" {
		t.Fatalf("extensions lost while the writer was away: %v", ups[1].StatusDetails)
	}
}

func TestProgressReported(t *testing.T) {
	v := setup(t, "job-r2")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r := report.New(v.jobs, nil, "job-r2", report.Config{Interval: time.Millisecond, PercentStep: 50})
	defer r.Close()
	if err := r.Start(ctx, 0, 10); err != nil {
		t.Fatal(err)
	}
	for i := 1; i <= 10; i++ {
		r.Progress(uint64(i), 10)
	}
	// Completion is always reported eventually, and the 50% step keeps the count low.
	n := 0
	for {
		select {
		case u := <-v.upd:
			if u.Source != "device" {
				continue
			}
			n++
			if u.StatusDetails["progress"] == "10/10" {
				if n > 4 {
					t.Fatalf("%d updates for a 50%% step", n)
				}
				return
			}
		case <-ctx.Done():
			t.Fatalf("completion not reported: %+v", v.e.Updates("job-r2"))
		}
	}
}

func TestRejectedAndTerminal(t *testing.T) {
	v := setup(t, "job-r3")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	r := report.New(v.jobs, nil, "job-r3", report.Config{})
	if err := r.Rejected(ctx, status.Errorf(otav1.Reason_REASON_JOB_DOCUMENT_INVALID, "bad")); err != nil {
		t.Fatal(err)
	}
	ex, err := v.e.WaitStatus(ctx, "job-r3", jobs.StatusRejected)
	if err != nil {
		t.Fatal(err)
	}
	if ex.StatusDetails["reason"] != "job_document_invalid" || ex.StatusDetails["error_code"] != "3009" {
		t.Fatalf("details %v", ex.StatusDetails)
	}
	// Terminal now: a later report fails typed, and nothing is sent.
	if err := r.Failed(ctx, nil, ""); !errors.Is(err, jobs.ErrTerminal) {
		t.Fatalf("err %v", err)
	}
	if n := len(v.e.Updates("job-r3")); n != 1 {
		t.Fatalf("%d updates", n)
	}
}

// TestSetFieldsInEveryUpdate: the pairs SetFields gives (the protocol a file came over) go
// out with every later update, after the failure's own fields and before the extensions.
func TestSetFieldsInEveryUpdate(t *testing.T) {
	v := setup(t, "job-r4")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	var ext status.Fields
	for i := range 10 {
		ext = append(ext, status.Field{Key: fmt.Sprintf("e%d", i), Value: "x"})
	}
	extFn := func(context.Context) (status.Fields, error) { return ext, nil }
	r := report.New(v.jobs, extFn, "job-r4", report.Config{Interval: time.Hour})
	defer r.Close()
	r.SetFields(status.Fields{{Key: "protocol", Value: "MQTT"}})
	if err := r.Start(ctx, 0, 4); err != nil {
		t.Fatal(err)
	}
	r.SetFields(status.Fields{{Key: "protocol", Value: "HTTP"}})
	if err := r.Failed(ctx, status.Errorf(otav1.Reason_REASON_DOWNLOAD_FAILED, "gone").WithMeta("http_status", "403"), ""); err != nil {
		t.Fatal(err)
	}
	ups := v.e.Updates("job-r4")
	var got []map[string]string
	for _, u := range ups {
		got = append(got, u.StatusDetails)
	}
	want := []map[string]string{
		{"self_test": "receiving", "progress": "0/4", "protocol": "MQTT",
			"e0": "x", "e1": "x", "e2": "x", "e3": "x", "e4": "x", "e5": "x", "e6": "x"},
		{"self_test": "aborted", "progress": "0/4", "reason": "download_failed", "error_code": status.Code(otav1.Reason_REASON_DOWNLOAD_FAILED),
			"http_status": "403", "protocol": "HTTP", "e0": "x", "e1": "x", "e2": "x", "e3": "x"},
	}
	if d := cmp.Diff(want, got); d != "" {
		t.Fatalf("statusDetails (-want +got):\n%s", d)
	}
}

// TestSummaryBeforeExtensions: a summary (a delta update's "reused") is in the ready, active
// and succeeded updates even when the writer's extension fields would fill the 10-pair budget:
// it comes right after the base keys.
func TestSummaryBeforeExtensions(t *testing.T) {
	v := setup(t, "job-sum")
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	ext := status.Fields{}
	for i := range 12 {
		ext = append(ext, status.Field{Key: "e" + string(rune('a'+i)), Value: "x"})
	}
	r := report.New(v.jobs, func(context.Context) (status.Fields, error) { return ext, nil }, "job-sum", report.Config{Interval: time.Hour})
	defer r.Close()
	if err := r.Start(ctx, 0, 5); err != nil {
		t.Fatal(err)
	}
	r.SetSummary(status.Fields{{Key: "reused", Value: "90/100"}})
	if err := r.Ready(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.Active(ctx); err != nil {
		t.Fatal(err)
	}
	if err := r.Succeeded(ctx); err != nil {
		t.Fatal(err)
	}
	ups := v.e.Updates("job-sum")
	if len(ups) != 4 {
		t.Fatalf("%d updates", len(ups))
	}
	for i, u := range ups {
		if err := status.Validate(u.StatusDetails); err != nil {
			t.Errorf("update %d breaks AWS limits: %v", i, err)
		}
		_, has := u.StatusDetails["reused"]
		if want := i > 0; has != want || has && u.StatusDetails["reused"] != "90/100" {
			t.Errorf("update %d (%s) reused=%q, want present %v: %v", i, u.StatusDetails["self_test"], u.StatusDetails["reused"], want, u.StatusDetails)
		}
		if i > 0 && len(u.StatusDetails) != status.MaxPairs {
			t.Errorf("update %d has %d pairs, want the budget filled", i, len(u.StatusDetails))
		}
	}
}
