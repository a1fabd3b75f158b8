package mqttconn_test

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"

	"github.com/gwota/gwota/netagent/mqttconn"
	"github.com/gwota/gwota/netagent/mqttconn/mqtttest"
	"github.com/gwota/gwota/netagent/webproxy"
	"github.com/gwota/gwota/test/harness"

	"github.com/gwota/gwota/test/testenv"
)

type pki struct {
	caPEM            []byte
	ca               *x509.Certificate
	caKey            *ecdsa.PrivateKey
	dir              string
	caFile, crt, key string
	serverCert       tls.Certificate
}

func issue(t *testing.T, p *pki, cn string, server bool) (certPEM, keyPEM []byte) {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(time.Now().UnixNano()), Subject: pkix.Name{CommonName: cn},
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	if server {
		tmpl.DNSNames = []string{"localhost"}
		tmpl.IPAddresses = []net.IP{net.ParseIP("127.0.0.1")}
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageServerAuth}
	} else {
		tmpl.ExtKeyUsage = []x509.ExtKeyUsage{x509.ExtKeyUsageClientAuth}
	}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, p.ca, &k.PublicKey, p.caKey)
	if err != nil {
		t.Fatal(err)
	}
	kb, err := x509.MarshalECPrivateKey(k)
	if err != nil {
		t.Fatal(err)
	}
	return pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}), pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})
}

func newPKI(t *testing.T) *pki {
	t.Helper()
	k, err := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	if err != nil {
		t.Fatal(err)
	}
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &k.PublicKey, k)
	if err != nil {
		t.Fatal(err)
	}
	ca, _ := x509.ParseCertificate(der)
	p := &pki{ca: ca, caKey: k, dir: t.TempDir()}
	p.caPEM = pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})
	sc, sk := issue(t, p, "broker", true)
	if p.serverCert, err = tls.X509KeyPair(sc, sk); err != nil {
		t.Fatal(err)
	}
	cc, ck := issue(t, p, "gw-tls", false)
	p.caFile, p.crt, p.key = filepath.Join(p.dir, "ca.pem"), filepath.Join(p.dir, "dev.crt"), filepath.Join(p.dir, "dev.key")
	for f, b := range map[string][]byte{p.caFile: p.caPEM, p.crt: cc, p.key: ck} {
		if err := os.WriteFile(f, b, 0o600); err != nil {
			t.Fatal(err)
		}
	}
	return p
}

// helloLog records the SNI and ALPN of every TLS ClientHello a broker saw.
type helloLog struct {
	mu    sync.Mutex
	snis  []string
	alpns [][]string
}

func (h *helloLog) seen() ([]string, [][]string) {
	h.mu.Lock()
	defer h.mu.Unlock()
	return append([]string(nil), h.snis...), append([][]string(nil), h.alpns...)
}

// startTLSBroker runs a mochi broker with p's server certificate that requires a client
// certificate signed by p's CA and speaks AWS's ALPN protocol, as AWS IoT Core on port 443.
func startTLSBroker(t *testing.T, p *pki) (*mqtttest.Broker, *helloLog) {
	pool := x509.NewCertPool()
	pool.AddCert(p.ca)
	h := &helloLog{}
	srvTLS := &tls.Config{
		Certificates: []tls.Certificate{p.serverCert},
		ClientCAs:    pool,
		ClientAuth:   tls.RequireAndVerifyClientCert,
		NextProtos:   []string{mqttconn.ALPNProtocol},
		GetConfigForClient: func(hello *tls.ClientHelloInfo) (*tls.Config, error) {
			h.mu.Lock()
			h.snis = append(h.snis, hello.ServerName)
			h.alpns = append(h.alpns, hello.SupportedProtos)
			h.mu.Unlock()
			return nil, nil
		},
	}
	return mqtttest.Start(t, mqtttest.Options{TLS: srvTLS}), h
}

