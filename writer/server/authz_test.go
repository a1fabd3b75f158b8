package server_test

import (
	"bufio"
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"io"
	"maps"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"runtime"
	"slices"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/google/go-cmp/cmp"
	"github.com/hashicorp/go-hclog"
	"google.golang.org/grpc"
	"google.golang.org/grpc/codes"
	"google.golang.org/grpc/credentials/insecure"
	healthpb "google.golang.org/grpc/health/grpc_health_v1"
	"google.golang.org/grpc/mem"
	grpcstatus "google.golang.org/grpc/status"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"
	"google.golang.org/protobuf/reflect/protoregistry"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/server"
	"github.com/gwota/gwota/writer/writertest"

	"github.com/gwota/gwota/test/testenv"
)

// authzEnv makes the test binary run the authorization cases (read as JSON from stdin)
// against the socket it names, as whatever uid it was started under.
const authzEnv = "OTA_SERVER_TEST_AUTHZ_SOCKET"

// authzRow is a request every served RPC gets in the authorization test, and the code the
// fake writer (writertest) answers an allowed caller with (which proves the call reached the
// handler).
type authzRow struct {
	req     proto.Message
	allowed codes.Code
}

// authzRows has one row per method the writer serves: TestAuthorization derives its cases
// from the descriptors of the registered services and fails for a method without a row.
var authzRows = map[string]authzRow{
	otav1.Writer_Handshake_FullMethodName: {&otav1.HandshakeRequest{ProtocolVersion: otav1.ProtocolVersion_PROTOCOL_VERSION_1}, codes.OK},
	otav1.Writer_GetState_FullMethodName:  {&otav1.GetStateRequest{}, codes.OK},
	otav1.Writer_BeginSession_FullMethodName: {&otav1.BeginSessionRequest{JobId: "authz", FilePath: writertest.Target, FileSize: 4096, BlockSize: 4096},
		codes.OK},
	otav1.Writer_WriteBlocks_FullMethodName: {&otav1.WriteBlocksRequest{SessionId: "none", Seq: 1, Sync: true,
		Blocks: []*otav1.Block{{Offset: 0, Data: make([]byte, 512)}}}, codes.NotFound},
	otav1.Writer_WriteBatch_FullMethodName: {&otav1.WriteBlocksRequest{SessionId: "none", Seq: 1, Sync: true,
		Blocks: []*otav1.Block{{Offset: 0, Data: make([]byte, 512)}}}, codes.NotFound},
	otav1.Writer_FinishSession_FullMethodName: {&otav1.FinishSessionRequest{SessionId: "none"}, codes.NotFound},
	otav1.Writer_AbortSession_FullMethodName:  {&otav1.AbortSessionRequest{SessionId: "none"}, codes.OK},
	otav1.Writer_Activate_FullMethodName:      {&otav1.ActivateRequest{SessionId: "none"}, codes.NotFound},
	otav1.Writer_Reboot_FullMethodName:        {&otav1.RebootRequest{}, codes.OK},
	otav1.Writer_SelfTest_FullMethodName:      {&otav1.SelfTestRequest{JobId: "authz"}, codes.OK},
	otav1.Writer_Commit_FullMethodName:        {&otav1.CommitRequest{JobId: "authz"}, codes.FailedPrecondition},
	otav1.Writer_Reject_FullMethodName:        {&otav1.RejectRequest{JobId: "authz"}, codes.OK},
	otav1.Writer_GetExtensions_FullMethodName: {&otav1.GetExtensionsRequest{}, codes.OK},
	healthpb.Health_Check_FullMethodName:      {&healthpb.HealthCheckRequest{Service: api.ServiceName}, codes.OK},
	healthpb.Health_List_FullMethodName:       {&healthpb.HealthListRequest{}, codes.OK},
	// Server streaming: the first message (the current status) is the answer.
	healthpb.Health_Watch_FullMethodName: {&healthpb.HealthCheckRequest{Service: api.ServiceName}, codes.OK},
}

// Case kinds besides the RPCs themselves: what grpc answers before any interceptor runs.
const (
	kindRPC       = "rpc"
	kindMalformed = "malformed" // a body that does not decode: Internal from grpc
	kindUnknown   = "unknown"   // a method nobody serves: Unimplemented from grpc
	kindOversize  = "oversize"  // over the receive limit: ResourceExhausted from grpc
	kindRaw       = "raw"       // HTTP/2 preface and SETTINGS by hand: does the server answer at all?
	kindFlood     = "flood"     // many connections in a row, each read until the server closes it
)

