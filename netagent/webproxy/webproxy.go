// Package webproxy is ota-net's way through a web proxy: every connection it makes (MQTT to
// AWS IoT, presigned HTTPS downloads) is a tunnel opened with HTTP CONNECT through one proxy,
// reached over plain TCP (http://) or TLS (https://), with optional Basic authentication.
// The end-to-end TLS to the broker or the download server runs inside the tunnel unchanged.
//
// The proxy comes from ota-net's configuration when it names one, else from the environment
// (HTTPS_PROXY, then HTTP_PROXY; NO_PROXY). Credentials never leave this package in a string:
// String and every error name the proxy without its user information.
package webproxy

import (
	"bufio"
	"context"
	"crypto/tls"
	"crypto/x509"
	"encoding/base64"
	"errors"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"net/url"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"time"
)

// Settings are the [proxy] section of ota-net's configuration.
type Settings struct {
	// URL is http://host:port or https://host:port. Empty: the environment decides.
	URL string `toml:"url"`
	// User and PasswordFile give Basic authentication. A relative PasswordFile is looked up
	// in $CREDENTIALS_DIRECTORY (systemd's LoadCredential=).
	User         string `toml:"user"`
	PasswordFile string `toml:"password_file"`
	// NoProxy lists hosts reached directly: "*", a host name (its subdomains too; a leading
	// dot is allowed), an IP address or a CIDR prefix, each optionally with ":port".
	NoProxy []string `toml:"no_proxy"`
	// CAFile verifies an https:// proxy (empty: the system roots).
	CAFile string `toml:"ca_file"`
}

// Errors, tested with errors.Is on what Dial returns.
var (
	// ErrUnreachable: no TCP (or TLS) connection to the proxy itself.
	ErrUnreachable = errors.New("proxy unreachable")
	// ErrAuth: the proxy answered 407 Proxy Authentication Required (or 401).
	ErrAuth = errors.New("proxy authentication required")
	// ErrRefused: the proxy answered the CONNECT with another status (403 for a port or host
	// it does not allow, 502/503/504 when it could not reach the target).
	ErrRefused = errors.New("proxy refused the tunnel")
)

// Error is a failure of the proxy path. It never holds credentials.
type Error struct {
	Proxy  string // the proxy URL without user information
	Target string // host:port asked for
	// Status is the HTTP status of the proxy's answer to CONNECT (0: no answer).
	Status int
	Err    error // ErrUnreachable, ErrAuth or ErrRefused, wrapping the cause where there is one
}

func (e *Error) Error() string {
	return fmt.Sprintf("web proxy %s, tunnel to %s: %v", e.Proxy, e.Target, e.Err)
}

func (e *Error) Unwrap() error { return e.Err }

// Permanent reports whether retrying the same request cannot help: the proxy refused it by
// policy (403) or for credentials (407, or 401 from proxies that use it). Unreachable proxies
// and 5xx answers may recover.
func (e *Error) Permanent() bool {
	return errors.Is(e.Err, ErrAuth) || e.Status == http.StatusForbidden
}

// Proxy is a resolved proxy setting. A nil *Proxy dials directly.
type Proxy struct {
	url      *url.URL // scheme and host only
	user     string
	password string
	hasAuth  bool
	noProxy  []rule
	tls      *tls.Config // for https:// proxies
	// Source says where the setting came from ("config", "HTTPS_PROXY", ...), for the log.
	Source string
	dialer net.Dialer
}

