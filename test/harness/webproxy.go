package harness

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"time"
)

// TinyproxyPath is where Debian installs the proxy.
const TinyproxyPath = "/usr/bin/tinyproxy"

// FindTinyproxy returns the tinyproxy binary, or an error saying it is not installed.
func FindTinyproxy() (string, error) {
	if _, err := os.Stat(TinyproxyPath); err == nil {
		return TinyproxyPath, nil
	}
	if p, err := exec.LookPath("tinyproxy"); err == nil {
		return p, nil
	}
	return "", errors.New("tinyproxy is not installed (Debian package tinyproxy; scripts/test.sh installs it)")
}

// WebProxyOptions describe a web proxy for a test.
type WebProxyOptions struct {
	// Listen is the address the proxy listens on (default 127.0.0.1).
	Listen string
	// User and Password turn on Basic authentication (tinyproxy's BasicAuth).
	User, Password string
	// ConnectPorts, when set, are the only ports CONNECT may reach (tinyproxy's ConnectPort);
	// others get 403.
	ConnectPorts []int
	// TLS puts a TLS front (socat, certificate from openssl) before tinyproxy: the proxy URL
	// is https://. CAFile is then the certificate to trust.
	TLS bool
}

// WebProxy is tinyproxy run as a separate process (with socat as its TLS front when asked).
type WebProxy struct {
	Opts   WebProxyOptions
	Port   int // what clients connect to
	Conf   string
	Log    string
	CAFile string // with TLS: the proxy's (self-signed) certificate

	plainPort int    // tinyproxy's own port (== Port without TLS)
	listen    string // tinyproxy's own address
	mu        sync.Mutex
	proc      *Proc
	front     *Proc
}

// StartWebProxy writes a tinyproxy configuration in dir and starts it; it returns once the
// proxy accepts connections.
func StartWebProxy(ctx context.Context, dir string, opts WebProxyOptions) (*WebProxy, error) {
	if _, err := FindTinyproxy(); err != nil {
		return nil, err
	}
	var err error
	if opts.Listen == "" {
		opts.Listen = "127.0.0.1"
	}
	w := &WebProxy{Opts: opts, Conf: filepath.Join(dir, "tinyproxy.conf"), Log: filepath.Join(dir, "tinyproxy.log")}
	if w.Port, err = freePortOn(opts.Listen); err != nil {
		return nil, err
	}
	w.plainPort = w.Port
	listen := opts.Listen
	if opts.TLS {
		if _, err := exec.LookPath("socat"); err != nil {
			return nil, errors.New("socat is not installed (Debian package socat; scripts/test.sh installs it)")
		}
		// tinyproxy itself listens on loopback only; socat is the only way in.
		if w.plainPort, err = freePortOn("127.0.0.1"); err != nil {
			return nil, err
		}
		listen = "127.0.0.1"
		if err := w.makeCert(ctx, dir); err != nil {
			return nil, err
		}
	}
	w.listen = listen
	if err := w.writeConf(); err != nil {
		return nil, err
	}
	return w, w.Start(ctx)
}

func (w *WebProxy) writeConf() error {
	conf := fmt.Sprintf("# written by the gwota test harness\nPort %d\nListen %s\nTimeout 600\nLogLevel Connect\nMaxClients 100\nDisableViaHeader Yes\n", w.plainPort, w.listen)
	if w.Opts.User != "" {
		conf += fmt.Sprintf("BasicAuth %s %s\n", w.Opts.User, w.Opts.Password)
	}
	for _, p := range w.Opts.ConnectPorts {
		conf += fmt.Sprintf("ConnectPort %d\n", p)
	}
	return os.WriteFile(w.Conf, []byte(conf), 0o600)
}

// SetConnectPorts restarts the proxy allowing CONNECT to these ports only.
func (w *WebProxy) SetConnectPorts(ctx context.Context, ports ...int) error {
	w.Opts.ConnectPorts = ports
	if err := w.writeConf(); err != nil {
		return err
	}
	if err := w.Kill(ctx); err != nil {
		return err
	}
	return w.Start(ctx)
}

