package harness

import (
	"bytes"

	"github.com/BurntSushi/toml"
)

// netTOML is ota-net's configuration as the harness writes it.
type netTOML struct {
	BrokerURL    string `toml:"broker_url"`
	ThingName    string `toml:"thing_name"`
	CAFile       string `toml:"ca_file,omitempty"`
	CertFile     string `toml:"cert_file,omitempty"`
	KeyFile      string `toml:"key_file,omitempty"`
	WriterSocket string `toml:"writer_socket"`
	StateDir     string `toml:"state_dir"`
	LogLevel     string `toml:"log_level"`
	// ReportInterval rate-limits progress updates; short, so tests see progress mid-download.
	ReportInterval string `toml:"report_interval"`
}

func (d *Device) netConfig() ([]byte, error) {
	n := netTOML{
		BrokerURL:      d.Opts.BrokerURL,
		ThingName:      d.Opts.Thing,
		CAFile:         d.Opts.CAFile,
		CertFile:       d.Opts.CertFile,
		KeyFile:        d.Opts.KeyFile,
		WriterSocket:   d.Socket,
		StateDir:       d.NetState,
		LogLevel:       d.Opts.LogLevel,
		ReportInterval: "100ms",
	}
	var buf bytes.Buffer
	if err := toml.NewEncoder(&buf).Encode(n); err != nil {
		return nil, err
	}
	return buf.Bytes(), nil
}

func (d *Device) netArgv() []string {
	return []string{d.Bin.Net, "--config", d.NetConfig}
}
