package writertest

import (
	"context"
	"io"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/server"
)

// Server is a writer served through the real gRPC adapter on a real Unix socket. It stops
// gracefully when the test ends.
type Server struct {
	// Sock is the socket path (short enough for sun_path).
	Sock string

	t     testing.TB
	impl  api.Writer
	opts  server.Options
	lc    server.ListenConfig
	log   hclog.Logger
	serve func(*server.Server, net.Listener) error

	mu   sync.Mutex
	srv  *server.Server
	done chan error
}

// Serve serves impl on a new socket. opts.MaxBlockSize defaults to impl's MaxBlockSize (the
// Fake's, the engine's configured one); log nil is the test's log at Warn.
func Serve(t testing.TB, impl api.Writer, opts server.Options, lc server.ListenConfig, log hclog.Logger) *Server {
	t.Helper()
	return ServeWith(t, impl, opts, lc, log, (*server.Server).Serve)
}

// ServeWith is Serve with the function that serves the listener (tests of Serve's variants).
func ServeWith(t testing.TB, impl api.Writer, opts server.Options, lc server.ListenConfig, log hclog.Logger, serve func(*server.Server, net.Listener) error) *Server {
	t.Helper()
	if m, ok := impl.(interface{ MaxBlockSize() uint32 }); ok && opts.MaxBlockSize == 0 {
		opts.MaxBlockSize = m.MaxBlockSize()
	}
	if log == nil {
		log = Logger(t, hclog.Warn)
	}
	s := &Server{Sock: filepath.Join(ShortDir(t), "w.sock"), t: t, impl: impl, opts: opts, lc: lc, log: log, serve: serve}
	s.Start()
	t.Cleanup(func() {
		s.mu.Lock()
		srv, done := s.srv, s.done
		s.srv = nil
		s.mu.Unlock()
		if srv == nil {
			return
		}
		ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
		defer cancel()
		srv.GracefulStop(ctx)
		if err := <-done; err != nil {
			t.Errorf("serve: %v", err)
		}
	})
	return s
}

// Server is the running adapter (nil after Kill).
func (s *Server) Server() *server.Server {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.srv
}

// Start serves again on the same socket (after Kill).
func (s *Server) Start() {
	s.t.Helper()
	ln, err := server.Listen(s.Sock, s.lc)
	if err != nil {
		s.t.Fatal(err)
	}
	srv := server.New(s.impl, s.opts, s.log)
	done := make(chan error, 1)
	go func() { done <- s.serve(srv, ln) }()
	s.mu.Lock()
	s.srv, s.done = srv, done
	s.mu.Unlock()
}

// Restart serves impl instead, on the same socket: Kill, then Start (a writer process
// restarted with its engine opened again).
func (s *Server) Restart(impl api.Writer) {
	s.Kill()
	s.impl = impl
	s.Start()
}

// SetLogger gives the adapter started by the next Start or Restart this logger.
func (s *Server) SetLogger(log hclog.Logger) { s.log = log }

// Kill stops serving at once: connections are cut, nothing graceful.
func (s *Server) Kill() {
	s.mu.Lock()
	srv, done := s.srv, s.done
	s.srv = nil
	s.mu.Unlock()
	if srv != nil {
		srv.Stop()
		<-done
	}
}

// Dial returns a client of the writer on sock that waited for it to serve and handshook;
// it is closed when the test ends.
func Dial(t testing.TB, sock string) *client.Client {
	t.Helper()
	return DialOptions(t, sock, client.Options{Name: "test"})
}

// DialOptions is Dial with the client's options.
func DialOptions(t testing.TB, sock string, opts client.Options) *client.Client {
	t.Helper()
	ctx, cancel := context.WithTimeout(context.Background(), 20*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, sock, opts)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	if err := c.WaitReady(ctx); err != nil {
		t.Fatal(err)
	}
	if _, err := c.Handshake(ctx, nil); err != nil {
		t.Fatal(err)
	}
	return c
}

// ShortDir is a temporary directory removed when the test ends, with a path short enough for
// a socket in it (t.TempDir paths can exceed sun_path with long test names).
func ShortDir(t testing.TB) string {
	t.Helper()
	d, err := os.MkdirTemp("", "ows")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(d) })
	return d
}

// Logger is a named logger at level into the test's log.
func Logger(t testing.TB, level hclog.Level) hclog.Logger {
	return hclog.New(&hclog.LoggerOptions{Name: "test", Level: level, Output: LogWriter(t)})
}

// LogWriter writes each line into the test's log.
func LogWriter(t testing.TB) io.Writer { return testWriter{t} }

type testWriter struct{ t testing.TB }

func (w testWriter) Write(p []byte) (int, error) {
	w.t.Log(strings.TrimRight(string(p), "\n"))
	return len(p), nil
}