const floodConns = 200

type authzCase struct {
	Name         string `json:"name"`
	Kind         string `json:"kind"`
	Method       string `json:"method,omitempty"`
	ClientStream bool   `json:"client_stream,omitempty"`
	ServerStream bool   `json:"server_stream,omitempty"`
}

type authzResult struct {
	Name string `json:"name"`
	// Code is the gRPC code, or for raw and flood cases: "closed" (the server sent nothing
	// and closed) or "answered".
	Code string `json:"code"`
	Msg  string `json:"msg,omitempty"`
}

// authzCases derives the cases from the descriptors of every service srv registers (the
// writer, health, and reflection or anything else registered later), plus what grpc answers
// on its own.
func authzCases(t *testing.T, srv *server.Server) []authzCase {
	t.Helper()
	var cases []authzCase
	served := map[string]bool{}
	infos := server.ServicesOf(srv)
	for _, name := range slices.Sorted(maps.Keys(infos)) {
		d, err := protoregistry.GlobalFiles.FindDescriptorByName(protoreflect.FullName(name))
		if err != nil {
			t.Fatalf("service %s is registered but has no descriptor: %v", name, err)
		}
		sd := d.(protoreflect.ServiceDescriptor)
		var fromInfo, fromDesc []string
		for _, m := range infos[name].Methods {
			fromInfo = append(fromInfo, m.Name)
		}
		for i := range sd.Methods().Len() {
			m := sd.Methods().Get(i)
			fromDesc = append(fromDesc, string(m.Name()))
			full := "/" + name + "/" + string(m.Name())
			served[full] = true
			if _, ok := authzRows[full]; !ok {
				t.Errorf("%s is served but has no row in authzRows: add one (request, code for an allowed caller)", full)
			}
			cases = append(cases, authzCase{Name: full, Kind: kindRPC, Method: full, ClientStream: m.IsStreamingClient(), ServerStream: m.IsStreamingServer()})
		}
		slices.Sort(fromInfo)
		slices.Sort(fromDesc)
		if d := cmp.Diff(fromDesc, fromInfo); d != "" {
			t.Errorf("service %s: registered methods differ from its descriptor (-desc +registered):\n%s", name, d)
		}
	}
	for m := range authzRows {
		if !served[m] {
			t.Errorf("authzRows has a row for %s, which is not served", m)
		}
	}
	return append(cases,
		authzCase{Name: "malformed unary body", Kind: kindMalformed, Method: otav1.Writer_Handshake_FullMethodName},
		authzCase{Name: "malformed stream body", Kind: kindMalformed, Method: otav1.Writer_WriteBlocks_FullMethodName, ClientStream: true, ServerStream: true},
		authzCase{Name: "unknown method", Kind: kindUnknown, Method: "/ota.v1.Writer/NoSuchMethod"},
		authzCase{Name: "unknown service", Kind: kindUnknown, Method: "/no.such.v1.Service/Call"},
		authzCase{Name: "oversize unary message", Kind: kindOversize, Method: otav1.Writer_WriteBatch_FullMethodName},
		authzCase{Name: "oversize stream message", Kind: kindOversize, Method: otav1.Writer_WriteBlocks_FullMethodName, ClientStream: true, ServerStream: true},
		authzCase{Name: "raw http2", Kind: kindRaw},
		authzCase{Name: "flood", Kind: kindFlood},
	)
}

