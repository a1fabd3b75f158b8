package hostile

import (
	"bytes"
	"context"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"google.golang.org/grpc/codes"
	grpcstatus "google.golang.org/grpc/status"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/client"

	"github.com/gwota/gwota/test/testenv"
)

// answerBound is how long a legitimate call may take while the writer is under load.
const answerBound = 2 * time.Second

// timed runs call and returns how long it took.
func timed(call func() error) (time.Duration, error) {
	t0 := time.Now()
	err := call()
	return time.Since(t0), err
}

func (s *summary) latency(key string, d time.Duration) {
	s.mu.Lock()
	defer s.mu.Unlock()
	if ms := float64(d.Microseconds()) / 1000; ms > s.LatencyMS[key] {
		s.LatencyMS[key] = ms
	}
}

// legitCalls: what ota-net does between downloads (handshake, state, a begin and an abort on
// the file target), each within answerBound.
func legitCalls(t *testing.T, ctx context.Context, w *writer, s *summary, key string, rounds int) {
	t.Helper()
	c, err := client.Dial(ctx, w.sock, client.Options{Name: "legit"})
	if err != nil {
		t.Fatal(err)
	}
	defer c.Close()
	raw := c.Raw()
	for i := range rounds {
		var id string
		for _, call := range []struct {
			name string
			fn   func() error
		}{
			{"handshake", func() error { _, err := c.Handshake(ctx, nil); return err }},
			{"state", func() error { _, err := c.State(ctx); return err }},
			{"begin", func() error {
				r, err := raw.BeginSession(ctx, &otav1.BeginSessionRequest{JobId: fmt.Sprintf("legit-%s-%d", key, i), FileType: ptr(int32(1)), FileSize: 5000, BlockSize: 1024,
					SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: w.sig, CertName: w.trusted.CertName})
				id = r.GetSession().GetSessionId()
				return err
			}},
			{"abort", func() error {
				_, err := raw.AbortSession(ctx, &otav1.AbortSessionRequest{SessionId: id})
				return err
			}},
		} {
			d, err := timed(call.fn)
			s.latency(key, d)
			if err != nil {
				s.failed(t, "legitimate %s under %s: %v", call.name, key, err)
				return
			}
			if d > answerBound {
				s.failed(t, "legitimate %s under %s took %v (bound %v)", call.name, key, d, answerBound)
			}
		}
	}
}

func concurrentClients(t *testing.T, ctx context.Context, w *writer, s *summary, n int) {
	const cat = "concurrent_clients"
	const clients = 200
	setup := w.client(t).Raw()
	shared := begin(t, ctx, setup, w.beginReq("conc-1"))
	defer abort(ctx, setup, shared)
	for round := range n {
		var wg sync.WaitGroup
		for i := range clients {
			wg.Add(1)
			go func() {
				defer wg.Done()
				c, err := client.Dial(ctx, w.sock, client.Options{Name: fmt.Sprintf("conc-%d", i), MaxMessageSize: 8 << 20})
				if err != nil {
					s.failed(t, "client %d: %v", i, err)
					return
				}
				defer c.Close()
				raw := c.Raw()
				check := func(what string, err error, ok bool) {
					s.tried(cat, 1)
					if err == nil {
						if !ok {
							s.failed(t, "client %d: %s accepted", i, what)
						}
						return
					}
					r, typed := refusal(err)
					if !typed {
						s.failed(t, "client %d: %s: untyped %v", i, what, err)
						return
					}
					s.reason(cat, r)
				}
				d, err := timed(func() error {
					_, err := raw.Handshake(ctx, &otav1.HandshakeRequest{ProtocolVersion: otav1.ProtocolVersion_PROTOCOL_VERSION_1})
					return err
				})
				s.latency(cat, d)
				check("handshake", err, true)
				if err != nil {
					return
				}
				_, err = raw.GetState(ctx, &otav1.GetStateRequest{})
				check("state", err, true)
				_, err = raw.GetExtensions(ctx, &otav1.GetExtensionsRequest{})
				check("extensions", err, true)
				r, err := raw.BeginSession(ctx, w.beginReq("conc-1"))
				check("resume", err, true)
				if err == nil && r.GetSession().GetSessionId() != shared {
					s.failed(t, "client %d resumed session %s, want %s", i, r.GetSession().GetSessionId(), shared)
				}
				_, err = raw.BeginSession(ctx, w.beginReq(fmt.Sprintf("conc-other-%d", i)))
				check("begin another job", err, false)
				k := (i + round*clients) % nBlocks()
				err = rawWrite(ctx, raw, shared, 1, blocks(w.image, k, k+1), i%16 == 0)
				check("write a block", err, true)
				err = rawWrite(ctx, raw, shared, 2, []*otav1.Block{{Offset: uint64(imageSize + i), Data: []byte{1}}}, false)
				check("write out of range", err, false)
				_, err = raw.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: shared})
				check("finish", err, true) // refused while blocks are missing: any typed reason
				_, err = raw.Activate(ctx, &otav1.ActivateRequest{SessionId: fmt.Sprintf("%032x", i)})
				check("activate a guessed id", err, false)
				_, err = raw.Commit(ctx, &otav1.CommitRequest{JobId: "conc-1"})
				check("commit", err, false)
			}()
		}
		wg.Wait()
	}
	// The shared session completes as if nothing had happened (the clients' blocks may
	// already have completed it and one of their finishes verified it: then writes are
	// refused as the session no longer receives).
	if err := writeAll(ctx, setup, shared, w.image); err != nil {
		if r, _ := refusal(err); r != rBadHandle {
			s.failed(t, "completing the shared session: %v", err)
			return
		}
	}
	if _, err := setup.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: shared}); err != nil {
		s.failed(t, "finish the shared session: %v", err)
	} else if !w.slotHolds(w.image) {
		s.failed(t, "shared session verified but the slot does not hold the image")
	}
	noActivation(t, w, s)
}

