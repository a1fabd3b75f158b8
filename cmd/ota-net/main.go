// Command ota-net is the unprivileged network agent: it follows AWS IoT jobs over MQTT,
// downloads images over MQTT streams or HTTP and streams them to ota-writer over its Unix
// socket. SIGTERM stops it cleanly; everything resumes at the next start.
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"os"
	"os/signal"
	"path/filepath"
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/internal/cpuprofile"
	"github.com/gwota/gwota/internal/runtimeopts"
	"github.com/gwota/gwota/internal/systemd"
	"github.com/gwota/gwota/netagent/agent"
	"github.com/gwota/gwota/netagent/httpdl"
	"github.com/gwota/gwota/netagent/jobs"
	"github.com/gwota/gwota/netagent/mqttconn"
	"github.com/gwota/gwota/netagent/pathselect"
	"github.com/gwota/gwota/netagent/stream"
	"github.com/gwota/gwota/netagent/webproxy"
	"github.com/gwota/gwota/netagent/writerlink"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

func main() {
	runtimeopts.Apply(os.Getenv) // memory limit and GOMAXPROCS, unless set in the environment
	os.Exit(run(os.Args[1:], os.Stderr))
}

// bindFlags declares every command-line flag, each bound to the configuration field it
// overrides: a flag and its field are named in this one place.
func bindFlags(fs *flag.FlagSet, c *Config) {
	fs.StringVar(&c.Broker, "broker", c.Broker, "broker URL (mqtts://host:8883, mqtt://host:port for tests)")
	fs.StringVar(&c.ThingName, "thing-name", c.ThingName, "AWS IoT thing name (MQTT client id)")
	fs.StringVar(&c.CAFile, "ca-file", c.CAFile, "CA certificate PEM")
	fs.StringVar(&c.CertFile, "cert-file", c.CertFile, "device certificate PEM")
	fs.StringVar(&c.KeyFile, "key-file", c.KeyFile, "device key PEM")
	fs.StringVar(&c.WriterSocket, "writer-socket", c.WriterSocket, "ota-writer socket")
	fs.StringVar(&c.StateDir, "state-dir", c.StateDir, "state directory (MQTT session)")
	fs.IntVar(&c.BlockSize, "block-size", c.BlockSize, "download block size in bytes")
	fs.IntVar(&c.StreamQuota, "stream-quota", c.StreamQuota, "connection rate in bytes/s bounding the stream's tail timeout (0: AWS's 512 KiB/s quota, -1: none)")
	fs.BoolVar(&c.PreferHTTP, "prefer-http", c.PreferHTTP, "prefer HTTP when a job offers both (older form of -protocol http)")
	fs.StringVar(&c.Protocol, "protocol", c.Protocol, "auto|mqtt|http: protocol when a job offers both (auto: by link speed against AWS's MQTT quota)")
	fs.StringVar(&c.LinkBandwidth, "link-bandwidth", c.LinkBandwidth, "link speed, e.g. 20Mbit/s or 2MB/s (empty: measured)")
	fs.StringVar(&c.Proxy.URL, "proxy", c.Proxy.URL, "web proxy URL (http://host:port or https://host:port)")
	fs.StringVar(&c.LogLevel, "log-level", c.LogLevel, "trace|debug|info|warn|error|off")
}

// parseArgs loads --config and applies the flags that were given on top of it. The flags are
// parsed twice: once to find --config, then over the loaded configuration, so a flag that is
// given overrides its key and one that is not leaves the file's value.
func parseArgs(args []string, stderr io.Writer) (Config, error) {
	newFlags := func(c *Config) (fs *flag.FlagSet, cfgPath *string, showVersion *bool) {
		fs = flag.NewFlagSet("ota-net", flag.ContinueOnError)
		fs.SetOutput(stderr)
		cfgPath = fs.String("config", "", "TOML configuration file")
		showVersion = fs.Bool("version", false, "print the version and exit")
		bindFlags(fs, c)
		return fs, cfgPath, showVersion
	}
	var scratch Config
	fs, cfgPath, showVersion := newFlags(&scratch)
	if err := fs.Parse(args); err != nil {
		return Config{}, err
	}
	if fs.NArg() > 0 {
		return Config{}, fmt.Errorf("unexpected arguments: %v", fs.Args())
	}
	if *showVersion {
		fmt.Fprintln(stderr, "ota-net", version)
		return Config{}, flag.ErrHelp
	}
	c, err := loadConfig(*cfgPath)
	if err != nil {
		return c, err
	}
	fs, _, _ = newFlags(&c)
	if err := fs.Parse(args); err != nil {
		return c, err
	}
	return c, c.validate()
}

func run(args []string, stderr io.Writer) int {
	defer cpuprofile.Start("ota-net")()
	cfg, err := parseArgs(args, stderr)
	if errors.Is(err, flag.ErrHelp) {
		return 0
	}
	if err != nil {
		fmt.Fprintln(stderr, "ota-net:", err)
		return 2
	}
	log := hclog.New(&hclog.LoggerOptions{Name: "ota-net", Level: hclog.LevelFromString(cfg.LogLevel), JSONFormat: cfg.LogJSON, Output: stderr})
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	if err := serve(ctx, cfg, log); err != nil {
		log.Error("ota-net failed", "error", err)
		return 1
	}
	log.Info("stopped")
	return 0
}

