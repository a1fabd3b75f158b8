// Command deltabench measures what a device holding one image downloads to install another
// through a manifest (scripts/bench-delta.sh runs it). Two modes:
//
//	deltabench -new v2.img -local v1.img [-block-size 4096] [-chunk-size 65536]...
//	    builds v2's manifest and chunk file in a temporary directory for each chunk size and
//	    prints one JSON line per chunk size: the chunks a device holding v1 must fetch.
//	deltabench -manifest new.manifest -local v1.img
//	    only the device's lookup (FindLocal) over v1, for its peak RSS.
//	deltabench -ready -new v2.img -local v1.img [-ready-cases quota-mqtt,link-mqtt,link-http] [-ready-kinds full,delta] [-base]
//	    end to end (ready.go): the emulator with AWS quotas, a real ota-writer running v1 and
//	    ota-net; a full and a delta update to v2 per case, one JSON line each: time to the
//	    ready update, bytes served, peak RSS (VmHWM) of both processes.
package main

import (
	"cmp"
	"context"
	"crypto/sha256"
	"encoding/json"
	"flag"
	"fmt"
	"io"
	"os"
	"os/exec"
	"path/filepath"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"

	"github.com/klauspost/compress/zstd"

	"github.com/gwota/gwota/writer/manifest"
)

// Figures is one measurement.
type Figures struct {
	ChunkSize     uint32 `json:"chunk_size"`
	Base          bool   `json:"base"`
	ImageBytes    uint64 `json:"image_bytes"`
	Blocks        uint64 `json:"blocks"`
	ZeroBlocks    uint64 `json:"zero_blocks"`
	FoundBlocks   uint64 `json:"found_blocks"`
	MissingBlocks uint64 `json:"missing_blocks"`
	ChunkFile     uint64 `json:"chunk_file_bytes"`
	ChunksNeeded  int    `json:"chunks_needed"`
	ChunkBytes    uint64 `json:"chunk_bytes"`
	ManifestBytes uint64 `json:"manifest_bytes"`
	// Download is what the device fetches: the manifest and the chunks it needs.
	Download uint64 `json:"download_bytes"`
	// StreamDownload is the same fetched over an MQTT stream in blocks of StreamBlock bytes
	// of the chunk file: every stream block overlapping a needed chunk, plus the manifest.
	StreamDownload uint64 `json:"stream_download_bytes"`
	// DeltaChunks of the needed chunks are delta chunks (DeltaBytes of ChunkBytes).
	DeltaChunks int     `json:"delta_chunks_needed"`
	DeltaBytes  uint64  `json:"delta_bytes"`
	BuildSecs   float64 `json:"build_seconds"`
}

// StreamBlock is ota-net's stream block size (64 KiB).
const StreamBlock = 64 << 10