func (w *WebProxy) makeCert(ctx context.Context, dir string) error {
	key, crt := filepath.Join(dir, "proxy.key.pem"), filepath.Join(dir, "proxy.crt.pem")
	host := w.Opts.Listen
	out, err := exec.CommandContext(ctx, "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
		"-nodes", "-keyout", key, "-out", crt, "-days", "2", "-subj", "/CN=gwota test proxy",
		"-addext", "subjectAltName=IP:"+host).CombinedOutput()
	if err != nil {
		return fmt.Errorf("openssl req: %w: %s", err, out)
	}
	w.CAFile = crt
	return nil
}

// URL is the proxy URL clients use (without credentials).
func (w *WebProxy) URL() string {
	scheme := "http"
	if w.Opts.TLS {
		scheme = "https"
	}
	return fmt.Sprintf("%s://%s", scheme, net.JoinHostPort(w.Opts.Listen, strconv.Itoa(w.Port)))
}

// Start runs the proxy (again, on the same port) and returns once it accepts connections.
func (w *WebProxy) Start(ctx context.Context) error {
	bin, err := FindTinyproxy()
	if err != nil {
		return err
	}
	p, err := startProc("tinyproxy", []string{bin, "-d", "-c", w.Conf}, nil, w.Log, nil, nil)
	if err != nil {
		return err
	}
	w.mu.Lock()
	w.proc = p
	w.mu.Unlock()
	if err := waitListening(ctx, p, net.JoinHostPort(w.listen, strconv.Itoa(w.plainPort))); err != nil {
		return fmt.Errorf("tinyproxy: %w: %s", err, tail(w.Log, 20))
	}
	if !w.Opts.TLS {
		return nil
	}
	dir := filepath.Dir(w.Conf)
	f, err := startProc("socat", []string{"socat",
		fmt.Sprintf("openssl-listen:%d,bind=%s,reuseaddr,fork,cert=%s,key=%s,verify=0", w.Port, w.Opts.Listen, w.CAFile, filepath.Join(dir, "proxy.key.pem")),
		fmt.Sprintf("tcp:127.0.0.1:%d", w.plainPort)}, nil, filepath.Join(dir, "socat.log"), nil, nil)
	if err != nil {
		return err
	}
	w.mu.Lock()
	w.front = f
	w.mu.Unlock()
	if err := waitListening(ctx, f, net.JoinHostPort(w.Opts.Listen, strconv.Itoa(w.Port))); err != nil {
		return fmt.Errorf("socat TLS front: %w", err)
	}
	return nil
}

// waitListening waits until addr accepts a TCP connection or p exits.
func waitListening(ctx context.Context, p *Proc, addr string) error {
	for {
		var d net.Dialer
		c, err := d.DialContext(ctx, "tcp", addr)
		if err == nil {
			c.Close()
			return nil
		}
		select {
		case <-p.Done():
			return fmt.Errorf("exited before listening on %s", addr)
		case <-ctx.Done():
			return context.Cause(ctx)
		case <-time.After(20 * time.Millisecond): // polling a port: no event to wait on
		}
	}
}

// Kill stops the proxy (and its TLS front) with SIGKILL: every tunnel through it breaks.
func (w *WebProxy) Kill(ctx context.Context) error {
	w.mu.Lock()
	p, f := w.proc, w.front
	w.mu.Unlock()
	var errs []error
	for _, q := range []*Proc{f, p} {
		if q != nil {
			errs = append(errs, q.Kill(ctx))
		}
	}
	return errors.Join(errs...)
}

// Stop stops the proxy at the end of a test.
func (w *WebProxy) Stop() {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	_ = w.Kill(ctx)
}

// Tunnels counts the CONNECT requests the proxy logged for target (host:port) since it first
// started.
func (w *WebProxy) Tunnels(target string) int {
	b, err := os.ReadFile(w.Log)
	if err != nil {
		return 0
	}
	return strings.Count(string(b), "CONNECT "+target+" ")
}

// freePortOn asks the kernel for a free port on ip.
func freePortOn(ip string) (int, error) {
	ln, err := net.Listen("tcp", net.JoinHostPort(ip, "0"))
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}