func idleConnections(t *testing.T, ctx context.Context, w *writer, s *summary, n int) {
	const cat = "idle_connections"
	const raw, h2 = 250, 250
	var conns []net.Conn
	var clients []*client.Client
	defer func() {
		for _, c := range conns {
			c.Close()
		}
		for _, c := range clients {
			c.Close()
		}
	}()
	// Half: sockets that connect and never speak.
	for range raw {
		c, err := net.Dial("unix", w.sock)
		if err != nil {
			s.failed(t, "connection %d refused: %v", len(conns), err)
			return
		}
		conns = append(conns, c)
	}
	// Half: full gRPC connections that handshake once and then idle.
	for i := range h2 {
		c, err := client.Dial(ctx, w.sock, client.Options{Name: fmt.Sprintf("idle-%d", i)})
		if err != nil {
			t.Fatal(err)
		}
		clients = append(clients, c)
		if _, err := c.Handshake(ctx, nil); err != nil {
			s.failed(t, "idle client %d: %v", i, err)
			return
		}
	}
	s.tried(cat, raw+h2)
	rss, _, fds := w.procStatus(t)
	s.mu.Lock()
	s.RSSKiB["with_500_idle_connections"] = rss
	s.mu.Unlock()
	t.Logf("500 idle connections: writer RSS %d KiB, %d open files", rss, fds)
	legitCalls(t, ctx, w, s, cat, 5*n)
}

// h2frame is an HTTP/2 frame header (RFC 9113 section 4.1) and its payload.
func h2frame(typ, flags byte, stream uint32, payload []byte) []byte {
	b := make([]byte, 9, 9+len(payload))
	b[0], b[1], b[2] = byte(len(payload)>>16), byte(len(payload)>>8), byte(len(payload))
	b[3], b[4] = typ, flags
	binary.BigEndian.PutUint32(b[5:], stream&0x7fffffff)
	return append(b, payload...)
}

// hpackLiteral encodes name: value as "literal header field without indexing, new name"
// (RFC 7541 section 6.2.2), short strings only.
func hpackLiteral(name, value string) []byte {
	b := []byte{0x00, byte(len(name))}
	b = append(b, name...)
	b = append(b, byte(len(value)))
	return append(b, value...)
}

const h2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"

func grpcHeaders(method string) []byte {
	var hb []byte
	for _, kv := range [][2]string{{":method", "POST"}, {":scheme", "http"}, {":path", "/ota.v1.Writer/" + method},
		{":authority", "localhost"}, {"content-type", "application/grpc"}, {"te", "trailers"}} {
		hb = append(hb, hpackLiteral(kv[0], kv[1])...)
	}
	return h2frame(0x1, 0x4, 1, hb) // HEADERS, END_HEADERS
}

