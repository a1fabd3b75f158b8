package main

import (
	"bytes"
	"flag"
	"os"
	"path/filepath"
	"reflect"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/netagent/webproxy"
)

func writeConfig(t *testing.T, body string) string {
	t.Helper()
	p := filepath.Join(t.TempDir(), "ota-net.toml")
	if err := os.WriteFile(p, []byte(body), 0o600); err != nil {
		t.Fatal(err)
	}
	return p
}

const example = `
broker = "mqtts://xxxxxxxx-ats.iot.eu-west-1.amazonaws.com:8883"
thing_name = "gw-01"
ca_file = "/etc/ota/AmazonRootCA1.pem"
cert_file = "/etc/ota/device.crt.pem"
key_file = "/etc/ota/device.key.pem"
writer_socket = "/run/ota/writer.sock"
state_dir = "/var/lib/ota-net"
block_size = 65536
blocks_per_request = 2
requests_in_flight = 8
quiet_period = "2s"
max_fruitless_rounds = 12
prefer_http = true
report_interval = "10s"
report_percent_step = 10
writer_wait_timeout = "15m"
self_test_timeout = "3m"
keep_alive = "300s"

[proxy]
url = "http://proxy.plant.example:3128"
no_proxy = ["10.0.0.0/8"]
`

func TestConfigFileAndFlags(t *testing.T) {
	p := writeConfig(t, example)
	var stderr bytes.Buffer
	c, err := parseArgs([]string{"--config", p, "--thing-name", "gw-02", "--state-dir", "/tmp/x", "--block-size", "4096"}, &stderr)
	if err != nil {
		t.Fatal(err)
	}
	want := Config{
		Broker: "mqtts://xxxxxxxx-ats.iot.eu-west-1.amazonaws.com:8883", ThingName: "gw-02",
		CAFile: "/etc/ota/AmazonRootCA1.pem", CertFile: "/etc/ota/device.crt.pem", KeyFile: "/etc/ota/device.key.pem",
		WriterSocket: "/run/ota/writer.sock", StateDir: "/tmp/x", BlockSize: 4096, BlocksPerRequest: 2, RequestsInFlight: 8,
		QuietPeriod: duration{2 * time.Second}, MaxFruitlessRounds: 12, PreferHTTP: true, StreamFormat: "cbor",
		ReportInterval: duration{10 * time.Second}, ReportPercentStep: 10, WriterWaitTimeout: duration{15 * time.Minute},
		SelfTestTimeout: duration{3 * time.Minute}, KeepAlive: duration{300 * time.Second}, LogLevel: "info",
		Proxy: webproxy.Settings{URL: "http://proxy.plant.example:3128", NoProxy: []string{"10.0.0.0/8"}},
	}
	if diff := cmp.Diff(want, c); diff != "" {
		t.Fatalf("(-want +got)\n%s", diff)
	}
}

func TestConfigErrors(t *testing.T) {
	tests := []struct {
		name string
		file string
		args []string
		want string
	}{
		{"unknown key", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"\nbrokr = 1\n", nil, "unknown keys: brokr"},
		{"bad toml", `broker = `, nil, "ota-net.toml"},
		{"no broker", `thing_name = "x"`, nil, "broker is required"},
		{"bad scheme", `broker = "http://h:1"` + "\nthing_name=\"x\"", nil, "scheme"},
		{"mqtts without cert", `broker = "mqtts://h:8883"` + "\nthing_name=\"x\"", nil, "mutual TLS"},
		{"bad thing", `broker = "mqtt://h:1"` + "\nthing_name=\"a/b\"", nil, "thing_name"},
		{"relative socket", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"\nwriter_socket=\"w.sock\"", nil, "absolute"},
		{"block size", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"\nblock_size=100", nil, "block_size"},
		{"keep alive", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"\nkeep_alive=\"5s\"", nil, "keep_alive"},
		{"bad duration", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"\nquiet_period=\"soon\"", nil, "soon"},
		{"flag overrides to invalid", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"", []string{"--broker", "ftp://h"}, "scheme"},
		{"proxy scheme", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"\n[proxy]\nurl=\"socks5://p:1\"", nil, "proxy"},
		{"proxy password in url", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"", []string{"--proxy", "http://u:pw@p:1"}, "password_file"},
		{"proxy unknown key", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"\n[proxy]\npassword=\"pw\"", nil, "unknown keys: proxy.password"},
		{"bad protocol", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"\nprotocol=\"ftp\"", nil, "auto, mqtt or http"},
		{"prefer_http contradicts protocol", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"\nprefer_http=true\nprotocol=\"mqtt\"", nil, "contradicts"},
		{"bad link bandwidth", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"", []string{"--link-bandwidth", "fast"}, "link_bandwidth"},
		{"bad stream quota", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"", []string{"--stream-quota", "-2"}, "stream_quota"},
		{"stray argument", `broker = "mqtt://h:1"` + "\nthing_name=\"x\"", []string{"extra"}, "unexpected"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			p := writeConfig(t, tt.file)
			var stderr bytes.Buffer
			_, err := parseArgs(append([]string{"--config", p}, tt.args...), &stderr)
			if err == nil || !strings.Contains(err.Error(), tt.want) {
				t.Fatalf("err %v, want %q", err, tt.want)
			}
		})
	}
}

