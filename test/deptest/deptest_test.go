package deptest

import (
	"strings"
	"testing"
)

const module = "github.com/gwota/gwota"

// TestSplit is the privilege split at link time, for both binaries.
func TestSplit(t *testing.T) {
	const privileged = "the writer's privileged code: ota-net parses internet input"
	for _, c := range []DepChecker{
		{Package: module + "/cmd/ota-net",
			BadDeps: map[string]string{
				module + "/writer/server": privileged, module + "/writer/engine": privileged,
				module + "/writer/target": privileged, module + "/writer/journal": privileged,
				module + "/writer/verify": privileged, module + "/writer/boot": privileged,
				module + "/writer/ext": privileged, module + "/writer/selftest": privileged,
				module + "/writer/config": privileged, module + "/writer/internal": privileged,
				"github.com/mochi-mqtt/server/v2": "a test broker",
			},
			WantDeps: map[string]string{
				module + "/writer/client": "ota-net talks to the writer", module + "/writer/api": "the writer API it calls",
				module + "/netagent": "the agent itself", "github.com/eclipse/paho.golang": "MQTT to AWS IoT",
			},
		},
		{Package: module + "/cmd/ota-writer",
			BadDeps: map[string]string{
				"github.com/eclipse/paho.golang": "MQTT: the writer has no network", "github.com/mochi-mqtt/server/v2": "MQTT: the writer has no network",
				module + "/netagent": "the network agent", "github.com/aws/aws-sdk-go-v2": "AWS: the writer has no network",
			},
			WantDeps: map[string]string{module + "/writer/server": "it serves the API", module + "/writer/engine": "it is the writer"},
		},
	} {
		t.Run(c.Package, func(t *testing.T) { c.Check(t) })
	}
}

// The checker itself: each kind of problem is reported, and a listed package that does not
// exist is a failure, not a skip.
func TestChecker(t *testing.T) {
	const pkg = module + "/status" // links grpc and the generated protobuf code, nothing of the writer
	tests := []struct {
		name string
		c    DepChecker
		want []string // substrings, one per expected problem, in order
	}{
		{"clean", DepChecker{Package: pkg, BadDeps: set(module + "/writer/server"), WantDeps: set(module + "/proto/ota/v1")}, nil},
		{"forbidden package does not exist", DepChecker{Package: pkg, BadDeps: set(module+"/writer/server", module+"/writer/no-such-package")},
			[]string{"forbidden package " + module + "/writer/no-such-package does not exist"}},
		{"forbidden module does not exist", DepChecker{Package: pkg, BadDeps: set("github.com/no-such-owner/no-such-module")},
			[]string{"forbidden package github.com/no-such-owner/no-such-module does not exist"}},
		{"required package does not exist", DepChecker{Package: pkg, BadDeps: set(module + "/writer/server"), WantDeps: set(module + "/proto/ota/v2")},
			[]string{"required package " + module + "/proto/ota/v2 does not exist", "does not link " + module + "/proto/ota/v2"}},
		{"forbidden package linked", DepChecker{Package: pkg, BadDeps: set("google.golang.org/grpc/codes")},
			[]string{pkg + " links google.golang.org/grpc/codes (forbidden: google.golang.org/grpc/codes: why)"}},
		{"forbidden tree linked, by prefix", DepChecker{Package: pkg, BadDeps: set(module + "/proto")},
			[]string{pkg + " links " + module + "/proto/ota/v1 (forbidden: " + module + "/proto: why)"}},
		{"required package not linked", DepChecker{Package: pkg, BadDeps: set(module + "/writer/engine"), WantDeps: set(module + "/writer/server")},
			[]string{pkg + " does not link " + module + "/writer/server, which it must: why"}},
		{"package to check does not exist", DepChecker{Package: module + "/cmd/no-such-binary", BadDeps: set(module + "/writer/server")},
			[]string{"go list -deps " + module + "/cmd/no-such-binary"}},
		{"nothing forbidden", DepChecker{Package: pkg}, []string{"no forbidden packages listed"}},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			got := tt.c.Problems(t.Context())
			if tt.want == nil {
				if len(got) != 0 {
					t.Fatalf("problems %q, want none", got)
				}
				return
			}
			ok := len(got) == len(tt.want)
			for i := range got {
				ok = ok && strings.Contains(got[i], tt.want[i])
			}
			if !ok {
				t.Errorf("problems:\n%s\nwant %d, containing in order:\n%s", strings.Join(got, "\n"), len(tt.want), strings.Join(tt.want, "\n"))
			}
		})
	}
}

// set gives each package the reason "why".
func set(pkgs ...string) map[string]string {
	m := map[string]string{}
	for _, p := range pkgs {
		m[p] = "why"
	}
	return m
}
