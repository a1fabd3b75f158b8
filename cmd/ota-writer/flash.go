package main

import (
	"context"
	"crypto/sha256"
	"encoding/base64"
	"encoding/hex"
	"flag"
	"fmt"
	"io"
	"os"
	"slices"
	"time"

	"github.com/schollz/progressbar/v3"
	"golang.org/x/term"

	"github.com/gwota/gwota/internal/bitmap"
	otav1 "github.com/gwota/gwota/proto/ota/v1"
	"github.com/gwota/gwota/status"
	"github.com/gwota/gwota/writer/config"
	"github.com/gwota/gwota/writer/server"
)

// sigAlgs are the --sig-alg names.
var sigAlgs = map[string]otav1.SigAlgorithm{
	"ecdsa-p256-sha256":   otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256,
	"rsa-pkcs1v15-sha256": otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256,
	"rsa-pss-sha256":      otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256,
	"ed25519-sha256":      otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256,
}

// flashBatch bounds the bytes handed to the core per Write: the only image buffer flash holds.
const flashBatch = 1 << 20

func cmdFlash(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	fs := flag.NewFlagSet("flash", flag.ContinueOnError)
	fs.SetOutput(stderr)
	cfgPath := fs.String("config", "", "writer configuration `file` (required)")
	target := fs.String("target", "", "configured target `name` (required)")
	image := fs.String("image", "", "image `file` (required)")
	sigFile := fs.String("sig-file", "", "signature `file` (raw bytes, e.g. DER from openssl dgst -sign)")
	sigB64 := fs.String("sig", "", "signature, `base64`")
	sigAlg := fs.String("sig-alg", "", "signature algorithm: ecdsa-p256-sha256 | rsa-pkcs1v15-sha256 | rsa-pss-sha256 | ed25519-sha256")
	certName := fs.String("cert-name", "", "trusted key to check against (file base name or certificate CN); required unless the configuration sets allow_any_trusted_key")
	blockSize := fs.Uint("block-size", 0, "block size in bytes (default: the configured maximum)")
	activate := fs.Bool("activate", false, "activate the new slot after a successful verification")
	if err := fs.Parse(args); err != nil {
		return usageError{err}
	}
	if *cfgPath == "" || *target == "" || *image == "" || *sigAlg == "" {
		return usagef("flash: --config, --target, --image and --sig-alg are required")
	}
	if (*sigFile == "") == (*sigB64 == "") {
		return usagef("flash: give exactly one of --sig-file and --sig")
	}
	alg, ok := sigAlgs[*sigAlg]
	if !ok {
		return usagef("flash: unknown --sig-alg %q", *sigAlg)
	}
	var sig []byte
	var err error
	if *sigFile != "" {
		sig, err = os.ReadFile(*sigFile)
	} else {
		sig, err = base64.StdEncoding.DecodeString(*sigB64)
	}
	if err != nil {
		return usagef("flash: signature: %v", err)
	}
	cfg, err := config.Load(*cfgPath)
	if err != nil {
		return usageError{err}
	}
	bs := uint32(*blockSize)
	if bs == 0 {
		bs = cfg.MaxBlockSize
	}
	sel, err := selectTarget(cfg, *target)
	if err != nil {
		return err
	}
	if err := refuseIfServing(ctx, cfg.Socket); err != nil {
		return err
	}
	img, err := os.Open(*image)
	if err != nil {
		return usagef("flash: %v", err)
	}
	defer img.Close()
	fi, err := img.Stat()
	if err != nil {
		return usagef("flash: %v", err)
	}
	// The job id is derived from the signature: flashing the same image again resumes an
	// interrupted run, a different image gets its own session.
	sum := sha256.Sum256(sig)
	req := &otav1.BeginSessionRequest{
		JobId:        "flash-" + hex.EncodeToString(sum[:8]),
		FileType:     sel.fileType,
		FilePath:     sel.filePath,
		FileSize:     uint64(fi.Size()),
		BlockSize:    bs,
		SigAlgorithm: alg,
		Signature:    sig,
		CertName:     *certName,
	}
	log := newLogger(cfg, stderr)
	eng, err := newEngine(ctx, cfg, log, false)
	if err != nil {
		return err
	}
	defer eng.Close()
	prog := newProgress(stderr, fi.Size())
	start := time.Now()
	res, err := flashImage(ctx, eng, req, img, *activate, prog)
	prog.done(err)
	if err != nil {
		return err
	}
	el := time.Since(start)
	fmt.Fprintf(stdout, "flashed %s to target %s slot %s: %d bytes in %.2fs (%.1f MB/s), sha256 %s, signature verified\n",
		*image, *target, res.finish.GetSession().GetSlot(), fi.Size(), el.Seconds(), float64(fi.Size())/el.Seconds()/1e6, res.finish.GetSha256())
	if res.activate != nil {
		fmt.Fprintf(stdout, "activated: target %s slot %s, reboot required: %v\n", res.activate.GetTarget(), res.activate.GetSlot(), res.activate.GetRebootRequired())
	}
	return nil
}

type targetSel struct {
	fileType *int32
	filePath string
}

