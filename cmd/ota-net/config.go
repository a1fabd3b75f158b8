package main

import (
	"errors"
	"fmt"
	"net/url"
	"os"
	"path/filepath"
	"sort"
	"strings"
	"time"

	"github.com/BurntSushi/toml"

	"github.com/gwota/gwota/netagent/pathselect"
	"github.com/gwota/gwota/netagent/webproxy"
)

// duration reads "5s", "2m" from TOML.
type duration struct{ time.Duration }

func (d *duration) UnmarshalText(b []byte) error {
	v, err := time.ParseDuration(string(b))
	if err != nil {
		return err
	}
	if v < 0 {
		return fmt.Errorf("negative duration %q", b)
	}
	d.Duration = v
	return nil
}

// MarshalText writes the form UnmarshalText reads, so a configuration can be written back.
func (d duration) MarshalText() ([]byte, error) { return []byte(d.String()), nil }

// Config is ota-net's TOML configuration. Zero values take the documented defaults.
type Config struct {
	// Broker is mqtts://host:8883 (AWS IoT), mqtts://host:443 (ALPN), or mqtt://host:port
	// for local tests.
	Broker    string `toml:"broker"`
	ThingName string `toml:"thing_name"`
	CAFile    string `toml:"ca_file"`
	CertFile  string `toml:"cert_file"`
	KeyFile   string `toml:"key_file"`
	// ALPN forces the x-amzn-mqtt-ca protocol (automatic on port 443).
	ALPN          bool     `toml:"alpn"`
	KeepAlive     duration `toml:"keep_alive"`
	SessionExpiry duration `toml:"session_expiry"`
	// MaxPublishRate caps publishes per second on the connection (default AWS's 100; -1
	// lifts the cap for a broker without AWS's quota).
	MaxPublishRate int `toml:"max_publish_rate"`

	WriterSocket string `toml:"writer_socket"`
	StateDir     string `toml:"state_dir"`

	// Download settings.
	BlockSize          int      `toml:"block_size"`
	BlocksPerRequest   int      `toml:"blocks_per_request"`
	RequestsInFlight   int      `toml:"requests_in_flight"`
	QuietPeriod        duration `toml:"quiet_period"`
	MaxQuietPeriod     duration `toml:"max_quiet_period"`
	MaxFruitlessRounds int      `toml:"max_fruitless_rounds"`
	StreamFormat       string   `toml:"stream_format"`
	// StreamQuota is the connection's rate in bytes per second, below which blocks asked for
	// cannot have arrived (default AWS's 512 KiB/s quota; -1 lifts it for a broker without
	// AWS's quotas, as max_publish_rate does).
	StreamQuota int `toml:"stream_quota"`
	// Protocol when a job offers both: "auto" (the default: HTTP when the link is faster
	// than AWS's 512 KiB/s MQTT quota, by LinkBandwidth or else the last measured download;
	// the other protocol is the fallback), "mqtt" or "http" (only that one).
	Protocol string `toml:"protocol"`
	// PreferHTTP is the older form of protocol = "http".
	PreferHTTP bool `toml:"prefer_http"`
	// LinkBandwidth is the link's speed ("20Mbit/s", "2MB/s"; empty: unknown, measured).
	LinkBandwidth   string   `toml:"link_bandwidth"`
	HTTPReadTimeout duration `toml:"http_read_timeout"`

	// Reporting and the writer.
	ReportInterval    duration `toml:"report_interval"`
	ReportPercentStep int      `toml:"report_percent_step"`
	WriterWaitTimeout duration `toml:"writer_wait_timeout"`
	SelfTestTimeout   duration `toml:"self_test_timeout"`

	LogLevel string `toml:"log_level"`
	LogJSON  bool   `toml:"log_json"`

	// Proxy is the web proxy every connection goes through (empty: HTTPS_PROXY, HTTP_PROXY
	// and NO_PROXY from the environment decide).
	Proxy webproxy.Settings `toml:"proxy"`
}

// Defaults.
const (
	DefaultWriterSocket = "/run/ota/writer.sock"
	DefaultStateDir     = "/var/lib/ota-net"
)

func defaults() Config {
	return Config{WriterSocket: DefaultWriterSocket, StateDir: DefaultStateDir, LogLevel: "info", StreamFormat: "cbor"}
}