func halfSentFrames(t *testing.T, ctx context.Context, w *writer, s *summary, n int) {
	const cat = "half_sent_frames"
	settings := h2frame(0x4, 0, 0, nil)
	headers := grpcHeaders("WriteBatch")
	// A gRPC message that announces 100000 bytes and delivers 1000.
	msg := []byte{0, 0, 0x01, 0x86, 0xa0}
	msg = append(msg, bytes.Repeat([]byte{0x0a}, 1000)...)
	data := h2frame(0x0, 0, 1, msg)
	partial := [][]byte{
		[]byte(h2Preface[:10]),
		append([]byte(h2Preface), h2frame(0x4, 0, 0, make([]byte, 18))[:15]...),
		append(append([]byte(h2Preface), settings...), headers[:len(headers)-7]...),
		append(append(append([]byte(h2Preface), settings...), headers...), data...),
		append(append(append([]byte(h2Preface), settings...), grpcHeaders("WriteBlocks")...), data[:500]...),
		append([]byte(h2Preface), h2frame(0x0, 0, 1, nil)[:4]...),
		[]byte("GET / HTTP/1.1\r\nHost: x\r\n\r\n"),
		bytes.Repeat([]byte{0xff}, 4096),
	}
	var conns []net.Conn
	defer func() {
		for _, c := range conns {
			c.Close()
		}
	}()
	for range n {
		for i, p := range partial {
			c, err := net.Dial("unix", w.sock)
			if err != nil {
				s.failed(t, "dial: %v", err)
				return
			}
			conns = append(conns, c)
			if _, err := c.Write(p); err != nil {
				s.failed(t, "half frame %d: %v", i, err)
			}
			s.tried(cat, 1)
		}
	}
	// While they hang: a whole session, write to verify, and the ordinary calls.
	legitCalls(t, ctx, w, s, cat, 3)
	c := w.client(t).Raw()
	var id string
	d, err := timed(func() error {
		id = begin(t, ctx, c, w.beginReq("half-legit"))
		if err := writeAll(ctx, c, id, w.image); err != nil {
			return err
		}
		_, err := c.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: id})
		return err
	})
	s.latency(cat+"_whole_session", d)
	if err != nil {
		s.failed(t, "session while half-sent frames hang: %v", err)
	}
	abort(ctx, c, id)
	// The garbage connections were closed by the writer; the half-sent ones are still open
	// (the writer's connection timeout ends them later); none of it blocked anything above.
	for i, c := range conns[len(conns)-2:] {
		c.SetReadDeadline(time.Now().Add(5 * time.Second))
		// EOF, or a reset when the writer closed with our garbage unread.
		if _, err := io.Copy(io.Discard, c); err != nil && !errors.Is(err, syscall.ECONNRESET) {
			s.failed(t, "garbage connection %d not closed by the writer: %v", i, err)
		}
	}
}

// intruderResult is one call made by the intruder process.
type intruderResult struct {
	Call   string `json:"call"`
	Code   string `json:"code"`
	Reason string `json:"reason"`
	Typed  bool   `json:"typed"`
	Err    string `json:"err"`
}

// intruder runs in the test binary re-executed under another uid: every call must be refused.
func intruder(sock string) int {
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	c, err := client.Dial(ctx, sock, client.Options{Name: "intruder"})
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 2
	}
	defer c.Close()
	w := c.Raw()
	ft := int32(0)
	calls := []struct {
		name string
		fn   func() error
	}{
		{"Handshake", func() error {
			_, err := w.Handshake(ctx, &otav1.HandshakeRequest{ProtocolVersion: otav1.ProtocolVersion_PROTOCOL_VERSION_1})
			return err
		}},
		{"GetState", func() error { _, err := w.GetState(ctx, &otav1.GetStateRequest{}); return err }},
		{"BeginSession", func() error {
			_, err := w.BeginSession(ctx, &otav1.BeginSessionRequest{JobId: "intruder", FileType: &ft, FileSize: 1000, BlockSize: 256, SigAlgorithm: 1, Signature: []byte{1}})
			return err
		}},
		{"WriteBatch", func() error {
			_, err := w.WriteBatch(ctx, &otav1.WriteBlocksRequest{SessionId: strings.Repeat("0", 32), Blocks: []*otav1.Block{{Offset: 0, Data: []byte{1}}}})
			return err
		}},
		{"WriteBlocks", func() error {
			st, err := w.WriteBlocks(ctx)
			if err != nil {
				return err
			}
			st.Send(&otav1.WriteBlocksRequest{SessionId: strings.Repeat("0", 32), Seq: 1})
			st.CloseSend()
			for {
				if _, err := st.Recv(); err != nil {
					return err
				}
			}
		}},
		{"FinishSession", func() error { _, err := w.FinishSession(ctx, &otav1.FinishSessionRequest{SessionId: "x"}); return err }},
		{"AbortSession", func() error { _, err := w.AbortSession(ctx, &otav1.AbortSessionRequest{SessionId: "x"}); return err }},
		{"Activate", func() error { _, err := w.Activate(ctx, &otav1.ActivateRequest{SessionId: "x"}); return err }},
		{"Reboot", func() error { _, err := w.Reboot(ctx, &otav1.RebootRequest{}); return err }},
		{"SelfTest", func() error { _, err := w.SelfTest(ctx, &otav1.SelfTestRequest{}); return err }},
		{"Commit", func() error { _, err := w.Commit(ctx, &otav1.CommitRequest{}); return err }},
		{"Reject", func() error { _, err := w.Reject(ctx, &otav1.RejectRequest{}); return err }},
		{"GetExtensions", func() error { _, err := w.GetExtensions(ctx, &otav1.GetExtensionsRequest{}); return err }},
	}
	var out []intruderResult
	// What the writer does with a peer uid it does not allow: it closes the connection at
	// accept, before a byte of HTTP/2 (the CLI reports that as permission_denied).
	probe := intruderResult{Call: "probe"}
	if conn, err := net.Dial("unix", sock); err != nil {
		probe.Err = err.Error()
	} else {
		conn.SetReadDeadline(time.Now().Add(5 * time.Second))
		n, err := conn.Read(make([]byte, 1))
		switch {
		case n == 0 && (errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)):
			probe.Code = "closed"
		case n > 0:
			probe.Code = "answered"
		default:
			probe.Code, probe.Err = "no answer", fmt.Sprint(err)
		}
		conn.Close()
	}
	out = append(out, probe)
	for _, call := range calls {
		err := call.fn()
		r := intruderResult{Call: call.name}
		if err != nil {
			st, _ := grpcstatus.FromError(err)
			reason, typed := refusal(err)
			r.Code, r.Reason, r.Typed, r.Err = st.Code().String(), reason.String(), typed, err.Error()
		}
		out = append(out, r)
	}
	json.NewEncoder(os.Stdout).Encode(out)
	return 0
}