// TestAuthorization calls every served RPC, and what grpc answers before the interceptors
// (malformed body, unknown method, oversize message), from a second real uid. Not allowed:
// every one sees the connection closed (Unavailable), never Internal, Unimplemented or
// ResourceExhausted; the writer logs the refusal once for all of them. Allowed: every call
// reaches its handler.
func TestAuthorization(t *testing.T) {
	requireRoot(t)
	const nobody = 65534
	bin := helperBinary(t)
	type want struct {
		codes map[string]string
		// refusalLines is how many "uid not allowed" lines the writer logs for all cases.
		refusalLines int
	}
	for _, tt := range []struct {
		name    string
		allowed []uint32
		want    func(cases []authzCase) want
	}{
		{"uid not allowed", nil, func(cases []authzCase) want {
			w := want{codes: map[string]string{}, refusalLines: 1}
			for _, c := range cases {
				w.codes[c.Name] = codes.Unavailable.String()
				if c.Kind == kindRaw || c.Kind == kindFlood {
					w.codes[c.Name] = "closed"
				}
			}
			return w
		}},
		{"uid allowed", []uint32{nobody}, func(cases []authzCase) want {
			w := want{codes: map[string]string{}}
			for _, c := range cases {
				switch c.Kind {
				case kindRPC:
					w.codes[c.Name] = authzRows[c.Method].allowed.String()
				case kindMalformed:
					w.codes[c.Name] = codes.Internal.String()
				case kindUnknown:
					w.codes[c.Name] = codes.Unimplemented.String()
				case kindOversize:
					w.codes[c.Name] = codes.ResourceExhausted.String()
				case kindRaw, kindFlood:
					w.codes[c.Name] = "answered"
				}
			}
			return w
		}},
	} {
		t.Run(tt.name, func(t *testing.T) {
			logs := &lockedBuffer{}
			log := hclog.New(&hclog.LoggerOptions{Name: "test", Level: hclog.Warn, Output: io.MultiWriter(logs, writertest.LogWriter(t))})
			r := writertest.Serve(t, writertest.NewFake(4096), server.Options{AllowedUIDs: tt.allowed}, server.ListenConfig{Mode: 0o666}, log)
			os.Chmod(filepath.Dir(r.Sock), 0o755)
			cases := authzCases(t, r.Server())
			w := tt.want(cases)

			in, err := json.Marshal(cases)
			if err != nil {
				t.Fatal(err)
			}
			cmd := exec.Command(bin, "-test.run=^$")
			cmd.Env = append(os.Environ(), authzEnv+"="+r.Sock)
			cmd.SysProcAttr = &syscall.SysProcAttr{Credential: &syscall.Credential{Uid: nobody, Gid: nobody}}
			cmd.Stdin = bytes.NewReader(in)
			var stderr bytes.Buffer
			cmd.Stderr = &stderr
			out, err := cmd.Output()
			if err != nil {
				t.Fatalf("helper under uid %d: %v\n%s", nobody, err, stderr.Bytes())
			}
			got := map[string]string{}
			msgs := map[string]string{}
			sc := bufio.NewScanner(bytes.NewReader(out))
			for sc.Scan() {
				var res authzResult
				if err := json.Unmarshal(sc.Bytes(), &res); err != nil {
					t.Fatalf("helper output %q: %v", sc.Text(), err)
				}
				got[res.Name], msgs[res.Name] = res.Code, res.Msg
			}
			if d := cmp.Diff(w.codes, got); d != "" {
				t.Errorf("outcome per case from uid %d (-want +got):\n%s", nobody, d)
				for _, name := range slices.Sorted(maps.Keys(got)) {
					if got[name] != w.codes[name] {
						t.Logf("%s: %s %s", name, got[name], msgs[name])
					}
				}
			}
			if n := strings.Count(logs.String(), "uid not allowed"); n != w.refusalLines {
				t.Errorf("writer logged %d refusal lines for %d cases and %d flood connections, want %d:\n%s", n, len(cases), floodConns, w.refusalLines, logs)
			}
			if w.refusalLines > 0 && !strings.Contains(logs.String(), fmt.Sprintf("uid=%d", nobody)) {
				t.Errorf("the refusal does not name uid %d:\n%s", nobody, logs)
			}
			// Root is always allowed, and the writer still serves.
			c := dial(t, r.Sock)
			if _, err := c.State(t.Context()); err != nil {
				t.Errorf("root after the cases: %v", err)
			}
		})
	}
}

