package main

import (
	"bytes"
	"context"
	"strings"
	"testing"
	"time"
)

// TestDemo runs the README's demo both ways and checks what it tells the reader.
func TestDemo(t *testing.T) {
	for _, tc := range []struct {
		name string
		o    opts
		want []string
	}{
		{"good image", opts{size: 1 << 20, protocol: "MQTT"}, []string{
			"IN_PROGRESS self_test=receiving", "IN_PROGRESS self_test=ready", "REBOOT", "IN_PROGRESS self_test=active",
			"SUCCEEDED   self_test=accepted", "final: SUCCEEDED", "OK: slot b holds the image",
		}},
		{"corrupt image", opts{size: 1 << 20, protocol: "MQTT", corrupt: true}, []string{
			"IN_PROGRESS self_test=receiving", "FAILED      self_test=aborted progress=16/16 reason=sig_check_failed error_code=1001",
			"final: FAILED", "OK: refused",
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			ctx, cancel := context.WithTimeout(context.Background(), 3*time.Minute)
			defer cancel()
			var out bytes.Buffer
			if err := run(ctx, &out, tc.o); err != nil {
				t.Fatalf("%v\n%s", err, out.String())
			}
			s := out.String()
			at := 0
			for _, w := range tc.want {
				i := strings.Index(s[at:], w)
				if i < 0 {
					t.Fatalf("output lacks %q (in order):\n%s", w, s)
				}
				at += i + len(w)
			}
			if tc.o.corrupt && strings.Contains(s, "REBOOT") {
				t.Fatalf("the corrupt image led to a reboot:\n%s", s)
			}
		})
	}
}
