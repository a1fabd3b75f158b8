package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"io/fs"
	"net"
	"os"
	"slices"
	"strings"
	"syscall"
	"time"

	"google.golang.org/protobuf/encoding/protojson"

	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/assemble"
	"github.com/gwota/gwota/writer/client"
	"github.com/gwota/gwota/writer/config"
)

// defaultStale is how long a session may make no progress before status calls it stale.
const defaultStale = 15 * time.Minute

type connFlags struct {
	config, socket *string
}

func addConnFlags(fs *flag.FlagSet) connFlags {
	return connFlags{
		config: fs.String("config", "", "writer configuration `file`: its socket, and the in-process fallback when no writer runs"),
		socket: fs.String("socket", "", "writer socket `path` (default: the configuration's, else "+config.DefaultSocket+")"),
	}
}

// connect returns the running writer over its socket or, when none answers there and a
// configuration is given, the engine in-process. The second result says which ("socket" or
// "in-process") and the closer releases it.
// status, accept, reject and abort need only the control plane, which the socket client and
// the in-process engine both provide.
func connect(ctx context.Context, cf connFlags, stderr io.Writer) (api.Control, string, func(), error) {
	var cfg *config.Config
	if *cf.config != "" {
		c, err := config.Load(*cf.config)
		if err != nil {
			return nil, "", nil, usageError{err}
		}
		cfg = c
	}
	sock := *cf.socket
	if sock == "" && cfg != nil {
		sock = cfg.Socket
	}
	if sock == "" {
		sock = config.DefaultSocket
	}
	c, err := dialRunning(ctx, sock)
	if err == nil {
		return c, "socket " + sock, func() { c.Close() }, nil
	}
	if !status.IsClass(err, status.ClassUnavailable) || cfg == nil {
		return nil, "", nil, err
	}
	eng, err := assemble.NewEngine(ctx, cfg, newLogger(cfg, stderr), false)
	if err != nil {
		return nil, "", nil, err
	}
	return eng, "in-process (no writer on " + sock + ")", func() { eng.Close() }, nil
}

// dialRunning connects to a writer serving on sock; REASON_WRITER_UNAVAILABLE when nothing
// is there. A missing socket file is answered at once, a present one gets a short wait.
func dialRunning(ctx context.Context, sock string) (*client.Client, error) {
	fi, err := os.Stat(sock)
	if errors.Is(err, fs.ErrNotExist) || (err == nil && fi.Mode().Type() != fs.ModeSocket) {
		return nil, status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "no writer socket at %s", sock)
	}
	// A socket left by a dead writer refuses connections: answer at once, not after a wait.
	if conn, err := net.DialTimeout("unix", sock, time.Second); err != nil {
		if errors.Is(err, syscall.ECONNREFUSED) {
			return nil, status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "no writer serving on %s: %w", sock, err)
		}
	} else {
		err := probeRefused(conn, sock)
		conn.Close()
		if err != nil {
			return nil, err
		}
	}
	c, err := client.Dial(ctx, sock, client.Options{Name: "ota-writer cli"})
	if err != nil {
		return nil, status.Errorf(otav1.Reason_REASON_WRITER_UNAVAILABLE, "%w", err)
	}
	wctx, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if err := c.WaitReady(wctx); err != nil {
		c.Close()
		return nil, err
	}
	if _, err := c.Handshake(ctx, nil); err != nil {
		c.Close()
		return nil, err
	}
	return c, nil
}

