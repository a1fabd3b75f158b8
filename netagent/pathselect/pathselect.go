// Package pathselect decides which protocol downloads a file when a job offers both MQTT
// streams and presigned HTTP. AWS IoT Core paces every MQTT connection to 512 KiB/s each way;
// presigned HTTP from S3 has no such cap. So when the link is faster than the quota HTTP is
// the faster path, and when it is not, MQTT (the connection ota-net holds anyway: no new TLS
// session, no proxy in the way) delivers as fast. An operator's explicit protocol always wins.
package pathselect

import (
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"os"
	"strconv"
	"strings"
	"sync"
	"time"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
)

// Protocol names as the job document spells them (jobdoc.ProtocolMQTT, jobdoc.ProtocolHTTP).
const (
	MQTT = "MQTT"
	HTTP = "HTTP"
)

// QuotaBytesPerSecond is AWS IoT Core's per-connection throughput quota (512 KiB/s).
const QuotaBytesPerSecond = 512 * 1024

// Sampling thresholds.
const (
	// MinSampleBytes: a download that moved less says more about round trips and set-up than
	// about the link, and is not used as a measurement.
	MinSampleBytes = 1 << 20
	// quotaBound: an MQTT download at this fraction of the quota or more was held by the
	// quota, not by the link: the link is at least as fast, and only HTTP can tell how much.
	quotaBound = 0.9
)

// Mode is the operator's choice.
type Mode string

// Modes.
const (
	Auto     Mode = "auto"
	OnlyMQTT Mode = "mqtt"
	OnlyHTTP Mode = "http"
)

// ParseMode reads "auto", "mqtt" or "http" ("" is auto).
func ParseMode(s string) (Mode, error) {
	switch m := Mode(strings.ToLower(strings.TrimSpace(s))); m {
	case "":
		return Auto, nil
	case Auto, OnlyMQTT, OnlyHTTP:
		return m, nil
	}
	return "", fmt.Errorf("protocol %q: auto, mqtt or http", s)
}

// Offer is what one file can be fetched with: offered by the job and wired in ota-net.
type Offer struct{ MQTT, HTTP bool }

// Sample is a measured download.
type Sample struct {
	Protocol       string    `json:"protocol"`
	BytesPerSecond float64   `json:"bytes_per_second"`
	At             time.Time `json:"at"`
}

// Config of a Selector.
type Config struct {
	Mode Mode
	// LinkBandwidth is the operator's statement of the link's speed in bytes per second (0:
	// unknown). When set it decides; measurements decide only when it is not.
	LinkBandwidth int64
	// File, when set, keeps the last measurement across restarts (an A/B update restarts
	// ota-net every time, so an estimate only in memory would rarely be used).
	File string
}

// Selector picks protocols. Safe for concurrent use.
type Selector struct {
	cfg Config

	mu   sync.Mutex
	last *Sample
}

// New returns a Selector, loading the persisted measurement if there is one (a missing or
// unreadable file is no measurement: the choice then falls back to the configuration).
func New(cfg Config) *Selector {
	if cfg.Mode == "" {
		cfg.Mode = Auto
	}
	s := &Selector{cfg: cfg}
	if cfg.File != "" {
		if data, err := os.ReadFile(cfg.File); err == nil {
			var smp Sample
			if json.Unmarshal(data, &smp) == nil && smp.BytesPerSecond > 0 && !math.IsInf(smp.BytesPerSecond, 0) &&
				(smp.Protocol == MQTT || smp.Protocol == HTTP) {
				s.last = &smp
			}
		}
	}
	return s
}

// Last returns the last measurement (nil: none).
func (s *Selector) Last() *Sample {
	s.mu.Lock()
	defer s.mu.Unlock()
	if s.last == nil {
		return nil
	}
	c := *s.last
	return &c
}

// Order returns the protocols to try for a file, best first, and why the first was chosen.
// Auto mode falls back to the other protocol (the second entry); an explicit mode tries only
// its protocol, or the other when the file does not offer it. Empty: nothing usable.
func (s *Selector) Order(o Offer) (order []string, why string) {
	switch {
	case !o.MQTT && !o.HTTP:
		return nil, "no usable protocol"
	case !o.HTTP:
		return []string{MQTT}, "only MQTT offered"
	case !o.MQTT:
		return []string{HTTP}, "only HTTP offered"
	}
	switch s.cfg.Mode {
	case OnlyMQTT:
		return []string{MQTT}, "protocol = mqtt"
	case OnlyHTTP:
		return []string{HTTP}, "protocol = http"
	}
	fast, why := s.faster()
	if fast {
		return []string{HTTP, MQTT}, why
	}
	return []string{MQTT, HTTP}, why
}

