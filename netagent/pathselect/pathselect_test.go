package pathselect

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

func TestOrder(t *testing.T) {
	both := Offer{MQTT: true, HTTP: true}
	const quota = QuotaBytesPerSecond
	sec := time.Second
	tests := []struct {
		name    string
		cfg     Config
		observe []Sample // measured over 8 s
		offer   Offer
		want    []string
	}{
		{"nothing known: MQTT first", Config{}, nil, both, []string{MQTT, HTTP}},
		{"configured above quota", Config{LinkBandwidth: quota + 1}, nil, both, []string{HTTP, MQTT}},
		{"configured at quota", Config{LinkBandwidth: quota}, nil, both, []string{MQTT, HTTP}},
		{"configured below quota", Config{LinkBandwidth: 100_000}, nil, both, []string{MQTT, HTTP}},
		{"configured wins over measured", Config{LinkBandwidth: 100_000}, []Sample{{Protocol: HTTP, BytesPerSecond: 10 * quota}}, both, []string{MQTT, HTTP}},
		{"HTTP measured above quota", Config{}, []Sample{{Protocol: HTTP, BytesPerSecond: 2 * quota}}, both, []string{HTTP, MQTT}},
		{"HTTP measured below quota", Config{}, []Sample{{Protocol: HTTP, BytesPerSecond: quota / 2}}, both, []string{MQTT, HTTP}},
		{"MQTT held by the quota", Config{}, []Sample{{Protocol: MQTT, BytesPerSecond: 0.95 * quota}}, both, []string{HTTP, MQTT}},
		{"MQTT held by the link", Config{}, []Sample{{Protocol: MQTT, BytesPerSecond: quota / 4}}, both, []string{MQTT, HTTP}},
		{"last measurement wins", Config{}, []Sample{{Protocol: HTTP, BytesPerSecond: 4 * quota}, {Protocol: HTTP, BytesPerSecond: quota / 4}}, both, []string{MQTT, HTTP}},
		{"explicit mqtt wins", Config{Mode: OnlyMQTT, LinkBandwidth: 100 * quota}, nil, both, []string{MQTT}},
		{"explicit http wins", Config{Mode: OnlyHTTP, LinkBandwidth: 1000}, nil, both, []string{HTTP}},
		{"explicit http, only MQTT offered", Config{Mode: OnlyHTTP}, nil, Offer{MQTT: true}, []string{MQTT}},
		{"explicit mqtt, only HTTP offered", Config{Mode: OnlyMQTT}, nil, Offer{HTTP: true}, []string{HTTP}},
		{"auto, only MQTT offered", Config{LinkBandwidth: 100 * quota}, nil, Offer{MQTT: true}, []string{MQTT}},
		{"nothing offered", Config{}, nil, Offer{}, nil},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			s := New(tt.cfg)
			for _, o := range tt.observe {
				n := int64(o.BytesPerSecond * 8)
				if err := s.Observe(o.Protocol, n, 8*sec); err != nil {
					t.Fatal(err)
				}
			}
			got, why := s.Order(tt.offer)
			if d := cmp.Diff(tt.want, got); d != "" {
				t.Errorf("order (-want +got), why %q:\n%s", why, d)
			}
			if why == "" {
				t.Error("no reason given")
			}
		})
	}
}

func TestSmallDownloadsAreNotMeasurements(t *testing.T) {
	s := New(Config{})
	// 512 KiB in 1 ms would read as 500 MiB/s: a round trip, not the link.
	_ = s.Observe(HTTP, MinSampleBytes-1, time.Millisecond)
	_ = s.Observe("FTP", 1<<30, time.Second)
	_ = s.Observe(HTTP, 1<<30, 0)
	if s.Last() != nil {
		t.Fatalf("measurement %+v recorded", s.Last())
	}
}

func TestEstimatePersists(t *testing.T) {
	file := filepath.Join(t.TempDir(), "bandwidth.json")
	s := New(Config{File: file})
	if err := s.Observe(HTTP, 8<<20, time.Second); err != nil {
		t.Fatal(err)
	}
	again := New(Config{File: file})
	if got, _ := again.Order(Offer{MQTT: true, HTTP: true}); got[0] != HTTP {
		t.Fatalf("after a restart the measured %v was forgotten: order %v", again.Last(), got)
	}
	if again.Last().BytesPerSecond != 8<<20 {
		t.Fatalf("persisted %+v", again.Last())
	}
	// A damaged file is no measurement, not a failure.
	for _, bad := range []string{"{", `{"protocol":"HTTP","bytes_per_second":-5}`, `{"protocol":"X","bytes_per_second":5}`} {
		if err := os.WriteFile(file, []byte(bad), 0o600); err != nil {
			t.Fatal(err)
		}
		if l := New(Config{File: file}).Last(); l != nil {
			t.Errorf("%s loaded as %+v", bad, l)
		}
	}
}

func TestFallback(t *testing.T) {
	tests := []struct {
		err  error
		want bool
	}{
		{nil, false},
		{errors.New("plain"), false},
		{status.Errorf(otav1.Reason_REASON_DOWNLOAD_FAILED, "http 403"), true},
		{fmt.Errorf("wrapped: %w", status.Errorf(otav1.Reason_REASON_PROXY_FAILED, "proxy 502")), true},
		{status.Errorf(otav1.Reason_REASON_MOMENTUM_ABORT, "no block"), true},
		{status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "writer"), false},
		{status.Errorf(otav1.Reason_REASON_FAILED_INGEST, "bad request"), false},
		{status.Errorf(otav1.Reason_REASON_JOB_DOCUMENT_INVALID, "doc"), false},
		{status.Errorf(otav1.Reason_REASON_USER_ABORT, "canceled"), false},
	}
	for _, tt := range tests {
		if got := Fallback(tt.err); got != tt.want {
			t.Errorf("Fallback(%v) = %v, want %v", tt.err, got, tt.want)
		}
	}
}

func TestParseBandwidth(t *testing.T) {
	tests := []struct {
		in   string
		want int64
		bad  bool
	}{
		{in: "", want: 0},
		{in: "0", want: 0},
		{in: "600000", want: 600000},
		{in: "20Mbit/s", want: 2_500_000},
		{in: "20 Mbit/s", want: 2_500_000},
		{in: "20Mbps", want: 2_500_000},
		{in: "1Gbit", want: 125_000_000},
		{in: "512kbit/s", want: 64_000},
		{in: "2.5MB/s", want: 2_500_000},
		{in: "512KiB/s", want: 524288},
		{in: "1MiB", want: 1 << 20},
		{in: "fast", bad: true},
		{in: "20 furlongs", bad: true},
		{in: "-5MB", bad: true},
	}
	for _, tt := range tests {
		got, err := ParseBandwidth(tt.in)
		if (err != nil) != tt.bad || got != tt.want {
			t.Errorf("ParseBandwidth(%q) = %d, %v; want %d, error %v", tt.in, got, err, tt.want, tt.bad)
		}
	}
}

func TestParseMode(t *testing.T) {
	for in, want := range map[string]Mode{"": Auto, "auto": Auto, "MQTT": OnlyMQTT, " http ": OnlyHTTP} {
		if got, err := ParseMode(in); err != nil || got != want {
			t.Errorf("ParseMode(%q) = %q, %v", in, got, err)
		}
	}
	if _, err := ParseMode("ftp"); err == nil {
		t.Error("ftp accepted")
	}
}