// selectTarget turns a configured target name into the selection a job would carry: the
// writer routes by fileType/filepath only, so the bench path uses the same routing.
func selectTarget(cfg *config.Config, name string) (targetSel, error) {
	var names []string
	for _, t := range cfg.Targets {
		names = append(names, t.Name)
		if t.Name != name {
			continue
		}
		if len(t.FilePaths) > 0 {
			return targetSel{filePath: t.FilePaths[0]}, nil
		}
		if len(t.FileTypes) > 0 {
			ft := t.FileTypes[0]
			return targetSel{fileType: &ft}, nil
		}
		return targetSel{}, usagef("flash: target %q has neither file_paths nor file_types to route to it", name)
	}
	slices.Sort(names)
	return targetSel{}, status.Errorf(otav1.Reason_REASON_TARGET_UNKNOWN, "no target %q configured (have %v)", name, names)
}

type flashResult struct {
	finish   *otav1.FinishSessionResponse
	activate *otav1.ActivateResponse
}

type progress interface {
	set(done int64)
	// verifying: all blocks are written, the read-back verification runs.
	verifying()
	done(err error)
}

// flashImage runs one session through core: begin (or resume), write the missing blocks in
// batches of at most flashBatch bytes from one reused buffer, finish (read back and verify),
// and optionally activate. On failure the session is left for a resume, as with ota-net.
func flashImage(ctx context.Context, core server.Core, req *otav1.BeginSessionRequest, img io.ReaderAt, activate bool, prog progress) (*flashResult, error) {
	begin, err := core.Begin(ctx, req)
	if err != nil {
		return nil, err
	}
	sess := begin.GetSession()
	bs := int64(sess.GetBlockSize())
	if bs <= 0 {
		return nil, status.Errorf(otav1.Reason_REASON_OTHER, "writer returned block size %d", bs)
	}
	size := int64(req.GetFileSize())
	total := (size + bs - 1) / bs
	missing := bitmap.Bitmap(sess.GetMissing())
	isMissing := func(k int64) bool {
		return !begin.GetResumed() || len(missing) == 0 || missing.Has(int(k))
	}
	perBatch := max(1, flashBatch/bs)
	buf := make([]byte, perBatch*bs)
	blocks := make([]*otav1.Block, 0, perBatch)
	var written int64
	flush := func(last bool) error {
		if len(blocks) == 0 && !last {
			return nil
		}
		if _, err := core.Write(ctx, sess.GetSessionId(), blocks, last); err != nil {
			return err
		}
		blocks = blocks[:0]
		prog.set(written)
		return nil
	}
	for k := range total {
		if err := ctx.Err(); err != nil {
			return nil, status.Errorf(otav1.Reason_REASON_USER_ABORT, "flash interrupted: %w", err)
		}
		off := k * bs
		n := min(bs, size-off)
		if !isMissing(k) {
			written += n
			continue
		}
		slot := buf[int64(len(blocks))*bs:][:n]
		if _, err := img.ReadAt(slot, off); err != nil {
			return nil, status.Errorf(otav1.Reason_REASON_OTHER, "reading image at %d: %w", off, err)
		}
		blocks = append(blocks, &otav1.Block{Offset: uint64(off), Data: slot})
		written += n
		if len(blocks) == int(perBatch) {
			if err := flush(false); err != nil {
				return nil, err
			}
		}
	}
	if err := flush(true); err != nil {
		return nil, err
	}
	prog.verifying()
	res := &flashResult{}
	if res.finish, err = core.Finish(ctx, sess.GetSessionId()); err != nil {
		return nil, err
	}
	if activate {
		if res.activate, err = core.Activate(ctx, sess.GetSessionId()); err != nil {
			return res, err
		}
	}
	return res, nil
}

// newProgress draws a bar on a terminal and prints a plain line per 10 % otherwise (logs,
// pipes, CI).
func newProgress(w io.Writer, size int64) progress {
	if f, ok := w.(*os.File); ok && term.IsTerminal(int(f.Fd())) {
		return &barProgress{w: w, bar: progressbar.NewOptions64(size,
			progressbar.OptionSetWriter(w),
			progressbar.OptionSetDescription("flashing"),
			progressbar.OptionShowBytes(true),
			progressbar.OptionSetWidth(30),
			progressbar.OptionThrottle(100*time.Millisecond),
			progressbar.OptionUseIECUnits(true),
		)}
	}
	return &lineProgress{w: w, size: size, next: 10}
}

type barProgress struct {
	w   io.Writer
	bar *progressbar.ProgressBar
}

func (p *barProgress) set(done int64) { p.bar.Set64(done) }
func (p *barProgress) verifying() {
	p.bar.Set64(p.bar.GetMax64())
	p.bar.Describe("verifying")
}
func (p *barProgress) done(err error) {
	if err == nil {
		p.bar.Finish()
	}
	fmt.Fprintln(p.w)
}

type lineProgress struct {
	w    io.Writer
	size int64
	next int64
}

func (p *lineProgress) set(done int64) {
	if p.size == 0 {
		return
	}
	pct := done * 100 / p.size
	if pct >= p.next {
		fmt.Fprintf(p.w, "flash: %3d%% %d/%d bytes\n", pct, done, p.size)
		p.next = pct/10*10 + 10
	}
}
func (p *lineProgress) verifying() {
	fmt.Fprintln(p.w, "flash: verifying the signature over the slot's content")
}
func (p *lineProgress) done(error) {}
