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
	"syscall"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/internal/systemd"
	"github.com/gwota/gwota/netagent/agent"
	"github.com/gwota/gwota/netagent/httpdl"
	"github.com/gwota/gwota/netagent/jobs"
	"github.com/gwota/gwota/netagent/mqttconn"
	"github.com/gwota/gwota/netagent/runtimeopts"
	"github.com/gwota/gwota/netagent/stream"
	"github.com/gwota/gwota/netagent/writerlink"
)

// version is set at build time (-ldflags "-X main.version=...").
var version = "dev"

func main() {
	runtimeopts.Apply(os.Getenv) // memory limit and GOMAXPROCS, unless set in the environment
	os.Exit(run(os.Args[1:], os.Stderr))
}

// parseArgs loads --config and applies the flags that were given on top of it.
func parseArgs(args []string, stderr io.Writer) (Config, error) {
	fs := flag.NewFlagSet("ota-net", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "TOML configuration file")
	var o Config
	fs.StringVar(&o.Broker, "broker", "", "broker URL (mqtts://host:8883, mqtt://host:port for tests)")
	fs.StringVar(&o.ThingName, "thing-name", "", "AWS IoT thing name (MQTT client id)")
	fs.StringVar(&o.CAFile, "ca-file", "", "CA certificate PEM")
	fs.StringVar(&o.CertFile, "cert-file", "", "device certificate PEM")
	fs.StringVar(&o.KeyFile, "key-file", "", "device key PEM")
	fs.StringVar(&o.WriterSocket, "writer-socket", "", "ota-writer socket")
	fs.StringVar(&o.StateDir, "state-dir", "", "state directory (MQTT session)")
	fs.IntVar(&o.BlockSize, "block-size", 0, "download block size in bytes")
	fs.BoolVar(&o.PreferHTTP, "prefer-http", false, "prefer HTTP when a job offers both")
	fs.StringVar(&o.LogLevel, "log-level", "", "trace|debug|info|warn|error|off")
	showVersion := fs.Bool("version", false, "print the version and exit")
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
	fs.Visit(func(f *flag.Flag) {
		switch f.Name {
		case "broker":
			c.Broker = o.Broker
		case "thing-name":
			c.ThingName = o.ThingName
		case "ca-file":
			c.CAFile = o.CAFile
		case "cert-file":
			c.CertFile = o.CertFile
		case "key-file":
			c.KeyFile = o.KeyFile
		case "writer-socket":
			c.WriterSocket = o.WriterSocket
		case "state-dir":
			c.StateDir = o.StateDir
		case "block-size":
			c.BlockSize = o.BlockSize
		case "prefer-http":
			c.PreferHTTP = o.PreferHTTP
		case "log-level":
			c.LogLevel = o.LogLevel
		}
	})
	return c, c.validate()
}

func run(args []string, stderr io.Writer) int {
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

// serve wires the parts and runs the agent until ctx ends.
func serve(ctx context.Context, cfg Config, log hclog.Logger) error {
	if err := os.MkdirAll(cfg.StateDir, 0o700); err != nil {
		return fmt.Errorf("state dir: %w", err)
	}
	conn, err := mqttconn.Dial(ctx, mqttconn.Config{
		BrokerURL: cfg.Broker, ClientID: cfg.ThingName,
		CAFile: cfg.CAFile, CertFile: cfg.CertFile, KeyFile: cfg.KeyFile, ALPN: cfg.ALPN,
		KeepAlive: cfg.KeepAlive.Duration, SessionExpiry: cfg.SessionExpiry.Duration,
		StateDir: cfg.StateDir, Logger: log.Named("mqtt"),
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
		MaxFruitlessRounds: cfg.MaxFruitlessRounds, Logger: log.Named("stream"),
	})
	if err != nil {
		return err
	}

	log.Info("waiting for the writer", "socket", cfg.WriterSocket)
	// Blocks not yet durable in the writer stay within one download window: a writer crash
	// costs at most that much fetched again.
	link, err := writerlink.Dial(ctx, writerlink.Config{SocketPath: cfg.WriterSocket, Name: "ota-net " + version,
		MaxAheadBytes: sd.Config().WindowBytes(), Logger: log.Named("writer")})
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
	hd, err := httpdl.New(httpdl.Config{ReadTimeout: cfg.HTTPReadTimeout.Duration, Logger: log.Named("http")})
	if err != nil {
		return err
	}
	blockSize := cfg.BlockSize
	if blockSize == 0 {
		blockSize = sd.Config().BlockSize
	}
	a := agent.New(jc, agent.LinkWriter(link), sd, hd, agent.Config{
		BlockSize: blockSize, PreferHTTP: cfg.PreferHTTP,
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
