package writerlink_test

import (
	"bytes"
	"context"
	"crypto/rand"
	"errors"
	"os"
	"path/filepath"
	"sync"
	"testing"
	"time"
	"unsafe"

	"github.com/hashicorp/go-hclog"

	"github.com/gwota/gwota/netagent/blocksink"
	"github.com/gwota/gwota/netagent/mqttconn"
	"github.com/gwota/gwota/netagent/mqttconn/mqtttest"
	"github.com/gwota/gwota/netagent/stream"
	"github.com/gwota/gwota/netagent/writerlink"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/test/backend"
	"github.com/gwota/gwota/test/emulator"
	"github.com/gwota/gwota/writer/server"
	"github.com/gwota/gwota/writer/writertest"
)

func TestMain(m *testing.M) { mqtttest.VerifyTestMain(m) }

func logger(t *testing.T) hclog.Logger {
	if os.Getenv("WRITERLINK_DEBUG") == "" {
		return hclog.NewNullLogger()
	}
	return hclog.New(&hclog.LoggerOptions{Name: t.Name(), Level: hclog.Debug})
}

// newFake is the writer the link's tests talk to: blocks up to 1 MiB, durable every 8 writes
// or when asked.
func newFake() *writertest.Fake {
	f := writertest.NewFake(1 << 20)
	f.SyncEvery = 8
	return f
}

// restart kills the writer and starts it again on the same socket: what was not durable is
// lost, as when the writer process is killed.
func restart(w *writertest.Server, f *writertest.Fake) {
	w.Kill()
	f.Crash()
	w.Start()
}

func dial(t *testing.T, w *writertest.Server) *writerlink.Link {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	l, err := writerlink.Dial(ctx, writerlink.Config{SocketPath: w.Sock, Name: "test", Logger: logger(t), ReconnectTimeout: 10 * time.Second})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { l.Close() })
	return l
}

func randImage(n int) []byte {
	b := make([]byte, n)
	rand.Read(b)
	return b
}

// eachConn runs f with a Link to a fake writer both ways a Link reaches one: over the socket
// (ota-net) and linked in-process (writerlink.Local, the hop benchmark's build): the sink
// behaves the same through both.
func eachConn(t *testing.T, f func(t *testing.T, core *writertest.Fake, l *writerlink.Link)) {
	t.Run("socket", func(t *testing.T) {
		core := newFake()
		f(t, core, dial(t, writertest.Serve(t, core, server.Options{}, server.ListenConfig{}, nil)))
	})
	t.Run("in-process", func(t *testing.T) {
		core := newFake()
		l, err := writerlink.New(t.Context(), writerlink.Local(core), writerlink.Config{Name: "test", Logger: logger(t)})
		if err != nil {
			t.Fatal(err)
		}
		t.Cleanup(func() { l.Close() })
		f(t, core, l)
	})
}

func TestSinkDurable(t *testing.T) { eachConn(t, testSinkDurable) }