// probeRefused tells a writer that refuses this uid from one that is slow to answer. The
// writer's grpc server sends its HTTP/2 SETTINGS as soon as it takes a connection; a peer uid
// it does not allow is closed at accept without a byte. So: end of stream before any byte is
// a refusal; a byte, or nothing yet within the wait (a writer still starting under socket
// activation), is left to WaitReady.
func probeRefused(conn net.Conn, sock string) error {
	conn.SetReadDeadline(time.Now().Add(time.Second))
	n, err := conn.Read(make([]byte, 1))
	if n > 0 || !(errors.Is(err, io.EOF) || errors.Is(err, syscall.ECONNRESET)) {
		return nil
	}
	return status.Errorf(otav1.Reason_REASON_PERMISSION_DENIED,
		"the writer on %s closed the connection without answering: it does not allow uid %d (only root and the peer_users/peer_uids of its configuration; its log names the refused uid)",
		sock, os.Geteuid())
}

// refuseIfServing keeps flash from racing a running writer over the same targets and state.
func refuseIfServing(ctx context.Context, sock string) error {
	c, err := dialRunning(ctx, sock)
	if err != nil {
		return nil
	}
	c.Close()
	return status.Errorf(otav1.Reason_REASON_SESSION_BUSY, "a writer is serving on %s; stop it before flashing in-process", sock)
}