// Resolve returns the proxy to use: the configuration's when it names a URL (its no_proxy
// list applies, the environment is ignored), else HTTPS_PROXY, HTTP_PROXY (or their lower-case
// forms) with NO_PROXY. getenv is os.Getenv. It returns nil, nil when there is no proxy.
func Resolve(s Settings, getenv func(string) string) (*Proxy, error) {
	raw, source := s.URL, "config"
	noProxy := s.NoProxy
	if raw == "" {
		if s.User != "" || s.PasswordFile != "" || len(s.NoProxy) > 0 || s.CAFile != "" {
			return nil, errors.New("proxy: user, password_file, no_proxy and ca_file need url")
		}
		for _, k := range []string{"HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"} {
			if v := getenv(k); v != "" {
				raw, source = v, k
				break
			}
		}
		if raw == "" {
			return nil, nil
		}
		np := getenv("NO_PROXY")
		if np == "" {
			np = getenv("no_proxy")
		}
		noProxy = strings.Split(np, ",")
	}
	u, err := url.Parse(raw)
	if err != nil || u.Host == "" || (u.Scheme != "http" && u.Scheme != "https") || (u.Path != "" && u.Path != "/") || u.RawQuery != "" {
		// The raw value may hold a password: name only where it came from.
		return nil, fmt.Errorf("proxy (%s): not an http:// or https:// URL with a host and nothing after it", source)
	}
	p := &Proxy{url: &url.URL{Scheme: u.Scheme, Host: u.Host}, Source: source}
	if p.url.Port() == "" {
		port := "80"
		if u.Scheme == "https" {
			port = "443"
		}
		p.url.Host = net.JoinHostPort(u.Hostname(), port)
	}
	if u.User != nil {
		if source == "config" {
			return nil, errors.New("proxy: url must not hold credentials; use user and password_file")
		}
		p.user = u.User.Username()
		p.password, _ = u.User.Password()
		p.hasAuth = true
	}
	if s.User != "" || s.PasswordFile != "" {
		if s.User == "" || s.PasswordFile == "" || strings.Contains(s.User, ":") {
			return nil, errors.New("proxy: user (without ':') and password_file go together")
		}
		pw, err := readPassword(s.PasswordFile, getenv)
		if err != nil {
			return nil, err
		}
		p.user, p.password, p.hasAuth = s.User, pw, true
	}
	for _, e := range noProxy {
		if e = strings.TrimSpace(e); e == "" {
			continue
		}
		r, err := parseRule(e)
		if err != nil {
			return nil, fmt.Errorf("proxy: no_proxy entry %q: %w", e, err)
		}
		p.noProxy = append(p.noProxy, r)
	}
	if u.Scheme == "https" {
		p.tls = &tls.Config{MinVersion: tls.VersionTLS12, ServerName: u.Hostname()}
		if s.CAFile != "" {
			pem, err := os.ReadFile(s.CAFile)
			if err != nil {
				return nil, fmt.Errorf("proxy: ca_file: %w", err)
			}
			pool := x509.NewCertPool()
			if !pool.AppendCertsFromPEM(pem) {
				return nil, fmt.Errorf("proxy: ca_file %s has no PEM certificate", s.CAFile)
			}
			p.tls.RootCAs = pool
		}
	}
	return p, nil
}

// readPassword reads the password file: one line, the trailing newline dropped.
func readPassword(name string, getenv func(string) string) (string, error) {
	if !filepath.IsAbs(name) {
		dir := getenv("CREDENTIALS_DIRECTORY")
		if dir == "" {
			return "", fmt.Errorf("proxy: password_file %q is relative but CREDENTIALS_DIRECTORY is not set (LoadCredential=)", name)
		}
		name = filepath.Join(dir, name)
	}
	b, err := os.ReadFile(name)
	if err != nil {
		return "", fmt.Errorf("proxy: password_file: %w", err)
	}
	pw := strings.TrimRight(string(b), "\r\n")
	if pw == "" || strings.ContainsAny(pw, "\r\n") {
		return "", fmt.Errorf("proxy: password_file %s must hold one non-empty line", name)
	}
	return pw, nil
}

// String is the proxy URL without credentials (safe to log).
func (p *Proxy) String() string {
	if p == nil {
		return "direct"
	}
	return p.url.String()
}

// Authenticated reports whether Basic credentials are configured (for the log; never the
// credentials themselves).
func (p *Proxy) Authenticated() bool { return p != nil && p.hasAuth }

// Bypass reports whether addr (host:port) is reached directly by the no-proxy list.
func (p *Proxy) Bypass(addr string) bool {
	if p == nil {
		return true
	}
	host, port, err := net.SplitHostPort(addr)
	if err != nil {
		host, port = addr, ""
	}
	host = strings.ToLower(strings.TrimSuffix(host, "."))
	ip, ipErr := netip.ParseAddr(host)
	for _, r := range p.noProxy {
		if r.port != "" && r.port != port {
			continue
		}
		switch {
		case r.all:
			return true
		case r.prefix.IsValid():
			if ipErr == nil && r.prefix.Contains(ip.Unmap()) {
				return true
			}
		case r.domain != "":
			if host == r.domain || strings.HasSuffix(host, "."+r.domain) {
				return true
			}
		}
	}
	return false
}

type rule struct {
	all    bool
	domain string
	prefix netip.Prefix
	port   string
}

func parseRule(e string) (rule, error) {
	e = strings.ToLower(e)
	if e == "*" {
		return rule{all: true}, nil
	}
	var r rule
	if p, err := netip.ParsePrefix(e); err == nil {
		r.prefix = p.Masked()
		return r, nil
	}
	host := e
	if h, port, err := net.SplitHostPort(e); err == nil {
		if _, err := strconv.ParseUint(port, 10, 16); err != nil {
			return r, fmt.Errorf("bad port %q", port)
		}
		host, r.port = h, port
	}
	if a, err := netip.ParseAddr(host); err == nil {
		r.prefix = netip.PrefixFrom(a.Unmap(), a.Unmap().BitLen())
		return r, nil
	}
	r.domain = strings.TrimSuffix(strings.TrimPrefix(host, "."), ".")
	if r.domain == "" || strings.ContainsAny(r.domain, "/*@ ") {
		return r, errors.New("not a host, IP address or CIDR prefix")
	}
	return r, nil
}