func main() {
	newImg := flag.String("new", "", "new image")
	local := flag.String("local", "", "the image the device runs")
	mf := flag.String("manifest", "", "lookup only: an existing manifest")
	bs := flag.Uint("block-size", 4096, "block size")
	chunks := flag.String("chunk-size", "65536", "comma-separated chunk sizes")
	withBase := flag.Bool("base", false, "build with -local as the delta base (chunks of new blocks apart)")
	level := flag.String("level", "", "zstd level (fastest, default, better, best; the package's default when empty)")
	newChunk := flag.Uint("new-chunk-size", 0, "with -base: image bytes of a chunk of new blocks (the package's default when 0)")
	maxChunk := flag.Uint("max-chunk-bytes", 0, "compressed bytes of a chunk at most (the package's default when 0)")
	dictSize := flag.Int("dict-size", 0, "with -base: largest dictionary of a delta chunk (the package's default when 0, negative: no delta chunks)")
	peakRSS := flag.Bool("peak-rss", false, "run the command given after the flags and print its peak RSS in KiB")
	ready := flag.Bool("ready", false, "end to end: time to ready, bytes served and peak RSS of a full and a delta update from -local to -new")
	readyCasesFlag := flag.String("ready-cases", "quota-mqtt,link-mqtt,link-http", "with -ready: quota-mqtt (the emulator's 512 KiB/s quota), link-mqtt and link-http (a 5 Mbit/s toxiproxy link)")
	readyKinds := flag.String("ready-kinds", "full,delta", "with -ready: full, delta")
	flag.Parse()
	ctx := context.Background()
	if *ready {
		err := readyBench(ctx, *local, *newImg, *withBase, strings.Split(*readyCasesFlag, ","), strings.Split(*readyKinds, ","), func(f ReadyFigures) {
			b, _ := json.Marshal(f)
			fmt.Println(string(b))
		})
		if err != nil {
			fmt.Fprintln(os.Stderr, "deltabench:", err)
			os.Exit(1)
		}
		return
	}
	if *peakRSS {
		kib, err := runPeakRSS(flag.Args())
		if err != nil {
			fmt.Fprintln(os.Stderr, "deltabench:", err)
			os.Exit(1)
		}
		fmt.Println(kib)
		return
	}
	if *mf != "" {
		st, err := lookupOnly(ctx, *mf, *local)
		if err != nil {
			fmt.Fprintln(os.Stderr, "deltabench:", err)
			os.Exit(1)
		}
		fmt.Println(st)
		return
	}
	opt := Options{NewChunkSize: uint32(*newChunk), MaxChunkBytes: uint32(*maxChunk), DictSize: *dictSize}
	if *level != "" {
		ok, lv := zstd.EncoderLevelFromString(*level)
		if !ok {
			fmt.Fprintln(os.Stderr, "deltabench: -level", *level)
			os.Exit(2)
		}
		opt.Level = lv
	}
	dir, err := os.MkdirTemp("", "deltabench")
	if err != nil {
		fmt.Fprintln(os.Stderr, "deltabench:", err)
		os.Exit(1)
	}
	defer os.RemoveAll(dir)
	for _, c := range strings.Split(*chunks, ",") {
		cs, err := strconv.ParseUint(c, 10, 32)
		if err == nil {
			var f Figures
			f, err = Measure(ctx, *newImg, *local, uint32(*bs), uint32(cs), dir, *withBase, opt)
			if err == nil {
				b, _ := json.Marshal(f)
				fmt.Println(string(b))
			}
		}
		if err != nil {
			fmt.Fprintln(os.Stderr, "deltabench:", err)
			os.Exit(1)
		}
	}
}

// runPeakRSS runs a command and returns its peak RSS (KiB). Linux counts in a child's peak
// the RSS of the process that started it (Go starts children with vfork, and exec records
// the old address space's peak), so a test measures through this small process rather than
// from its own larger one.
func runPeakRSS(args []string) (int64, error) {
	if len(args) == 0 {
		return 0, fmt.Errorf("-peak-rss: no command")
	}
	cmd := exec.Command(args[0], args[1:]...)
	cmd.Stdout, cmd.Stderr = io.Discard, os.Stderr
	if err := cmd.Run(); err != nil {
		return 0, fmt.Errorf("%v: %w", args, err)
	}
	return cmd.ProcessState.SysUsage().(*syscall.Rusage).Maxrss, nil
}

func lookupOnly(ctx context.Context, mpath, local string) (manifest.LookupStats, error) {
	f, err := os.Open(mpath)
	if err != nil {
		return manifest.LookupStats{}, err
	}
	defer f.Close()
	fi, err := f.Stat()
	if err != nil {
		return manifest.LookupStats{}, err
	}
	m, err := manifest.Open(f, fi.Size())
	if err != nil {
		return manifest.LookupStats{}, err
	}
	l, err := os.Open(local)
	if err != nil {
		return manifest.LookupStats{}, err
	}
	defer l.Close()
	li, err := l.Stat()
	if err != nil {
		return manifest.LookupStats{}, err
	}
	return m.FindLocal(ctx, l, li.Size(), 0, func(manifest.Match, []byte) error { return nil })
}

// Options are the build parameters other than the chunk size (the package's defaults when
// zero).
type Options struct {
	Level         zstd.EncoderLevel
	NewChunkSize  uint32
	MaxChunkBytes uint32
	// DictSize bounds a delta chunk's dictionary (manifest.Params.DictSize).
	DictSize int
}