// TestProtocolSettings: protocol and link_bandwidth from the file, overridden by flags;
// prefer_http alone still means HTTP.
func TestProtocolSettings(t *testing.T) {
	base := `broker = "mqtt://h:1"` + "\nthing_name=\"x\"\n"
	tests := []struct {
		file, args  string
		proto, link string
		prefer      bool
	}{
		{file: base, proto: "", link: ""},
		{file: base + `protocol = "auto"` + "\n" + `link_bandwidth = "20Mbit/s"`, proto: "auto", link: "20Mbit/s"},
		{file: base + `protocol = "mqtt"`, args: "--protocol http --link-bandwidth 2MB/s", proto: "http", link: "2MB/s"},
		{file: base + `prefer_http = true`, prefer: true},
		{file: base + `prefer_http = true` + "\n" + `protocol = "http"`, proto: "http", prefer: true},
	}
	for _, tt := range tests {
		var stderr bytes.Buffer
		c, err := parseArgs(append([]string{"--config", writeConfig(t, tt.file)}, strings.Fields(tt.args)...), &stderr)
		if err != nil {
			t.Fatalf("%q %q: %v", tt.file, tt.args, err)
		}
		if c.Protocol != tt.proto || c.LinkBandwidth != tt.link || c.PreferHTTP != tt.prefer {
			t.Errorf("%q %q: protocol %q, link_bandwidth %q, prefer_http %v", tt.file, tt.args, c.Protocol, c.LinkBandwidth, c.PreferHTTP)
		}
	}
}

func TestFlagsOnly(t *testing.T) {
	var stderr bytes.Buffer
	c, err := parseArgs([]string{"--broker", "mqtt://127.0.0.1:1883", "--thing-name", "gw-01", "--writer-socket", "/run/w.sock"}, &stderr)
	if err != nil {
		t.Fatal(err)
	}
	if c.StateDir != DefaultStateDir || c.WriterSocket != "/run/w.sock" {
		t.Fatalf("%+v", c)
	}
	if code := run([]string{"--bogus"}, &stderr); code != 2 {
		t.Fatalf("exit %d for a bad flag", code)
	}
	if code := run([]string{"--version"}, &stderr); code != 0 {
		t.Fatalf("exit %d for --version", code)
	}
}

func TestExampleConfig(t *testing.T) {
	c, err := loadConfig("example.toml")
	if err != nil {
		t.Fatal(err)
	}
	if err := c.validate(); err != nil {
		t.Fatal(err)
	}
	if c.ThingName != "gw-01" || c.BlockSize != 65536 || c.WriterWaitTimeout.Duration != 10*time.Minute {
		t.Fatalf("%+v", c)
	}
}

// TestEveryFlagOverridesItsKey: each flag bindFlags declares changes its own configuration
// field when given, and nothing when not given.
func TestEveryFlagOverridesItsKey(t *testing.T) {
	base, err := parseConfig([]byte(example))
	if err != nil {
		t.Fatal(err)
	}
	probe := flag.NewFlagSet("probe", flag.ContinueOnError)
	var scratch Config
	bindFlags(probe, &scratch)
	n := 0
	probe.VisitAll(func(f *flag.Flag) {
		n++
		c := base
		fs := flag.NewFlagSet("t", flag.ContinueOnError)
		bindFlags(fs, &c)
		if err := fs.Parse(nil); err != nil || !reflect.DeepEqual(c, base) {
			t.Fatalf("binding the flags changed the configuration: %v", err)
		}
		value := "/changed/by/flag"
		switch cur := fs.Lookup(f.Name).Value; cur.(type) {
		case interface{ IsBoolFlag() bool }:
			value = strconv.FormatBool(cur.String() != "true")
		default:
			if _, err := strconv.Atoi(f.DefValue); err == nil {
				value = "4096"
			}
		}
		if err := fs.Parse([]string{"--" + f.Name + "=" + value}); err != nil {
			t.Fatal(err)
		}
		if reflect.DeepEqual(c, base) {
			t.Errorf("--%s=%s changed no configuration field", f.Name, value)
		}
	})
	if n < 10 {
		t.Fatalf("only %d flags", n)
	}
}