// loadConfig reads path over the defaults; unknown keys are refused (a typo never silently
// changes behaviour).
func loadConfig(path string) (Config, error) {
	c := defaults()
	if path == "" {
		return c, nil
	}
	data, err := os.ReadFile(path)
	if err != nil {
		return c, err
	}
	c, err = parseConfig(data)
	if err != nil {
		return c, fmt.Errorf("%s: %w", path, err)
	}
	return c, nil
}

// parseConfig decodes TOML over the defaults, refusing unknown keys.
func parseConfig(data []byte) (Config, error) {
	c := defaults()
	md, err := toml.Decode(string(data), &c)
	if err != nil {
		return c, err
	}
	if und := md.Undecoded(); len(und) > 0 {
		keys := make([]string, len(und))
		for i, k := range und {
			keys[i] = k.String()
		}
		sort.Strings(keys)
		return c, fmt.Errorf("unknown keys: %s", strings.Join(keys, ", "))
	}
	return c, nil
}

func validThing(s string) bool {
	if s == "" || len(s) > 128 {
		return false
	}
	return !strings.ContainsFunc(s, func(r rune) bool {
		return !(r >= 'a' && r <= 'z' || r >= 'A' && r <= 'Z' || r >= '0' && r <= '9' || r == ':' || r == '_' || r == '-')
	})
}

// validate checks the merged configuration.
func (c Config) validate() error {
	var errs []error
	u, err := url.Parse(c.Broker)
	switch {
	case c.Broker == "":
		errs = append(errs, errors.New("broker is required"))
	case err != nil || u.Host == "":
		errs = append(errs, fmt.Errorf("broker %q is not a URL with a host", c.Broker))
	case u.Scheme == "mqtts":
		if c.CertFile == "" || c.KeyFile == "" {
			errs = append(errs, errors.New("mqtts needs cert_file and key_file (mutual TLS)"))
		}
	case u.Scheme == "mqtt":
	default:
		errs = append(errs, fmt.Errorf("broker scheme %q: use mqtts:// (or mqtt:// for local tests)", u.Scheme))
	}
	if !validThing(c.ThingName) {
		errs = append(errs, fmt.Errorf("thing_name %q must be 1..128 of [a-zA-Z0-9:_-]", c.ThingName))
	}
	for name, p := range map[string]string{"writer_socket": c.WriterSocket, "state_dir": c.StateDir} {
		if !filepath.IsAbs(p) {
			errs = append(errs, fmt.Errorf("%s %q must be an absolute path", name, p))
		}
	}
	if c.BlockSize != 0 && (c.BlockSize < 256 || c.BlockSize > 128*1024) {
		errs = append(errs, fmt.Errorf("block_size %d outside 256..131072", c.BlockSize))
	}
	if c.BlocksPerRequest < 0 || c.RequestsInFlight < 0 || c.MaxFruitlessRounds < 0 || c.ReportPercentStep < 0 || c.ReportPercentStep > 100 {
		errs = append(errs, errors.New("blocks_per_request, requests_in_flight, max_fruitless_rounds, report_percent_step must be positive (percent at most 100)"))
	}
	if c.StreamQuota < -1 {
		errs = append(errs, fmt.Errorf("stream_quota %d: bytes per second, 0 for AWS's quota or -1 for none", c.StreamQuota))
	}
	if m, err := pathselect.ParseMode(c.Protocol); err != nil {
		errs = append(errs, err)
	} else if c.PreferHTTP && c.Protocol != "" && m != pathselect.OnlyHTTP {
		errs = append(errs, fmt.Errorf("prefer_http = true contradicts protocol = %q (prefer_http is the older protocol = \"http\")", c.Protocol))
	}
	if _, err := pathselect.ParseBandwidth(c.LinkBandwidth); err != nil {
		errs = append(errs, fmt.Errorf("link_bandwidth: %w", err))
	}
	if c.StreamFormat != "cbor" && c.StreamFormat != "json" {
		errs = append(errs, fmt.Errorf("stream_format %q: cbor or json", c.StreamFormat))
	}
	if ka := c.KeepAlive.Duration; ka != 0 && (ka < 30*time.Second || ka > 1200*time.Second) {
		errs = append(errs, fmt.Errorf("keep_alive %v outside AWS's 30s..20m", ka))
	}
	if _, err := webproxy.Resolve(c.Proxy, os.Getenv); err != nil {
		errs = append(errs, err)
	}
	switch c.LogLevel {
	case "trace", "debug", "info", "warn", "error", "off":
	default:
		errs = append(errs, fmt.Errorf("log_level %q", c.LogLevel))
	}
	return errors.Join(errs...)
}