// Mutual TLS with SNI and ALPN against a TLS broker that requires a client certificate.
func TestMutualTLS(t *testing.T) {
	p := newPKI(t)
	b, hellos := startTLSBroker(t, p)
	_, port, _ := net.SplitHostPort(b.Addr())
	url := "mqtts://localhost:" + port
	c := dial(t, b, "gw-tls", func(cfg *mqttconn.Config) {
		cfg.BrokerURL = url
		cfg.CAFile, cfg.CertFile, cfg.KeyFile, cfg.ALPN = p.caFile, p.crt, p.key, true
	})
	ctx := ctxT(t)
	h := newCollector()
	if _, err := c.Subscribe(ctx, "tls/t", 1, h.handle); err != nil {
		t.Fatal(err)
	}
	if err := c.Publish(ctx, "tls/t", 1, []byte("secret")); err != nil {
		t.Fatal(err)
	}
	if got := h.next(t); got.payload != "secret" {
		t.Fatalf("got %+v", got)
	}
	snis, alpns := hellos.seen()
	if len(snis) == 0 || snis[0] != "localhost" {
		t.Fatalf("SNI %q", snis)
	}
	if len(alpns[0]) != 1 || alpns[0][0] != mqttconn.ALPNProtocol {
		t.Fatalf("ALPN %q", alpns[0])
	}

	// A CA that did not sign the broker: the connection never comes up.
	other := newPKI(t)
	bad, err := mqttconn.Dial(ctx, mqttconn.Config{BrokerURL: url, ClientID: "gw-bad", CAFile: other.caFile, CertFile: p.crt, KeyFile: p.key,
		BackoffMin: 50 * time.Millisecond})
	if err != nil {
		t.Fatal(err)
	}
	short, cancel := context.WithTimeout(ctx, 500*time.Millisecond)
	defer cancel()
	if err := bad.AwaitConnection(short); err == nil {
		t.Fatal("connected to a broker signed by an untrusted CA")
	}
	if err := bad.Close(ctx); err != nil {
		t.Fatal(err)
	}
}

func TestTLSConfigErrors(t *testing.T) {
	p := newPKI(t)
	ctx := ctxT(t)
	garbage := filepath.Join(p.dir, "garbage.pem")
	_ = os.WriteFile(garbage, []byte("not pem"), 0o600)
	for name, cfg := range map[string]mqttconn.Config{
		"missing ca":  {CAFile: filepath.Join(p.dir, "nope.pem"), CertFile: p.crt, KeyFile: p.key},
		"garbage ca":  {CAFile: garbage, CertFile: p.crt, KeyFile: p.key},
		"missing key": {CAFile: p.caFile, CertFile: p.crt, KeyFile: filepath.Join(p.dir, "nope.key")},
	} {
		cfg.BrokerURL, cfg.ClientID = "mqtts://localhost:8883", "x"
		if _, err := mqttconn.Dial(ctx, cfg); err == nil || strings.Contains(err.Error(), "panic") {
			t.Errorf("%s: %v", name, err)
		}
	}
}

// TestMutualTLSThroughProxy: the connection goes through tinyproxy's CONNECT tunnel, with the
// mutual TLS, SNI and ALPN x-amzn-mqtt-ca inside it exactly as without a proxy, and the
// reconnection after the broker drops the client goes through the proxy again.
func TestMutualTLSThroughProxy(t *testing.T) {
	_, err := harness.FindTinyproxy()
	testenv.Need(t, err)
	p := newPKI(t)
	b, hellos := startTLSBroker(t, p)
	_, port, _ := net.SplitHostPort(b.Addr())
	ctx := ctxT(t)
	px, err := harness.StartWebProxy(ctx, t.TempDir(), harness.WebProxyOptions{})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(px.Stop)
	proxy, err := webproxy.Resolve(webproxy.Settings{URL: px.URL()}, func(string) string { return "" })
	if err != nil {
		t.Fatal(err)
	}
	c := dial(t, b, "gw-px", func(cfg *mqttconn.Config) {
		cfg.BrokerURL = "mqtts://localhost:" + port
		cfg.CAFile, cfg.CertFile, cfg.KeyFile, cfg.ALPN = p.caFile, p.crt, p.key, true
		cfg.Proxy = proxy
	})
	if err := c.AwaitConnection(ctx); err != nil {
		t.Fatal(err)
	}
	target := "localhost:" + port
	if n := px.Tunnels(target); n != 1 {
		t.Fatalf("tinyproxy logged %d tunnels to %s, want 1", n, target)
	}
	if !b.Kick("gw-px") {
		t.Fatal("client not on the broker")
	}
	for c.Connections() < 2 {
		select {
		case <-ctx.Done():
			t.Fatal("no reconnection")
		case <-time.After(10 * time.Millisecond): // Connections has no change notification
		}
	}
	if n := px.Tunnels(target); n != 2 {
		t.Errorf("tinyproxy logged %d tunnels after the reconnection, want 2", n)
	}
	snis, alpns := hellos.seen()
	if diff := cmp.Diff([]string{"localhost", "localhost"}, snis); diff != "" {
		t.Errorf("SNI (-want +got):\n%s", diff)
	}
	for _, a := range alpns {
		if len(a) != 1 || a[0] != mqttconn.ALPNProtocol {
			t.Errorf("ALPN %q", a)
		}
	}
}
