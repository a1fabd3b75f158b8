// Command streamdl is the downloader side of the stream benchmark: ota-net's own parts only
// (netagent/mqttconn + netagent/stream) and a file sink, so that its peak RSS is that of the
// network agent's download path, not of the benchmark harness. streambench runs it.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"os"
	"runtime"
	"runtime/pprof"
	"strings"
	"time"

	"github.com/gwota/gwota/internal/runtimeopts"
	"github.com/gwota/gwota/netagent/mqttconn"
	"github.com/gwota/gwota/netagent/stream"
	"github.com/gwota/gwota/netagent/writerlink"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
)

type result struct {
	Seconds  float64
	MBps     float64
	MaxRSSKB int64
	// VerifySeconds is FinishSession (read back + signature check) with -writer.
	VerifySeconds float64
}

func main() {
	// ota-net's runtime settings (each unless its variable is set), so the download runs as
	// in the agent; GOMEMLIMIT=off GOMAXPROCS=N gives the Go runtime's defaults.
	runtimeopts.Apply(os.Getenv)
	if err := child(os.Args[1:]); err != nil {
		fmt.Fprintln(os.Stderr, "streamdl:", err)
		os.Exit(1)
	}
}

// child downloads one stream with ota-net's parts and prints {"Seconds","MBps"}.
func child(args []string) error {
	fs := flag.NewFlagSet("streamdl", flag.ExitOnError)
	broker := fs.String("broker", "", "")
	thing := fs.String("thing", "", "")
	streamName := fs.String("stream", "", "")
	size := fs.Int64("size", 0, "")
	bs := fs.Int("bs", stream.DefaultBlockSize, "")
	per := fs.Int("per", stream.DefaultBlocksPerRequest, "")
	flight := fs.Int("flight", stream.DefaultRequestsInFlight, "")
	out := fs.String("out", "", "")
	writerSock := fs.String("writer", "", "ota-writer socket: write into a real writer instead of the file")
	sigFile := fs.String("sig", "", "raw ECDSA P-256/SHA-256 signature of the image (with -writer)")
	jobID := fs.String("job", "bench", "job id of the writer session")
	fs.Parse(args)

	if p := os.Getenv("STREAMDL_CPUPROFILE"); p != "" {
		f, err := os.Create(p)
		if err != nil {
			return err
		}
		if err := pprof.StartCPUProfile(f); err != nil {
			return err
		}
		defer f.Close()
		defer pprof.StopCPUProfile()
	}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Minute)
	defer cancel()
	conn, err := mqttconn.Dial(ctx, mqttconn.Config{BrokerURL: *broker, ClientID: *thing})
	if err != nil {
		return err
	}
	defer conn.Close(context.Background())
	if err := conn.AwaitConnection(ctx); err != nil {
		return err
	}
	d, err := stream.New(conn, stream.Config{Thing: *thing, BlockSize: *bs, BlocksPerRequest: *per, RequestsInFlight: *flight})
	if err != nil {
		return err
	}
	var secs, verify float64
	if *writerSock == "" {
		f, err := os.Create(*out)
		if err != nil {
			return err
		}
		defer f.Close()
		start := time.Now()
		if _, err := d.Download(ctx, stream.File{StreamName: *streamName, Size: *size, BlockSize: *bs}, nil, &fileSink{f: f, bs: int64(*bs)}); err != nil {
			return err
		}
		secs = time.Since(start).Seconds()
	} else {
		sig, err := os.ReadFile(*sigFile)
		if err != nil {
			return err
		}
		link, err := writerlink.Dial(ctx, writerlink.Config{SocketPath: *writerSock, Name: "streamdl"})
		if err != nil {
			return err
		}
		defer link.Close()
		start := time.Now()
		sess, err := link.Begin(ctx, &otav1.BeginSessionRequest{JobId: *jobID, FilePath: "/img", FileSize: uint64(*size), BlockSize: uint32(*bs),
			SigAlgorithm: otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256, Signature: sig})
		if err != nil {
			return err
		}
		sink, err := sess.Sink(ctx)
		if err != nil {
			return err
		}
		if _, err := d.Download(ctx, stream.File{StreamName: *streamName, Size: *size, BlockSize: sess.BlockSize()}, sess.Missing(), sink); err != nil {
			return err
		}
		sink.Close()
		secs = time.Since(start).Seconds()
		fin, err := sess.Finish(ctx) // read back from the slot and verify the signature
		if err != nil {
			return err
		}
		verify = time.Since(start).Seconds() - secs
		if fin.GetSession().GetState() != otav1.SessionState_SESSION_STATE_VERIFIED {
			return fmt.Errorf("session %s after finish", fin.GetSession().GetState())
		}
		if err := sess.Abort(ctx, otav1.Reason_REASON_USER_ABORT); err != nil {
			return err
		}
	}
	hwm, err := peakRSS()
	if err != nil {
		return err
	}
	if p := os.Getenv("STREAMBENCH_MEMPROFILE"); p != "" {
		f, err := os.Create(p)
		if err != nil {
			return err
		}
		pprof.Lookup("allocs").WriteTo(f, 0)
		f.Close()
	}
	if os.Getenv("STREAMBENCH_MEMSTATS") != "" {
		var ms runtime.MemStats
		runtime.ReadMemStats(&ms)
		fmt.Fprintf(os.Stderr, "sys %d heapsys %d heapinuse %d heapreleased %d stack %d numgc %d totalalloc %d\n", ms.Sys>>10, ms.HeapSys>>10, ms.HeapInuse>>10, ms.HeapReleased>>10, ms.StackSys>>10, ms.NumGC, ms.TotalAlloc>>20)
		b, _ := os.ReadFile("/proc/self/status")
		fmt.Fprintln(os.Stderr, string(b))
		os.Exit(3)
	}
	return json.NewEncoder(os.Stdout).Encode(result{Seconds: secs, MBps: float64(*size) / secs / 1e6, MaxRSSKB: hwm, VerifySeconds: verify})
}

// peakRSS is this process's VmHWM in KiB. (The rusage a parent gets from wait4 is no good
// here: ru_maxrss of a forked child starts from the parent's high-water mark.)
func peakRSS() (int64, error) {
	b, err := os.ReadFile("/proc/self/status")
	if err != nil {
		return 0, err
	}
	for _, line := range strings.Split(string(b), "\n") {
		if v, ok := strings.CutPrefix(line, "VmHWM:"); ok {
			var kb int64
			_, err := fmt.Sscanf(strings.TrimSpace(v), "%d kB", &kb)
			return kb, err
		}
	}
	return 0, errors.New("no VmHWM in /proc/self/status")
}

// fileSink writes blocks to a file; it syncs only at the end (Flush), so the bench measures
// the network and not the disk.
type fileSink struct {
	f                *os.File
	bs               int64
	written, durable int
}

func (s *fileSink) WriteBlock(_ context.Context, i int, data []byte) error {
	_, err := s.f.WriteAt(data, int64(i)*s.bs)
	if err == nil {
		s.written++
	}
	return err
}

func (s *fileSink) Flush(context.Context) error {
	if err := s.f.Sync(); err != nil {
		return err
	}
	s.durable = s.written
	return nil
}

func (s *fileSink) Sync(context.Context) error { return nil }
func (s *fileSink) Durable() int               { return s.durable }
func (s *fileSink) Close()                     {}