// dialWriter links the agent to the writer: over the writer's socket. The benchmark build
// (build tag gwota_inproc, inproc.go) replaces it to link the writer engine into this process
// instead, to price the gRPC hop end to end; no shipped build has that tag.
var dialWriter = func(ctx context.Context, _ Config, lc writerlink.Config, _ hclog.Logger) (*writerlink.Link, error) {
	return writerlink.Dial(ctx, lc)
}

// serve wires the parts and runs the agent until ctx ends. Logging has one convention on
// this side: each part takes an hclog.Logger in its configuration's Logger field (a null
// logger when nil), and gets log.Named(<part>) here; no package makes or looks up a global
// logger. netagent/webproxy logs nothing: its typed errors are logged by the part that
// dialled.
func serve(ctx context.Context, cfg Config, log hclog.Logger) error {
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	px, err := webproxy.Resolve(cfg.Proxy, os.Getenv)
	if err != nil {
		return err
	}
	if px != nil {
		// Never the credentials: String has no user information.
		log.Info("using a web proxy", "proxy", px.String(), "from", px.Source, "basic_auth", px.Authenticated())
	}
	conn, err := mqttconn.Dial(ctx, mqttconn.Config{
		BrokerURL: cfg.Broker, ClientID: cfg.ThingName,
		CAFile: cfg.CAFile, CertFile: cfg.CertFile, KeyFile: cfg.KeyFile, ALPN: cfg.ALPN,
		KeepAlive: cfg.KeepAlive.Duration, SessionExpiry: cfg.SessionExpiry.Duration,
		StateDir: cfg.StateDir, Proxy: px, MaxPublishRate: cfg.MaxPublishRate, Logger: log.Named("mqtt"),
	})
	if err != nil {
		return err
	}
	defer func() {
		if err := conn.Close(context.Background()); err != nil {
			log.Warn("mqtt close", "error", err)
		}
	}()

	sd, err := stream.New(conn, stream.Config{
		Thing: cfg.ThingName, Format: cfg.StreamFormat, BlockSize: cfg.BlockSize,
		BlocksPerRequest: cfg.BlocksPerRequest, RequestsInFlight: cfg.RequestsInFlight,
		QuietPeriod: cfg.QuietPeriod.Duration, MaxQuietPeriod: cfg.MaxQuietPeriod.Duration,
		MaxFruitlessRounds: cfg.MaxFruitlessRounds, QuotaBytesPerSecond: max(cfg.StreamQuota, 0),
		NoQuota: cfg.StreamQuota < 0, Logger: log.Named("stream"),
	})
	if err != nil {
		return err
	}

	log.Info("waiting for the writer", "socket", cfg.WriterSocket)
	// Blocks not yet durable in the writer stay within one download window: a writer crash
	// costs at most that much fetched again.
	link, err := dialWriter(ctx, cfg, writerlink.Config{SocketPath: cfg.WriterSocket, Name: "ota-net " + version,
		MaxAheadBytes: sd.Config().WindowBytes(), Logger: log.Named("writer")}, log)
	if err != nil {
		if ctx.Err() != nil {
			return nil
		}
		return fmt.Errorf("writer: %w", err)
	}
	defer link.Close()

	jc, err := jobs.New(conn, cfg.ThingName, jobs.Options{Logger: log.Named("jobs")})
	if err != nil {
		return err
	}
	defer jc.Close(context.Background())
	hd, err := httpdl.New(httpdl.Config{ReadTimeout: cfg.HTTPReadTimeout.Duration, Proxy: px, Logger: log.Named("http")})
	if err != nil {
		return err
	}
	// validate checked both.
	mode, _ := pathselect.ParseMode(cfg.Protocol)
	linkBW, _ := pathselect.ParseBandwidth(cfg.LinkBandwidth)
	blockSize := cfg.BlockSize
	if blockSize == 0 {
		blockSize = sd.Config().BlockSize
	}
	a := agent.New(jc, agent.LinkWriter(link), sd, hd, agent.Config{
		BlockSize: blockSize, Protocol: mode, PreferHTTP: cfg.PreferHTTP, LinkBandwidth: linkBW,
		BandwidthFile:  filepath.Join(cfg.StateDir, "bandwidth.json"),
		ReportInterval: cfg.ReportInterval.Duration, ReportPercentStep: cfg.ReportPercentStep,
		WriterWait: cfg.WriterWaitTimeout.Duration, SelfTestTimeout: cfg.SelfTestTimeout.Duration,
		Logger: log.Named("agent"),
	})
	_ = systemd.Ready()
	wctx, stopWatchdog := context.WithCancel(ctx)
	defer stopWatchdog()
	go func() {
		// The agent loop runs on its own; the ping proves the process is scheduled and the
		// writer link answers (a writer that is away is the agent's to report, not a hang).
		if err := systemd.Watchdog(wctx, nil); err != nil {
			log.Warn("watchdog", "error", err)
		}
	}()
	log.Info("running", "thing", cfg.ThingName, "broker", cfg.Broker)
	err = a.Run(ctx)
	_ = systemd.Stopping()
	return err
}
