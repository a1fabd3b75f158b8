package webproxy_test

import (
	"context"
	"errors"
	"io"
	"net"
	"net/http"
	"os"
	"path/filepath"
	"strconv"
	"strings"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/netagent/webproxy"
	"github.com/gwota/gwota/test/harness"

	"github.com/gwota/gwota/test/testenv"
)

func env(kv ...string) func(string) string {
	m := map[string]string{}
	for i := 0; i+1 < len(kv); i += 2 {
		m[kv[i]] = kv[i+1]
	}
	return func(k string) string { return m[k] }
}

// TestResolve: the configuration wins over the environment; HTTPS_PROXY before HTTP_PROXY;
// NO_PROXY only with an environment proxy; credentials from the password file.
func TestResolve(t *testing.T) {
	dir := t.TempDir()
	pw := filepath.Join(dir, "pw")
	if err := os.WriteFile(pw, []byte("hunter2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	type out struct {
		Proxy, Source string
		Auth          bool
		Direct        []string // of probe addresses, those reached directly
	}
	probes := []string{"broker.example.com:8883", "s3.example.com:443", "10.1.2.3:443", "localhost:1883", "other.net:443"}
	for _, tc := range []struct {
		name string
		s    webproxy.Settings
		env  func(string) string
		want *out
	}{
		{"nothing", webproxy.Settings{}, env(), nil},
		{"config", webproxy.Settings{URL: "http://proxy.lan:3128"}, env(), &out{"http://proxy.lan:3128", "config", false, nil}},
		{"config wins over env", webproxy.Settings{URL: "https://proxy.lan", NoProxy: []string{".example.com"}},
			env("HTTPS_PROXY", "http://other:1", "NO_PROXY", "*"),
			&out{"https://proxy.lan:443", "config", false, []string{"broker.example.com:8883", "s3.example.com:443"}}},
		{"HTTPS_PROXY first", webproxy.Settings{}, env("HTTPS_PROXY", "http://a:1", "HTTP_PROXY", "http://b:2"), &out{"http://a:1", "HTTPS_PROXY", false, nil}},
		{"https_proxy", webproxy.Settings{}, env("https_proxy", "http://a:1", "HTTP_PROXY", "http://b:2"), &out{"http://a:1", "https_proxy", false, nil}},
		{"HTTP_PROXY", webproxy.Settings{}, env("HTTP_PROXY", "http://b:2"), &out{"http://b:2", "HTTP_PROXY", false, nil}},
		{"env credentials", webproxy.Settings{}, env("HTTPS_PROXY", "http://u:p@a:1"), &out{"http://a:1", "HTTPS_PROXY", true, nil}},
		{"NO_PROXY", webproxy.Settings{}, env("HTTPS_PROXY", "http://a:1", "NO_PROXY", "s3.example.com, 10.0.0.0/8,localhost:1883"),
			&out{"http://a:1", "HTTPS_PROXY", false, []string{"s3.example.com:443", "10.1.2.3:443", "localhost:1883"}}},
		{"no_proxy port mismatch", webproxy.Settings{}, env("HTTPS_PROXY", "http://a:1", "no_proxy", "example.com:443"),
			&out{"http://a:1", "HTTPS_PROXY", false, []string{"s3.example.com:443"}}},
		{"no_proxy star", webproxy.Settings{}, env("HTTPS_PROXY", "http://a:1", "NO_PROXY", "*"),
			&out{"http://a:1", "HTTPS_PROXY", false, probes}},
		{"config auth", webproxy.Settings{URL: "http://p:8080", User: "gw", PasswordFile: pw}, env(), &out{"http://p:8080", "config", true, nil}},
		{"relative password file", webproxy.Settings{URL: "http://p:8080", User: "gw", PasswordFile: "pw"}, env("CREDENTIALS_DIRECTORY", dir),
			&out{"http://p:8080", "config", true, nil}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := webproxy.Resolve(tc.s, tc.env)
			if err != nil {
				t.Fatal(err)
			}
			var got *out
			if p != nil {
				got = &out{Proxy: p.String(), Source: p.Source, Auth: p.Authenticated()}
				for _, a := range probes {
					if p.Bypass(a) {
						got.Direct = append(got.Direct, a)
					}
				}
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s", diff)
			}
		})
	}
}

