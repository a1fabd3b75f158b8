package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"net"
	"time"

	"github.com/coreos/go-systemd/v22/activation"
	"github.com/hashicorp/go-hclog"

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
	eng, err := newEngine(ctx, cfg, log, true)
	if err != nil {
		ln.Close()
		return err
	}
	defer eng.Close()
	uids := make([]uint32, 0, len(cfg.PeerUIDs))
	for _, u := range cfg.PeerUIDs {
		uids = append(uids, uint32(u))
	}
	srv := server.New(eng, server.Options{AllowedUIDs: uids, Log: log})
	served := make(chan error, 1)
	go func() { served <- srv.Serve(ln) }()
	select {
	case err := <-served:
		return err
	case <-ctx.Done():
	}
	log.Info("signal received, stopping")
	sctx, cancel := context.WithTimeout(context.Background(), stopTimeout)
	defer cancel()
	srv.GracefulStop(sctx)
	return <-served
}

// listen takes the socket systemd passed (socket activation) or creates the configured one.
func listen(cfg *config.Config, log hclog.Logger) (net.Listener, error) {
	lns, err := activation.Listeners()
	if err != nil {
		return nil, fmt.Errorf("socket activation: %w", err)
	}
	switch len(lns) {
	case 0:
		return server.Listen(cfg.Socket, server.ListenConfig{Group: cfg.SocketGroup})
	case 1:
		if lns[0] == nil {
			return nil, errors.New("socket activation: passed descriptor is not a listening socket")
		}
		if _, ok := lns[0].(*net.UnixListener); !ok {
			return nil, fmt.Errorf("socket activation: passed %s socket, want a Unix socket", lns[0].Addr().Network())
		}
		log.Info("using socket passed by systemd", "addr", lns[0].Addr().String())
		return lns[0], nil
	default:
		return nil, fmt.Errorf("socket activation: %d sockets passed, want 1", len(lns))
	}
}

// newLogger is the one logger of the process; packages get Named sub-loggers of it.
func newLogger(cfg *config.Config, w io.Writer) hclog.Logger {
	lvl := hclog.LevelFromString(cfg.LogLevel)
	if lvl == hclog.NoLevel {
		lvl = hclog.Info
	}
	return hclog.New(&hclog.LoggerOptions{Name: "ota-writer", Level: lvl, Output: w, JSONFormat: cfg.LogJSON})
}
