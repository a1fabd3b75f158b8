// Command faultreport turns the JSON summaries that the fault suites write into
// GWOTA_FAULTS_OUT (crash.json, powercut.json, hostile.json, fuzz.json, ...) into the
// reliability report, docs/RELIABILITY.md. scripts/faults.sh runs the suites and then this.
package main

import (
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"path/filepath"
	"runtime"
	"sort"
	"strings"
	"time"
)

func main() {
	in := flag.String("in", "", "directory holding the suites' JSON summaries")
	out := flag.String("o", "docs/RELIABILITY.md", "report to write")
	cmd := flag.String("cmd", "", "the command that produced the summaries (printed in the report)")
	commit := flag.String("commit", "", "the source revision the suites ran on (printed in the report)")
	flag.Parse()
	if *in == "" {
		fmt.Fprintln(os.Stderr, "faultreport: -in is required")
		os.Exit(2)
	}
	files, err := filepath.Glob(filepath.Join(*in, "*.json"))
	if err != nil || len(files) == 0 {
		fmt.Fprintf(os.Stderr, "faultreport: no summaries in %s (%v)\n", *in, err)
		os.Exit(1)
	}
	sort.Strings(files)
	var b strings.Builder
	host, _ := os.Hostname()
	fmt.Fprintf(&b, "# Reliability report\n\n")
	fmt.Fprintf(&b, "Written by `scripts/faults.sh` on %s (%s/%s, %d CPUs, host %s).\n", time.Now().UTC().Format("2006-01-02 15:04 MST"), runtime.GOOS, runtime.GOARCH, runtime.NumCPU(), host)
	if *cmd != "" {
		fmt.Fprintf(&b, "Command: `%s`.\n", *cmd)
	}
	if *commit != "" {
		fmt.Fprintf(&b, "Source: `%s`.\n", *commit)
	}
	fmt.Fprintf(&b, "\nEach section is one suite's own summary; `failures` must be 0.\n")
	failures := 0
	for _, f := range files {
		raw, err := os.ReadFile(f)
		if err != nil {
			fmt.Fprintln(os.Stderr, "faultreport:", err)
			os.Exit(1)
		}
		var m map[string]any
		if err := json.Unmarshal(raw, &m); err != nil {
			fmt.Fprintf(os.Stderr, "faultreport: %s: %v\n", f, err)
			os.Exit(1)
		}
		failures += countFailures(m)
		name := strings.TrimSuffix(filepath.Base(f), ".json")
		fmt.Fprintf(&b, "\n## %s\n\n| measure | value |\n|---|---|\n", name)
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		var tables []string
		for _, k := range keys {
			if rows, ok := records(m[k]); ok {
				tables = append(tables, k)
				fmt.Fprintf(&b, "| %s | %d, below |\n", strings.ReplaceAll(k, "_", " "), len(rows))
				continue
			}
			fmt.Fprintf(&b, "| %s | %s |\n", strings.ReplaceAll(k, "_", " "), cell(m[k]))
		}
		for _, k := range tables {
			rows, _ := records(m[k])
			b.WriteString(table(rows))
		}
	}
	fmt.Fprintf(&b, "\nTotal failures: %d.\n", failures)
	if err := os.WriteFile(*out, []byte(b.String()), 0o644); err != nil {
		fmt.Fprintln(os.Stderr, "faultreport:", err)
		os.Exit(1)
	}
	if failures > 0 {
		fmt.Fprintf(os.Stderr, "faultreport: %d failures\n", failures)
		os.Exit(1)
	}
}

// cell renders a JSON value for a table cell: maps as "k: v" lists, lists joined.
func cell(v any) string {
	switch x := v.(type) {
	case map[string]any:
		keys := make([]string, 0, len(x))
		for k := range x {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		parts := make([]string, 0, len(keys))
		for _, k := range keys {
			parts = append(parts, k+": "+cell(x[k]))
		}
		return strings.Join(parts, "<br>")
	case []any:
		parts := make([]string, 0, len(x))
		for _, e := range x {
			parts = append(parts, cell(e))
		}
		return strings.Join(parts, "<br>")
	case float64:
		if x == float64(int64(x)) {
			return fmt.Sprint(int64(x))
		}
		return fmt.Sprintf("%.2f", x)
	default:
		s := fmt.Sprint(x)
		return strings.NewReplacer("|", "\\|", "\n", " ").Replace(s)
	}
}

// countFailures reads a suite's failures, a count or the list of them (null: none), and
// leaves in m what the report prints: the count, followed by the failures when listed. A
// listed failure must count: the report's total is what says the run was clean.
func countFailures(m map[string]any) int {
	v, ok := m["failures"]
	if !ok {
		return 0
	}
	switch v := v.(type) {
	case float64:
		return int(v)
	case []any:
		m["failures"] = append([]any{float64(len(v))}, v...)
		return len(v)
	case nil:
		m["failures"] = float64(0)
		return 0
	default:
		// Unknown shape: count it as a failure rather than hide it.
		return 1
	}
}

// records is a list of JSON objects (fuzz.json's targets): one row each, not one cell.
func records(v any) ([]map[string]any, bool) {
	l, ok := v.([]any)
	if !ok || len(l) == 0 {
		return nil, false
	}
	rows := make([]map[string]any, 0, len(l))
	for _, e := range l {
		r, ok := e.(map[string]any)
		if !ok {
			return nil, false
		}
		rows = append(rows, r)
	}
	return rows, true
}

// table renders records with the union of their keys as columns (logs and per-run paths,
// which name a temporary directory, left out).
func table(rows []map[string]any) string {
	seen := map[string]bool{"log": true}
	var cols []string
	for _, r := range rows {
		for k := range r {
			if !seen[k] {
				seen[k] = true
				cols = append(cols, k)
			}
		}
	}
	sort.Strings(cols)
	var b strings.Builder
	b.WriteString("\n| " + strings.ReplaceAll(strings.Join(cols, " | "), "_", " ") + " |\n|")
	for range cols {
		b.WriteString("---|")
	}
	b.WriteString("\n")
	for _, r := range rows {
		b.WriteString("|")
		for _, c := range cols {
			v := ""
			if x, ok := r[c]; ok {
				v = cell(x)
			}
			b.WriteString(" " + v + " |")
		}
		b.WriteString("\n")
	}
	return b.String()
}