func otherUID(t *testing.T, ctx context.Context, w *writer, s *summary, n int) {
	const cat = "other_uid"
	testenv.NeedRoot(t, "other uid: to switch uid")
	setpriv, err := exec.LookPath("setpriv")
	if err != nil {
		t.Fatalf("other uid needs setpriv (util-linux): %v", err)
	}
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	// The test binary, where the other uid can run it.
	bin := filepath.Join(w.dir, "intruder.test")
	b, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(bin, b, 0o755); err != nil {
		t.Fatal(err)
	}
	as := func(argv ...string) *exec.Cmd {
		return exec.CommandContext(ctx, setpriv, append([]string{fmt.Sprintf("--reuid=%d", intruderID), fmt.Sprintf("--regid=%d", intruderID), "--clear-groups",
			"--no-new-privs", "--"}, argv...)...)
	}
	// The writer's own CLI, as that uid, names the refusal.
	cli := filepath.Join(w.dir, "ota-writer")
	if b, err = os.ReadFile(w.bin); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(cli, b, 0o755); err != nil {
		t.Fatal(err)
	}
	for range n {
		for _, sub := range []string{"status", "accept", "reject"} {
			out, err := as(cli, sub, "--socket", w.sock).CombinedOutput()
			s.tried(cat, 1)
			if err == nil || !strings.Contains(string(out), "permission_denied") || !strings.Contains(string(out), "3002") {
				s.failed(t, "ota-writer %s as uid %d: %v, want permission_denied/3002:\n%s", sub, intruderID, err, out)
				continue
			}
			s.reason(cat, rDenied)
		}
		cmd := as(bin, "-test.run=^$")
		cmd.Env = append(os.Environ(), envRole+"=intruder", envSocket+"="+w.sock)
		var stderr bytes.Buffer
		cmd.Stderr = &stderr
		out, err := cmd.Output()
		if err != nil {
			t.Fatalf("intruder: %v\n%s", err, stderr.String())
		}
		var res []intruderResult
		if err := json.Unmarshal(out, &res); err != nil {
			t.Fatalf("intruder output %q: %v", out, err)
		}
		for _, r := range res {
			s.tried(cat, 1)
			switch {
			case r.Call == "probe":
				if r.Code != "closed" {
					s.failed(t, "uid %d: connection %s (%s), want closed at accept", intruderID, r.Code, r.Err)
				}
			case r.Code == codes.Unavailable.String() && !r.Typed:
				// Closed before any HTTP/2: no handler, nor grpc's own answers, ran.
			case r.Code == codes.PermissionDenied.String() && r.Reason == otav1.Reason_REASON_PERMISSION_DENIED.String() && r.Typed:
				// Refused per request (the second line of defence).
			default:
				s.failed(t, "uid %d: %s: %s %s typed=%v (%s)", intruderID, r.Call, r.Code, r.Reason, r.Typed, r.Err)
			}
		}
	}
	if log := tail(w.log, 400); !strings.Contains(log, "uid not allowed") || !strings.Contains(log, fmt.Sprintf("uid=%d", intruderID)) {
		s.failed(t, "the writer did not log the refused uid %d", intruderID)
	}
	noActivation(t, w, s)
}
