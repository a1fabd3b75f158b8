package depcheck

import (
	"strings"
	"testing"
)

const module = "github.com/gwota/gwota"

func TestSplit(t *testing.T) {
	for _, c := range []Checker{
		{Package: module + "/cmd/ota-net",
			Forbidden: []string{
				module + "/writer/server", module + "/writer/engine", module + "/writer/target",
				module + "/writer/journal", module + "/writer/verify", module + "/writer/boot",
				module + "/writer/ext", module + "/writer/selftest", module + "/writer/config",
			},
			Required: []string{module + "/writer/client", module + "/netagent", "github.com/eclipse/paho.golang"},
		},
		{Package: module + "/cmd/ota-writer",
			Forbidden: []string{
				"github.com/eclipse/paho.golang", "github.com/mochi-mqtt/server/v2", module + "/netagent", "github.com/aws/aws-sdk-go-v2",
			},
			Required: []string{module + "/writer/server", module + "/writer/engine"},
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
		c    Checker
		want []string // substrings, one per expected problem, in order
	}{
		{"clean", Checker{Package: pkg, Forbidden: []string{module + "/writer/server"}, Required: []string{module + "/proto/ota/v1"}}, nil},
		{"forbidden package does not exist", Checker{Package: pkg, Forbidden: []string{module + "/writer/server", module + "/writer/no-such-package"}},
			[]string{"forbidden package " + module + "/writer/no-such-package does not exist"}},
		{"forbidden module does not exist", Checker{Package: pkg, Forbidden: []string{"github.com/no-such-owner/no-such-module"}},
			[]string{"forbidden package github.com/no-such-owner/no-such-module does not exist"}},
		{"required package does not exist", Checker{Package: pkg, Forbidden: []string{module + "/writer/server"}, Required: []string{module + "/proto/ota/v2"}},
			[]string{"required package " + module + "/proto/ota/v2 does not exist", "does not link " + module + "/proto/ota/v2"}},
		{"forbidden package linked", Checker{Package: pkg, Forbidden: []string{"google.golang.org/grpc/codes"}},
			[]string{pkg + " links google.golang.org/grpc/codes (forbidden: google.golang.org/grpc/codes)"}},
		{"forbidden tree linked, by prefix", Checker{Package: pkg, Forbidden: []string{module + "/proto"}},
			[]string{pkg + " links " + module + "/proto/ota/v1 (forbidden: " + module + "/proto)"}},
		{"required package not linked", Checker{Package: pkg, Forbidden: []string{module + "/writer/engine"}, Required: []string{module + "/writer/server"}},
			[]string{pkg + " does not link " + module + "/writer/server"}},
		{"package to check does not exist", Checker{Package: module + "/cmd/no-such-binary", Forbidden: []string{module + "/writer/server"}},
			[]string{"go list -deps " + module + "/cmd/no-such-binary"}},
		{"nothing forbidden", Checker{Package: pkg}, []string{"no forbidden packages listed"}},
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
