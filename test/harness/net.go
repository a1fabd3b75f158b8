package harness

import (
	"bytes"

	"github.com/BurntSushi/toml"
)

// netTOML mirrors ota-net's configuration keys (cmd/ota-net/config.go).
type netTOML struct {
	Broker       string `toml:"broker"`
	ThingName    string `toml:"thing_name"`
	CAFile       string `toml:"ca_file,omitempty"`
	CertFile     string `toml:"cert_file,omitempty"`
	KeyFile      string `toml:"key_file,omitempty"`
	WriterSocket string `toml:"writer_socket"`
	StateDir     string `toml:"state_dir"`
	// Progress is reported often (every 100 ms, any step) so tests see it mid-download and
	// the demo shows it moving.
	ReportInterval    string `toml:"report_interval"`
	ReportPercentStep int    `toml:"report_percent_step"`
	BlockSize         int    `toml:"block_size,omitempty"`
	BlocksPerRequest  int    `toml:"blocks_per_request,omitempty"`
	RequestsInFlight  int    `toml:"requests_in_flight,omitempty"`
	StreamQuota       int    `toml:"stream_quota,omitempty"`
	LogLevel          string `toml:"log_level"`
}

func (d *Device) netConfig() ([]byte, error) {
	n := netTOML{
		Broker:            d.Opts.BrokerURL,
		ThingName:         d.Opts.Thing,
		CAFile:            d.Opts.CAFile,
		CertFile:          d.Opts.CertFile,
		KeyFile:           d.Opts.KeyFile,
		WriterSocket:      d.Socket,
		StateDir:          d.NetState,
		ReportInterval:    "100ms",
		ReportPercentStep: 1,
		BlockSize:         d.Opts.BlockSize,
		BlocksPerRequest:  d.Opts.BlocksPerRequest,
		StreamQuota:       d.Opts.StreamQuota,
		RequestsInFlight:  d.Opts.RequestsInFlight,
		LogLevel:          d.Opts.LogLevel,
	}
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(n); err != nil {
		return nil, err
	}
	buf.WriteString(d.Opts.NetConfigExtra)
	return buf.Bytes(), nil
}

func (d *Device) netArgv() []string {
	bin := d.Bin.Net
	if d.Opts.InProcess {
		bin = d.Bin.NetInProc
	}
	return append(append([]string(nil), d.Opts.NetPrefix...), bin, "--config", d.NetConfig)
}

// netEnv is ota-net's environment: the benchmark build finds the writer's configuration in
// it.
func (d *Device) netEnv() []string {
	if !d.Opts.InProcess {
		return d.Opts.Env
	}
	return append(append([]string(nil), d.Opts.Env...), EnvInProcWriterConfig+"="+d.WriterConfig)
}
