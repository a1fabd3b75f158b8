package main

import (
	"encoding/json"
	"testing"

	"github.com/google/go-cmp/cmp"
)

func TestCountFailures(t *testing.T) {
	for _, tc := range []struct {
		name, json string
		want       int
		cell       string
	}{
		{"count", `{"failures": 2}`, 2, "2"},
		{"zero", `{"failures": 0}`, 0, "0"},
		{"listed", `{"failures": ["run 3: wrong slot", "run 9: job FAILED"]}`, 2, "2<br>run 3: wrong slot<br>run 9: job FAILED"},
		{"empty list", `{"failures": []}`, 0, "0"},
		{"null", `{"failures": null}`, 0, "0"},
		{"absent", `{"runs": 4}`, 0, ""},
		{"unknown shape", `{"failures": "yes"}`, 1, "yes"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			var m map[string]any
			if err := json.Unmarshal([]byte(tc.json), &m); err != nil {
				t.Fatal(err)
			}
			got := countFailures(m)
			var cellGot string
			if v, ok := m["failures"]; ok {
				cellGot = cell(v)
			}
			if diff := cmp.Diff([]any{tc.want, tc.cell}, []any{got, cellGot}); diff != "" {
				t.Errorf("(-want +got)\n%s", diff)
			}
		})
	}
}

func TestRecordsBecomeATable(t *testing.T) {
	var m map[string]any
	if err := json.Unmarshal([]byte(`{"targets":[{"target":"FuzzA","execs":10,"log":"/tmp/x"},{"target":"FuzzB","execs":20,"result":"fail"}],"tags":["a","b"]}`), &m); err != nil {
		t.Fatal(err)
	}
	rows, ok := records(m["targets"])
	if !ok {
		t.Fatal("targets not records")
	}
	want := "\n| execs | result | target |\n|---|---|---|\n| 10 |  | FuzzA |\n| 20 | fail | FuzzB |\n"
	if diff := cmp.Diff(want, table(rows)); diff != "" {
		t.Errorf("(-want +got)\n%s", diff)
	}
	if _, ok := records(m["tags"]); ok {
		t.Error("a list of strings is not records")
	}
}