// A peer that connects and then sends nothing, or never reads, cannot stall the accept
// path: a caller behind it is served at once.
func TestAcceptNotStalledByIdlePeers(t *testing.T) {
	requireRoot(t)
	const nobody = 65534
	r := start(t, writertest.NewFake(4096), server.Options{}, server.ListenConfig{Mode: 0o666})
	os.Chmod(filepath.Dir(r.Sock), 0o755)
	var idle []net.Conn
	t.Cleanup(func() {
		for _, c := range idle {
			c.Close()
		}
	})
	// Allowed peers (root) that stay silent: they pass the uid check and reach grpc.
	for range 32 {
		c, err := net.Dial("unix", r.Sock)
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	// Refused peers that stay silent and never read, from another uid.
	for range 32 {
		fd, err := syscall.Socket(syscall.AF_UNIX, syscall.SOCK_STREAM, 0)
		if err != nil {
			t.Fatal(err)
		}
		f := os.NewFile(uintptr(fd), "idle")
		// SO_PEERCRED records the credentials of the process at connect: connect as nobody.
		if err := connectAs(t, fd, r.Sock, nobody); err != nil {
			f.Close()
			t.Fatal(err)
		}
		c, err := net.FileConn(f)
		f.Close()
		if err != nil {
			t.Fatal(err)
		}
		idle = append(idle, c)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Second)
	defer cancel()
	c := dial(t, r.Sock)
	if _, err := c.State(ctx); err != nil {
		t.Fatalf("caller behind %d idle peers: %v", len(idle), err)
	}
}

// connectAs connects fd to sock with the effective uid set to uid for the connect only, so
// the kernel records uid as the peer (this thread only; the thread is locked and restored).
func connectAs(t *testing.T, fd int, sock string, uid int) error {
	t.Helper()
	errc := make(chan error, 1)
	go func() {
		// Not unlocked: a thread whose credentials were changed is discarded by the runtime
		// when the goroutine exits locked.
		runtime.LockOSThread()
		if _, _, e := syscall.RawSyscall(syscall.SYS_SETRESUID, ^uintptr(0), uintptr(uid), ^uintptr(0)); e != 0 {
			errc <- fmt.Errorf("setresuid: %w", e)
			return
		}
		errc <- syscall.Connect(fd, &syscall.SockaddrUnix{Name: sock})
	}()
	return <-errc
}

// TestRefusalLogRateLimit: the first refusal of each uid is logged at once, then at most one
// line per interval, each counting the refusals it did not log.
func TestRefusalLogRateLimit(t *testing.T) {
	var buf lockedBuffer
	log := hclog.New(&hclog.LoggerOptions{Name: "auth", Output: &buf, Level: hclog.Info})
	now := time.Unix(1000, 0)
	rl := server.NewRefusalLogForTest(log, time.Minute, func() time.Time { return now })
	rl.Refuse(65534) // first of uid 65534: logged
	for range 1000 {
		rl.Refuse(65534)
	}
	now = now.Add(59 * time.Second)
	rl.Refuse(1000) // first of uid 1000: logged at once, counting the 1000 before it
	for range 5 {
		rl.Refuse(1000)
	}
	now = now.Add(59 * time.Second)
	rl.Refuse(65534) // 59 s after the last line: not logged
	now = now.Add(2 * time.Second)
	rl.Refuse(65534) // a minute after the last line: logged, counting 6
	lines := strings.Split(strings.TrimSpace(buf.String()), "\n")
	want := []string{
		"uid=65534 gid=65534 pid=1 allowed_uids=[7] not_logged_since_last=0",
		"uid=1000 gid=1000 pid=1 allowed_uids=[7] not_logged_since_last=1000",
		"uid=65534 gid=65534 pid=1 allowed_uids=[7] not_logged_since_last=6",
	}
	if len(lines) != len(want) {
		t.Fatalf("%d lines, want %d:\n%s", len(lines), len(want), buf.String())
	}
	for i, w := range want {
		if !strings.Contains(lines[i], "connection refused: uid not allowed") || !strings.Contains(lines[i], w) {
			t.Errorf("line %d: %q, want the refusal with %q", i, lines[i], w)
		}
	}
}

func requireRoot(t *testing.T) {
	t.Helper()
	testenv.NeedRoot(t, "to run a client under another uid")
}

// helperBinary copies the test binary where another uid can execute it.
func helperBinary(t *testing.T) string {
	t.Helper()
	bindir, err := os.MkdirTemp("", "owb")
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { os.RemoveAll(bindir) })
	os.Chmod(bindir, 0o755)
	self, err := os.Executable()
	if err != nil {
		t.Fatal(err)
	}
	data, err := os.ReadFile(self)
	if err != nil {
		t.Fatal(err)
	}
	bin := filepath.Join(bindir, "client")
	if err := os.WriteFile(bin, data, 0o755); err != nil {
		t.Fatal(err)
	}
	return bin
}

type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
}

// authzHelper runs in the child process: every case from stdin, one JSON result per line.
func authzHelper(sock string) int {
	var cases []authzCase
	if err := json.NewDecoder(os.Stdin).Decode(&cases); err != nil {
		fmt.Fprintln(os.Stderr, "cases:", err)
		return 2
	}
	enc := json.NewEncoder(os.Stdout)
	for _, c := range cases {
		code, msg := runAuthzCase(sock, c)
		if err := enc.Encode(authzResult{Name: c.Name, Code: code, Msg: msg}); err != nil {
			fmt.Fprintln(os.Stderr, err)
			return 2
		}
	}
	return 0
}

