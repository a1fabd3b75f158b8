package harness

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
)

// MosquittoPath is where Debian installs the broker.
const MosquittoPath = "/usr/sbin/mosquitto"

// bridgeClientID is the client id an edge broker's bridge uses on its upstream.
const bridgeClientID = "gwota-bridge"

// FindMosquitto returns the mosquitto binary, or an error saying it is not installed.
func FindMosquitto() (string, error) {
	if _, err := os.Stat(MosquittoPath); err == nil {
		return MosquittoPath, nil
	}
	if p, err := exec.LookPath("mosquitto"); err == nil {
		return p, nil
	}
	return "", errors.New("mosquitto is not installed (Debian package mosquitto; scripts/test.sh installs it)")
}

// Mosquitto is a broker run as a separate process on a loopback port.
type Mosquitto struct {
	Bin  string
	Port int
	Conf string
	Log  string
	// Upstream is the broker this one bridges $aws/# to (nil: not bridged).
	Upstream *Mosquitto

	mu      sync.Mutex
	proc    *Proc
	waiters []*lineWaiter
}

type lineWaiter struct {
	substr string
	ch     chan struct{}
}

// StartMosquitto writes a configuration in dir (a free loopback port, TCP_NODELAY, a raised
// queue limit so QoS 1 stream blocks are not dropped) and starts the broker.
func StartMosquitto(ctx context.Context, dir string) (*Mosquitto, error) {
	return startMosquitto(ctx, dir, "mosquitto", nil)
}

// StartMosquittoEdge starts a second broker whose $aws/# topics are bridged both ways to
// upstream, with persistence (sessions survive its restart). Devices connect to the edge
// and the emulator to upstream: restarting the edge is a broker restart as the device sees
// it, while the emulator's own connection (which does not reconnect) stays up.
func StartMosquittoEdge(ctx context.Context, dir string, upstream *Mosquitto) (*Mosquitto, error) {
	return startMosquitto(ctx, dir, "mosquitto-edge", upstream)
}

func startMosquitto(ctx context.Context, dir, name string, upstream *Mosquitto) (*Mosquitto, error) {
	bin, err := FindMosquitto()
	if err != nil {
		return nil, err
	}
	port, err := freePort()
	if err != nil {
		return nil, err
	}
	m := &Mosquitto{Bin: bin, Port: port, Conf: filepath.Join(dir, name+".conf"), Log: filepath.Join(dir, name+".log"), Upstream: upstream}
	conf := fmt.Sprintf(`# written by the gwota test harness
listener %d 127.0.0.1
allow_anonymous true
set_tcp_nodelay true
max_queued_messages 100000
max_packet_size 1048576
log_dest stderr
log_type error
log_type warning
log_type notice
log_type information
connection_messages true
`, port)
	if upstream == nil {
		conf += "persistence false\n"
	} else {
		pdir := filepath.Join(dir, name+"-db")
		if err := os.MkdirAll(pdir, 0o700); err != nil {
			return nil, err
		}
		conf += fmt.Sprintf(`persistence true
persistence_location %s/
autosave_interval 1
connection upstream
address 127.0.0.1:%d
topic $aws/# both 1
bridge_protocol_version mqttv311
try_private true
cleansession false
remote_clientid %s
restart_timeout 1
notifications false
`, pdir, upstream.Port, bridgeClientID)
	}
	if err := os.WriteFile(m.Conf, []byte(conf), 0o644); err != nil {
		return nil, err
	}
	return m, m.Start(ctx)
}

// URL is the broker URL for clients.
func (m *Mosquitto) URL() string { return fmt.Sprintf("mqtt://127.0.0.1:%d", m.Port) }

// waitLine returns a channel closed when the broker logs a line containing substr (only
// lines logged from now on count).
func (m *Mosquitto) waitLine(substr string) <-chan struct{} {
	w := &lineWaiter{substr: substr, ch: make(chan struct{})}
	m.mu.Lock()
	m.waiters = append(m.waiters, w)
	m.mu.Unlock()
	return w.ch
}