func cmdStatus(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("status", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cf := addConnFlags(fs)
	asJSON := fs.Bool("json", false, "print JSON")
	stale := fs.Duration("stale", defaultStale, "a session without progress for this long is reported stale")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	w, via, closeFn, err := connect(ctx, cf, stderr)
	if err != nil {
		return err
	}
	defer closeFn()
	st, err := w.State(ctx)
	if err != nil {
		return err
	}
	ext, err := w.Extensions(ctx)
	if err != nil {
		return err
	}
	sums := summarize(st.GetSessions(), time.Now(), *stale)
	if *asJSON {
		return printJSON(stdout, st, ext, sums, via)
	}
	printHuman(stdout, st, ext, sums, via)
	return nil
}

// sessionSummary is a session as an operator reads it: how old, how far, and whether it
// looks stuck (no progress for the stale time: typically a job canceled while ota-net was
// down; `ota-writer abort --target T` frees the target).
type sessionSummary struct {
	Target         string `json:"target"`
	JobID          string `json:"job_id"`
	SessionID      string `json:"session_id"`
	FileIndex      uint32 `json:"file_index"`
	State          string `json:"state"`
	AgeSeconds     int64  `json:"age_s"`
	IdleSeconds    int64  `json:"idle_s"`
	ReceivedBlocks uint64 `json:"received_blocks"`
	DurableBlocks  uint64 `json:"durable_blocks"`
	TotalBlocks    uint64 `json:"total_blocks"`
	Stale          bool   `json:"stale"`
}

func summarize(ss []*otav1.SessionInfo, now time.Time, stale time.Duration) []sessionSummary {
	out := []sessionSummary{}
	for _, s := range ss {
		since := func(unix int64) int64 {
			if unix <= 0 {
				return -1
			}
			return max(0, int64(now.Sub(time.Unix(unix, 0))/time.Second))
		}
		sum := sessionSummary{
			Target: s.GetTarget(), JobID: s.GetJobId(), SessionID: s.GetSessionId(), FileIndex: s.GetFileIndex(),
			State:      enumName(s.GetState().String(), "SESSION_STATE_"),
			AgeSeconds: since(s.GetCreatedUnix()), IdleSeconds: since(s.GetUpdatedUnix()),
			ReceivedBlocks: max(s.GetReceivedBlocks(), s.GetDurableBlocks()), DurableBlocks: s.GetDurableBlocks(), TotalBlocks: s.GetTotalBlocks(),
		}
		sum.Stale = sum.IdleSeconds >= 0 && time.Duration(sum.IdleSeconds)*time.Second >= stale
		out = append(out, sum)
	}
	return out
}

func printJSON(w io.Writer, st *otav1.DeviceState, ext status.Fields, sums []sessionSummary, via string) error {
	raw, err := protojson.MarshalOptions{UseProtoNames: true, EmitUnpopulated: true}.Marshal(st)
	if err != nil {
		return err
	}
	out, err := json.MarshalIndent(struct {
		Via        string            `json:"via"`
		State      json.RawMessage   `json:"state"`
		Sessions   []sessionSummary  `json:"sessions"`
		Extensions map[string]string `json:"extensions"`
		// ExtensionOrder: the order the fields take the statusDetails budget.
		ExtensionOrder []string `json:"extension_order"`
	}{via, raw, sums, ext.Map(), extKeys(ext)}, "", "  ")
	if err != nil {
		return err
	}
	_, err = fmt.Fprintf(w, "%s\n", out)
	return err
}

func extKeys(ext status.Fields) []string {
	out := []string{}
	for _, f := range ext {
		out = append(out, f.Key)
	}
	return out
}

// enumName turns IMAGE_STATE_TRIAL into "trial".
func enumName(s, prefix string) string { return strings.ToLower(strings.TrimPrefix(s, prefix)) }

// age renders seconds as a short duration ("-" when unknown).
func age(secs int64) string {
	if secs < 0 {
		return "-"
	}
	return (time.Duration(secs) * time.Second).String()
}

func printHuman(w io.Writer, st *otav1.DeviceState, ext status.Fields, sums []sessionSummary, via string) {
	fmt.Fprintf(w, "=== System Info ===\n")
	fmt.Fprintf(w, "Image state:   %s\n", enumName(st.GetImageState().String(), "IMAGE_STATE_"))
	fmt.Fprintf(w, "Boot backend:  %s\n", st.GetBootBackend())
	if u := st.GetLastUpdate(); u != nil && u.GetJobId() != "" {
		fmt.Fprintf(w, "Last update:   job %s, target %s, slot %s", u.GetJobId(), u.GetTarget(), u.GetSlot())
		if u.GetVersion() != "" {
			fmt.Fprintf(w, ", version %s", u.GetVersion())
		}
		if u.GetReason() != otav1.Reason_REASON_UNSPECIFIED {
			fmt.Fprintf(w, ", reason %s", status.String(u.GetReason()))
		}
		fmt.Fprintln(w)
	}
	fmt.Fprintf(w, "Source:        %s\n", via)
	fmt.Fprintf(w, "=== Targets ===\n")
	for _, t := range st.GetTargets() {
		kind := enumName(t.GetKind().String(), "TARGET_KIND_")
		fmt.Fprintf(w, "%s (%s)", t.GetName(), kind)
		if t.GetKind() == otav1.TargetKind_TARGET_KIND_AB {
			fmt.Fprintf(w, ": active %s, inactive %s", t.GetActiveSlot(), t.GetInactiveSlot())
		}
		fmt.Fprintln(w)
		for _, s := range t.GetSlots() {
			mark := " "
			if s.GetActive() {
				mark = "x"
			}
			v := s.GetVersion()
			if v == "" {
				v = "-"
			}
			fmt.Fprintf(w, "  [%s] slot %s  version %s\n", mark, s.GetName(), v)
		}
	}
	fmt.Fprintf(w, "=== Sessions ===\n")
	if len(st.GetSessions()) == 0 {
		fmt.Fprintf(w, "  none\n")
	}
	for i, s := range st.GetSessions() {
		sum := sums[i]
		fmt.Fprintf(w, "  target %s: job %s file %d, %s, %d/%d blocks received (%d durable), age %s, no progress for %s\n",
			sum.Target, sum.JobID, sum.FileIndex, sum.State, sum.ReceivedBlocks, sum.TotalBlocks, sum.DurableBlocks, age(sum.AgeSeconds), age(sum.IdleSeconds))
		fmt.Fprintf(w, "    session %s -> slot %s (%d bytes, block %d)\n", s.GetSessionId(), s.GetSlot(), s.GetFileSize(), s.GetBlockSize())
		if sum.Stale {
			fmt.Fprintf(w, "    STALE: if job %s is no longer the device's job, \"ota-writer abort --target %s\" frees the target\n", sum.JobID, sum.Target)
		}
	}
	if len(ext) > 0 {
		fmt.Fprintf(w, "=== Extensions (statusDetails order) ===\n")
		for _, f := range ext {
			fmt.Fprintf(w, "  %s = %s\n", f.Key, f.Value)
		}
	}
}

// cmdAbort drops sessions: every session, or the one of --target (and only of --job-id).
// The slot stays inactive; the next job on the target starts a new session.
func cmdAbort(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("abort", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cf := addConnFlags(fs)
	target := fs.String("target", "", "abort only the session of this target (default: every session)")
	jobID := fs.String("job-id", "", "abort only sessions of this job")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	if fs.NArg() > 0 {
		return usagef("abort: unexpected arguments %v", fs.Args())
	}
	w, via, closeFn, err := connect(ctx, cf, stderr)
	if err != nil {
		return err
	}
	defer closeFn()
	st, err := w.State(ctx)
	if err != nil {
		return err
	}
	if *target != "" && !slices.ContainsFunc(st.GetTargets(), func(t *otav1.TargetState) bool { return t.GetName() == *target }) {
		return status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "no target %q is configured", *target)
	}
	n := 0
	for _, s := range st.GetSessions() {
		if (*target != "" && s.GetTarget() != *target) || (*jobID != "" && s.GetJobId() != *jobID) {
			continue
		}
		if err := w.Abort(ctx, s.GetSessionId(), otav1.Reason_REASON_USER_ABORT); err != nil {
			return fmt.Errorf("abort session %s (target %s, job %s): %w", s.GetSessionId(), s.GetTarget(), s.GetJobId(), err)
		}
		fmt.Fprintf(stdout, "aborted: target %s, job %s file %d, session %s (%d/%d blocks were durable) via %s\n",
			s.GetTarget(), s.GetJobId(), s.GetFileIndex(), s.GetSessionId(), s.GetDurableBlocks(), s.GetTotalBlocks(), via)
		n++
	}
	if n == 0 {
		fmt.Fprintf(stdout, "no session to abort via %s\n", via)
	}
	return nil
}

func cmdAcceptReject(ctx context.Context, args []string, stdout, stderr io.Writer, accept bool) error {
	name := "reject"
	if accept {
		name = "accept"
	}
	fs := flag.NewFlagSet(name, flag.ContinueOnError)
	fs.SetOutput(stderr)
	cf := addConnFlags(fs)
	jobID := fs.String("job-id", "", "only if the trial belongs to this job")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	w, via, closeFn, err := connect(ctx, cf, stderr)
	if err != nil {
		return err
	}
	defer closeFn()
	if accept {
		// The writer commits only after a self test that passed in this boot: run it here.
		st, err := w.SelfTest(ctx, *jobID)
		if err != nil {
			return err
		}
		if !st.GetPassed() {
			for _, c := range st.GetChecks() {
				fmt.Fprintf(stdout, "check %s: passed %v: %s\n", c.GetName(), c.GetPassed(), c.GetDetail())
			}
			r := st.GetReason()
			if r == otav1.Reason_REASON_UNSPECIFIED {
				r = otav1.Reason_REASON_SELF_TEST_FAILED
			}
			return status.Errorf(r, "self test failed: not committed (reject the trial, or fix and accept again)")
		}
		r, err := w.Commit(ctx, *jobID)
		if err != nil {
			return err
		}
		u := r.GetCommitted()
		fmt.Fprintf(stdout, "committed: target %s slot %s (job %s) via %s\n", u.GetTarget(), u.GetSlot(), u.GetJobId(), via)
		return nil
	}
	r, err := w.Reject(ctx, *jobID, otav1.Reason_REASON_USER_ABORT)
	if err != nil {
		return err
	}
	fmt.Fprintf(stdout, "rejected via %s; reboot required: %v\n", via, r.GetRebootRequired())
	return nil
}
