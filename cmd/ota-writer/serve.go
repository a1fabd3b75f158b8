package main

import (
	"context"
	"flag"
	"io"
	"net"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/internal/systemd"
	"github.com/gwota/gwota/writer/assemble"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/server"
)

// stopTimeout bounds the graceful stop: running calls get this long to finish.
const stopTimeout = 10 * time.Second

func cmdServe(ctx context.Context, args []string, stderr io.Writer) error {
	fs := flag.NewFlagSet("serve", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "writer configuration `file` (required)")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	if *cfgPath == "" {
		return usagef("serve: --config is required")
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return usageError{err}
	}
	log := newLogger(cfg, stderr)
	// The socket first: a second writer started by mistake stops here, before the file
	// backend's simulated boot would count a boot that did not happen.
	ln, err := listen(cfg, log)
	if err != nil {
		return usageError{err}
	}
	eng, err := assemble.NewEngine(ctx, cfg, log, true)
	if err != nil {
		ln.Close()
		return err
	}
	defer eng.Close()
	// cfg.PeerUIDs already holds the uids of peer_users, resolved at load.
	uids := make([]uint32, 0, len(cfg.PeerUIDs))
	for _, u := range cfg.PeerUIDs {
		uids = append(uids, uint32(u))
	}
	log.Info("allowed peers", "uids", uids, "users", cfg.PeerUsers)
	srv := server.New(eng, server.Options{AllowedUIDs: uids, MaxBlockSize: eng.MaxBlockSize()}, log)
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	// Ready once the engine is up and the socket accepts: systemd (Type=notify) holds the
	// socket's queued connections until then. The watchdog pings only while the engine
	// still answers, so a wedged writer is restarted rather than kept alive by a timer.
	if err := systemd.Ready(); err != nil {
		log.Warn("sd_notify READY", "error", err)
	}
	wctx, stopWatchdog := context.WithCancel(ctx)
	defer stopWatchdog()
	go func() {
		if err := systemd.Watchdog(wctx, func() error {
			hctx, cancel := context.WithTimeout(wctx, 5*time.Second)
			defer cancel()
			_, err := eng.State(hctx)
			return err
		}); err != nil {
			log.Warn("watchdog", "error", err)
		}
	}()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	_ = systemd.Stopping()
	log.Info("signal received, stopping")
	sctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	srv.GracefulStop(sctx)
	return <-served
}

// listen takes the socket systemd passed (socket activation) or creates the configured one.
func listen(cfg *config.Config, log hclog.Logger) (net.Listener, error) {
	ln, ok, err := systemd.Listener("")
	if err != nil {
		return nil, err
	}
	if ok {
		log.Info("using socket passed by systemd", "addr", ln.Addr().String())
		return ln, nil
	}
	return server.Listen(cfg.Socket, server.ListenConfig{Group: cfg.SocketGroup})
}

// newLogger is the one logger of the process. It is passed down as the last argument of each
// constructor (engine, server, boot, ext, selftest), which names its own sub-logger
// ("ota-writer.engine"); nil there means no logging.
func newLogger(cfg *config.Config, w io.Writer) hclog.Logger {
	lvl := hclog.LevelFromString(cfg.LogLevel)
	if lvl == hclog.NoLevel {
		lvl = hclog.Info
	}
	return hclog.New(&hclog.LoggerOptions{Name: "ota-writer", Level: lvl, Output: w, JSONFormat: cfg.LogJSON})
}