func (m *Mosquitto) scanLines(r io.Reader) {
	sc := bufio.NewScanner(r)
	for sc.Scan() {
		line := sc.Text()
		m.mu.Lock()
		kept := m.waiters[:0]
		for _, w := range m.waiters {
			if strings.Contains(line, w.substr) {
				close(w.ch)
				continue
			}
			kept = append(kept, w)
		}
		m.waiters = kept
		m.mu.Unlock()
	}
}

// Start runs the broker (again, on the same port) and returns once it serves and, for an
// edge broker, once its bridge is connected upstream.
func (m *Mosquitto) Start(ctx context.Context) error {
	pr, pw := io.Pipe()
	// mosquitto 2.x logs "mosquitto version 2.0.11 running" once its listeners are open.
	running := m.waitLine(" running")
	var bridged <-chan struct{}
	if m.Upstream != nil {
		bridged = m.Upstream.waitLine(" as " + bridgeClientID)
	}
	p, err := startProc("mosquitto", []string{m.Bin, "-c", m.Conf}, nil, m.Log, pw, func(*Proc, bool) { pw.Close() })
	if err != nil {
		return err
	}
	m.mu.Lock()
	m.proc = p
	m.mu.Unlock()
	go m.scanLines(pr)
	select {
	case <-running:
	case <-p.Done():
		return fmt.Errorf("mosquitto exited before listening: %s", tail(m.Log, 20))
	case <-ctx.Done():
		_ = p.Kill(context.Background())
		return context.Cause(ctx)
	}
	// mosquitto logs "running" a moment before it starts honouring SIGTERM (a signal in
	// between is lost); a CONNACK proves its main loop runs.
	if err := m.probe(ctx); err != nil {
		return err
	}
	if bridged != nil {
		select {
		case <-bridged:
		case <-p.Done():
			return fmt.Errorf("mosquitto edge exited before its bridge connected: %s", tail(m.Log, 20))
		case <-ctx.Done():
			return fmt.Errorf("mosquitto edge bridge not connected upstream: %w", context.Cause(ctx))
		}
	}
	return nil
}

// Stop stops the broker (SIGTERM) and waits for it.
func (m *Mosquitto) Stop(ctx context.Context) error {
	m.mu.Lock()
	p := m.proc
	m.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.Stop(ctx)
}

// Kill stops the broker abruptly.
func (m *Mosquitto) Kill(ctx context.Context) error {
	m.mu.Lock()
	p := m.proc
	m.mu.Unlock()
	if p == nil {
		return nil
	}
	return p.Kill(ctx)
}

// Restart stops the broker and starts it again on the same port.
func (m *Mosquitto) Restart(ctx context.Context) error {
	if err := m.Stop(ctx); err != nil {
		return err
	}
	return m.Start(ctx)
}

// freePort asks the kernel for a free loopback port. Another process could take it before
// mosquitto binds it; the start then fails loudly rather than silently.
func freePort() (int, error) {
	ln, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return 0, err
	}
	defer ln.Close()
	return ln.Addr().(*net.TCPAddr).Port, nil
}

// probe sends an MQTT 3.1.1 CONNECT and waits for the CONNACK.
func (m *Mosquitto) probe(ctx context.Context) error {
	var d net.Dialer
	c, err := d.DialContext(ctx, "tcp", fmt.Sprintf("127.0.0.1:%d", m.Port))
	if err != nil {
		return fmt.Errorf("mosquitto probe: %w", err)
	}
	defer c.Close()
	if dl, ok := ctx.Deadline(); ok {
		_ = c.SetDeadline(dl)
	}
	// CONNECT: protocol "MQTT" level 4, clean session, keepalive 60, empty client id.
	connect := []byte{0x10, 12, 0, 4, 'M', 'Q', 'T', 'T', 4, 0x02, 0, 60, 0, 0}
	if _, err := c.Write(connect); err != nil {
		return fmt.Errorf("mosquitto probe: %w", err)
	}
	ack := make([]byte, 4)
	if _, err := io.ReadFull(c, ack); err != nil {
		return fmt.Errorf("mosquitto probe: %w", err)
	}
	if ack[0] != 0x20 || ack[3] != 0 {
		return fmt.Errorf("mosquitto probe: unexpected CONNACK % x", ack)
	}
	_, _ = c.Write([]byte{0xe0, 0})
	return nil
}