func testSinkDurable(t *testing.T, core *writertest.Fake, l *writerlink.Link) {
	ctx := context.Background()
	img := randImage(100*1024 + 5)
	const bs = 4096
	s, err := l.Begin(ctx, &otav1.BeginSessionRequest{JobId: "j1", FilePath: "/fw", FileSize: uint64(len(img)), BlockSize: bs})
	if err != nil {
		t.Fatal(err)
	}
	if s.Resumed() || s.Missing().Count() != 26 {
		t.Fatalf("new session: resumed %v, missing %d", s.Resumed(), s.Missing().Count())
	}
	k, err := s.Sink(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	for i := 25; i >= 0; i-- { // any order
		if err := k.WriteBlock(ctx, i, img[i*bs:min(len(img), (i+1)*bs)]); err != nil {
			t.Fatal(err)
		}
	}
	if err := k.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if k.Durable() != 26 {
		t.Fatalf("durable %d", k.Durable())
	}
	if !bytes.Equal(core.Image(s.ID()), img) {
		t.Fatal("image differs")
	}
	if _, err := s.Finish(ctx); err != nil {
		t.Fatal(err)
	}
	// Resume of the same job: nothing missing.
	s2, err := l.Begin(ctx, &otav1.BeginSessionRequest{JobId: "j1", FilePath: "/fw", FileSize: uint64(len(img)), BlockSize: bs})
	if err != nil || !s2.Resumed() || s2.Missing().Count() != 0 {
		t.Fatalf("resume: %v %+v", err, s2)
	}
	// Pass-through calls.
	if ext, err := l.Extensions(ctx); err != nil || ext.Map()["fw"] != "1" {
		t.Fatalf("extensions %v %v", ext, err)
	}
}

func TestTypedErrors(t *testing.T) { eachConn(t, testTypedErrors) }

func testTypedErrors(t *testing.T, core *writertest.Fake, l *writerlink.Link) {
	ctx := context.Background()
	_, err := l.Begin(ctx, &otav1.BeginSessionRequest{JobId: "j", FilePath: "/nope", FileSize: 10, BlockSize: 4096})
	if status.ReasonOf(err) != otav1.Reason_REASON_TARGET_UNKNOWN {
		t.Fatalf("begin: %v", err)
	}
	s, err := l.Begin(ctx, &otav1.BeginSessionRequest{JobId: "j", FilePath: "/fw", FileSize: 8192, BlockSize: 4096})
	if err != nil {
		t.Fatal(err)
	}
	k, err := s.Sink(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	core.Fail("Write", status.Errorf(otav1.Reason_REASON_STORAGE_FULL, "no space"))
	err = k.WriteBlock(ctx, 0, make([]byte, 4096))
	if err == nil {
		err = k.Flush(ctx)
	}
	if status.ReasonOf(err) != otav1.Reason_REASON_STORAGE_FULL {
		t.Fatalf("write: %v (%v)", err, status.ReasonOf(err))
	}
	var re *blocksink.ResumedError
	if errors.As(err, &re) {
		t.Fatal("a writer refusal must not look like a resume")
	}
}

// The writer is killed and restarted mid-download: the downloader resumes from the writer's
// durable bitmap and the image ends up complete.
func TestStreamDownloadSurvivesWriterRestart(t *testing.T) {
	ctx, cancel := context.WithTimeout(context.Background(), 60*time.Second)
	defer cancel()
	emu, err := emulator.Start(ctx, emulator.Options{})
	if err != nil {
		t.Fatal(err)
	}
	defer emu.Close()
	conn, err := mqttconn.Dial(ctx, mqttconn.Config{BrokerURL: emu.BrokerURL(), ClientID: emu.ThingName()})
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close(context.Background())
	if err := conn.AwaitConnection(ctx); err != nil {
		t.Fatal(err)
	}
	img := randImage(1<<20 + 99)
	path := filepath.Join(t.TempDir(), "img")
	if err := os.WriteFile(path, img, 0o600); err != nil {
		t.Fatal(err)
	}
	if err := emu.CreateJob(ctx, backend.JobSpec{JobID: "job1", Files: []backend.FileSpec{{LocalPath: path, DevicePath: "/fw"}}}); err != nil {
		t.Fatal(err)
	}

	core := newFake()
	core.SyncEvery = 1 // every message durable: 64 blocks of 4 KiB per message
	w := writertest.Serve(t, core, server.Options{}, server.ListenConfig{}, nil)
	l := dial(t, w)
	const bs = 4096
	s, err := l.Begin(ctx, &otav1.BeginSessionRequest{JobId: "job1", FilePath: "/fw", FileSize: uint64(len(img)), BlockSize: bs})
	if err != nil {
		t.Fatal(err)
	}
	k, err := s.Sink(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()

	var once sync.Once
	var durableAtCrash int
	d, err := stream.New(conn, stream.Config{Thing: emu.ThingName(), BlockSize: bs, QuietPeriod: 200 * time.Millisecond, Logger: logger(t)})
	if err != nil {
		t.Fatal(err)
	}
	f := stream.File{StreamName: emu.StreamName("job1"), Size: int64(len(img)), BlockSize: s.BlockSize(),
		OnProgress: func(p blocksink.Progress) {
			// Crash once the writer has acknowledged something durable, so the test proves
			// those blocks are not fetched again (a fixed block count raced the first ack).
			if p.Durable > 0 {
				once.Do(func() {
					restart(w, core)
					durableAtCrash = core.Durable(s.ID())
				})
			}
		}}
	st, err := d.Download(ctx, f, s.Missing(), k)
	if err != nil {
		t.Fatal(err)
	}
	if st.Resumes != 1 || durableAtCrash == 0 || durableAtCrash >= st.Blocks {
		t.Fatalf("stats %+v, durable at crash %d", st, durableAtCrash)
	}
	if k.Durable() != st.Blocks {
		t.Fatalf("durable %d of %d", k.Durable(), st.Blocks)
	}
	if !bytes.Equal(core.Image(s.ID()), img) {
		t.Fatal("image differs after the restart")
	}
	if _, err := s.Finish(ctx); err != nil {
		t.Fatal(err)
	}
	// Blocks durable before the crash were not fetched again.
	seen := map[int]int{}
	for _, r := range emu.StreamRequests("job1") {
		for _, b := range r.Wanted {
			seen[b]++
		}
	}
	again := 0
	for _, n := range seen {
		if n > 1 {
			again++
		}
	}
	if again == 0 || again > 256-durableAtCrash {
		t.Fatalf("%d blocks fetched twice (durable at crash: %d)", again, durableAtCrash)
	}
}

// TestSetMaxAhead: a sink's own bound replaces the link's. Under the link's 64 KiB bound,
// 256 KiB written means at least 192 KiB acknowledged durable (WriteBlock waited for it);
// with SetMaxAhead(1 MiB) the writer was asked for nothing yet, and Flush still makes all
// of it durable.
func TestSetMaxAhead(t *testing.T) {
	const bs = 4096
	img := randImage(64 * bs)
	for _, tt := range []struct {
		name     string
		ahead    int64 // 0: the link's
		min, max int   // durable blocks before Flush
	}{
		{"link bound", 0, 48, 64},
		{"sink bound", 1 << 20, 0, 0},
	} {
		t.Run(tt.name, func(t *testing.T) {
			core := writertest.NewFake(1 << 20) // syncs only when asked
			w := writertest.Serve(t, core, server.Options{}, server.ListenConfig{}, nil)
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			defer cancel()
			l, err := writerlink.Dial(ctx, writerlink.Config{SocketPath: w.Sock, Name: "test", Logger: logger(t), MaxAheadBytes: 64 << 10})
			if err != nil {
				t.Fatal(err)
			}
			defer l.Close()
			s, err := l.Begin(ctx, &otav1.BeginSessionRequest{JobId: "j", FilePath: "/fw", FileSize: uint64(len(img)), BlockSize: bs})
			if err != nil {
				t.Fatal(err)
			}
			k, err := s.Sink(ctx)
			if err != nil {
				t.Fatal(err)
			}
			defer k.Close()
			if got := k.MaxAhead(); got != 64<<10 {
				t.Fatalf("MaxAhead %d, want the link's", got)
			}
			if tt.ahead > 0 {
				k.SetMaxAhead(tt.ahead)
			}
			for i := range 64 {
				if err := k.WriteBlock(ctx, i, img[i*bs:(i+1)*bs]); err != nil {
					t.Fatal(err)
				}
			}
			if d := k.Durable(); d < tt.min || d > tt.max {
				t.Fatalf("%d blocks durable before Flush, want %d..%d", d, tt.min, tt.max)
			}
			if err := k.Flush(ctx); err != nil {
				t.Fatal(err)
			}
			if d := core.Durable(s.ID()); d != 64 || !bytes.Equal(core.Image(s.ID()), img) {
				t.Fatalf("after Flush %d durable", d)
			}
		})
	}
}

// SetOnSent hands back every block's buffer exactly once, after the message carrying it was
// sent; the writer still gets every block intact, and with nil nothing is handed back.
func TestSinkHandsBackSentBlocks(t *testing.T) {
	core := newFake()
	w := writertest.Serve(t, core, server.Options{}, server.ListenConfig{}, nil)
	l := dial(t, w)
	ctx := context.Background()
	const bs, n = 4096, 40
	img := randImage(n * bs)
	s, err := l.Begin(ctx, &otav1.BeginSessionRequest{JobId: "sent", FilePath: "/fw", FileSize: uint64(len(img)), BlockSize: bs})
	if err != nil {
		t.Fatal(err)
	}
	k, err := s.Sink(ctx)
	if err != nil {
		t.Fatal(err)
	}
	defer k.Close()
	var back []*byte
	k.SetOnSent(func(b []byte) {
		back = append(back, unsafe.SliceData(b))
		clear(b) // the sink must not send it after handing it back
	})
	var want []*byte
	for i := range n {
		if i == n/2 {
			if err := k.Sync(ctx); err != nil { // sends the batch
				t.Fatal(err)
			}
			k.SetOnSent(nil) // the rest stays the caller's
		}
		b := bytes.Clone(img[i*bs : (i+1)*bs])
		if i < n/2 {
			want = append(want, unsafe.SliceData(b))
		}
		if err := k.WriteBlock(ctx, i, b); err != nil {
			t.Fatal(err)
		}
	}
	if err := k.Flush(ctx); err != nil {
		t.Fatal(err)
	}
	if !bytes.Equal(core.Image(s.ID()), img) {
		t.Fatal("image differs")
	}
	if len(back) != len(want) {
		t.Fatalf("%d buffers handed back, want %d", len(back), len(want))
	}
	for i, p := range back {
		if p != want[i] {
			t.Fatalf("buffer %d handed back is not block %d's (or handed back twice)", i, i)
		}
	}
}
