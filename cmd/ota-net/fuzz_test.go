package main

import (
	"net/url"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/BurntSushi/toml"
	"github.com/google/go-cmp/cmp"
)

// FuzzConfig: any bytes as ota-net's configuration are refused or give a configuration every
// later step can rely on: a broker URL with a host and a usable scheme (mutual TLS files for
// mqtts), a thing name that is a valid MQTT client id and topic level (no '/', '+', '#'),
// absolute paths, stream settings within AWS's limits. Never a panic; an accepted
// configuration survives a TOML round trip.
func FuzzConfig(f *testing.F) {
	f.Add([]byte(example))
	if b, err := os.ReadFile("example.toml"); err == nil {
		f.Add(b)
	}
	if b, err := os.ReadFile("../../deploy/config/net.toml"); err == nil {
		f.Add(b)
	}
	f.Add([]byte("broker = \"mqtt://127.0.0.1:1883\"\nthing_name = \"gw/+/#\"\n"))
	f.Add([]byte("broker = \"mqtts://h:8883\"\nthing_name = \"t\"\nkeep_alive = \"29s\"\nblock_size = 255\n"))
	f.Add([]byte("broker = \"mqtt://h\"\nthing_name = \"t\"\nquiet_period = \"-1s\"\nreport_percent_step = 101\n"))
	f.Fuzz(func(t *testing.T, data []byte) {
		c, err := parseConfig(data)
		if err != nil {
			return
		}
		if err := c.validate(); err != nil {
			return
		}
		fail := func(format string, args ...any) {
			t.Helper()
			t.Fatalf("accepted configuration breaks an invariant: "+format, args...)
		}
		u, err := url.Parse(c.Broker)
		if err != nil || u.Host == "" || (u.Scheme != "mqtt" && u.Scheme != "mqtts") {
			fail("broker %q", c.Broker)
		}
		if u.Scheme == "mqtts" && (c.CertFile == "" || c.KeyFile == "") {
			fail("mqtts without client certificate")
		}
		if c.ThingName == "" || len(c.ThingName) > 128 || strings.ContainsAny(c.ThingName, "/+#$ \x00") {
			fail("thing name %q", c.ThingName)
		}
		if !filepath.IsAbs(c.WriterSocket) || !filepath.IsAbs(c.StateDir) {
			fail("paths %q %q", c.WriterSocket, c.StateDir)
		}
		if c.BlockSize != 0 && (c.BlockSize < 256 || c.BlockSize > 128<<10) {
			fail("block size %d", c.BlockSize)
		}
		if c.BlocksPerRequest < 0 || c.RequestsInFlight < 0 || c.MaxFruitlessRounds < 0 || c.ReportPercentStep < 0 || c.ReportPercentStep > 100 {
			fail("counts %+v", c)
		}
		for _, d := range []duration{c.KeepAlive, c.SessionExpiry, c.QuietPeriod, c.MaxQuietPeriod, c.HTTPReadTimeout, c.ReportInterval, c.WriterWaitTimeout, c.SelfTestTimeout} {
			if d.Duration < 0 {
				fail("negative duration %v", d.Duration)
			}
		}
		if ka := c.KeepAlive.Duration; ka != 0 && (ka < 30*time.Second || ka > 1200*time.Second) {
			fail("keep alive %v", ka)
		}
		if c.StreamFormat != "cbor" && c.StreamFormat != "json" {
			fail("stream format %q", c.StreamFormat)
		}
		var buf strings.Builder
		if err := toml.NewEncoder(&buf).Encode(c); err != nil {
			t.Fatalf("encode: %v", err)
		}
		c2, err := parseConfig([]byte(buf.String()))
		if err != nil {
			t.Fatalf("round trip refused: %v\n%s", err, buf.String())
		}
		if d := cmp.Diff(c, c2); d != "" {
			t.Fatalf("round trip changed the configuration:\n%s\n%s", d, buf.String())
		}
	})
}