// DialContext connects to addr (host:port): through a CONNECT tunnel, or directly when p is
// nil or addr is in the no-proxy list. Proxy failures are *Error values. It has the signature
// of net.Dialer.DialContext, so an http.Transport can use it; network must be a TCP network.
func (p *Proxy) DialContext(ctx context.Context, network, addr string) (net.Conn, error) {
	if p.Bypass(addr) {
		var d net.Dialer
		return d.DialContext(ctx, network, addr)
	}
	return p.tunnel(ctx, addr)
}

// tunnel opens the connection to the proxy and asks it for addr.
func (p *Proxy) tunnel(ctx context.Context, addr string) (net.Conn, error) {
	fail := func(status int, err error) error {
		return &Error{Proxy: p.String(), Target: addr, Status: status, Err: err}
	}
	conn, err := p.dialer.DialContext(ctx, "tcp", p.url.Host)
	if err != nil {
		return nil, fail(0, fmt.Errorf("%w: %w", ErrUnreachable, err))
	}
	// The CONNECT exchange obeys ctx; the tunnel afterwards has no deadline of ours.
	if dl, ok := ctx.Deadline(); ok {
		_ = conn.SetDeadline(dl)
	}
	stop := context.AfterFunc(ctx, func() { _ = conn.SetDeadline(time.Unix(1, 0)) })
	defer stop()
	if p.tls != nil {
		tc := tls.Client(conn, p.tls)
		if err := tc.HandshakeContext(ctx); err != nil {
			conn.Close()
			return nil, fail(0, fmt.Errorf("%w: TLS to the proxy: %w", ErrUnreachable, err))
		}
		conn = tc
	}
	req := &http.Request{
		Method: http.MethodConnect,
		URL:    &url.URL{Opaque: addr},
		Host:   addr,
		Header: http.Header{},
	}
	if p.hasAuth {
		cred := base64.StdEncoding.EncodeToString([]byte(p.user + ":" + p.password))
		req.Header.Set("Proxy-Authorization", "Basic "+cred)
	}
	if err := req.Write(conn); err != nil {
		conn.Close()
		return nil, fail(0, fmt.Errorf("%w: sending CONNECT: %w", ErrUnreachable, err))
	}
	br := bufio.NewReaderSize(conn, 1024)
	resp, err := http.ReadResponse(br, req)
	if err != nil {
		conn.Close()
		if ctx.Err() != nil {
			return nil, fail(0, fmt.Errorf("%w: waiting for the CONNECT answer: %w", ErrUnreachable, ctx.Err()))
		}
		return nil, fail(0, fmt.Errorf("%w: reading the CONNECT answer: %w", ErrUnreachable, err))
	}
	if resp.StatusCode != http.StatusOK {
		conn.Close()
		// 407 is the standard answer; tinyproxy answers a CONNECT with 401. Either way the
		// target saw nothing: the proxy wants credentials.
		auth := resp.StatusCode == http.StatusProxyAuthRequired || resp.StatusCode == http.StatusUnauthorized
		switch {
		case auth && p.hasAuth:
			return nil, fail(resp.StatusCode, fmt.Errorf("%w: %s: the proxy refused the configured credentials", ErrAuth, resp.Status))
		case auth:
			return nil, fail(resp.StatusCode, fmt.Errorf("%w: %s: no credentials configured", ErrAuth, resp.Status))
		default:
			return nil, fail(resp.StatusCode, fmt.Errorf("%w: %s", ErrRefused, resp.Status))
		}
	}
	if !stop() {
		// ctx ended just as the answer came: the deadline may already be in the past.
		conn.Close()
		return nil, fail(0, fmt.Errorf("%w: %w", ErrUnreachable, ctx.Err()))
	}
	_ = conn.SetDeadline(time.Time{})
	if br.Buffered() > 0 {
		// Neither MQTT nor TLS lets the server speak first, but a proxy may have sent bytes
		// of the tunnel with its answer: hand them out before the connection's own.
		return &bufferedConn{Conn: conn, r: br}, nil
	}
	return conn, nil
}

type bufferedConn struct {
	net.Conn
	r *bufio.Reader
}

func (c *bufferedConn) Read(p []byte) (int, error) {
	if c.r.Buffered() > 0 {
		return c.r.Read(p)
	}
	return c.Conn.Read(p)
}