// h2Preface is a client's HTTP/2 connection preface and an empty SETTINGS frame.
var h2Preface = append([]byte("PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"), 0, 0, 0, 4, 0, 0, 0, 0, 0)

func runAuthzCase(sock string, c authzCase) (code, msg string) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	switch c.Kind {
	case kindRaw:
		return rawConnect(ctx, sock)
	case kindFlood:
		answered := 0
		for i := range floodConns {
			code, msg := rawConnect(ctx, sock)
			switch code {
			case "answered":
				answered++
			case "closed":
			default:
				return code, fmt.Sprintf("connection %d: %s", i, msg)
			}
		}
		switch answered {
		case 0:
			return "closed", ""
		case floodConns:
			return "answered", ""
		}
		return "mixed", fmt.Sprintf("%d of %d answered", answered, floodConns)
	}
	cc, err := grpc.NewClient("unix://"+sock, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		return "client", err.Error()
	}
	defer cc.Close()
	var body []byte
	switch c.Kind {
	case kindRPC:
		row, ok := authzRows[c.Method]
		if !ok {
			body = nil // an empty request still asks the question of authorization
		} else if body, err = proto.Marshal(row.req); err != nil {
			return "marshal", err.Error()
		}
	case kindMalformed:
		body = []byte{0x0f, 0xff, 0xff} // field 1 with wire type 7: no message decodes this
	case kindOversize:
		body = make([]byte, 256<<10) // over the writer's limit for 4 KiB blocks
	}
	err = invokeRaw(ctx, cc, c, body)
	return grpcstatus.Code(err).String(), fmt.Sprint(err)
}

// rawConnect speaks HTTP/2's preface by hand and reports whether the server answered
// (its SETTINGS) or closed the connection without a byte.
func rawConnect(ctx context.Context, sock string) (string, string) {
	var d net.Dialer
	conn, err := d.DialContext(ctx, "unix", sock)
	if err != nil {
		return "dial", err.Error()
	}
	defer conn.Close()
	dl, _ := ctx.Deadline()
	conn.SetDeadline(dl)
	if _, err := conn.Write(h2Preface); err != nil {
		if errors.Is(err, syscall.EPIPE) || errors.Is(err, syscall.ECONNRESET) {
			return "closed", err.Error()
		}
		return "write", err.Error()
	}
	buf := make([]byte, 64)
	n, err := conn.Read(buf)
	switch {
	case n > 0:
		return "answered", ""
	case errors.Is(err, io.EOF), errors.Is(err, syscall.ECONNRESET):
		return "closed", err.Error()
	}
	return "read", fmt.Sprint(err)
}

// invokeRaw calls c.Method with body as the encoded request, in the method's streaming form.
func invokeRaw(ctx context.Context, cc *grpc.ClientConn, c authzCase, body []byte) error {
	opts := []grpc.CallOption{grpc.ForceCodecV2(rawCodec{}), grpc.MaxCallSendMsgSize(4 << 20)}
	var out rawMsg
	if !c.ClientStream && !c.ServerStream {
		return cc.Invoke(ctx, c.Method, rawMsg(body), &out, opts...)
	}
	st, err := cc.NewStream(ctx, &grpc.StreamDesc{ClientStreams: c.ClientStream, ServerStreams: c.ServerStream}, c.Method, opts...)
	if err != nil {
		return err
	}
	// A send on a stream the server already ended returns io.EOF; RecvMsg has the status.
	if err := st.SendMsg(rawMsg(body)); err != nil && !errors.Is(err, io.EOF) {
		return err
	}
	if err := st.CloseSend(); err != nil {
		return err
	}
	if err := st.RecvMsg(&out); !errors.Is(err, io.EOF) {
		return err
	}
	return nil
}

// rawMsg is an encoded protobuf message, sent and received as is.
type rawMsg []byte

// rawCodec passes rawMsg through; named "proto" so the server decodes with its own codec.
type rawCodec struct{}

func (rawCodec) Name() string { return "proto" }

func (rawCodec) Marshal(v any) (mem.BufferSlice, error) {
	m, ok := v.(rawMsg)
	if !ok {
		return nil, fmt.Errorf("rawCodec: %T", v)
	}
	return mem.BufferSlice{mem.SliceBuffer(m)}, nil
}

func (rawCodec) Unmarshal(data mem.BufferSlice, v any) error {
	m, ok := v.(*rawMsg)
	if !ok {
		return fmt.Errorf("rawCodec: %T", v)
	}
	*m = data.Materialize()
	return nil
}
