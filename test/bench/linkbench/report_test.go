package main

import (
	"bytes"
	"os"
	"path/filepath"
	"strings"
	"testing"
)

// The report's curl target line comes from httpvscurl's JSON line: judged against curl -o FILE
// + fsync, with the other two baselines beside it; an older httpvscurl's line (one baseline)
// or a failed run gives no target line.
func TestCurlTargetLine(t *testing.T) {
	dir := t.TempDir()
	write := func(name, s string) string {
		p := filepath.Join(dir, name)
		if err := os.WriteFile(p, []byte(s), 0o644); err != nil {
			t.Fatal(err)
		}
		return p
	}
	human := "httpvscurl: rep 0: ...\n"
	tests := []struct {
		name, out string
		want      []string // substrings of the target line; nil: no curl line
	}{
		{"met", human + `{"bench":"httpvscurl","size_bytes":67108864,"reps":5,"proxy":true,"rate_kbps":0,"otanet_median_s":0.4,"curl_null_median_s":0.3,"curl_file_median_s":0.32,"curl_fsync_median_s":0.4,"ratio_null":0.75,"ratio_file":0.8,"ratio_fsync":1.0}`,
			[]string{"64 MiB through tinyproxy", "1.00 of `curl -o FILE` + fsync (0.400 s against 0.400 s, median of 5; target at least 0.9: met)", "0.80 of `curl -o FILE`", "0.75 of `curl -o /dev/null`"}},
		{"missed", human + `{"bench":"httpvscurl","size_bytes":67108864,"reps":3,"proxy":false,"rate_kbps":0,"otanet_median_s":0.5,"curl_null_median_s":0.3,"curl_file_median_s":0.35,"curl_fsync_median_s":0.4,"ratio_null":0.6,"ratio_file":0.7,"ratio_fsync":0.8}`,
			[]string{"direct", "0.80 of `curl -o FILE` + fsync", "target at least 0.9: **missed**"}},
		{"older httpvscurl", human + `{"bench":"httpvscurl","size_bytes":67108864,"reps":3,"proxy":true,"rate_kbps":0,"curl_median_s":0.29,"otanet_median_s":0.6,"ratio":0.48}`, nil},
		{"paced link", human + `{"bench":"httpvscurl","size_bytes":67108864,"reps":3,"proxy":true,"rate_kbps":12500,"otanet_median_s":0.5,"curl_null_median_s":0.5,"curl_file_median_s":0.5,"curl_fsync_median_s":0.5,"ratio_null":1,"ratio_file":1,"ratio_fsync":1}`, nil},
		{"failed", "httpvscurl: curl is not installed\nhttpvscurl failed (exit 1)\n", nil},
	}
	for _, tc := range tests {
		t.Run(tc.name, func(t *testing.T) {
			var w bytes.Buffer
			(&report{}).targets(&w, "", write(strings.ReplaceAll(tc.name, " ", "_"), tc.out))
			var line string
			for _, l := range strings.Split(w.String(), "\n") {
				if strings.HasPrefix(l, "- HTTP download") {
					line = l
				}
			}
			if tc.want == nil {
				if line != "" {
					t.Fatalf("curl target line %q, want none", line)
				}
				return
			}
			for _, s := range tc.want {
				if !strings.Contains(line, s) {
					t.Errorf("curl target line %q lacks %q", line, s)
				}
			}
			if !strings.Contains(line, "Judged against curl -o FILE + fsync") {
				t.Errorf("curl target line %q does not say what it is judged against", line)
			}
		})
	}
}
