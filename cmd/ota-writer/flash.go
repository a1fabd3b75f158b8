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
	"github.com/gwota/gwota/writer/api"
	"github.com/gwota/gwota/writer/assemble"
	"github.com/gwota/gwota/writer/config"
)

// sigAlgs are the --sig-alg names.
var sigAlgs = map[string]otav1.SigAlgorithm{
	"ecdsa-p256-sha256":   otav1.SigAlgorithm_SIG_ALGORITHM_ECDSA_P256_SHA256,
	"rsa-pkcs1v15-sha256": otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PKCS1V15_SHA256,
	"rsa-pss-sha256":      otav1.SigAlgorithm_SIG_ALGORITHM_RSA_PSS_SHA256,
	"ed25519-sha256":      otav1.SigAlgorithm_SIG_ALGORITHM_ED25519_SHA256,
}

// flashBatch bounds the bytes handed to the engine per Write: the only image buffer flash holds.
const flashBatch = 1 << 20

// flashArgs are the checked flags of one flash.
type flashArgs struct {
	cfgPath, target, image, certName string
	sig                              []byte
	alg                              otav1.SigAlgorithm
	blockSize                        uint32 // 0: the configured maximum
	activate                         bool
}

func cmdFlash(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	a, err := parseFlashArgs(args, stderr)
	if err != nil {
		return err
	}
	cfg, err := config.Load(a.cfgPath)
	if err != nil {
		return usageError{err}
	}
	sel, err := selectTarget(cfg, a.target)
	if err != nil {
		return err
	}
	if err := refuseIfServing(ctx, cfg.Socket); err != nil {
		return err
	}
	img, err := os.Open(a.image)
	if err != nil {
		return usagef("flash: %v", err)
	}
	defer img.Close()
	fi, err := img.Stat()
	if err != nil {
		return usagef("flash: %v", err)
	}
	req := beginRequest(a, cfg, sel, fi.Size())
	eng, err := assemble.NewEngine(ctx, cfg, newLogger(cfg, stderr), false)
	if err != nil {
		return err
	}
	defer eng.Close()
	prog := newProgress(stderr, fi.Size())
	start := time.Now()
	res, err := flashImage(ctx, eng, req, img, a.activate, prog)
	prog.done(err)
	if err != nil {
		return err
	}
	el := time.Since(start)
	fmt.Fprintf(stdout, "flashed %s to target %s slot %s: %d bytes in %.2fs (%.1f MB/s), sha256 %s, signature verified\n",
		a.image, a.target, res.finish.GetSession().GetSlot(), fi.Size(), el.Seconds(), float64(fi.Size())/el.Seconds()/1e6, res.finish.GetSha256())
	if res.activate != nil {
		fmt.Fprintf(stdout, "activated: target %s slot %s, reboot required: %v\n", res.activate.GetTarget(), res.activate.GetSlot(), res.activate.GetRebootRequired())
	}
	return nil
}

// parseFlashArgs reads and checks flash's flags and the signature they name; every problem
// is a usage error.
func parseFlashArgs(args []string, stderr io.Writer) (flashArgs, error) {
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
		return flashArgs{}, usageError{err}
	}
	if *cfgPath == "" || *target == "" || *image == "" || *sigAlg == "" {
		return flashArgs{}, usagef("flash: --config, --target, --image and --sig-alg are required")
	}
	if (*sigFile == "") == (*sigB64 == "") {
		return flashArgs{}, usagef("flash: give exactly one of --sig-file and --sig")
	}
	alg, ok := sigAlgs[*sigAlg]
	if !ok {
		return flashArgs{}, usagef("flash: unknown --sig-alg %q", *sigAlg)
	}
	var sig []byte
	var err error
	if *sigFile != "" {
		sig, err = os.ReadFile(*sigFile)
	} else {
		sig, err = base64.StdEncoding.DecodeString(*sigB64)
	}
	if err != nil {
		return flashArgs{}, usagef("flash: signature: %v", err)
	}
	return flashArgs{cfgPath: *cfgPath, target: *target, image: *image, certName: *certName, sig: sig, alg: alg,
		blockSize: uint32(*blockSize), activate: *activate}, nil
}

// beginRequest is the session a job carrying this image would open. The job id is derived
// from the signature: flashing the same image again resumes an interrupted run, a different
// image gets its own session.
func beginRequest(a flashArgs, cfg *config.Config, sel targetSel, size int64) *otav1.BeginSessionRequest {
	bs := a.blockSize
	if bs == 0 {
		bs = cfg.MaxBlockSize
	}
	sum := sha256.Sum256(a.sig)
	return &otav1.BeginSessionRequest{
		JobId:        "flash-" + hex.EncodeToString(sum[:8]),
		FileType:     sel.fileType,
		FilePath:     sel.filePath,
		FileSize:     uint64(size),
		BlockSize:    bs,
		SigAlgorithm: a.alg,
		Signature:    a.sig,
		CertName:     a.certName,
	}
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

// flashImage runs one session through w: begin (or resume), write the missing blocks,
// finish (read back and verify), and optionally activate. On failure the session is left for
// a resume, as with ota-net.
func flashImage(ctx context.Context, w api.Writer, req *otav1.BeginSessionRequest, img io.ReaderAt, activate bool, prog progress) (*flashResult, error) {
	begin, err := w.Begin(ctx, req)
	if err != nil {
		return nil, err
	}
	if err := writeMissing(ctx, w, begin, int64(req.GetFileSize()), img, prog); err != nil {
		return nil, err
	}
	prog.verifying()
	id := begin.GetSession().GetSessionId()
	res := &flashResult{}
	if res.finish, err = w.Finish(ctx, id); err != nil {
		return nil, err
	}
	if activate {
		if res.activate, err = w.Activate(ctx, id); err != nil {
			return res, err
		}
	}
	return res, nil
}

// writeMissing writes the blocks of img the session still misses (all of them unless it
// was resumed) in batches of at most flashBatch bytes from one reused buffer; the last
// write asks for a sync.
func writeMissing(ctx context.Context, w api.Writer, begin *otav1.BeginSessionResponse, size int64, img io.ReaderAt, prog progress) error {
	sess := begin.GetSession()
	bs := int64(sess.GetBlockSize())
	if bs <= 0 {
		return status.Errorf(otav1.Reason_REASON_OTHER, "writer returned block size %d", bs)
	}
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
		if _, err := w.Write(ctx, sess.GetSessionId(), blocks, last); err != nil {
			return err
		}
		blocks = blocks[:0]
		prog.set(written)
		return nil
	}
	for k := range total {
		if err := ctx.Err(); err != nil {
			return status.Errorf(otav1.Reason_REASON_USER_ABORT, "flash interrupted: %w", err)
		}
		off := k * bs
		n := min(bs, size-off)
		written += n
		if !isMissing(k) {
			continue
		}
		slot := buf[int64(len(blocks))*bs:][:n]
		if _, err := img.ReadAt(slot, off); err != nil {
			return status.Errorf(otav1.Reason_REASON_OTHER, "reading image at %d: %w", off, err)
		}
		blocks = append(blocks, &otav1.Block{Offset: uint64(off), Data: slot})
		if len(blocks) == int(perBatch) {
			if err := flush(false); err != nil {
				return err
			}
		}
	}
	return flush(true)
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
