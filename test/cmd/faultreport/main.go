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
		if v, ok := m["failures"].(float64); ok {
			failures += int(v)
		}
		name := strings.TrimSuffix(filepath.Base(f), ".json")
		fmt.Fprintf(&b, "\n## %s\n\n| measure | value |\n|---|---|\n", name)
		keys := make([]string, 0, len(m))
		for k := range m {
			keys = append(keys, k)
		}
		sort.Strings(keys)
		for _, k := range keys {
			fmt.Fprintf(&b, "| %s | %s |\n", strings.ReplaceAll(k, "_", " "), cell(m[k]))
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