// TestResolveErrors: bad settings are refused with a message that never holds a password.
func TestResolveErrors(t *testing.T) {
	dir := t.TempDir()
	empty := filepath.Join(dir, "empty")
	if err := os.WriteFile(empty, []byte("\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name string
		s    webproxy.Settings
		env  func(string) string
		want string
	}{
		{"socks", webproxy.Settings{URL: "socks5://p:1080"}, env(), "not an http:// or https:// URL"},
		{"no host", webproxy.Settings{URL: "http://"}, env(), "not an http:// or https:// URL"},
		{"path", webproxy.Settings{URL: "http://p:1/x"}, env(), "not an http:// or https:// URL"},
		{"bad env", webproxy.Settings{}, env("HTTPS_PROXY", "ftp://u:topsecret@p"), "(HTTPS_PROXY)"},
		{"credentials in config url", webproxy.Settings{URL: "http://u:topsecret@p:1"}, env(), "use user and password_file"},
		{"user without password", webproxy.Settings{URL: "http://p:1", User: "u"}, env(), "go together"},
		{"password without user", webproxy.Settings{URL: "http://p:1", PasswordFile: empty}, env(), "go together"},
		{"empty password", webproxy.Settings{URL: "http://p:1", User: "u", PasswordFile: empty}, env(), "one non-empty line"},
		{"missing password file", webproxy.Settings{URL: "http://p:1", User: "u", PasswordFile: filepath.Join(dir, "nope")}, env(), "no such file"},
		{"relative without credentials dir", webproxy.Settings{URL: "http://p:1", User: "u", PasswordFile: "pw"}, env(), "CREDENTIALS_DIRECTORY"},
		{"settings without url", webproxy.Settings{NoProxy: []string{"a"}}, env("HTTPS_PROXY", "http://a:1"), "need url"},
		{"bad no_proxy", webproxy.Settings{URL: "http://p:1", NoProxy: []string{"a:b"}}, env(), "bad port"},
		{"missing proxy ca", webproxy.Settings{URL: "https://p:1", CAFile: filepath.Join(dir, "nope")}, env(), "ca_file"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := webproxy.Resolve(tc.s, tc.env)
			if err == nil {
				t.Fatalf("accepted: %v", p)
			}
			if !strings.Contains(err.Error(), tc.want) {
				t.Errorf("error %q, want it to mention %q", err, tc.want)
			}
			if strings.Contains(err.Error(), "topsecret") {
				t.Errorf("error shows the password: %v", err)
			}
		})
	}
}

func needTinyproxy(t *testing.T) {
	t.Helper()
	_, err := harness.FindTinyproxy()
	testenv.Need(t, err)
}

// echoServer answers every connection by echoing what it reads.
func echoServer(t *testing.T) string {
	t.Helper()
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { ln.Close() })
	go func() {
		for {
			c, err := ln.Accept()
			if err != nil {
				return
			}
			go func() {
				defer c.Close()
				_, _ = io.Copy(c, c)
			}()
		}
	}()
	return ln.Addr().String()
}

func ctxT(t *testing.T) context.Context {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	t.Cleanup(cancel)
	return ctx
}