// faster tells whether the link is believed faster than the MQTT quota.
func (s *Selector) faster() (bool, string) {
	if bw := s.cfg.LinkBandwidth; bw > 0 {
		return bw > QuotaBytesPerSecond, fmt.Sprintf("link_bandwidth %s vs MQTT quota %s", FormatRate(float64(bw)), FormatRate(QuotaBytesPerSecond))
	}
	last := s.Last()
	switch {
	case last == nil:
		return false, "link speed unknown"
	case last.Protocol == HTTP:
		return last.BytesPerSecond > QuotaBytesPerSecond, fmt.Sprintf("HTTP measured %s vs MQTT quota %s", FormatRate(last.BytesPerSecond), FormatRate(QuotaBytesPerSecond))
	default:
		// An MQTT measurement cannot exceed the quota: near it, the quota held the download
		// back and HTTP may well be faster (its own measurement decides next time); well below
		// it, the link (or the round trip) was the limit and HTTP would not do better.
		return last.BytesPerSecond >= quotaBound*QuotaBytesPerSecond, fmt.Sprintf("MQTT measured %s vs MQTT quota %s", FormatRate(last.BytesPerSecond), FormatRate(QuotaBytesPerSecond))
	}
}

// Observe records a completed download of n bytes over proto that took d. Downloads under
// MinSampleBytes are ignored. The last measurement replaces the one before: the link a
// gateway has now is what counts (a modem may have changed networks).
func (s *Selector) Observe(proto string, n int64, d time.Duration) error {
	if n < MinSampleBytes || d <= 0 || (proto != MQTT && proto != HTTP) {
		return nil
	}
	smp := Sample{Protocol: proto, BytesPerSecond: float64(n) / d.Seconds(), At: time.Now().UTC().Truncate(time.Second)}
	s.mu.Lock()
	s.last = &smp
	s.mu.Unlock()
	if s.cfg.File == "" {
		return nil
	}
	data, _ := json.Marshal(smp)
	tmp := s.cfg.File + ".tmp"
	if err := os.WriteFile(tmp, data, 0o600); err != nil {
		return fmt.Errorf("bandwidth estimate: %w", err)
	}
	if err := os.Rename(tmp, s.cfg.File); err != nil {
		return fmt.Errorf("bandwidth estimate: %w", err)
	}
	// Not fsynced: a lost estimate costs one download at the configured choice.
	return nil
}

// Fallback tells whether err, which ended a download, is a failure of the path (the server,
// the URL, the proxy, the stream) that the other protocol may not share. Failures of the
// writer, of the job (canceled, terminal) or of the document are not: the other protocol
// would meet them too.
func Fallback(err error) bool {
	if err == nil {
		return false
	}
	var se *status.Error
	if !errors.As(err, &se) {
		return false
	}
	switch se.Reason {
	case otav1.Reason_REASON_DOWNLOAD_FAILED, otav1.Reason_REASON_PROXY_FAILED, otav1.Reason_REASON_MOMENTUM_ABORT:
		return true
	}
	return false
}

// ParseBandwidth reads a link speed: a number with a unit, bits ("20Mbit/s", "512kbit",
// "1Gbps") or bytes ("2.5MB/s", "512KiB/s", "600000" with no unit is bytes per second).
// Decimal prefixes are powers of 1000, binary ones (KiB, MiB, GiB) of 1024. "" or "0" is 0
// (unknown). The result is bytes per second.
func ParseBandwidth(s string) (int64, error) {
	t := strings.TrimSpace(s)
	if t == "" {
		return 0, nil
	}
	t = strings.TrimSuffix(strings.TrimSuffix(t, "/s"), "ps")
	i := strings.IndexFunc(t, func(r rune) bool { return !(r >= '0' && r <= '9' || r == '.') })
	num, unit := t, ""
	if i >= 0 {
		num, unit = t[:i], strings.TrimSpace(t[i:])
	}
	v, err := strconv.ParseFloat(num, 64)
	if err != nil || v < 0 || math.IsInf(v, 0) || math.IsNaN(v) {
		return 0, fmt.Errorf("bandwidth %q: not a number with a unit (e.g. 20Mbit/s, 2MB/s)", s)
	}
	mult, ok := map[string]float64{
		"": 1, "B": 1,
		"kB": 1e3, "KB": 1e3, "MB": 1e6, "GB": 1e9,
		"KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
		"bit": 1.0 / 8, "kbit": 1e3 / 8, "Kbit": 1e3 / 8, "Mbit": 1e6 / 8, "Gbit": 1e9 / 8,
		"b": 1.0 / 8, "kb": 1e3 / 8, "Kb": 1e3 / 8, "Mb": 1e6 / 8, "Gb": 1e9 / 8,
	}[unit]
	if !ok {
		return 0, fmt.Errorf("bandwidth %q: unknown unit %q (bit, kbit, Mbit, Gbit, B, kB, MB, GB, KiB, MiB, GiB; per second)", s, unit)
	}
	bps := v * mult
	if bps > math.MaxInt64/2 {
		return 0, fmt.Errorf("bandwidth %q: too large", s)
	}
	return int64(bps), nil
}

// FormatRate prints bytes per second readably.
func FormatRate(bps float64) string {
	switch {
	case bps >= 1<<20:
		return fmt.Sprintf("%.1f MiB/s", bps/(1<<20))
	case bps >= 1<<10:
		return fmt.Sprintf("%.0f KiB/s", bps/(1<<10))
	}
	return fmt.Sprintf("%.0f B/s", bps)
}