// Measure builds newImg's manifest and chunk file in dir and returns what a device holding
// local downloads.
func Measure(ctx context.Context, newImg, local string, bs, chunkSize uint32, dir string, withBase bool, opt Options) (Figures, error) {
	f := Figures{ChunkSize: chunkSize, Base: withBase}
	img, err := os.Open(newImg)
	if err != nil {
		return f, err
	}
	defer img.Close()
	mpath, cpath := filepath.Join(dir, "m"), filepath.Join(dir, "c")
	mf, err := os.Create(mpath)
	if err != nil {
		return f, err
	}
	defer mf.Close()
	cf, err := os.Create(cpath)
	if err != nil {
		return f, err
	}
	defer cf.Close()
	p := manifest.Params{Target: "rootfs", Compatible: "bench", Version: "2", BlockSize: bs, ChunkSize: chunkSize, TempDir: dir,
		Level: opt.Level, NewChunkSize: opt.NewChunkSize, MaxChunkBytes: opt.MaxChunkBytes, DictSize: opt.DictSize}
	if withBase {
		b, err := os.Open(local)
		if err != nil {
			return f, err
		}
		defer b.Close()
		bi, err := b.Stat()
		if err != nil {
			return f, err
		}
		p.Base, p.BaseSize = b, bi.Size()
		h := sha256.New()
		if _, err := io.Copy(h, io.NewSectionReader(b, 0, bi.Size())); err != nil {
			return f, err
		}
		p.BaseSHA256 = h.Sum(nil)
	}
	t0 := time.Now()
	res, err := manifest.Build(ctx, img, p, cf, mf)
	f.BuildSecs = time.Since(t0).Seconds()
	if err != nil {
		return f, err
	}
	m, err := manifest.Open(mf, int64(res.ManifestSize))
	if err != nil {
		return f, err
	}
	l, err := os.Open(local)
	if err != nil {
		return f, err
	}
	defer l.Close()
	li, err := l.Stat()
	if err != nil {
		return f, err
	}
	have := make([]bool, m.Blocks())
	st, err := m.FindLocal(ctx, l, li.Size(), 0, func(mt manifest.Match, _ []byte) error {
		have[mt.Block] = true
		return nil
	})
	if err != nil {
		return f, err
	}
	need := m.NeededChunks(func(b uint64) bool { return !have[b] })
	// The device runs the base (-local is -base): a needed chunk with a delta chunk is
	// fetched as that delta chunk, as the writer asks (writer/engine fillLocal).
	if withBase {
		for i, c := range need {
			if d, ok := m.DeltaOf(c.Index); ok {
				need[i] = m.Delta(d)
				f.DeltaChunks++
				f.DeltaBytes += need[i].Size
			}
		}
		slices.SortFunc(need, func(a, b manifest.Chunk) int { return cmp.Compare(a.Offset, b.Offset) })
		if err := checkDeltas(m, need, cf, l); err != nil {
			return f, err
		}
	}
	f.ImageBytes, f.Blocks, f.ZeroBlocks, f.FoundBlocks = res.ImageSize, res.Blocks, st.Zero, st.Found
	f.MissingBlocks = res.Blocks - st.Zero - st.Found
	f.ChunkFile, f.ManifestBytes, f.ChunksNeeded = res.ChunkFileSize, res.ManifestSize, len(need)
	last := int64(-1)
	for _, c := range need {
		f.ChunkBytes += c.Size
		for sb := int64(c.Offset / StreamBlock); sb <= int64((c.Offset+c.Size-1)/StreamBlock); sb++ {
			if sb != last {
				f.StreamDownload += min(StreamBlock, f.ChunkFile-uint64(sb)*StreamBlock)
				last = sb
			}
		}
	}
	f.Download = f.ChunkBytes + f.ManifestBytes
	f.StreamDownload += f.ManifestBytes
	return f, nil
}

// checkDeltas decodes every needed delta chunk with its dictionary read from local, as the
// writer does, so a figure never counts a chunk that would not install.
func checkDeltas(m *manifest.Manifest, need []manifest.Chunk, chunks, local io.ReaderAt) error {
	dec, err := m.NewChunkDecoder()
	if err != nil {
		return err
	}
	defer dec.Close()
	for _, c := range need {
		if !c.Delta {
			continue
		}
		data, dict := make([]byte, c.Size), make([]byte, c.DictLen)
		if _, err := chunks.ReadAt(data, int64(c.Offset)); err != nil {
			return err
		}
		if _, err := local.ReadAt(dict, int64(c.DictOffset)); err != nil {
			return err
		}
		if err := dec.DecodeDelta(c.D, data, dict, func(uint64, []byte) error { return nil }); err != nil {
			return fmt.Errorf("delta chunk %d: %w", c.D, err)
		}
	}
	return nil
}