// TestTunnel: CONNECT through tinyproxy, over TCP and over TLS to the proxy, and each kind
// of failure typed: unreachable proxy, credentials missing or wrong, a refused port, an
// unreachable target.
func TestTunnel(t *testing.T) {
	needTinyproxy(t)
	ctx := ctxT(t)
	echo := echoServer(t)
	_, echoPort, _ := net.SplitHostPort(echo)
	port, _ := strconv.Atoi(echoPort)
	const secret = "s3cret-pass"
	pwFile := filepath.Join(t.TempDir(), "pw")
	if err := os.WriteFile(pwFile, []byte(secret), 0o600); err != nil {
		t.Fatal(err)
	}
	wrongFile := filepath.Join(t.TempDir(), "wrong")
	if err := os.WriteFile(wrongFile, []byte("wrong-pass"), 0o600); err != nil {
		t.Fatal(err)
	}
	plain, err := harness.StartWebProxy(ctx, t.TempDir(), harness.WebProxyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(plain.Stop)
	authed, err := harness.StartWebProxy(ctx, t.TempDir(), harness.WebProxyOptions{User: "gw", Password: secret})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(authed.Stop)
	tlsPx, err := harness.StartWebProxy(ctx, t.TempDir(), harness.WebProxyOptions{TLS: true})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(tlsPx.Stop)
	portsOnly, err := harness.StartWebProxy(ctx, t.TempDir(), harness.WebProxyOptions{ConnectPorts: []int{port + 1}})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(portsOnly.Stop)
	closed := func() string {
		ln, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		defer ln.Close()
		return ln.Addr().String()
	}()

	type want struct {
		Err       string // "", "unreachable", "auth", "refused"
		Status    int
		Permanent bool
	}
	for _, tc := range []struct {
		name   string
		s      webproxy.Settings
		target string
		want   want
	}{
		{"plain", webproxy.Settings{URL: plain.URL()}, echo, want{}},
		{"tls to the proxy", webproxy.Settings{URL: tlsPx.URL(), CAFile: tlsPx.CAFile}, echo, want{}},
		{"basic auth", webproxy.Settings{URL: authed.URL(), User: "gw", PasswordFile: pwFile}, echo, want{}},
		{"no credentials", webproxy.Settings{URL: authed.URL()}, echo, want{"auth", http.StatusProxyAuthRequired, true}},
		// tinyproxy answers wrong credentials with 401.
		{"wrong credentials", webproxy.Settings{URL: authed.URL(), User: "gw", PasswordFile: wrongFile}, echo, want{"auth", http.StatusUnauthorized, true}},
		{"port refused", webproxy.Settings{URL: portsOnly.URL()}, echo, want{"refused", http.StatusForbidden, true}},
		{"target unreachable", webproxy.Settings{URL: plain.URL()}, closed, want{"refused", http.StatusInternalServerError, false}},
		{"proxy unreachable", webproxy.Settings{URL: "http://" + closed}, echo, want{"unreachable", 0, false}},
		{"proxy certificate untrusted", webproxy.Settings{URL: tlsPx.URL()}, echo, want{"unreachable", 0, false}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			p, err := webproxy.Resolve(tc.s, env())
			if err != nil {
				t.Fatal(err)
			}
			c, err := p.DialContext(ctx, "tcp", tc.target)
			var got want
			if err != nil {
				var pe *webproxy.Error
				if !errors.As(err, &pe) {
					t.Fatalf("untyped error %T: %v", err, err)
				}
				for name, sentinel := range map[string]error{"unreachable": webproxy.ErrUnreachable, "auth": webproxy.ErrAuth, "refused": webproxy.ErrRefused} {
					if errors.Is(err, sentinel) {
						got.Err = name
					}
				}
				got.Status, got.Permanent = pe.Status, pe.Permanent()
				if strings.Contains(err.Error(), secret) || strings.Contains(err.Error(), "wrong-pass") {
					t.Errorf("error shows a password: %v", err)
				}
			} else {
				defer c.Close()
				msg := []byte("through the tunnel")
				if _, err := c.Write(msg); err != nil {
					t.Fatal(err)
				}
				back := make([]byte, len(msg))
				if _, err := io.ReadFull(c, back); err != nil || string(back) != string(msg) {
					t.Fatalf("echo %q, %v", back, err)
				}
			}
			if diff := cmp.Diff(tc.want, got); diff != "" {
				t.Errorf("(-want +got):\n%s\nerror: %v", diff, err)
			}
		})
	}
	if n := plain.Tunnels(echo); n < 1 {
		t.Errorf("tinyproxy logged %d CONNECTs to %s", n, echo)
	}
}
